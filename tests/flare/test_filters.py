"""The site's travel-set filter and the server's contribution check, without running FLARE."""

import numpy as np
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_constant import FLContextKey, ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.app_constant import AppConstants

from fedfms.flare.contribution_filter import ContributionCheckFilter
from fedfms.flare.replies import REASON_HEADER
from fedfms.flare.filters import TravelSetFilter
from fedfms.flare.update_check import (
    FROZEN_FINGERPRINT,
    aggregate_problems,
    expected_travel_spec,
    find_problems,
    metric_problems,
    sample_count_problem,
)

TINY_MSA = {"variant": "tiny", "mode": "fedmsa", "num_classes": 1, "pretrained": False}


def travel_update(spec):
    return {k: np.zeros(shape, dtype=np.float32) for k, (shape, _) in spec.items()}


def test_travel_filter_passes_exact_travel_set_and_refuses_encoder_with_a_reason():
    spec = expected_travel_spec(TINY_MSA)
    f = TravelSetFilter("fedmsa", TINY_MSA)
    ok = DXO(DataKind.WEIGHTS, travel_update(spec)).to_shareable()
    assert f.process(ok, FLContext()) is ok
    leaky = travel_update(spec)
    leaky["image_encoder.blocks.0.attn.qkv.weight"] = np.zeros((3, 3), np.float32)
    reply = f.process(DXO(DataKind.WEIGHTS, leaky).to_shareable(), FLContext())
    assert reply.get_return_code() == ReturnCode.TASK_RESULT_FILTER_ERROR
    assert "image_encoder.blocks.0.attn.qkv.weight" in reply.get_header(REASON_HEADER)
    assert "DXO" not in reply  # no weights leave the site
    short = travel_update(spec)
    short.pop(next(iter(short)))
    reply = f.process(DXO(DataKind.WEIGHTS, short).to_shareable(), FLContext())
    assert "missing" in reply.get_header(REASON_HEADER)


def test_update_check_names_each_problem_and_never_raises():
    spec = expected_travel_spec(TINY_MSA)
    assert find_problems(travel_update(spec), spec) == []
    key = next(iter(spec))
    cases = {
        "NaN": np.full(spec[key][0], np.nan, np.float32),
        "shape": np.zeros((1, 2, 3), np.float32),
        "dtype <U1": np.full(spec[key][0], "x"),  # right shape, string dtype
        "dtype float64": np.zeros(spec[key][0], np.float64),
        "dtype object": np.empty(spec[key][0], dtype=object),
        "numpy array": [0.0, 1.0],
    }
    for expected, value in cases.items():
        bad = travel_update(spec)
        bad[key] = value
        problems = find_problems(bad, spec)
        assert any(expected in p and key in p for p in problems), (expected, problems)
    bad = travel_update(spec)
    bad["prompt_encoder.no_mask_embed.weight"] = np.zeros((1, 32), np.float32)
    assert any("unexpected" in p for p in find_problems(bad, spec))
    assert find_problems(None, spec) == ["weights are a NoneType, expected a dict of arrays"]
    assert all(k.startswith(("mask_decoder.", "head.")) or "adapter" in k for k in spec)


def test_sample_count_rules():
    assert sample_count_problem(12, max_samples=100) is None
    for bad in (0, -3, 1.5, "12", True, None):
        assert "positive integer" in sample_count_problem(bad, 100)
    assert "max_samples" in sample_count_problem(10**9, 100)
    assert "max_samples" in sample_count_problem(10**18, 10**6)
    assert "pins" in sample_count_problem(13, 100, pinned=12)
    assert sample_count_problem(500, 100, pinned=500) is None  # a pinned count is the consortium's word
    assert "changed from 12" in sample_count_problem(13, 100, first_accepted=12)
    assert sample_count_problem(np.int64(12), 100, first_accepted=12) is None


