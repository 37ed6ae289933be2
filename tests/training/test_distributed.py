"""A site's round as PyTorch DDP processes (fedfms.training.distributed): on a CPU with gloo and two processes it
gives the single process's update, reports the site's sample count once, and a failing or slow rank ends the
round with a one-line error instead of a hang."""

from __future__ import annotations

import sys
import time

import psutil
import pytest
import torch
from torch.utils.data import RandomSampler, SequentialSampler

from fedfms.models import ModelConfig
from fedfms.training.distributed import (OPTIMIZER_FILE, DistributedRoundError, RoundAborted, ShardedBatchSampler,
                                         launch_round)
from fedfms.training.trainer import LocalTrainer, TrainConfig

# fedsam: every tensor trains, including the prompt encoder's and IoU head's that the prompt-free forward never
# uses (DDP must leave them as one process does, with weight decay on); batch 5 over 2 processes: 3 + 2 samples,
# and the epoch's last batch (32 = 6 x 5 + 2) 1 + 1; shuffled, as the trainer always trains
MODEL = ModelConfig("tiny", "fedsam", num_classes=1, pretrained=False)
TRAIN = TrainConfig(lr=1e-3, loss="bce_dice", batch_size=5, epochs=2, weight_decay=0.01, progress=False, threads=1)
# Tolerances after a round (14 Adam steps of lr 1e-3). DDP sums in another order (two part-batch means, then a
# gloo all-reduce, against one mean): ~1e-7 relative in each gradient. Adam divides by the gradient's own size, so
# where the true gradient is zero the summation noise itself takes steps: the attention key biases (softmax does
# not change when every key moves by the same vector) move ~1e-5 on noise, and one process alone, run with 1 or 2
# threads, differs by 1.7e-5 there (measured, FedMSA on this site). Hence ATOL = 1e-4 on every element (10 % of one
# Adam step) and, on the whole round's update (all travel tensors as one vector), |DDP - single| / |single| <=
# REL = 1e-3 (measured here: max element 3.2e-6 / 5.6e-7, relative 6.3e-7 / 2.2e-7 in rounds 1 / 2; FedMSA, whose
# update is smaller, batch 6: 1.3e-5 and 4.3e-5). What the test must catch is far larger: averaging the ranks'
# means without weighting the uneven 3 + 2 parts differs by 3.5e-3 per element, another shuffle order by 1e-2.
ATOL = 1e-4
REL = 1e-3


def no_process_left(work_dir) -> bool:
    """No torchrun or rank of this work folder still runs."""
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(str(work_dir) in part for part in proc.info["cmdline"] or []):
                return False
        except psutil.Error:
            continue
    return True


