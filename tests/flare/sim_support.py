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


class RecordingFilter(DXOFilter):
    """Saves exactly what leaves the site (after the travel-set filter) for each train result."""

    def __init__(self, out_dir):
        super().__init__(supported_data_kinds=None, data_kinds_to_filter=None)
        self.out_dir = Path(out_dir)
        self.count = 0

    def process_dxo(self, dxo, shareable, fl_ctx):
        site = fl_ctx.get_identity_name()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        np.savez(self.out_dir / f"{site}_r{self.count}.npz", **dxo.data)
        meta = {"num_samples": dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND),
                "nbytes": int(sum(np.asarray(v).nbytes for v in dxo.data.values()))}
        (self.out_dir / f"{site}_r{self.count}.json").write_text(json.dumps(meta))
        self.count += 1
        return dxo


class RecordingExecutor(FedFMSExecutor):
    """Records a digest of the frozen (non-travelling) weights before and after every round."""

    def __init__(self, out_dir, **kwargs):
        super().__init__(**kwargs)
        self.out_dir = Path(out_dir)

    def _train(self, shareable, fl_ctx, abort_signal):
        mode = self.trainer.mode
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
