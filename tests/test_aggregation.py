"""Robust aggregation rules (the opt-in robust mode), without FLARE."""

import numpy as np
import pytest

from fedfms.aggregation import aggregate, bound_update_norms, coordinate_median, trimmed_mean, update_distance, weighted_mean


def model(value, n=4):
    return {"w": np.full(n, value, np.float32), "b": np.array([value], np.float32), "steps": np.array([3], np.int64)}


def test_weighted_mean_is_fedavg_in_float64():
    out = weighted_mean([model(1.0), model(4.0)], [1, 2])
    np.testing.assert_allclose(out["w"], 3.0)
    assert out["w"].dtype == np.float64
    # counts that would overflow a float32 running sum stay exact in float64
    big = weighted_mean([model(1.0), model(3.0)], [1e30, 1e30])
    assert np.isfinite(big["w"]).all() and np.allclose(big["w"], 2.0)


def test_median_and_trimmed_mean_ignore_a_minority_of_arbitrary_updates():
    honest = [model(1.0), model(1.2), model(0.9)]
    attack = [model(1e6), model(-1e6)]
    med = coordinate_median(honest + attack[:1])
    assert 0.9 <= med["w"][0] <= 1.2
    tm = trimmed_mean(honest + attack, trim_fraction=0.2)  # 5 updates: one cut at each end
    np.testing.assert_allclose(tm["w"], np.mean([1.0, 1.2, 0.9]))
    with pytest.raises(ValueError, match="trim_fraction"):
        trimmed_mean(honest, 0.5)
    with pytest.raises(ValueError, match="method"):
        aggregate(honest, [1, 1, 1], "max")


def test_norm_bound_clips_or_drops_an_outlying_update():
    reference = model(0.0)
    updates = [model(1.0), model(1.1), model(0.9), model(1000.0)]
    clipped, distances, bound = bound_update_norms(updates, reference, k=2.0)
    assert distances[3] > bound and bound == pytest.approx(2.0 * np.median(distances))
    assert update_distance(clipped[3], reference) == pytest.approx(bound)
    assert clipped[0] is updates[0]  # inside the bound: untouched
    np.testing.assert_array_equal(clipped[3]["steps"], updates[3]["steps"])  # integer buffers are not scaled
    dropped, _, _ = bound_update_norms(updates, reference, k=2.0, action="reject")
    assert dropped[3] is None and all(u is not None for u in dropped[:3])
    # FedAvg after the bound: the scaled site can move the average by at most its bounded share
    avg = weighted_mean([u for u in clipped], [1, 1, 1, 1])
    assert avg["w"][0] < 5.0
    with pytest.raises(ValueError, match="positive"):
        bound_update_norms(updates, reference, k=0)
