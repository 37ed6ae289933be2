"""Every bad input a new user is likely to hit, run through the real CLI: one line each, nothing left behind.

In a temporary folder this fabricates bad raw trees, prepared sites, images and job options, runs
``python -m fedfms.cli ...`` for each as a subprocess, and prints a Markdown table: exit code, the message
(first stderr line, paths shortened to the temp root), and what was left in the output folder. Error cases
must exit non-zero with exactly one message line (an argparse usage block before it is allowed) and no
traceback; warning cases must exit 0 with a ``warning:`` line. Pre-existing good output must stay byte-identical.
Exit status 1 when any case breaks these rules.

    timeout 1800 python bench/bad_inputs.py > bench/results/bad_inputs.md   # ~15-20 min on 2 busy cores
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
JOB = REPO / "jobs" / "fedmsa_tiny"
SMALL = ["--image-size", "32", "--mask-size", "16"]


# ----------------------------------------------------------------------------------------------------
# fabricating inputs


def nii(path: Path, data, affine=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), str(path))
    return path


def png(path: Path, array, mode=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array), mode).save(path)
    return path


def prostate_case(site_dir: Path, name: str, depth=5, seed=0, image=None, seg=None, seg_suffix="_segmentation"):
    """A 16x16xdepth T2-like volume and its segmentation (a prostate box on a few slices)."""
    rng = np.random.default_rng(seed)
    img = rng.uniform(0, 1000, size=(16, 16, depth)).astype(np.float32) if image is None else image
    if seg is None:
        seg = np.zeros(img.shape, np.uint8)
        seg[4:10, 5:12, 1:3] = 1
    nii(site_dir / f"{name}.nii.gz", img)
    nii(site_dir / f"{name}{seg_suffix}.nii.gz", seg)


def prostate_raw(root: Path) -> Path:
    raw = root / "raw"
    prostate_case(raw / "BIDMC", "Case00", seed=1)
    prostate_case(raw / "BIDMC", "Case01", depth=4, seed=2)
    return raw


def fundus_case(site_dir: Path, name: str, image=None, ext=".png"):
    rng = np.random.default_rng(len(name))
    img = rng.integers(0, 255, size=(20, 24, 3), dtype=np.uint8) if image is None else image
    png(site_dir / "images" / f"{name}{ext}", img)
    mask = np.full((20, 24), 255, np.uint8)
    mask[4:16, 6:18] = 128
    mask[8:12, 10:14] = 0
    png(site_dir / "masks" / f"{name}.png", mask)


def tissue(h=16, w=16, base=40):
    return (np.arange(h * w * 3).reshape(h, w, 3) % 97 + base).astype(np.uint8)


def disc_site(path: Path, **kw) -> Path:
    from fedfms.data.synthetic import make_disc_site

    return make_disc_site(path, **{"num_volumes": 4, "slices_per_volume": 3, **kw})


def empty_mask_site(path: Path) -> Path:
    """A site where no sample has any foreground (positive fraction 0)."""
    from fedfms.data.site_dataset import SiteWriter

    rng = np.random.default_rng(0)
    with SiteWriter(path, "nofg", "synthetic", ["disc"], 64, 32, {"generator": "empty"}) as writer:
        for v in range(4):
            for s in range(3):
                writer.add(rng.uniform(0.1, 0.5, (32, 32)).astype(np.float32), np.zeros((32, 32), np.uint8), f"v{v}", s)
    return path


def edit_manifest(site: Path, fn) -> None:
    path = site / "manifest.json"
    manifest = json.loads(path.read_text())
    fn(manifest)
    path.write_text(json.dumps(manifest))


def weights_file(path: Path) -> Path:
    """The travel set of an untrained tiny FedMSA model, saved the way FLARE's persistor saves it."""
    import torch

    from fedfms.models import ModelConfig, build_model, travel_state_dict

    model = build_model(ModelConfig("tiny", "fedmsa", num_classes=1, pretrained=False, init_seed=0))
    torch.save({"model": travel_state_dict(model, "fedmsa")}, path)
    return path


