"""Loading official-layout SAM checkpoints: the good case, and every way a file can be wrong.

Checkpoints are written the way the official ones were: ``segment_anything.modeling.Sam(...).state_dict()``.
The tiny variant's modules keep this fast; one slow test does the same with a real-size vit_b.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam

from fedfms.errors import CheckpointError, ConfigError
from fedfms.models import ModelConfig, build_model, get_variant
from fedfms.models.adapters import is_adapter_key
from fedfms.models.checkpoint import describe_variant, load_sam_weights
from fedfms.models.registry import build_image_encoder, build_mask_decoder, build_prompt_encoder


def official_sam(variant, seed: int = 1) -> Sam:
    torch.manual_seed(seed)
    sam = Sam(build_image_encoder(variant), build_prompt_encoder(variant), build_mask_decoder(variant))
    # position tables start at zero; make them non-trivial so a wrong resize or a skipped key would show
    with torch.no_grad():
        for name, p in sam.named_parameters():
            if "pos" in name:
                p.normal_()
    return sam


def save(sam: Sam, path) -> dict[str, torch.Tensor]:
    state = sam.state_dict()
    torch.save(state, path)
    return state


@pytest.fixture
def tiny_ckpt(tmp_path):
    path = tmp_path / "sam_tiny.pth"
    return path, save(official_sam(get_variant("tiny")), path)


def cfg(path, mode="fedmsa", **kw) -> ModelConfig:
    return ModelConfig("tiny", mode, num_classes=2, checkpoint=str(path), pretrained=True, **kw)


@pytest.mark.parametrize("mode", ["fedsam", "fedmsa"])
def test_good_checkpoint_loads_every_sam_tensor(tiny_ckpt, mode):
    path, saved = tiny_ckpt
    model = build_model(cfg(path, mode))
    state = model.state_dict()
    sam_keys = [k for k in state if not k.startswith("head.") and not is_adapter_key(k)]
    assert set(sam_keys) == set(saved)  # key for key: adapters reuse the block attribute names
    for k in sam_keys:
        assert torch.equal(state[k], saved[k]), k
    # random init with the same seed differs, so equality above really comes from the file
    scratch = build_model(ModelConfig("tiny", mode, num_classes=2, pretrained=False))
    assert not torch.equal(scratch.state_dict()["image_encoder.blocks.0.attn.qkv.weight"], saved["image_encoder.blocks.0.attn.qkv.weight"])


def test_checkpoint_wrapped_in_model_key_loads(tmp_path, tiny_ckpt):
    _, saved = tiny_ckpt
    path = tmp_path / "wrapped.pth"
    torch.save({"model": saved, "epoch": 3}, path)
    model = build_model(cfg(path))
    assert torch.equal(model.state_dict()["mask_decoder.iou_token.weight"], saved["mask_decoder.iou_token.weight"])


def test_pretrained_without_checkpoint_is_a_config_error():
    with pytest.raises(ConfigError, match="checkpoint"):
        build_model(ModelConfig("vit_b", "fedmsa", pretrained=True, checkpoint=None))


def test_missing_file(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(CheckpointError, match="not found") as err:
        build_model(cfg(path))
    assert str(path) in str(err.value)


def test_truncated_file(tmp_path, tiny_ckpt):
    path, _ = tiny_ckpt
    data = path.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="unreadable checkpoint") as err:
        build_model(cfg(cut))
    assert str(cut) in str(err.value)


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="not a state dict"):
        build_model(cfg(path))


def test_extra_key(tmp_path, tiny_ckpt):
    _, saved = tiny_ckpt
    path = tmp_path / "extra.pth"
    torch.save({**saved, "image_encoder.extra.weight": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match=r"1 unexpected key\(s\) e\.g\. image_encoder\.extra\.weight"):
        build_model(cfg(path))


def test_missing_key(tmp_path, tiny_ckpt):
    _, saved = tiny_ckpt
    path = tmp_path / "missing.pth"
    torch.save({k: v for k, v in saved.items() if k != "mask_decoder.iou_token.weight"}, path)
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\) e\.g\. mask_decoder\.iou_token\.weight"):
        build_model(cfg(path))


def test_non_finite_tensor(tmp_path, tiny_ckpt):
    _, saved = tiny_ckpt
    bad = dict(saved)
    bad["mask_decoder.iou_token.weight"] = torch.full_like(saved["mask_decoder.iou_token.weight"], float("nan"))
    path = tmp_path / "nan.pth"
    torch.save(bad, path)
    with pytest.raises(CheckpointError, match="NaN"):
        build_model(cfg(path))


def test_deeper_encoder_is_named_in_the_error(tmp_path):
    path = tmp_path / "deep.pth"
    save(official_sam(replace(get_variant("tiny"), depth=3)), path)
    with pytest.raises(CheckpointError, match=r"looks like an unknown variant \(embed 64, 3 blocks\), expected tiny"):
        build_model(cfg(path))


def test_wider_encoder_is_named_in_the_error(tmp_path):
    path = tmp_path / "wide.pth"
    save(official_sam(replace(get_variant("tiny"), embed_dim=96)), path)
    with pytest.raises(CheckpointError, match=r"has shape .*looks like an unknown variant \(embed 96, 2 blocks\), expected tiny"):
        build_model(cfg(path))


def test_tiny_file_for_vit_b_names_tiny(tiny_ckpt):
    path, _ = tiny_ckpt
    with pytest.raises(CheckpointError, match=r"looks like tiny \(embed 64, 2 blocks\), expected vit_b"):
        build_model(ModelConfig("vit_b", "fedmsa", checkpoint=str(path), pretrained=True))


def test_describe_variant():
    assert describe_variant(official_sam(get_variant("tiny")).state_dict()) == "tiny (embed 64, 2 blocks)"
    assert describe_variant({"foo": torch.zeros(1)}).startswith("not a SAM checkpoint")


def test_1024_checkpoint_into_smaller_image_size_resizes_position_tables(tmp_path):
    """An official file is for 1024 px; running at 128 needs its pos_embed and global rel-pos tables resized."""
    big = get_variant("tiny", image_size=1024)
    path = tmp_path / "tiny1024.pth"
    saved = save(official_sam(big), path)
    assert saved["image_encoder.pos_embed"].shape == (1, 64, 64, 64)

    model = build_model(ModelConfig("tiny", "fedsam", num_classes=1, image_size=128, checkpoint=str(path)))
    state = model.state_dict()
    assert state["image_encoder.pos_embed"].shape == (1, 8, 8, 64)
    expected = F.interpolate(saved["image_encoder.pos_embed"].permute(0, 3, 1, 2), size=(8, 8), mode="bicubic", align_corners=False)
    torch.testing.assert_close(state["image_encoder.pos_embed"], expected.permute(0, 2, 3, 1))

    # load_sam_weights reports which keys were resized: pos_embed and the global block's rel-pos tables only
    fresh = build_model(ModelConfig("tiny", "fedsam", num_classes=1, image_size=128, pretrained=False))
    resized = load_sam_weights(fresh, path, "tiny")
    assert sorted(resized) == sorted(["image_encoder.pos_embed", "image_encoder.blocks.1.attn.rel_pos_h",
                                      "image_encoder.blocks.1.attn.rel_pos_w"])
    assert fresh.state_dict()["image_encoder.blocks.1.attn.rel_pos_h"].shape == (2 * 8 - 1, 32)
    # windowed blocks keep their tables (window size does not depend on the image size)
    assert torch.equal(fresh.state_dict()["image_encoder.blocks.0.attn.rel_pos_h"], saved["image_encoder.blocks.0.attn.rel_pos_h"])
    with torch.no_grad():
        assert model(torch.rand(1, 3, 128, 128)).shape == (1, 1, 32, 32)


@pytest.mark.slow
def test_real_vit_b_checkpoint_from_segment_anything(tmp_path):
    """The official builder's vit_b (random init, ~375 MB): loads in both modes; it is not a vit_l or a tiny."""
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    path = tmp_path / "sam_vit_b.pth"
    official = sam_model_registry["vit_b"]()
    saved = save(official, path)
    del official
    for mode in ("fedmsa", "fedsam"):
        model = build_model(ModelConfig("vit_b", mode, num_classes=2, checkpoint=str(path)))
        state = model.state_dict()
        for k, v in saved.items():
            assert torch.equal(state[k], v), k
        del model, state
    with pytest.raises(CheckpointError, match=r"looks like vit_b \(embed 768, 12 blocks\), expected tiny"):
        build_model(ModelConfig("tiny", "fedmsa", checkpoint=str(path)))
