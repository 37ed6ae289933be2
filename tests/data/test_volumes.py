"""NIfTI loading, per-volume percentile windowing, depth slicing and 2.5D stacking."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from fedfms.data import volumes as vol
from fedfms.errors import ConfigError, DataError


def save(path, data, affine=None, dtype=None):
    data = np.asarray(data)
    img = nib.Nifti1Image(data.astype(dtype or data.dtype), np.eye(4) if affine is None else affine)
    nib.save(img, str(path))
    return path


def test_window_percentiles_matches_linear_map_between_1st_and_99th_percentile():
    v = np.arange(100, dtype=np.float32).reshape(5, 5, 4)
    out = vol.window_percentiles(v)
    # numpy linear percentiles of 0..99: p1 = 0.99, p99 = 98.01
    lo, hi = 0.99, 98.01
    assert out.dtype == np.float32
    assert out.flat[50] == pytest.approx((50 - lo) / (hi - lo), abs=1e-6)
    assert out.flat[0] == 0.0 and out.flat[99] == 1.0  # clipped below p1 / above p99
    assert out.min() == 0.0 and out.max() == 1.0


def test_window_percentiles_custom_and_constant_and_invalid():
    v = np.arange(101, dtype=np.float32)
    out = vol.window_percentiles(v, low_pct=10, high_pct=60)
    assert out[35] == pytest.approx(0.5, abs=1e-6)
    assert out[5] == 0.0 and out[80] == 1.0
    assert not vol.window_percentiles(np.full((4, 4, 2), 7.0)).any()  # no window -> zeros, not NaN
    with pytest.raises(ConfigError):
        vol.window_percentiles(v, 50, 50)
    with pytest.raises(ConfigError):
        vol.window_percentiles(v, -1, 99)


def test_depth_slices_and_neighbour_stack():
    v = np.zeros((3, 4, 5), np.float32)
    for k in range(5):
        v[:, :, k] = k
    slices = list(vol.iter_depth_slices(v))
    assert [k for k, _ in slices] == [0, 1, 2, 3, 4]
    assert all(s.shape == (3, 4) and (s == k).all() for k, s in slices)
    mid = vol.neighbour_stack(v, 2)
    assert mid.shape == (3, 4, 3) and [mid[0, 0, c] for c in range(3)] == [1, 2, 3]
    first, last = vol.neighbour_stack(v, 0), vol.neighbour_stack(v, 4)
    assert [first[0, 0, c] for c in range(3)] == [0, 0, 1]  # edge slice repeated
    assert [last[0, 0, c] for c in range(3)] == [3, 4, 4]
    assert len(list(vol.iter_slices_2p5d(v))) == 5


def test_load_nifti_pair_ok_and_4d_singleton_squeezed(tmp_path):
    img = np.random.default_rng(0).normal(size=(6, 7, 3)).astype(np.float32)
    seg = np.zeros((6, 7, 3, 1), np.uint8)
    seg[1:3, 1:3, 1] = 2
    a, b = vol.load_nifti_pair(save(tmp_path / "i.nii.gz", img), save(tmp_path / "s.nii.gz", seg))
    assert a.shape == b.shape == (6, 7, 3)
    assert a.dtype == np.float32 and np.allclose(a, img)
    assert b.dtype == np.int32 and b.sum() == 8


def test_float_labels_accepted_when_integral_rejected_otherwise(tmp_path):
    img = save(tmp_path / "i.nii.gz", np.ones((4, 4, 2), np.float32))
    seg = np.zeros((4, 4, 2), np.float32)
    seg[0, 0, 0] = 1.0
    assert vol.load_nifti_pair(img, save(tmp_path / "s.nii.gz", seg))[1].max() == 1
    seg[1, 1, 1] = 0.5
    with pytest.raises(DataError, match=r"s2\.nii\.gz.*non-integer"):
        vol.load_nifti_pair(img, save(tmp_path / "s2.nii.gz", seg))


def test_shape_mismatch_names_segmentation(tmp_path):
    img = save(tmp_path / "img.nii.gz", np.ones((4, 4, 3), np.float32))
    seg = save(tmp_path / "seg.nii.gz", np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(DataError, match=r"seg\.nii\.gz: segmentation shape \(4, 4, 2\) differs .*\(4, 4, 3\)"):
        vol.load_nifti_pair(img, seg)


def test_affine_mismatch_names_segmentation(tmp_path):
    img = save(tmp_path / "img.nii.gz", np.ones((4, 4, 3), np.float32))
    shifted = np.eye(4)
    shifted[0, 3] = 5.0
    seg = save(tmp_path / "seg.nii.gz", np.zeros((4, 4, 3), np.uint8), affine=shifted)
    with pytest.raises(DataError, match=r"seg\.nii\.gz: segmentation affine differs"):
        vol.load_nifti_pair(img, seg)
    # float-storage noise is not a mismatch
    noisy = np.eye(4)
    noisy[0, 0] += 1e-6
    vol.load_nifti_pair(img, save(tmp_path / "seg2.nii.gz", np.zeros((4, 4, 3), np.uint8), affine=noisy))


def test_truncated_and_garbage_and_missing_files(tmp_path):
    path = save(tmp_path / "big.nii.gz", np.random.default_rng(1).normal(size=(32, 32, 16)).astype(np.float32))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"big\.nii\.gz: .*(truncated|not a readable)"):
        vol.load_nifti(path)
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"this is not a nifti file at all" * 10)
    with pytest.raises(DataError, match=r"junk\.nii\.gz"):
        vol.load_nifti(junk)
    empty = tmp_path / "empty.nii"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.nii: file is empty"):
        vol.load_nifti(empty)
    with pytest.raises(DataError, match=r"nope\.nii\.gz: file is missing"):
        vol.load_nifti(tmp_path / "nope.nii.gz")


def test_2d_volume_rejected(tmp_path):
    with pytest.raises(DataError, match=r"flat\.nii\.gz: volume has shape \(4, 4\)"):
        vol.load_nifti(save(tmp_path / "flat.nii.gz", np.ones((4, 4), np.float32)))


def test_nan_voxels_rejected(tmp_path):
    v = np.ones((4, 4, 2), np.float32)
    v[0, 0, 0] = np.nan
    with pytest.raises(DataError, match="NaN"):
        vol.load_nifti(save(tmp_path / "nan.nii.gz", v))


@pytest.mark.parametrize(
    "text, expected",
    [("all", None), (None, None), ("0", 0), ("5", 5), (3, 3), ("0.25", 0.25), ("1.0", None), (0.5, 0.5)],
)
def test_parse_empty_keep(text, expected):
    assert vol.parse_empty_keep(text) == expected


@pytest.mark.parametrize("text", ["-1", "1.5", "lots", "-0.2"])
def test_parse_empty_keep_rejects(text):
    with pytest.raises(ConfigError):
        vol.parse_empty_keep(text)


def test_select_slices_counts_and_fraction():
    has = np.array([0, 0, 1, 1, 0, 0, 0, 0, 0, 0], bool)  # 2 positive, 8 empty
    assert vol.select_slices(has, None) == list(range(10))
    assert vol.select_slices(has, 0) == [2, 3]
    two = vol.select_slices(has, 2)
    assert len(two) == 4 and {2, 3} <= set(two)
    assert len(vol.select_slices(has, 0.5)) == 2 + 4
    assert vol.select_slices(has, 100) == list(range(10))
    assert vol.select_slices(has, 2) == two  # deterministic


# ----------------------------------------------------------------------------------------------------
# intensity checks where a volume enters (prepare, predict)


def test_window_volume_refuses_constant_empty_window_and_label_maps():
    rng = np.random.default_rng(0)
    good = rng.uniform(0, 1000, (8, 8, 4)).astype(np.float32)
    np.testing.assert_array_equal(vol.window_volume(good, 1, 99, "v.nii.gz"), vol.window_percentiles(good, 1, 99))
    with pytest.raises(DataError, match=r"^flat\.nii\.gz: volume is constant \(every voxel is 0\); expected an image with contrast$"):
        vol.window_volume(np.zeros((8, 8, 4), np.float32), path="flat.nii.gz")
    sparse = np.zeros((16, 16, 4), np.float32)
    sparse[0, 0, :] = rng.uniform(1, 2, 4)  # 4 voxels of 1024 carry signal: the 1st and 99th percentiles are both 0
    with pytest.raises(DataError, match=r"^sparse\.nii\.gz: intensity window is empty: percentiles 1 and 99 are both 0 "
                                        r"\(100% .*--low-pct/--high-pct\)$"):
        vol.window_volume(sparse, path="sparse.nii.gz")
    assert vol.window_volume(sparse, 0, 100, "sparse.nii.gz").max() == 1.0  # a wider window is the documented way out
    labels = np.zeros((8, 8, 4), np.int16)
    labels[2:5, 2:5, 1] = 1
    labels[3, 3, 1] = 2
    with pytest.raises(DataError, match=r"seg\.nii\.gz: volume has only 3 distinct values \[0, 1, 2\], like a mask or segmentation"):
        vol.window_volume(labels, path="seg.nii.gz")


def test_label_like_and_unit_range_rules():
    from fedfms.data import intensity

    rng = np.random.default_rng(1)
    assert intensity.label_like_values(np.array([[0, 255], [255, 0]], np.uint8)) == [0, 255]
    assert intensity.label_like_values(np.array([0.0, 1.0, 2.0, 1.0])) == [0, 1, 2]
    assert intensity.label_like_values(rng.integers(0, 256, (64, 64), dtype=np.uint8)) is None  # a real 8-bit image
    assert intensity.label_like_values(np.array([0.0, 0.5, 1.0])) is None  # fractions: an image, not labels
    assert intensity.label_like_values(np.full((4, 4), 3)) is None  # constant: reported as constant instead
    img8 = rng.integers(0, 256, (4, 4), dtype=np.uint8)
    np.testing.assert_allclose(intensity.to_unit_range(img8, "unit", "x"), img8 / 255.0, atol=1e-7)
    with pytest.raises(DataError, match=r"x: image is int16 with values \[-5, 7\]"):
        intensity.to_unit_range(np.array([[-5, 7]], np.int16), "unit", "x")
    windowed = intensity.to_unit_range(np.linspace(0, 60000, 101).astype(np.uint16), "window", "x")
    assert windowed.min() == 0.0 and windowed.max() == 1.0 and 0.45 < windowed[50] < 0.55