def grey_png(path: Path, seed=0) -> Path:
    return png(path, np.random.default_rng(seed).integers(0, 255, (48, 48), dtype=np.uint8))


def run_prepare(argv: list[str]) -> None:
    """A good preparation done in-process as the starting point of a stale re-run."""
    out = subprocess.run([sys.executable, "-m", "fedfms.cli", *argv], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"setup prepare failed: {out.stderr}")


# ----------------------------------------------------------------------------------------------------
# the cases


@dataclass
class Case:
    command: str
    bad: str
    setup: object  # fn(root: Path) -> (argv, watched folder or None, prepared-before: bool)
    kind: str = "error"  # "error" or "warning"
    result: dict = field(default_factory=dict)


CASES: list[Case] = []


def case(command, bad, kind="error"):
    def deco(fn):
        CASES.append(Case(command, bad, fn, kind))
        return fn
    return deco


def prep(raw, out, *extra, dataset="prostate", sites=("BIDMC",)):
    sites_arg = ["--sites", *sites] if sites else []
    return ["prepare", dataset, "--raw", str(raw), "--out", str(out), *sites_arg, *SMALL, *extra]


# --- prepare: folders


@case("prepare prostate", "--raw folder does not exist")
def _(r):
    return prep(r / "nope", r / "out"), r / "out", False


@case("prepare prostate", "a site's raw subfolder missing (no --sites: all 6 expected)")
def _(r):
    return prep(prostate_raw(r), r / "out", sites=()), r / "out", False


@case("prepare prostate", "--sites HK, but raw/HK is absent")
def _(r):
    return prep(prostate_raw(r), r / "out", sites=("HK",)), r / "out", False


@case("prepare prostate", "empty raw folder")
def _(r):
    (r / "raw").mkdir()
    return prep(r / "raw", r / "out"), r / "out", False


@case("prepare prostate", "--out is a file")
def _(r):
    (r / "out").write_text("notes")
    return prep(prostate_raw(r), r / "out"), None, False


@case("prepare prostate", "--out is the same folder as --raw")
def _(r):
    raw = prostate_raw(r)
    return prep(raw, raw), raw, True


@case("prepare prostate", "--out cannot be created (a path under a file; chmod does not stop root)")
def _(r):
    (r / "file").write_text("x")
    return prep(prostate_raw(r), r / "file" / "out"), None, False


# --- prepare: stale re-runs


def _stale(r, change):
    raw = prostate_raw(r)
    run_prepare(prep(raw, r / "out"))
    return prep(change(raw), r / "out"), r / "out", True


@case("prepare prostate (re-run)", "a case added to raw since the first run")
def _(r):
    return _stale(r, lambda raw: (prostate_case(raw / "BIDMC", "Case02", seed=5), raw)[1])


@case("prepare prostate (re-run)", "a case removed from raw since the first run")
def _(r):
    def remove(raw):
        for p in (raw / "BIDMC").glob("Case01*"):
            p.unlink()
        return raw
    return _stale(r, remove)


@case("prepare prostate (re-run)", "a case's volume edited since the first run")
def _(r):
    return _stale(r, lambda raw: (prostate_case(raw / "BIDMC", "Case00", seed=9), raw)[1])


@case("prepare prostate (re-run)", "--raw now points at another download")
def _(r):
    def elsewhere(raw):
        other = r / "raw2"
        prostate_case(other / "BIDMC", "Case07", seed=7)
        return other
    return _stale(r, elsewhere)


@case("prepare prostate (re-run)", "other settings (--low-pct 5) than the first run")
def _(r):
    raw = prostate_raw(r)
    run_prepare(prep(raw, r / "out"))
    return prep(raw, r / "out", "--low-pct", "5"), r / "out", True


# --- prepare: bad volumes and images


def _bad_case(r, **kw):
    raw = prostate_raw(r)
    prostate_case(raw / "BIDMC", "Case01", **kw)
    return prep(raw, r / "out"), r / "out", False


@case("prepare prostate", "constant (all-zero) volume")
def _(r):
    return _bad_case(r, image=np.zeros((16, 16, 4), np.float32))


@case("prepare prostate", "all-NaN volume")
def _(r):
    return _bad_case(r, image=np.full((16, 16, 4), np.nan, np.float32))


