"""Test-only FLARE components, shipped to simulated sites as the job's custom code.

They observe (or corrupt) what a site sends so the tests can check FLARE's behaviour from outside."""

import hashlib
import json
from pathlib import Path

import numpy as np
from nvflare.apis.dxo import MetaKey, from_shareable
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.shareable import ReturnCode

from fedfms.flare.executor import FedFMSExecutor
from fedfms.models.travel import is_travel_key


def _frozen_digest(model, mode):
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        if not is_travel_key(key, mode):
            h.update(key.encode())
            h.update(value.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def weights_digest(weights) -> str:
    """SHA-256 of a key -> array dict, values as float32 (how the sites receive them)."""
    h = hashlib.sha256()
    for key in sorted(weights):
        h.update(key.encode())
        h.update(np.ascontiguousarray(np.asarray(weights[key], dtype=np.float32)).tobytes())
    return h.hexdigest()


class RecordingFilter(DXOFilter):
    """Saves exactly what leaves the site (after the travel-set filter) for each train result."""

    def __init__(self, out_dir):
        super().__init__(supported_data_kinds=None, data_kinds_to_filter=None)
        self.out_dir = Path(out_dir)
        self.count = 0

    def process_dxo(self, dxo, shareable, fl_ctx):
        site = fl_ctx.get_identity_name()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        rnd = shareable.get_header("current_round")  # set by the executor on train results only
        name = f"{site}_r{rnd}" if rnd is not None else f"{site}_submit{self.count}"
        np.savez(self.out_dir / f"{name}.npz", **dxo.data)
        meta = {"num_samples": dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND),
                "nbytes": int(sum(np.asarray(v).nbytes for v in dxo.data.values())),
                "initial_metrics": dxo.get_meta_prop(MetaKey.INITIAL_METRICS)}
        (self.out_dir / f"{name}.json").write_text(json.dumps(meta))
        self.count += 1
        return dxo


class RecordingExecutor(FedFMSExecutor):
    """Records a digest of the frozen (non-travelling) weights before and after every round."""

    def __init__(self, out_dir=None, **kwargs):
        super().__init__(**kwargs)
        self.out_dir = Path(out_dir) if out_dir else None

    def _train(self, shareable, fl_ctx, abort_signal):
        if self.out_dir is None:
            return super()._train(shareable, fl_ctx, abort_signal)
        mode = self.trainer.mode
        incoming = from_shareable(shareable).data  # the global model this round starts from
        rnd = shareable.get_header("current_round")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"{fl_ctx.get_identity_name()}_in_r{rnd}.json").write_text(json.dumps(weights_digest(incoming)))
        np.savez(self.out_dir / f"{fl_ctx.get_identity_name()}_in_r{rnd}.npz", **{k: np.asarray(v) for k, v in incoming.items()})
        before = _frozen_digest(self.trainer.model, mode)
        result = super()._train(shareable, fl_ctx, abort_signal)
        after = _frozen_digest(self.trainer.model, mode)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"{fl_ctx.get_identity_name()}_frozen.json"
        log = json.loads(path.read_text()) if path.exists() else []
        path.write_text(json.dumps(log + [{"before": before, "after": after}]))
        return result


class CorruptingExecutor(FedFMSExecutor):
    """A broken or malicious site: sends NaN weights, or adds an encoder tensor to its result."""

    def __init__(self, corruption, **kwargs):
        super().__init__(**kwargs)
        self.corruption = corruption

    def _train(self, shareable, fl_ctx, abort_signal):
        result = super()._train(shareable, fl_ctx, abort_signal)
        if result.get_return_code(ReturnCode.OK) != ReturnCode.OK:
            return result
        dxo = from_shareable(result)
        if self.corruption == "nan":
            key = sorted(dxo.data)[0]
            dxo.data[key] = np.full_like(dxo.data[key], np.nan)
        elif self.corruption == "encoder":
            state = self.trainer.model.state_dict()
            dxo.data["image_encoder.patch_embed.proj.weight"] = state["image_encoder.patch_embed.proj.weight"].cpu().numpy()
        return dxo.to_shareable()


class SlowFilter(DXOFilter):
    """A slow site: its train results leave ``seconds`` late (as if its GPU were slower than the others')."""

    def __init__(self, seconds):
        super().__init__(supported_data_kinds=None, data_kinds_to_filter=None)
        self.seconds = float(seconds)

    def process_dxo(self, dxo, shareable, fl_ctx):
        import time

        time.sleep(self.seconds)
        return dxo


class PoisonFilter(DXOFilter):
    """A malicious site: a result filter *after* the project's own that rewrites what is sent.

    kind: "scale_count" (weights x1000, sample count 1e9), "huge_count" (1e18), "string_dtype" (one tensor
    of the right shape as strings), "nan_dice" (NaN weights while claiming validation Dice 1.0),
    "scale" (weights x1000 with the honest count: only a robust aggregator stops it)."""

    def __init__(self, kind, out_dir=None):
        super().__init__(supported_data_kinds=None, data_kinds_to_filter=None)
        self.kind = kind
        self.out_dir = Path(out_dir) if out_dir else None

    def process_dxo(self, dxo, shareable, fl_ctx):
        first = sorted(dxo.data)[0]
        if self.kind in ("scale_count", "scale"):
            dxo.data = {k: v * 1000 for k, v in dxo.data.items()}
            if self.kind == "scale_count":
                dxo.set_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND, 10**9)
        elif self.kind == "huge_count":
            dxo.set_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND, 10**18)
        elif self.kind == "string_dtype":
            dxo.data[first] = np.full(dxo.data[first].shape, "x")
        elif self.kind == "nan_dice":
            dxo.data[first] = np.full_like(dxo.data[first], np.nan)
            dxo.set_meta_prop(MetaKey.INITIAL_METRICS, {"val_dice": 1.0})
        else:
            raise ValueError(self.kind)
        if self.out_dir is not None:  # what this site really sent, for the test's own average
            site = fl_ctx.get_identity_name()
            self.out_dir.mkdir(parents=True, exist_ok=True)
            rnd = shareable.get_header("current_round", 0)
            np.savez(self.out_dir / f"{site}_r{rnd}.npz",
                     **{k: np.asarray(v) for k, v in dxo.data.items() if np.asarray(v).dtype.kind == "f"})
        return dxo


class FailingExecutor(RecordingExecutor):
    """A site whose training raises from round ``from_round`` on (a broken GPU, a full disk, ...)."""

    def __init__(self, from_round=0, **kwargs):
        super().__init__(**kwargs)
        self.from_round = int(from_round)

    def _train(self, shareable, fl_ctx, abort_signal):
        current_round = shareable.get_header("current_round", 0)
        if current_round >= self.from_round:
            raise RuntimeError(f"simulated failure in round {current_round}")
        return super()._train(shareable, fl_ctx, abort_signal)
