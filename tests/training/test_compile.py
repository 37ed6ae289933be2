"""Regional compilation (train config ``compile: "regional"``): each image-encoder block compiled with
torch.compile gives the losses of the eager model, and leaves parameter names and the travel set as they were."""

from __future__ import annotations

import pytest
import torch

from fedfms.data.synthetic import make_disc_site
from fedfms.errors import ConfigError
from fedfms.models import ModelConfig, build_model
from fedfms.training.trainer import LocalTrainer, TrainConfig, compile_regions

MODEL = ModelConfig("tiny", "fedmsa", num_classes=1, pretrained=False, init_seed=0)


def test_the_setting_is_checked():
    assert TrainConfig().compile is False
    assert TrainConfig.from_dict({"compile": "regional"}).compile == "regional"
    for bad in (True, "full", 1, "Regional"):
        with pytest.raises(ConfigError, match=r"field 'compile' is .*; expected false or 'regional'"):
            TrainConfig.from_dict({"compile": bad})


def test_the_unet_has_no_blocks_to_compile():
    unet = build_model(ModelConfig("unet", "fedsam", pretrained=False, image_size=64))
    with pytest.raises(ConfigError, match="compile 'regional' compiles the blocks of SAM's image encoder"):
        compile_regions(unet)


def test_regional_compile_matches_eager_losses(tmp_path):
    """Two optimisation steps on the same batches: compiled and eager losses agree within 1e-4 (CPU inductor; about
    a minute to compile on 2 cores)."""
    pytest.importorskip("torch._inductor")
    site = make_disc_site(tmp_path / "site", num_volumes=3, slices_per_volume=2)
    train = dict(lr=1e-3, loss="bce_dice", batch_size=2, progress=False, threads=1, device="cpu")
    eager = LocalTrainer(MODEL, TrainConfig(**train), str(site))
    compiled = LocalTrainer(MODEL, TrainConfig(**train, compile="regional"), str(site))
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in compiled.model.image_encoder.blocks)
    assert list(compiled.model.state_dict()) == list(eager.model.state_dict())
    assert compiled.travel_weights().keys() == eager.travel_weights().keys()
    g = torch.Generator().manual_seed(0)
    size, mask = compiled.model.image_size, compiled.model.mask_size
    for _ in range(2):
        images = torch.rand(2, 3, size, size, generator=g)
        masks = (torch.rand(2, 1, mask, mask, generator=g) > 0.5).float()
        assert compiled.step(images, masks) == pytest.approx(eager.step(images, masks), abs=1e-4)
    for key, value in eager.travel_weights().items():
        torch.testing.assert_close(compiled.travel_weights()[key], value, atol=1e-4, rtol=0)
