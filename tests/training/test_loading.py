"""What keeps a GPU fed: loader processes, persistent loaders and decoded images kept in RAM — without
changing a single sample or the order of an epoch."""

import pytest
import torch

from fedfms.data.site_dataset import SiteDataset
from fedfms.errors import ConfigError
from fedfms.models import ModelConfig
from fedfms.training.trainer import LocalTrainer, TrainConfig, resolve_num_workers, should_cache

TINY = ModelConfig(variant="tiny", mode="fedmsa", pretrained=False)


def test_preloaded_samples_are_the_decoded_files(disc_site):
    plain, cached = SiteDataset(disc_site), SiteDataset(disc_site)
    cached.preload()
    first_image = disc_site / cached.manifest.samples[0].image
    item0 = cached[0]
    first_image.unlink()  # the cache no longer needs the file
    assert torch.equal(cached[0]["image"], item0["image"])
    for i in range(1, len(plain)):
        a, b = plain[i], cached[i]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"]) and a["id"] == b["id"]
    assert cached.decoded_bytes() == len(cached) * (3 * 128 * 128 + 32 * 32)


def test_cache_and_worker_decisions():
    assert should_cache("auto", needed_bytes=10, available_bytes=100) is True
    assert should_cache("auto", needed_bytes=30, available_bytes=100) is False  # more than a quarter
    assert should_cache("auto", needed_bytes=17 * 2**30, available_bytes=2**40) is False  # above 16 GiB
    assert should_cache(False, 1, 100) is False and should_cache(True, 10**12, 1) is True
    with pytest.raises(ConfigError, match="cache_decoded"):
        should_cache("yes", 1, 1)
    assert resolve_num_workers("auto", torch.device("cpu")) == 0
    assert 1 <= resolve_num_workers("auto", torch.device("cuda")) <= 8
    assert resolve_num_workers(3, torch.device("cpu")) == 3
    with pytest.raises(ConfigError, match="num_workers"):
        resolve_num_workers(-1, torch.device("cpu"))


def test_loader_processes_and_reuse_keep_the_epoch_order(disc_site):
    def epoch_ids(trainer):
        return [i for batch in trainer._loader("train", shuffle=True) for i in batch["id"]]

    base = LocalTrainer(TINY, TrainConfig(device="cpu", num_workers=0, cache_decoded=False), disc_site)
    workers = LocalTrainer(TINY, TrainConfig(device="cpu", num_workers=2, cache_decoded=True), disc_site)
    assert workers.cached and workers.num_workers == 2
    first = epoch_ids(base)
    assert epoch_ids(workers) == first
    assert epoch_ids(workers) == first  # the same (persistent) loader, re-seeded for the same round
    assert base._loader("train", True) is base._loader("train", True)
    base.rounds_done += 1
    assert epoch_ids(base) != first  # the next round shuffles differently