@case("prepare prostate", "volume that is a label map (segmentation saved as the image)")
def _(r):
    labels = np.zeros((16, 16, 4), np.int16)
    labels[4:9, 4:9, 1] = 1
    return _bad_case(r, image=labels)


@case("prepare prostate", "segmentation coded 0/255")
def _(r):
    seg = np.zeros((16, 16, 5), np.uint8)  # the image's grid (prostate_case: depth 5)
    seg[4:10, 5:12, 1] = 255
    return _bad_case(r, seg=seg)


@case("prepare prostate", "segmentation with an out-of-range label (7)")
def _(r):
    seg = np.zeros((16, 16, 5), np.uint8)  # the image's grid (prostate_case: depth 5)
    seg[4:10, 5:12, 1] = 7
    return _bad_case(r, seg=seg)


@case("prepare prostate", "segmentation shape differs from the image's")
def _(r):
    return _bad_case(r, seg=np.zeros((16, 12, 4), np.uint8))


@case("prepare prostate", "segmentation file missing for a case")
def _(r):
    raw = prostate_raw(r)
    (raw / "BIDMC" / "Case01_segmentation.nii.gz").unlink()
    return prep(raw, r / "out"), r / "out", False


@case("prepare prostate", "corrupt NIfTI (truncated .nii.gz)")
def _(r):
    raw = prostate_raw(r)
    path = raw / "BIDMC" / "Case01.nii.gz"
    path.write_bytes(path.read_bytes()[:200])
    return prep(raw, r / "out"), r / "out", False


@case("prepare prostate", "a .nii.gz that is not gzip (plain text renamed)")
def _(r):
    raw = prostate_raw(r)
    (raw / "BIDMC" / "Case01.nii.gz").write_text("this is not a volume\n")
    return prep(raw, r / "out"), r / "out", False


@case("prepare fundus", "16-bit PNG photo (no 2D windowing option)")
def _(r):
    raw = r / "raw"
    fundus_case(raw / "REFUGE", "g0001")
    fundus_case(raw / "REFUGE", "g0002", image=np.random.default_rng(0).integers(0, 4096, (20, 24)).astype(np.uint16))
    return prep(raw, r / "out", dataset="fundus", sites=("REFUGE",)), r / "out", False


@case("prepare fundus", "corrupt PNG photo (truncated)")
def _(r):
    raw = r / "raw"
    fundus_case(raw / "REFUGE", "g0001")
    fundus_case(raw / "REFUGE", "g0002")
    path = raw / "REFUGE" / "images" / "g0002.png"
    path.write_bytes(path.read_bytes()[:60])
    return prep(raw, r / "out", dataset="fundus", sites=("REFUGE",)), r / "out", False


@case("prepare fundus", "all-black (constant) photo")
def _(r):
    raw = r / "raw"
    fundus_case(raw / "REFUGE", "g0001", image=np.zeros((20, 24, 3), np.uint8))
    return prep(raw, r / "out", dataset="fundus", sites=("REFUGE",)), r / "out", False


@case("prepare fundus", "a mask saved among the photos (label-like image)")
def _(r):
    raw = r / "raw"
    fundus_case(raw / "REFUGE", "g0001", image=np.where(np.eye(20, 24) > 0, 128, 255).astype(np.uint8))
    return prep(raw, r / "out", dataset="fundus", sites=("REFUGE",)), r / "out", False


@case("prepare fundus", "photo and mask of different sizes")
def _(r):
    raw = r / "raw"
    fundus_case(raw / "REFUGE", "g0001", image=np.random.default_rng(0).integers(0, 255, (30, 24, 3), dtype=np.uint8))
    return prep(raw, r / "out", dataset="fundus", sites=("REFUGE",)), r / "out", False


