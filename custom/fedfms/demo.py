"""``fedfms demo``: what federating a pretrained foundation model buys, on a CPU, offline, in a few minutes.

Four sites segment white matter in MNI152 slices seen by four different "scanners"
(:mod:`fedfms.data.preparers.mni_demo`: per-scan intensity inhomogeneity, noise, contrast and head position); the
third site is scarce (one scan to train on), the fourth's scanner inverts the tissue contrast. Seven ways to get a
segmenter, each scored on the *same* validation slices of every site by the same rule
(:mod:`fedfms.evaluation.baselines`):

1. ``threshold``: each site's best intensity threshold, chosen on its own training slices;
2. ``alone``: each site trains the FedMSA model (adapters + decoder on the pretrained frozen encoder) on its own
   training slices only, for as many epochs as the federation's rounds x local epochs;
3. ``fedmsa``: FedMSA with the pretrained frozen encoder, FedAvg over the four sites in FLARE's simulator;
4. ``fedmsa_personal``: FedMSA personalised (:mod:`fedfms.training.personal`, ``DEMO_PERSONALISE``): each site
   scored with its own personalised model, which its simulated FLARE site saved. A setting that keeps no part of
   the model at the sites (``finetune:N``, the default) trains exactly as ``fedmsa``, so both rows come from one
   federation: the global model and each site's fine-tuned copy of it; one with a local part (``norm``, ``head``,
   ``decoder``) trains differently and runs its own federation;
5. ``fedmsa_pt``: FedMSA with a random frozen encoder (the paper's -PT ablation), in FLARE's simulator;
6. ``fedsam``: FedSAM, every weight of the pretrained tiny SAM trained, in FLARE's simulator;
7. ``central``: the FedMSA model trained on the pooled training slices of all sites (what federation approximates).

Below the table, each site's personalised model is compared with the better of the global FedMSA model and the
site alone, and the sites where it falls short by more than the noise (:data:`fedfms.training.personal.NOISE_DICE`)
are named.

The pretrained encoder is the ``tiny`` SAM that ``fedfms pretrain`` made from generated scenes (no brain, no MRI:
:mod:`fedfms.training.pretrain`), committed in ``fedfms/assets`` and loaded by the strict loader of the official
SAM checkpoints. Every model keeps its last round or epoch (no selection on validation data). Seeds are fixed:
a rerun gives the same table.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from fedfms.data.preparers.mni_demo import SCANNERS, SITES
from fedfms.errors import ConfigError, FedFMSError
from fedfms.evaluation.personal import comparison_rows, format_comparison
from fedfms.evaluation.baselines import (fit_threshold, model_predictor, score, site_split, threshold_predictor,
                                         train_alone)
from fedfms.numbers import finite_mean, fmt_score
from fedfms.models import ModelConfig
from fedfms.training.personal import NOISE_DICE, Personalisation
from fedfms.training.pretrain import DEMO_CHECKPOINT, provenance_path
from fedfms.training.trainer import TrainConfig
from fedfms.data.preparers.registry import prepare
from fedfms.training.predict import load_model
from fedfms.evaluation.personal import read_personal_record
from fedfms.reporting.run_report import pick_samples, plot_demo, site_pictures

DEMO_ROUNDS = 10
DEMO_EPOCHS = 3
# The demo's local training: small sites need several local epochs per round to learn anything (one epoch of a
# 6-slice site is a single step); a third of each site's scans validate (at least one).
DEMO_TRAIN = {"batch_size": 6, "lr": 3e-3, "betas": [0.9, 0.999], "loss": "bce_dice", "val_fraction": 0.34,
              "seed": 0, "split_seed": 0, "threads": 1, "device": "cpu", "progress": False}
SCARCE_SITE = "site-3"
INVERTED_SITE = "site-4"
OVERLAY_SAMPLES = 2
# The personalised FedMSA row: after the last round every site fine-tunes the final global model on its own slices
# for 5 epochs (`fedfms demo --personalise norm,finetune:5` etc. to try another setting: docs/federation.md)
DEMO_PERSONALISE = "finetune:5"


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    federated: bool = False
    variant: str | None = None  # the FLARE job variant a federated method renders
    pretrained: bool = True
    personalised: bool = False  # the job's personalise setting is the demo's (--personalise)


METHODS = (
    Method("threshold", "threshold per site"),
    Method("alone", "each site alone (FedMSA model)"),
    Method("fedmsa", "FedMSA, pretrained encoder", True, "fedmsa_tiny"),
    Method("fedmsa_personal", "FedMSA personalised", True, "fedmsa_tiny", personalised=True),
    Method("fedmsa_pt", "FedMSA -PT (random encoder)", True, "fedmsa_tiny", pretrained=False),
    Method("fedsam", "FedSAM, pretrained", True, "fedsam_tiny"),
    Method("central", "centralised (FedMSA, pooled)"),
)
METHOD_KEYS = tuple(m.key for m in METHODS)


def checkpoint_path() -> Path:
    if not DEMO_CHECKPOINT.is_file():
        raise ConfigError(f"{DEMO_CHECKPOINT}: the demo's pretrained tiny SAM is missing; make it with "
                          f"`fedfms pretrain --out {DEMO_CHECKPOINT}` (see its README)")
    return DEMO_CHECKPOINT


def model_config(mode: str, pretrained: bool) -> ModelConfig:
    return ModelConfig(variant="tiny", mode=mode, num_classes=1, pretrained=pretrained, init_seed=0,
                       checkpoint=str(checkpoint_path()) if pretrained else None)


def train_config(epochs: int) -> TrainConfig:
    return TrainConfig.from_dict({**DEMO_TRAIN, "epochs": epochs}, "demo train config")


def _per_site(scores: dict) -> str:
    return " | ".join(f"{site} {fmt_score(scores.get(site))}" for site in SITES)


class Demo:
    def __init__(self, out: Path, rounds: int, epochs: int, methods: tuple[str, ...], verbose: bool,
                 say: Callable[[str], None] = print, personalise: str = DEMO_PERSONALISE):
        unknown = [m for m in methods if m not in METHOD_KEYS]
        if unknown:
            raise ConfigError(f"--methods: unknown method(s) {unknown}; expected some of {', '.join(METHOD_KEYS)}")
        for name, value in (("rounds", rounds), ("epochs", epochs)):
            if value < 1:
                raise ConfigError(f"--{name} is {value}; expected a positive integer")
        self.out, self.rounds, self.epochs, self.verbose, self.say = Path(out), rounds, epochs, verbose, say
        self.methods = [m for m in METHODS if m.key in methods]
        setting = Personalisation.parse(personalise, "--personalise")
        self.personalise = str(setting)
        self.labels = {m.key: f"{m.label} ({self.personalise})" if m.personalised else m.label for m in self.methods}
        # no local part: the personalised row is the FedMSA federation's own sites, fine-tuned after its last round
        self.shared_personal = not setting.local_parts and {"fedmsa", "fedmsa_personal"} <= set(methods)
        self.tcfg = train_config(epochs)
        self.run = self.out / "runs" / time.strftime("%Y%m%d-%H%M%S")
        self.scores: dict[str, dict[str, dict]] = {}  # method -> site -> metrics
        self.seconds: dict[str, float] = {}
        self.predictors: dict[str, dict[str, Callable]] = {}  # method -> site -> predictor (for the pictures)
        self.runs: dict[str, Path] = {}  # federated method -> server run folder
        self._printed: set[str] = set()

    # ------------------------------------------------------------------ data
    def prepare(self) -> None:
        size = {"image_size": 128, "mask_size": 32}
        try:
            self.site_dirs = prepare("mni-demo", self.out / "raw", self.out / "sites", summary=False, **size)
        except FedFMSError as exc:
            if not (self.out / "sites").is_dir():
                raise
            # the demo's sites are derived data of this demo folder (e.g. made by an older version): build them again
            self.say(f"rebuilding the demo sites in {self.out / 'sites'} ({exc})")
            self.site_dirs = prepare("mni-demo", self.out / "raw", self.out / "sites", overwrite=True, summary=False, **size)
        self.site_dirs = {p.name: p for p in self.site_dirs}
        self.splits = {site: site_split(d, self.tcfg, 128, 32) for site, d in self.site_dirs.items()}

    # ------------------------------------------------------------------ methods
    def _score_all(self, key: str, predictors: dict[str, Callable]) -> dict[str, float]:
        self.predictors[key] = predictors
        self.scores[key] = {}
        for site, (dataset, _, val) in self.splits.items():
            self.scores[key][site] = score(predictors[site], dataset, val)
        return {site: self.scores[key][site]["dice"] for site in self.splits}

    def threshold(self) -> None:
        self.thresholds = {site: fit_threshold(dataset, train) for site, (dataset, train, _) in self.splits.items()}
        predictors = {site: threshold_predictor(t["threshold"], t["polarity"], 32) for site, t in self.thresholds.items()}
        self._score_all("threshold", predictors)

    def alone(self) -> None:
        cfg = model_config("fedmsa", True)
        predictors = {}
        for site, path in self.site_dirs.items():
            trainer = train_alone(cfg, self.tcfg, path, self.rounds * self.epochs)
            predictors[site] = model_predictor(trainer.model)
        self._score_all("alone", predictors)

    def central(self) -> None:
        trainer = train_alone(model_config("fedmsa", True), self.tcfg, list(self.site_dirs.values()), self.rounds * self.epochs)
        predictor = model_predictor(trainer.model)
        self._score_all("central", {site: predictor for site in self.site_dirs})

    def federate(self, method: Method) -> int:
        # FLARE loads only when a method federates (the threshold, alone and central rows run without it)
        from fedfms.flare.fed_job import write_job
        from fedfms.flare.simulate import report_outcome, server_job_dir, simulate

        mode = "fedsam" if method.variant.startswith("fedsam") else "fedmsa"
        cfg = model_config(mode, method.pretrained)
        model = {"pretrained": cfg.pretrained, "checkpoint": cfg.checkpoint}
        folder = self.run / method.key
        personalised = method.personalised or (method.key == "fedmsa" and self.shared_personal)
        job = write_job(method.variant, folder / "job", num_rounds=self.rounds, train={**DEMO_TRAIN, "epochs": self.epochs},
                        model={k: v for k, v in model.items() if v is not None} if cfg.pretrained else {"pretrained": False},
                        personalise=self.personalise if personalised else None)
        outcome = simulate(job, folder / "workspace", list(SITES), data_root=self.out / "sites", quiet=not self.verbose,
                           echo=self._echo_once)
        rc = report_outcome(folder / "workspace", outcome)
        if rc != 0:
            return rc
        run_dir = server_job_dir(folder / "workspace")
        self.runs[method.key] = run_dir
        if personalised:
            # each site's own personalised model, as its simulated FLARE site saved it (fedfms_personal/ in its folder)

            record = read_personal_record(run_dir)
            cfg.local_parts = Personalisation.parse(self.personalise).local_parts
            self.personal_record = record
            self._score_all("fedmsa_personal", {site: model_predictor(load_model(cfg, record["sites"][site]["files"]["personal"]))
                                                for site in self.site_dirs})
        if not method.personalised:
            predictor = model_predictor(load_model(cfg, run_dir / "app_server" / "FL_global_model.pt"))
            self._score_all(method.key, {site: predictor for site in self.site_dirs})
        return 0

    def _echo_once(self, line: str) -> None:
        """The simulator's opening lines (placement, check-site warnings) once for the demo, not once per run."""
        if line not in self._printed:
            self._printed.add(line)
            self.say(f"  {line}")

    # ------------------------------------------------------------------ the whole demo
    def header(self) -> None:
        info = json.loads(provenance_path(checkpoint_path()).read_text()) if provenance_path(checkpoint_path()).is_file() else {}
        settings = info.get("settings", {})
        self.say(f"FedFMS demo: white matter in MNI152 slices seen by {len(SITES)} scanners (offline; sites in "
                 f"{self.out / 'sites'})")
        for site, (_, train, val) in self.splits.items():
            self.say(f"  {site}: {SCANNERS[site].description}; {len(train)} training / {len(val)} validation slices")
        self.say(f"  pretrained encoder: {checkpoint_path().name} (`fedfms pretrain`, seed {settings.get('seed', '?')}, "
                 f"{settings.get('steps', '?')} steps on generated scenes, no brain image)")
        self.say(f"  {self.rounds} rounds x {self.epochs} local epochs; every method scored on the same validation slices")

    def execute(self) -> int:
        start = time.perf_counter()
        self.prepare()
        self.header()
        n = len(self.methods)
        for i, method in enumerate(self.methods, 1):
            t = time.perf_counter()
            if method.personalised and self.shared_personal:
                self.seconds[method.key] = float(self.personal_record.get("seconds") or 0.0)
                self.say(f"[{i}/{n}] {self.labels[method.key]}: each site fine-tuned the FedMSA run's final global model "
                         "on its own slices: " + _per_site({s: v["dice"] for s, v in self.scores[method.key].items()})
                         + f" ({self.seconds[method.key]:.0f} s in that run)")
            elif method.federated:
                shared = method.key == "fedmsa" and self.shared_personal
                how = f"FedAvg, then personalised ({self.personalise})" if method.personalised or shared else "FedAvg"
                self.say(f"[{i}/{n}] {self.labels[method.key]}: {how} in FLARE's simulator "
                         f"(logs: {self.run / method.key / 'workspace'})")
                rc = self.federate(method)
                if rc != 0:
                    return rc
                self.seconds[method.key] = time.perf_counter() - t
            else:
                getattr(self, method.key)()
                self.seconds[method.key] = time.perf_counter() - t
                self.say(f"[{i}/{n}] {self.labels[method.key]}: " + _per_site({s: v["dice"] for s, v in self.scores[method.key].items()})
                         + f" ({self.seconds[method.key]:.0f} s)")
        self.say("")
        self.say(format_demo_table(self.scores, self.methods, self.labels))
        for line in verdict(self.scores):
            self.say(line)
        for line in personal_verdict(self.scores, self.personalise):
            self.say(line)
        self.run.mkdir(parents=True, exist_ok=True)
        table = self.run / "demo_table.json"
        table.write_text(json.dumps(self.table_json(time.perf_counter() - start), indent=2) + "\n")
        png = self.figure()
        self.say(f"\nwall time {time.perf_counter() - start:.0f} s; figure {png}; table {table}")
        return 0

    def table_json(self, seconds: float) -> dict:
        return {
            "validation": "each site's validation scans (patient-level split, val_fraction "
                          f"{self.tcfg.val_fraction}, split_seed {self.tcfg.split_seed}); Dice per slice at sigmoid > 0.5",
            "rounds": self.rounds, "epochs": self.epochs, "train": {**DEMO_TRAIN, "epochs": self.epochs},
            "checkpoint": str(checkpoint_path()),
            "sites": {site: {"train": len(tr), "val": len(va), "scanner": SCANNERS[site].description}
                      for site, (_, tr, va) in self.splits.items()},
            "personalise": self.personalise, "noise_dice": NOISE_DICE,
            "personalisation_record": getattr(self, "personal_record", None),
            "methods": {m.key: {"label": self.labels[m.key], "seconds": round(self.seconds.get(m.key, 0.0), 1),
                                "sites": {s: {k: _plain(v) for k, v in r.items() if k in ("dice", "iou", "volume_dice", "num_samples")}
                                          for s, r in self.scores.get(m.key, {}).items()}}
                        for m in self.methods},
            "thresholds": getattr(self, "thresholds", None),
            "federated_runs": {k: str(v) for k, v in self.runs.items()},
            "seconds": round(seconds, 1),
        }

    def figure(self) -> Path:
        labels = self.labels
        shown = [k for k in ("fedmsa", "fedmsa_personal", "alone", "threshold") if k in self.predictors]
        pictures = {site: site_pictures(dataset, pick_samples(val, OVERLAY_SAMPLES),
                                        {labels[k]: self.predictors[k][site] for k in shown})
                    for site, (dataset, _, val) in self.splits.items()}
        return plot_demo(self.run / "report.png", self.scores, [(m.key, labels[m.key]) for m in self.methods], self.runs,
                         pictures, title=f"FedFMS demo: white matter, {len(SITES)} scanners, {self.rounds} rounds x "
                                         f"{self.epochs} local epochs; {SCARCE_SITE} is the scarce site, {INVERTED_SITE}'s "
                                         "contrast is inverted")