@pytest.mark.parametrize("batch_size,world", [(6, 2), (5, 2), (4, 3), (7, 3)])
def test_shards_are_the_single_process_batches_with_weights_summing_to_one(batch_size, world):
    sampler = RandomSampler(range(32), generator=torch.Generator().manual_seed(0))
    order = list(sampler)  # the generator is re-seeded below: each pass gives this order
    batches = [order[i:i + batch_size] for i in range(0, 32, batch_size)]
    shards = [ShardedBatchSampler(sampler, batch_size, rank, world) for rank in range(world)]
    parts = []
    for shard in shards:
        sampler.generator.manual_seed(0)
        parts.append(list(shard))
    assert all(len(p) == len(batches) == len(s) for p, s in zip(parts, shards))
    for step, batch in enumerate(batches):
        weights = [s.share(step) for s in shards]
        assert sum(weights) == pytest.approx(1.0)
        assert sum(s.grad_scale(step) for s in shards) == pytest.approx(world)
        used = [p[step] for p, w in zip(parts, weights) if w > 0]
        assert sorted(i for part in used for i in part) == sorted(batch)
        assert all(len(part) in (len(batch) // world, -(-len(batch) // world)) for part in used)


def test_a_rank_without_samples_in_a_batch_takes_one_with_weight_zero():
    # 7 samples, batch 3, 3 ranks: the last batch holds one sample; ranks 1 and 2 take part in the step with it
    shards = [ShardedBatchSampler(SequentialSampler(range(7)), 3, rank, 3) for rank in range(3)]
    assert [list(s)[-1] for s in shards] == [[6], [6], [6]]
    assert [s.share(2) for s in shards] == [1.0, 0.0, 0.0]
    assert [list(s)[0] for s in shards] == [[0], [1], [2]]


def test_a_single_process_trainer_is_untouched_by_the_hooks(disc_site):
    trainer = LocalTrainer(MODEL, TRAIN, str(disc_site))
    assert trainer.shard is None and trainer.train_module is trainer.model


@pytest.mark.integration
def test_two_gloo_processes_give_the_single_process_update(disc_site, tmp_path):
    single = LocalTrainer(MODEL, TRAIN, str(disc_site))
    start = single.travel_weights()
    work = tmp_path / "ddp"
    previous = start
    for rnd in range(2):  # the second round continues the first (shuffle seed, Adam's moments), as one trainer does
        expected = single.train_round(previous)
        began = time.perf_counter()
        got = launch_round(MODEL.to_dict(), TRAIN.to_dict(), str(disc_site), previous, 2, work, rounds_done=rnd,
                           optimizer_state=work / OPTIMIZER_FILE if rnd else None, timeout_s=300)
        seconds = time.perf_counter() - began
        assert set(got.weights) == set(expected.weights)
        keys = sorted(expected.weights)
        error = torch.cat([(got.weights[k] - expected.weights[k]).flatten().double() for k in keys])
        update = torch.cat([(expected.weights[k] - previous[k]).flatten().double() for k in keys])
        diff, rel = error.abs().max().item(), (error.norm() / update.norm()).item()
        print(f"round {rnd}: max |DDP - single| = {diff:.3g}, relative to the update {rel:.3g}, "
              f"max move {update.abs().max():.3g}, launch {seconds:.1f} s")
        assert diff <= ATOL and rel <= REL, (rnd, diff, rel)
        assert update.abs().max() > 1e-3
        # the site's training samples, once (not times the processes), and the same steps
        assert got.num_samples == expected.num_samples == single.num_train_samples == 32
        assert got.metrics["train"]["steps"] == expected.metrics["train"]["steps"] == 14
        assert got.metrics["train"]["processes"] == 2
        assert got.metrics["train"]["loss"] == pytest.approx(expected.metrics["train"]["loss"], rel=1e-5)
        assert got.metrics["val_before"]["dice"] == pytest.approx(expected.metrics["val_before"]["dice"], abs=1e-6)
        previous = got.weights
    assert no_process_left(work)


@pytest.mark.integration
def test_a_failing_rank_ends_the_round_with_one_line_naming_its_log(disc_site, tmp_path):
    # rank 1 breaks when training starts, while rank 0 waits for it in the first gradient exchange
    entry = tmp_path / "broken_rank.py"
    entry.write_text(
        "import os, sys\n"
        "from fedfms.training import distributed, trainer\n"
        "def broken(self, *args, **kwargs):\n"
        "    raise RuntimeError('rank 1 broke on purpose')\n"
        "if os.environ['RANK'] == '1':\n"
        "    trainer.LocalTrainer.fit = broken\n"
        "sys.exit(distributed.main())\n")
    work = tmp_path / "ddp"
    began = time.perf_counter()
    with pytest.raises(DistributedRoundError) as info:
        launch_round(MODEL.to_dict(), TRAIN.to_dict(), str(disc_site), None, 2, work, entry=[str(entry)], timeout_s=240)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("rank 1 of 2 failed: RuntimeError: rank 1 broke on purpose (log: ")
    assert str(work / "logs" / "rank1.log") in message
    assert "rank 1 broke on purpose" in (work / "logs" / "rank1.log").read_text()  # the traceback is in the log
    assert time.perf_counter() - began < 200  # torchrun ended rank 0 rather than waiting out the 240 s
    assert no_process_left(work)


@pytest.mark.integration
def test_timeout_and_abort_end_every_process(disc_site, tmp_path):
    args = (MODEL.to_dict(), TRAIN.to_dict(), str(disc_site), None, 2)
    with pytest.raises(DistributedRoundError, match=r"took longer than 2 s and was ended \(logs: "):
        launch_round(*args, tmp_path / "slow", timeout_s=2)
    assert no_process_left(tmp_path / "slow")
    began = time.perf_counter()
    with pytest.raises(RoundAborted):
        launch_round(*args, tmp_path / "aborted", should_abort=lambda: time.perf_counter() - began > 1)
    assert no_process_left(tmp_path / "aborted")


def test_the_launcher_runs_this_python(tmp_path):
    from fedfms.training.distributed import torchrun_command

    cmd = torchrun_command(4, tmp_path / "in.pt", tmp_path / "out.pt", tmp_path / "logs")
    assert cmd[:4] == [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    assert cmd[cmd.index("--nproc_per_node") + 1] == "4"
    assert cmd[cmd.index("-m", 3) + 1] == "fedfms.training.distributed"