@case("prepare nuclei", "float TIFF tile with values out of [0, 1]")
def _(r):
    site = r / "raw" / "MoNuSAC"
    png(site / "images" / "TCGA-55-1594-01Z-00-DX1_1.png", tissue())
    img = (np.random.default_rng(0).uniform(0, 300, (16, 16))).astype(np.float32)
    png(site / "images" / "TCGA-55-1594-01Z-00-DX1_2.tif", img, "F")
    for k in (1, 2):
        gt = np.zeros((16, 16), np.uint8)
        gt[3:6, 3:6] = 1
        png(site / "masks" / f"TCGA-55-1594-01Z-00-DX1_{k}.png", gt)
    return prep(r / "raw", r / "out", dataset="nuclei", sites=("MoNuSAC",)), r / "out", False


@case("prepare nuclei", "TNBC folder without the Slide_/GT_ layout")
def _(r):
    (r / "raw" / "TNBC" / "whatever").mkdir(parents=True)
    return prep(r / "raw", r / "out", dataset="nuclei", sites=("TNBC",)), r / "out", False


@case("prepare prostate", "--preset reference with a contradicting --low-pct 1")
def _(r):
    return prep(prostate_raw(r), r / "out", "--preset", "reference", "--low-pct", "1"), r / "out", False


@case("prepare fets", "--preset reference --empty-slices-keep all (preset sets every:5)")
def _(r):
    (r / "raw").mkdir()  # the raw folder exists: the contradiction itself must be what is refused
    return prep(r / "raw", r / "out", "--preset", "reference", "--empty-slices-keep", "all", dataset="fets", sites=()), r / "out", False


@case("prepare prostate", "--empty-slices-keep many (not a number)")
def _(r):
    return prep(prostate_raw(r), r / "out", "--empty-slices-keep", "many"), r / "out", False


@case("prepare prostate", "--low-pct 99 --high-pct 1 (window reversed)")
def _(r):
    return prep(prostate_raw(r), r / "out", "--low-pct", "99", "--high-pct", "1"), r / "out", False


@case("prepare prostate", "a fundus-only option (--disc-includes-cup) for prostate")
def _(r):
    return prep(prostate_raw(r), r / "out", "--disc-includes-cup", "false"), r / "out", False


# --- check-site


def check(site):
    return ["check-site", "--job", str(JOB), "--data-dir", str(site)]


@case("check-site", "one patient only: no validation samples", kind="warning")
def _(r):
    return check(disc_site(r / "site", num_volumes=1, slices_per_volume=8)), r / "site", True


@case("check-site", "fewer training samples (4) than a batch (6)", kind="warning")
def _(r):
    return check(disc_site(r / "site", num_volumes=3, slices_per_volume=2)), r / "site", True


@case("check-site", "positive fraction 0 (no mask has foreground)", kind="warning")
def _(r):
    return check(empty_mask_site(r / "site")), r / "site", True


@case("check-site", "positive fraction 1 (every sample has foreground)", kind="warning")
def _(r):
    return check(disc_site(r / "site", num_volumes=6)), r / "site", True


@case("check-site", "--data-dir does not exist")
def _(r):
    return check(r / "nosite"), None, False


@case("check-site", "manifest.json is not valid JSON")
def _(r):
    site = disc_site(r / "site")
    (site / "manifest.json").write_text('{"format": "fedfms-site", "samples": [')
    return check(site), site, True


@case("check-site", "manifest has 2 classes, the job 1")
def _(r):
    site = disc_site(r / "site")
    edit_manifest(site, lambda m: m.update(classes=["disc", "cup"]))
    return check(site), site, True


@case("check-site", "an image listed in the manifest is missing")
def _(r):
    site = disc_site(r / "site")
    sample = json.loads((site / "manifest.json").read_text())["samples"][2]
    (site / sample["image"]).unlink()
    return check(site), site, True


@case("check-site", "a raw download given instead of a prepared site")
def _(r):
    return check(prostate_raw(r) / "BIDMC"), None, False


# --- predict


def predict(r, inputs, *extra):
    w = r / "w.pt" if (r / "w.pt").exists() else weights_file(r / "w.pt")
    return ["predict", "--job", str(JOB), "--weights", str(w), "--out", str(r / "pred"), *extra, *map(str, inputs)]


@case("predict", "one good image and one missing file in the same call")
def _(r):
    return predict(r, [grey_png(r / "good.png"), r / "missing.png"]), r / "pred", False


