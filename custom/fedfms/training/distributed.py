"""One site's local round on several GPUs (or CPU processes) with PyTorch DistributedDataParallel.

FLARE's multi-GPU pattern: the site's client process launches ``torchrun`` for the round, the ranks train one
model together, and rank 0 alone hands back what the site reports (the travel set, the site's sample count
once, the metrics). Nothing here knows FLARE; :func:`launch_round` is what a site's executor calls.

Each rank runs this module::

    python -m torch.distributed.run --standalone --nproc_per_node N -m fedfms.training.distributed \\
        --in round_in.pt --out round_out.pt --log-dir logs/

``round_in.pt`` (written by :func:`write_round_input`) holds the model and train configs, the site's data
folder(s), the global travel set, the rounds already done and where the previous round's optimiser state is;
rank 0 writes ``round_out.pt`` with the new travel set, the sample count and the metrics, and the optimiser
state to ``optimizer.pt`` beside it (Adam's moments, which one long-lived trainer keeps from round to round).

The same update as one process. Every rank builds the single process's batch order (the same sampler, seeded
the same way), cuts it into the same batches of ``batch_size`` and takes the samples at positions
``rank, rank + N, ...`` of each; each rank's loss is scaled by (its samples x N / the batch's samples), so the
gradient DistributedDataParallel averages over the ranks is the gradient of the batch's mean loss, and one
optimiser step follows per batch on every rank, as in one process. The per-rank batch is therefore
``batch_size / N`` when N divides ``batch_size``; when it does not, the ranks hold ``ceil`` or ``floor`` of it and
the scaling still weighs every sample equally (nothing is dropped or repeated). A batch with fewer samples than
ranks (the last of an epoch) leaves some ranks none: they run one sample with weight 0, so that every rank takes
part in every gradient exchange. (PyTorch's ``DistributedSampler`` would instead shuffle differently from one
process and pad the data with repeated samples when N does not divide it.) Results differ from one process only
by floating-point summation order.

Devices: on CUDA each rank uses ``cuda:LOCAL_RANK`` with the NCCL backend (choose GPUs with
``CUDA_VISIBLE_DEVICES``); on a CPU, gloo.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from torch.utils.data import ConcatDataset, Sampler

from fedfms.errors import ConfigError, FedFMSError
from fedfms.models import ModelConfig
from fedfms.processes import stop_group
from fedfms.training.trainer import LocalTrainer, RoundResult, TrainConfig, pick_device, should_cache


def check_processes_per_site(value, where: str) -> int:
    """``processes_per_site`` as a whole number >= 1 (1: the site trains in its own process), or a ConfigError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where} is {value!r}; expected a whole number >= 1 (one DDP process per GPU; "
                          "1: train in the site's own process)")
    return value

ENTRY_MODULE = "fedfms.training.distributed"
ERROR_FILE = "rank{rank}.error.json"
LOG_FILE = "rank{rank}.log"
OPTIMIZER_FILE = "optimizer.pt"


class DistributedRoundError(FedFMSError, RuntimeError):
    """The multi-process round failed; the message is one line naming the failing rank's log."""


class RoundAborted(RuntimeError):
    """The round was stopped on request (``should_abort``); its processes were ended."""


