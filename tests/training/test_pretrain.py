"""`fedfms pretrain`: the tiny SAM trained on generated scenes, saved so the strict SAM loader takes it; and the
committed checkpoint the demo uses is exactly what its provenance file says."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedfms.cli import main
from fedfms.errors import CheckpointError
from fedfms.models import ModelConfig, build_model, frozen_fingerprint
from fedfms.models.checkpoint import load_sam_weights, read_state_dict
from fedfms.training.pretrain import DEMO_CHECKPOINT, provenance_path, sha256, synthetic_batch


def test_generated_scenes_are_seeded_and_shaped_like_a_tiny_site():
    a_img, a_mask = synthetic_batch(np.random.default_rng(3), 6)
    b_img, b_mask = synthetic_batch(np.random.default_rng(3), 6)
    c_img, _ = synthetic_batch(np.random.default_rng(4), 6)
    assert a_img.shape == (6, 3, 128, 128) and a_mask.shape == (6, 1, 32, 32)
    assert torch.equal(a_img, b_img) and torch.equal(a_mask, b_mask)
    assert not torch.equal(a_img, c_img)
    assert 0 <= float(a_img.min()) and float(a_img.max()) <= 1
    assert set(torch.unique(a_mask).tolist()) <= {0.0, 1.0}
    # objects and background both occur: a task, not a constant
    _, many = synthetic_batch(np.random.default_rng(0), 32)
    share = many.mean(dim=(1, 2, 3))
    assert float(share.min()) < 0.5 and float(share.max()) > 0 and 0.03 < float(many.mean()) < 0.5


def test_pretrain_command_writes_a_checkpoint_the_strict_loader_takes(tmp_path, capsys):
    out = tmp_path / "sam_tiny.pth"
    args = ["pretrain", "--out", str(out), "--steps", "3", "--batch-size", "4", "--seed", "5", "--threads", "1",
            "--log-every", "1"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "step 3/3" in printed and str(out) in printed
    state = read_state_dict(out)
    assert state and all(k.startswith(("image_encoder.", "prompt_encoder.", "mask_decoder.")) for k in state)
    assert not any("adapter" in k or k.startswith("head.") for k in state)
    info = json.loads(provenance_path(out).read_text())
    assert info["sha256"] == sha256(out) and info["settings"]["seed"] == 5 and info["settings"]["steps"] == 3
    assert info["command"].startswith("fedfms pretrain --out") and "--seed 5" in info["command"]
    # exactly what the official checkpoints go through, for both modes
    for mode in ("fedmsa", "fedsam"):
        model = build_model(ModelConfig("tiny", mode, pretrained=True, checkpoint=str(out)))
        assert torch.equal(model.image_encoder.patch_embed.proj.weight, state["image_encoder.patch_embed.proj.weight"])
    # the same seed and threads give the same weights; the same name is not replaced without --overwrite
    again = tmp_path / "again.pth"
    assert main([*args[:2], str(again), *args[3:]]) == 0
    twin = read_state_dict(again)
    assert twin.keys() == state.keys() and all(torch.equal(twin[k], state[k]) for k in state)
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err


def test_pretrain_refuses_bad_settings_in_one_line(tmp_path, capsys):
    assert main(["pretrain", "--out", str(tmp_path / "x.pth"), "--lr", "0", "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: lr is 0")
    assert main(["pretrain", "--out", str(tmp_path), "--steps", "1", "--overwrite"]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_the_committed_demo_checkpoint_matches_its_provenance_and_loads_strictly():
    info = json.loads(provenance_path(DEMO_CHECKPOINT).read_text())
    assert info["sha256"] == sha256(DEMO_CHECKPOINT) and info["bytes"] == DEMO_CHECKPOINT.stat().st_size
    assert info["command"].startswith("fedfms pretrain") and "seed" in info["settings"]
    assert "no image from any dataset" in info["data"]
    probe = build_model(ModelConfig("tiny", "fedmsa", pretrained=False))
    load_sam_weights(probe, DEMO_CHECKPOINT, "tiny")  # raises on any missing, extra or misshaped key
    with pytest.raises(CheckpointError, match="looks like tiny"):
        load_sam_weights(build_model(ModelConfig("vit_b", "fedmsa", pretrained=False, image_size=128)), DEMO_CHECKPOINT, "vit_b")
    # the frozen encoder FedMSA adapts is the pretrained one, not the random -PT one
    pretrained = build_model(ModelConfig("tiny", "fedmsa", pretrained=True, checkpoint=str(DEMO_CHECKPOINT)))
    assert frozen_fingerprint(pretrained, "fedmsa") == frozen_fingerprint(probe, "fedmsa")  # probe holds the checkpoint now
    random_encoder = build_model(ModelConfig("tiny", "fedmsa", pretrained=False))
    assert frozen_fingerprint(pretrained, "fedmsa") != frozen_fingerprint(random_encoder, "fedmsa")