def test_metric_and_aggregate_checks():
    assert metric_problems({"val_dice": 0.4, "val_iou": None}) == []
    assert metric_problems({"val_dice": 1.5}) and metric_problems({"val_dice": float("nan")}) and metric_problems("x")
    ref = {"a": np.zeros(3, np.float32), "b": np.zeros(2, np.float32)}
    assert aggregate_problems({"a": np.ones(3), "b": np.ones(2)}, ref) == []
    assert aggregate_problems({}, ref) == ["no accepted contribution"]
    assert any("missing" in p for p in aggregate_problems({"a": np.ones(3)}, ref))
    assert any("NaN" in p for p in aggregate_problems({"a": np.ones(3), "b": np.array([1.0, np.inf])}, ref))


def _result(site, data, n=6, fingerprint="f" * 64, metrics=None, round_=0):
    dxo = DXO(DataKind.WEIGHTS, data, meta={MetaKey.NUM_STEPS_CURRENT_ROUND: n, FROZEN_FINGERPRINT: fingerprint,
                                            MetaKey.INITIAL_METRICS: metrics or {"val_dice": 0.5}})
    shareable = dxo.to_shareable()
    shareable.set_peer_props({ReservedKey.IDENTITY_NAME: site})
    shareable.add_cookie(AppConstants.CONTRIBUTION_ROUND, round_)
    return shareable


def _ctx(task="train"):
    ctx = FLContext()
    ctx.set_prop(FLContextKey.TASK_NAME, task, private=True, sticky=False)
    return ctx


def test_contribution_filter_turns_bad_results_into_error_replies():
    spec = expected_travel_spec(TINY_MSA)
    check = ContributionCheckFilter(TINY_MSA, max_samples=1000, site_samples={"site-9": 40})
    good = check.process(_result("site-1", travel_update(spec), n=6), _ctx())
    assert good.get_return_code(ReturnCode.OK) == ReturnCode.OK
    # passed on in float64, so FLARE's stock weighted sum accumulates in float64
    assert all(v.dtype == np.float64 for v in from_shareable(good).data.values())

    def rejected(result, task="train"):
        reply = check.process(result, _ctx(task))
        assert reply.get_return_code() == ReturnCode.BAD_TASK_DATA
        assert "DXO" not in reply
        return reply.get_header(REASON_HEADER)

    poisoned = {k: v * 1000 for k, v in travel_update(spec).items()}
    assert "max_samples" in rejected(_result("site-2", poisoned, n=10**9))
    assert "max_samples" in rejected(_result("site-2", travel_update(spec), n=10**18))
    assert "changed from 6" in rejected(_result("site-1", travel_update(spec), n=7, round_=1))
    assert "pins" in rejected(_result("site-9", travel_update(spec), n=41))
    assert check.process(_result("site-9", travel_update(spec), n=40), _ctx()).get_return_code(ReturnCode.OK) == ReturnCode.OK
    assert "frozen weights differ" in rejected(_result("site-3", travel_update(spec), fingerprint="0" * 64))
    assert "[0, 1]" in rejected(_result("site-4", travel_update(spec), metrics={"val_dice": 7.0}))
    strings = travel_update(spec)
    strings[next(iter(spec))] = np.full(spec[next(iter(spec))][0], "x")
    assert "dtype" in rejected(_result("site-5", strings))
    assert "not a DXO" in rejected(Shareable())
    # models submitted for cross-site evaluation get the weights check too (no sample count there)
    nan = travel_update(spec)
    nan[next(iter(spec))][...] = np.nan
    assert "NaN" in rejected(_result("site-6", nan), task="submit_model")
    # results of other tasks (validation metrics) pass untouched
    metrics = DXO(DataKind.METRICS, {"dice": 0.4}).to_shareable()
    assert check.process(metrics, _ctx("validate")) is metrics
    assert {site for site, _, _ in check.rejected} >= {"site-2", "site-1", "site-9", "site-3", "site-4", "site-5"}
