"""Test-only FLARE components for the personalisation tests, shipped to simulated sites as the job's custom code:
a probe of everything a site sends, a site that sends its local part, and a site that records its local part at
the start and end of every round."""

import hashlib
import json
from pathlib import Path

import numpy as np
from nvflare.apis.dxo import from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import FLContextKey, ReturnCode

from fedfms.flare.executor import FedFMSExecutor, tensors_to_numpy


def _append(path: Path, entry: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(entry) + "\n")


class ProbeFilter(Filter):
    """The last result filter of a site: records, for every task result that leaves it, the task, the data kind,
    the tensor keys (and, for train results, the arrays)."""

    def __init__(self, out_dir):
        super().__init__()
        self.out_dir = Path(out_dir)

    def process(self, shareable, fl_ctx):
        site = fl_ctx.get_identity_name()
        task = fl_ctx.get_prop(FLContextKey.TASK_NAME)
        entry = {"site": site, "task": task, "rc": shareable.get_return_code(ReturnCode.OK)}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        try:
            dxo = from_shareable(shareable)
            entry["kind"] = dxo.data_kind
            entry["keys"] = sorted(k for k, v in dxo.data.items() if isinstance(v, np.ndarray))
            entry["fields"] = sorted(dxo.data)
            rnd = shareable.get_header("current_round")
            if task == "train" and rnd is not None:
                np.savez(self.out_dir / f"{site}_r{rnd}.npz", **dxo.data)
        except Exception as exc:  # an error reply carries no DXO
            entry["kind"] = f"no DXO ({type(exc).__name__})"
        _append(self.out_dir / "sent.jsonl", entry)
        return shareable


class LeakingExecutor(FedFMSExecutor):
    """A site that also sends its local part with every training result."""

    def _train(self, shareable, fl_ctx, abort_signal):
        result = super()._train(shareable, fl_ctx, abort_signal)
        if result.get_return_code(ReturnCode.OK) != ReturnCode.OK:
            return result
        dxo = from_shareable(result)
        dxo.data.update(tensors_to_numpy(self.trainer.local_weights()))
        return dxo.to_shareable()


def local_digest(weights) -> str:
    h = hashlib.sha256()
    for key in sorted(weights):
        h.update(key.encode())
        h.update(np.ascontiguousarray(np.asarray(weights[key], dtype=np.float32)).tobytes())
    return h.hexdigest()


class LocalPartRecordingExecutor(FedFMSExecutor):
    """Records a digest of the site's local part when each round starts and ends, and the process it ran in."""

    def __init__(self, out_dir, **kwargs):
        super().__init__(**kwargs)
        self.out_dir = Path(out_dir)

    def _train(self, shareable, fl_ctx, abort_signal):
        import os

        rnd = shareable.get_header("current_round")
        start = local_digest(tensors_to_numpy(self.trainer.local_weights()))
        result = super()._train(shareable, fl_ctx, abort_signal)
        end = local_digest(tensors_to_numpy(self.trainer.local_weights()))
        _append(self.out_dir / "local.jsonl", {"site": fl_ctx.get_identity_name(), "round": rnd, "start": start,
                                                 "end": end, "pid": os.getpid()})
        return result

    def _personalise(self, shareable, fl_ctx, abort_signal):
        import os

        _append(self.out_dir / "local.jsonl", {"site": fl_ctx.get_identity_name(), "round": "personalise",
                                                 "start": local_digest(tensors_to_numpy(self.trainer.local_weights())),
                                                 "pid": os.getpid()})
        return super()._personalise(shareable, fl_ctx, abort_signal)
