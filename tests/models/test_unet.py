"""The FedU-Net baseline shares the SAM models' interface, so data, trainer and jobs serve both."""

import pytest
import torch

from fedfms.errors import ConfigError
from fedfms.models import ModelConfig, build_model, travel_keys
from fedfms.training.trainer import LocalTrainer, TrainConfig


def test_unet_shapes_and_travel_set():
    model = build_model(ModelConfig(variant="unet", mode="fedsam", pretrained=False, image_size=128, num_classes=3))
    assert model(torch.rand(2, 3, 128, 128)).shape == (2, 3, 32, 32)
    assert (model.image_size, model.mask_size) == (128, 32)
    assert travel_keys(model, "fedsam") == list(model.state_dict())


def test_unet_refuses_adapters_and_checkpoints():
    with pytest.raises(ConfigError, match="mode must be 'fedsam'"):
        build_model(ModelConfig(variant="unet", mode="fedmsa", pretrained=False))
    with pytest.raises(ConfigError, match="pretrained: false"):
        build_model(ModelConfig(variant="unet", mode="fedsam", pretrained=True, checkpoint="x.pth"))


def test_unet_learns_on_the_same_trainer(disc_site):
    cfg = ModelConfig(variant="unet", mode="fedsam", pretrained=False, image_size=128)
    trainer = LocalTrainer(cfg, TrainConfig(lr=1e-3, loss="bce_dice", val_fraction=0.2, progress=False), str(disc_site))
    before = trainer.evaluate("train")["dice"]
    for _ in range(6):
        trainer.fit()
    after = trainer.evaluate("train")["dice"]
    assert after > before + 0.2 and after > 0.6, (before, after)