def _plain(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (np.floating, torch.Tensor)):
        return float(v)
    return v


SITE_NOTES = {SCARCE_SITE: "scarce", INVERTED_SITE: "inverted"}


def format_demo_table(scores: dict, methods, labels: dict | None = None) -> str:
    """Methods as rows, sites as columns (the scarce and the inverted one marked) and the mean over sites,
    validation Dice."""
    labels = labels or {m.key: m.label for m in methods}
    header = ["method"] + [f"{s} ({SITE_NOTES[s]})" if s in SITE_NOTES else s for s in SITES] + ["mean"]
    body = []
    for m in methods:
        if m.key not in scores:
            continue
        values = [scores[m.key].get(s, {}).get("dice") for s in SITES]
        body.append([labels[m.key]] + [fmt_score(v) for v in values] + [fmt_score(finite_mean(values))])
    table = [header] + body
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "validation Dice (per slice, sigmoid > 0.5), the same slices for every method\n" + "\n".join(lines)


def verdict(scores: dict) -> list[str]:
    """What the table says at the scarce site, in numbers: FedMSA (pretrained) against each baseline."""
    fed = scores.get("fedmsa", {}).get(SCARCE_SITE, {}).get("dice")
    if fed is None:
        return []
    parts = []
    for key, name in (("threshold", "its threshold"), ("alone", f"{SCARCE_SITE} alone"), ("fedmsa_pt", "FedMSA -PT")):
        other = scores.get(key, {}).get(SCARCE_SITE, {}).get("dice")
        if other is not None:
            parts.append(f"{name} {other:.3f} ({fed - other:+.3f})")
    return [f"at the scarce {SCARCE_SITE}: FedMSA (pretrained) {fed:.3f} vs " + ", ".join(parts)] if parts else []


