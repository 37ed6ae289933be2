"""Pooling sites (the centralised baseline) splits each site by patient, then concatenates."""

import numpy as np
import pytest

from fedfms.data.site_dataset import SiteWriter
from fedfms.data.synthetic import make_disc_site
from fedfms.errors import ConfigError
from fedfms.models import ModelConfig
from fedfms.training.trainer import LocalTrainer, TrainConfig

CFG = ModelConfig(variant="tiny", mode="fedmsa", pretrained=False)


def test_pooled_sites_keep_per_site_patient_splits(tmp_path):
    a = make_disc_site(tmp_path / "a", site="a", num_volumes=4, slices_per_volume=3)
    b = make_disc_site(tmp_path / "b", site="b", num_volumes=6, slices_per_volume=3, seed=1)
    single = {s: LocalTrainer(CFG, TrainConfig(val_fraction=0.2), str(s)) for s in (a, b)}
    pooled = LocalTrainer(CFG, TrainConfig(val_fraction=0.2), [str(a), str(b)])
    for part in ("train", "val", "all"):
        assert len(pooled.datasets[part]) == sum(len(t.datasets[part]) for t in single.values())
    assert pooled.num_train_samples == 24 and pooled.site == "a+b"
    train_vols = {pooled.datasets["train"][i]["volume"] for i in range(len(pooled.datasets["train"]))}
    val_vols = {pooled.datasets["val"][i]["volume"] for i in range(len(pooled.datasets["val"]))}
    assert not train_vols & val_vols and {v.split("_")[0] for v in val_vols} == {"a", "b"}


def test_pooling_refuses_different_classes(tmp_path):
    a = make_disc_site(tmp_path / "a", site="a", num_volumes=2, slices_per_volume=2)
    with SiteWriter(tmp_path / "c", "c", "synthetic", ["tumour"], 128, 32) as w:
        w.add(np.full((4, 4), 0.5), np.array([[0, 1, 0, 0]] * 4), "c_case0", 0)
    with pytest.raises(ConfigError, match="cannot pool"):
        LocalTrainer(CFG, TrainConfig(), [str(a), str(tmp_path / "c")])