@case("predict", "one good image and one corrupt PNG in the same call")
def _(r):
    bad = r / "bad.png"
    bad.write_bytes(grey_png(r / "tmp.png").read_bytes()[:50])
    return predict(r, [grey_png(r / "good.png"), bad]), r / "pred", False


@case("predict", "constant (all-black) image")
def _(r):
    return predict(r, [png(r / "black.png", np.zeros((48, 48), np.uint8))]), r / "pred", False


@case("predict", "a mask given as the input (label-like)")
def _(r):
    mask = np.zeros((48, 48), np.uint8)
    mask[10:20, 10:20] = 255
    return predict(r, [png(r / "mask.png", mask)]), r / "pred", False


@case("predict", "all-NaN NIfTI volume")
def _(r):
    return predict(r, [nii(r / "vol.nii.gz", np.full((16, 16, 3), np.nan, np.float32))]), r / "pred", False


@case("predict", "prediction exists, no --overwrite")
def _(r):
    good = grey_png(r / "good.png")
    run_prepare(predict(r, [good]))  # a first, good prediction
    return predict(r, [good]), r / "pred", True


@case("predict", "unknown extension (.dcm)")
def _(r):
    (r / "scan.dcm").write_bytes(b"DICM" * 40)
    return predict(r, [r / "scan.dcm"]), r / "pred", False


@case("predict", "--weights is not a model file")
def _(r):
    (r / "w.pt").write_text("not a checkpoint")
    return ["predict", "--job", str(JOB), "--weights", str(r / "w.pt"), "--out", str(r / "pred"),
            str(grey_png(r / "good.png"))], r / "pred", False


@case("predict", "--weights of a 2-class model for a 1-class job")
def _(r):
    import torch

    from fedfms.models import ModelConfig, build_model, travel_state_dict

    model = build_model(ModelConfig("tiny", "fedmsa", num_classes=2, pretrained=False, init_seed=0))
    torch.save({"model": travel_state_dict(model, "fedmsa")}, r / "w2.pt")
    return ["predict", "--job", str(JOB), "--weights", str(r / "w2.pt"), "--out", str(r / "pred"),
            str(grey_png(r / "good.png"))], r / "pred", False


# --- simulate


@case("simulate", "--data-root lacks one client's site folder")
def _(r):
    disc_site(r / "data" / "site-1")
    return ["simulate", str(JOB), "--workspace", str(r / "ws"), "--clients", "site-1,site-2",
            "--data-root", str(r / "data")], r / "ws", False


@case("simulate", "--data-root folder does not exist")
def _(r):
    return ["simulate", str(JOB), "--workspace", str(r / "ws"), "--clients", "site-1,site-2",
            "--data-root", str(r / "nodata")], r / "ws", False


# --- job new


@case("job new", "unknown variant 'fedmsa_small'")
def _(r):
    return ["job", "new", "fedmsa_small", str(r / "job")], r / "job", False


@case("job new", "bad --site-samples syntax (A:120)")
def _(r):
    return ["job", "new", "fedmsa_tiny", str(r / "job"), "--sites", "A,B", "--site-samples", "A:120"], r / "job", False


@case("job new", "--min-sites 3 with 2 --sites")
def _(r):
    return ["job", "new", "fedmsa_tiny", str(r / "job"), "--sites", "A,B", "--min-sites", "3"], r / "job", False


@case("job new", "--train is not valid JSON")
def _(r):
    return ["job", "new", "fedmsa_tiny", str(r / "job"), "--train", "{lr: 1e-4}"], r / "job", False


@case("job new", "output job folder exists, no --overwrite")
def _(r):
    run_prepare(["job", "new", "fedmsa_tiny", str(r / "job")])
    return ["job", "new", "fedmsa_tiny", str(r / "job"), "--rounds", "3"], r / "job", True


# ----------------------------------------------------------------------------------------------------
# running and judging


def snapshot(folder: Path | None) -> dict[str, str]:
    if folder is None or not folder.exists():
        return {}
    if folder.is_file():
        return {".": hashlib.sha256(folder.read_bytes()).hexdigest()}
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(folder.rglob("*"))}