# ---------------------------------------------------------------------------------------------- sharding
class ShardedBatchSampler(Sampler[list[int]]):
    """This rank's part of each batch one process would make from ``sampler`` (see the module's docstring)."""

    def __init__(self, sampler: Sampler[int], batch_size: int, rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of {world_size}")
        self.sampler, self.batch_size, self.rank, self.world_size = sampler, batch_size, rank, world_size

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def __iter__(self):
        batch: list[int] = []
        for index in self.sampler:
            batch.append(index)
            if len(batch) == self.batch_size:
                yield self._part(batch)
                batch = []
        if batch:
            yield self._part(batch)

    def _part(self, batch: list[int]) -> list[int]:
        return batch[self.rank::self.world_size] or batch[:1]  # none of this batch: one sample, weighted 0

    def _sizes(self, step: int) -> tuple[int, int]:
        whole = min(self.batch_size, len(self.sampler) - step * self.batch_size)
        return len(range(self.rank, whole, self.world_size)), whole

    def share(self, step: int) -> float:
        """This rank's samples / the batch's samples: its mean loss's weight in the batch's mean loss."""
        mine, whole = self._sizes(step)
        return mine / whole

    def grad_scale(self, step: int) -> float:
        """The factor on this rank's loss so that the ranks' averaged gradient is the batch's."""
        return self.share(step) * self.world_size


# ---------------------------------------------------------------------------------------------- the ranks
def write_round_input(path: str | os.PathLike, model_config: Mapping, train_config: Mapping, site_dir: str | Sequence[str],
                      global_weights: Mapping[str, torch.Tensor] | None, rounds_done: int = 0,
                      optimizer_state: str | os.PathLike | None = None) -> None:
    site = [str(d) for d in site_dir] if isinstance(site_dir, (list, tuple)) else str(site_dir)
    torch.save({"model_config": dict(model_config), "train_config": dict(train_config), "site_dir": site,
                "weights": None if global_weights is None else {k: torch.as_tensor(v).cpu() for k, v in global_weights.items()},
                "rounds_done": int(rounds_done), "optimizer_state": None if optimizer_state is None else str(optimizer_state)}, path)


def _preload_shared(trainer: LocalTrainer, setting, world_size: int) -> None:
    """Decoded-image caching when every rank keeps its own copy: "auto" budgets a quarter of the free memory
    for all ranks together, not each."""
    parts = trainer.datasets["all"].datasets if isinstance(trainer.datasets["all"], ConcatDataset) else [trainer.datasets["all"]]
    needed = sum(p.decoded_bytes() for p in parts)
    if setting == "auto":
        try:
            import psutil

            available = psutil.virtual_memory().available
        except ImportError:  # pragma: no cover
            available = 0
        cache = should_cache("auto", needed * world_size, available)
    else:
        cache = should_cache(setting, needed)
    if cache:
        for part in parts:
            part.preload()
    trainer.cached = cache


def run_rank(spec: dict, rank: int, local_rank: int, world_size: int) -> tuple[LocalTrainer, dict]:
    """This rank's round inside an initialised process group: build the trainer, train with DDP, and return the
    trainer and the round's metrics (the same on every rank except ``val_before``, which rank 0 alone computes)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    train = dict(spec["train_config"])
    cache_setting = train.get("cache_decoded", "auto")
    train["cache_decoded"] = False  # decided below, for all ranks together
    if pick_device(train.get("device", "auto")).type == "cuda":
        train["device"] = f"cuda:{local_rank}"
        if train.get("num_workers", "auto") == "auto":  # the spare cores shared between the ranks' loaders
            train["num_workers"] = min(8, max(1, ((os.cpu_count() or 2) - 1) // world_size))
    if world_size > 1:
        train["progress"] = False
    trainer = LocalTrainer(ModelConfig.from_dict(spec["model_config"]), TrainConfig.from_dict(train), spec["site_dir"])
    _preload_shared(trainer, cache_setting, world_size)
    trainer.rounds_done = spec.get("rounds_done", 0)
    if spec.get("weights") is not None:
        trainer.load_travel_weights(spec["weights"])
    if spec.get("optimizer_state") is not None:
        trainer.optimizer.load_state_dict(torch.load(spec["optimizer_state"], map_location="cpu", weights_only=True))
    metrics: dict = {}
    if rank == 0 and len(trainer.datasets["val"]):
        metrics["val_before"] = trainer.evaluate("val")  # of the received model, as LocalTrainer.train_round
    dist.barrier()
    cuda = trainer.device.type == "cuda"
    # the prompt encoder's point/mask embeddings and the IoU head never take part in the prompt-free forward:
    # DDP must be told, and leaves their gradients unset as one process does
    trainer.train_module = DistributedDataParallel(trainer.model, device_ids=[trainer.device.index] if cuda else None,
                                                   find_unused_parameters=True)
    trainer.shard = lambda sampler, batch_size: ShardedBatchSampler(sampler, batch_size, rank, world_size)
    fit = trainer.fit()
    # each rank's loss is its share of the batches' mean losses: the sum over the ranks is the site's
    loss = torch.tensor([fit["loss"]], dtype=torch.float64, device=trainer.device)
    dist.all_reduce(loss)
    metrics["train"] = {**fit, "loss": loss.item(), "processes": world_size}
    return trainer, metrics


def _redirect_output(log_dir: str | None, rank: int) -> None:
    """Send this rank's stdout and stderr (Python's and the C++ layers') to its own log file."""
    if not log_dir:
        return
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    fd = os.open(Path(log_dir) / LOG_FILE.format(rank=rank), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one rank of a site's multi-process (DDP) round; launched by torchrun")
    parser.add_argument("--in", dest="inp", required=True, help="round input file (write_round_input)")
    parser.add_argument("--out", required=True, help="file rank 0 writes: weights, num_samples, metrics (and optimizer.pt beside it)")
    parser.add_argument("--log-dir", default=None, help="folder for rank<r>.log and, on failure, rank<r>.error.json")
    parser.add_argument("--timeout-min", type=float, default=60.0, help="how long a rank waits for the others in a collective")
    args = parser.parse_args(argv)
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    _redirect_output(args.log_dir, rank)

    import torch.distributed as dist

    try:
        spec = torch.load(args.inp, weights_only=True)  # tensors and plain values only: never unpickles code
        cuda = pick_device(spec["train_config"].get("device", "auto")).type == "cuda"
        if cuda:
            if local_rank >= torch.cuda.device_count():
                here = os.environ.get("LOCAL_WORLD_SIZE", world_size)
                raise ConfigError(f"{here} processes on this machine but {torch.cuda.device_count()} GPU(s) visible; one process "
                                  "per GPU (set processes_per_site to the GPU count, or choose GPUs with CUDA_VISIBLE_DEVICES)")
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=args.timeout_min))
        trainer, metrics = run_rank(spec, rank, local_rank, world_size)
        if rank == 0:
            out = Path(args.out)
            for path, content in ((out.parent / OPTIMIZER_FILE, trainer.optimizer.state_dict()),
                                  (out, {"weights": trainer.travel_weights(), "num_samples": trainer.num_train_samples,
                                         "metrics": metrics, "rounds_done": trainer.rounds_done})):
                tmp = path.with_suffix(".partial")
                torch.save(content, tmp)
                os.replace(tmp, path)  # the launcher never reads a half-written file
        dist.barrier()
        dist.destroy_process_group()
        return 0
    except BaseException as exc:
        traceback.print_exc()
        if args.log_dir:
            record = {"rank": rank, "time": time.time(), "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:500]}
            (Path(args.log_dir) / ERROR_FILE.format(rank=rank)).write_text(json.dumps(record))
        return 1


# ---------------------------------------------------------------------------------------------- the launcher
def torchrun_command(nproc: int, inp: str | os.PathLike, out: str | os.PathLike, log_dir: str | os.PathLike,
                     entry: Sequence[str] = ("-m", ENTRY_MODULE), python: str = sys.executable) -> list[str]:
    """``torchrun --standalone`` (a free local port for the ranks to meet) with this module as each rank."""
    return [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "--max_restarts", "0",
            *entry, "--in", str(inp), "--out", str(out), "--log-dir", str(log_dir)]


def _failure(log_dir: Path, nproc: int, rc: int, launcher_log: Path) -> str:
    """One line: the first rank that failed, its error and its log (or torchrun's own log when no rank said)."""
    records = []
    for path in log_dir.glob("rank*.error.json"):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    if records:
        first = min(records, key=lambda r: r["time"])
        log = log_dir / LOG_FILE.format(rank=first["rank"])
        return f"rank {first['rank']} of {nproc} failed: {first['error']} (log: {log})"
    logs = ", ".join(str(log_dir / LOG_FILE.format(rank=r)) for r in range(nproc))
    return f"torchrun exited with code {rc} and no rank reported an error (logs: {launcher_log}, {logs})"


def launch_round(model_config: Mapping, train_config: Mapping, site_dir: str | Sequence[str],
                 global_weights: Mapping[str, torch.Tensor] | None, nproc: int, work_dir: str | os.PathLike | None = None, *,
                 rounds_done: int = 0, optimizer_state: str | os.PathLike | None = None, timeout_s: float | None = None,
                 should_abort: Callable[[], bool] | None = None, entry: Sequence[str] = ("-m", ENTRY_MODULE),
                 env: Mapping[str, str] | None = None, poll_s: float = 0.5) -> RoundResult:
    """Run one local round as ``nproc`` DDP processes under ``torchrun`` and return rank 0's
    :class:`RoundResult` (``num_samples``: the site's training samples, once). ``rounds_done`` and
    ``optimizer_state`` (a file: the previous round's ``<work_dir>/optimizer.pt``) let rounds continue as in one
    long-lived :class:`LocalTrainer` (same shuffle seeds, Adam's moments kept); rank 0 writes this round's
    optimiser state to ``<work_dir>/optimizer.pt``.

    Bounded: after ``timeout_s`` seconds, or as soon as ``should_abort()`` is true, torchrun and every rank are
    ended (SIGTERM, then SIGKILL) and :class:`DistributedRoundError` (timeout) or :class:`RoundAborted` is
    raised. A failing rank makes torchrun end the others; the error is one line naming the rank and its log
    (``<work_dir>/logs/rank<r>.log``)."""
    if nproc < 1:
        raise ValueError(f"nproc is {nproc}; expected at least 1")
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="fedfms_ddp_"))
    work.mkdir(parents=True, exist_ok=True)
    inp, out, log_dir = work / "round_in.pt", work / "round_out.pt", work / "logs"
    for stale in (out, *log_dir.glob("rank*")):  # (optimizer.pt stays: it may be this round's input)
        stale.unlink(missing_ok=True)
    log_dir.mkdir(exist_ok=True)
    write_round_input(inp, model_config, train_config, site_dir, global_weights, rounds_done, optimizer_state)
    launcher_log = log_dir / "torchrun.log"
    with open(launcher_log, "wb") as sink:
        proc = subprocess.Popen(torchrun_command(nproc, inp, out, log_dir, entry), stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True, env={**os.environ, **(env or {})})
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            while proc.poll() is None:
                if should_abort and should_abort():
                    stop_group(proc)
                    raise RoundAborted(f"the {nproc}-process round was aborted; its processes were ended")
                if deadline is not None and time.monotonic() > deadline:
                    stop_group(proc)
                    raise DistributedRoundError(f"the {nproc}-process round took longer than {timeout_s:g} s and was ended "
                                                f"(logs: {log_dir})")
                time.sleep(poll_s)
        except BaseException:
            if proc.poll() is None:  # KeyboardInterrupt and the like: never leave the ranks behind
                stop_group(proc)
            raise
    if proc.returncode != 0 or not out.is_file():
        raise DistributedRoundError(_failure(log_dir, nproc, proc.returncode, launcher_log))
    result = torch.load(out, weights_only=True)
    return RoundResult(result["weights"], result["num_samples"], result["metrics"])


if __name__ == "__main__":
    sys.exit(main())