def personal_verdict(scores: dict, personalise: str, noise: float = NOISE_DICE) -> list[str]:
    """Per site, the personalised FedMSA against the better of the global FedMSA and the site alone; the sites where
    it is below that by more than ``noise`` are named."""
    if "fedmsa_personal" not in scores:
        return []
    per_site = {s: {"global": scores.get("fedmsa", {}).get(s, {}).get("dice"),
                    "personal": scores["fedmsa_personal"].get(s, {}).get("dice"),
                    "alone": scores.get("alone", {}).get(s, {}).get("dice")} for s in SITES}
    rows = comparison_rows(per_site, noise)
    lines = ["", f"personalised FedMSA ({personalise}) against the better of the global FedMSA model and the site alone:",
             format_comparison(rows, noise, {"global": "FedMSA global", "personal": "personalised", "alone": "alone"})]
    below = [r["site"] for r in rows if r["below"]]
    compared = [r for r in rows if r["site"] != "mean" and r["gap"] is not None]
    if below:
        lines.append(f"below the better of global and alone by more than {noise}: {', '.join(below)}")
    elif compared:
        lines.append(f"at every site the personalised model is at least the better of global and alone, within {noise} Dice")
    return lines


def run_demo(out: str | Path = "demo_out", rounds: int = DEMO_ROUNDS, epochs: int = DEMO_EPOCHS,
             methods: tuple[str, ...] = METHOD_KEYS, verbose: bool = False, say: Callable[[str], None] | None = None,
             personalise: str = DEMO_PERSONALISE) -> int:
    say = say or (lambda msg: print(msg, flush=True))
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return Demo(Path(out), rounds, epochs, tuple(methods), verbose, say, personalise).execute()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_demo())
