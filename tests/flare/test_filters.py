"""The travel-set filter and the server-side update check, without running FLARE."""

import numpy as np
import pytest
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from fedfms.flare.filters import TravelSetFilter, TravelSetLeak
from fedfms.flare.update_check import expected_travel_spec, find_problems

TINY_MSA = {"variant": "tiny", "mode": "fedmsa", "num_classes": 1, "pretrained": False}


def travel_update(spec):
    return {k: np.zeros(shape, dtype=np.float32) for k, (shape, _) in spec.items()}


def test_filter_passes_exact_travel_set_and_refuses_encoder():
    spec = expected_travel_spec(TINY_MSA)
    f = TravelSetFilter("fedmsa", TINY_MSA)
    ok = DXO(DataKind.WEIGHTS, travel_update(spec))
    assert f.process_dxo(ok, Shareable(), FLContext()) is ok
    leaky = travel_update(spec)
    leaky["image_encoder.blocks.0.attn.qkv.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(TravelSetLeak, match="image_encoder.blocks.0.attn.qkv.weight"):
        f.process_dxo(DXO(DataKind.WEIGHTS, leaky), Shareable(), FLContext())
    short = travel_update(spec)
    short.pop(next(iter(short)))
    with pytest.raises(TravelSetLeak, match="missing"):
        f.process_dxo(DXO(DataKind.WEIGHTS, short), Shareable(), FLContext())


def test_update_check_names_each_problem():
    spec = expected_travel_spec(TINY_MSA)
    assert find_problems(travel_update(spec), spec) == []
    bad = travel_update(spec)
    key = next(iter(bad))
    bad[key] = np.full_like(bad[key], np.nan)
    assert any("NaN" in p and key in p for p in find_problems(bad, spec))
    bad = travel_update(spec)
    bad[key] = np.zeros((1, 2, 3), np.float32)
    assert any("shape" in p for p in find_problems(bad, spec))
    bad = travel_update(spec)
    bad["prompt_encoder.no_mask_embed.weight"] = np.zeros((1, 32), np.float32)
    assert any("unexpected" in p for p in find_problems(bad, spec))
    assert all(k.startswith(("mask_decoder.", "head.")) or "adapter" in k for k in spec)
