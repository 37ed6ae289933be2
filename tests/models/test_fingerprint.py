"""The frozen-weights fingerprint tells sites with the same frozen encoder from sites without."""

import torch

from fedfms.models import ModelConfig, build_model, frozen_fingerprint


def tiny(seed=0, mode="fedmsa"):
    return build_model(ModelConfig(variant="tiny", mode=mode, pretrained=False, init_seed=seed))


def test_same_frozen_weights_same_fingerprint_and_training_keeps_it():
    a, b = tiny(0), tiny(0)
    assert frozen_fingerprint(a, "fedmsa") == frozen_fingerprint(b, "fedmsa")
    assert frozen_fingerprint(a, "fedmsa") != frozen_fingerprint(tiny(1), "fedmsa")
    before = frozen_fingerprint(a, "fedmsa")
    opt = torch.optim.Adam([p for p in a.parameters() if p.requires_grad], lr=1e-2)
    a(torch.rand(2, 3, 128, 128)).mean().backward()
    opt.step()
    assert frozen_fingerprint(a, "fedmsa") == before  # adapters/decoder moved, the frozen part did not


def test_a_changed_frozen_tensor_changes_the_fingerprint_and_fedsam_has_none():
    a = tiny(0)
    before = frozen_fingerprint(a, "fedmsa")
    with torch.no_grad():
        a.image_encoder.patch_embed.proj.weight[0, 0, 0, 0] += 1e-3
    assert frozen_fingerprint(a, "fedmsa") != before
    assert frozen_fingerprint(tiny(0, "fedsam"), "fedsam") == frozen_fingerprint(tiny(1, "fedsam"), "fedsam")