def usage_block(line: str) -> bool:
    return line.startswith("usage:") or line.startswith(" ")


def run_case(index: int, c: Case, base: Path) -> None:
    root = base / f"c{index:02d}"
    root.mkdir()
    try:
        argv, watched, existed = c.setup(root)
    except Exception as exc:  # a broken fabrication is a failure of this script, not of the CLI
        c.result = {"exit": "-", "message": f"SETUP FAILED: {exc!r}"[:200], "left": "-", "problems": ["setup failed"]}
        return
    before = snapshot(watched)
    started = time.time()
    try:
        proc = subprocess.run([sys.executable, "-m", "fedfms.cli", *argv], capture_output=True, text=True,
                              cwd=root, timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        proc = subprocess.CompletedProcess(argv, "timeout", "", err + "\n(no answer within 600 s)")
    after = snapshot(watched)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    problems = []
    if "Traceback" in proc.stderr:
        problems.append("traceback")
    if c.kind == "error":
        message_lines = [ln for ln in lines if not usage_block(ln)]
        if proc.returncode == 0:
            problems.append("exit 0 for an error")
        if len(message_lines) != 1:
            problems.append(f"{len(message_lines)} message lines")
        message = message_lines[0] if message_lines else (proc.stdout.strip().splitlines() or ["(nothing)"])[0]
    else:
        warnings = [ln for ln in lines if ln.startswith("warning:")]
        if proc.returncode != 0:
            problems.append(f"exit {proc.returncode} for a warning")
        if not warnings:
            problems.append("no warning")
        message = warnings[0] if warnings else (lines or ["(nothing)"])[0]
    if existed:
        left = "good output untouched" if after == before else "GOOD OUTPUT CHANGED"
        if after != before:
            problems.append("pre-existing output changed")
    else:
        new = sorted(set(after) - set(before))
        left = "nothing" if not new else f"{len(new)} path(s): {', '.join(new[:3])}"
        if new and c.kind == "error":
            problems.append("left files behind")
    c.result = {"exit": proc.returncode, "message": message.replace(str(base), "TMP"), "left": left,
                "problems": problems, "seconds": round(time.time() - started, 1),
                "stderr": proc.stderr.replace(str(base), "TMP")}
    if proc.returncode == "timeout":
        c.result["problems"].append("no answer within 600 s")
    print(f"#{index} exit {c.result['exit']} {c.result['message'][:110]} {c.result['problems'] or ''}", file=sys.stderr, flush=True)


def cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="cases run at the same time")
    parser.add_argument("--only", type=int, nargs="*", help="case numbers to run (1-based)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="fedfms_bad_inputs_"))
    selected = [(i, c) for i, c in enumerate(CASES, 1) if not args.only or i in args.only]
    started = time.time()
    try:
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda ic: run_case(ic[0], ic[1], base), selected))
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    print(f"# Bad inputs through the real CLI ({len(selected)} cases)\n")
    print(f"`python bench/bad_inputs.py`, {time.strftime('%Y-%m-%d')}, {time.time() - started:.0f} s; TMP = the temporary root; "
          "exit 2 = a one-line `error:`; warning cases must exit 0.\n")
    print("| # | command (short) | bad input | exit | message (first stderr line) | left behind |")
    print("|---|---|---|---|---|---|")
    failures = []
    for i, c in selected:
        res = c.result
        flag = f" **{'; '.join(res['problems'])}**" if res["problems"] else ""
        print(f"| {i} | {cell(c.command)} | {cell(c.bad)} | {res['exit']} | {cell(res['message'])}{flag} | {cell(res['left'])} |")
        if res["problems"]:
            failures.append((i, c))
    errors = sum(c.kind == "error" for _, c in selected)
    print(f"\n{len(selected)} cases ({errors} errors, {len(selected) - errors} warnings); "
          f"{len(failures)} broke the rules (traceback, exit 0 for an error, several message lines, files left or changed).")
    for i, c in failures:
        print(f"\n<details><summary>#{i} full stderr</summary>\n\n```\n{c.result.get('stderr', '')[-3000:]}\n```\n</details>")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
