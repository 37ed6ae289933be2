"""The run record the server's federation monitor writes (``fedfms_run.json`` in the server's run folder):
what every round averaged, which site missed which round and why, and the run's status. Plain JSON, read
here without FLARE by ``fedfms simulate``, ``fedfms report`` and ``fedfms job resume``."""

from __future__ import annotations

import json
import math
from pathlib import Path

from fedfms.errors import DataError

RUN_RECORD = "fedfms_run.json"

# what a run record's "status" means
COMPLETED = "completed"  # every round, every expected site accepted
COMPLETED_WITH_GAPS = "completed_with_gaps"  # every round done, but some site missed some round (named)
FAILED = "failed"  # stopped before the last round (reason given)
RUNNING = "running"

# exit codes of `fedfms simulate` and `fedfms report`
EXIT_OK = 0  # every round averaged every expected site
EXIT_FAILED = 1  # the run stopped before its last round, or FLARE failed
EXIT_GAPS = 3  # every round ran, but some site missed some round (each named in the summary)


def exit_code(record: dict | None) -> int:
    if record is None:
        return EXIT_OK
    return {COMPLETED: EXIT_OK, COMPLETED_WITH_GAPS: EXIT_GAPS}.get(record.get("status"), EXIT_FAILED)


def as_float(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def site_summary(record: dict) -> dict:
    """site -> {"samples", "contributed": [rounds], "missed": {round: reason}} over the record's finished rounds."""
    sites = {s: {"samples": None, "contributed": [], "missed": {}} for s in record.get("expected_sites", [])}
    for r in record.get("rounds", []):
        if r.get("status") in (RUNNING, "interrupted") and r.get("seconds") is None:
            continue  # a round in progress (or cut off by a killed server) missed nobody yet
        ended = r.get("ended", {})  # why the round stopped waiting for a site (fedfms.flare.liveness)
        why = {**{s: ended.get(s, "no result") for s in r.get("missing", [])}, **r.get("failed", {})}
        for site in set(sites) | set(r.get("accepted", {})) | set(why):
            entry = sites.setdefault(site, {"samples": None, "contributed": [], "missed": {}})
            if site in r.get("accepted", {}):
                entry["contributed"].append(r["round"])
                entry["samples"] = r["accepted"][site]
            else:
                entry["missed"][str(r["round"])] = why.get(site, "not accepted")
    return sites


def close_interrupted(record: dict, reason: str) -> dict:
    """A record left ``running`` by a server that was killed, closed truthfully: ``failed`` with ``reason``, the round
    that was in progress marked ``interrupted`` (it never finished), the sites' summary recomputed."""
    if record.get("status") != RUNNING:
        return record
    for r in record.get("rounds", []):
        if r.get("seconds") is None and r.get("status") == RUNNING:
            r["status"] = "interrupted"
    record["status"] = FAILED
    record["reason"] = record.get("reason") or reason
    record["sites"] = site_summary(record)
    return record


def summarize(record: dict) -> str:
    """One line per finding: the run's status, then each site that missed rounds (which, and why)."""
    status = record.get("status")
    done = [r for r in record.get("rounds", []) if r.get("seconds") is not None]
    planned = (record.get("last_round") + 1) if record.get("last_round") is not None else None
    reason = record.get("reason")
    if status == RUNNING and not reason:
        reason = ("the record was never closed: the job is still running, or its server process was killed "
                  "(fedfms job resume continues it from the last saved round)")
    lines = [f"federation {status}: {len(done)}{f' of {planned}' if planned else ''} round(s) finished"
             + (f"; {reason}" if reason else "")]
    for site, info in sorted(site_summary(record).items()):
        missed = info["missed"]
        if not missed:
            continue
        rounds = sorted(int(r) for r in missed)
        never = not info["contributed"]
        first_reason = missed[str(rounds[0])]
        lines.append(f"  {site}: {'never contributed' if never else f'missed {len(rounds)} round(s)'} "
                     f"(round{'s' if len(rounds) > 1 else ''} {_ranges(rounds)}): {first_reason}")
    return "\n".join(lines)


def _ranges(values: list[int]) -> str:
    out, start, prev = [], None, None
    for v in values:
        if start is None:
            start = prev = v
        elif v == prev + 1:
            prev = v
        else:
            out.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = prev = v
    if start is not None:
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
    return ",".join(out)


def read_run_record(path: str | Path) -> dict | None:
    """The run record in a run folder (or the file itself); None when the run wrote none."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.rglob(RUN_RECORD), key=lambda p: (len(p.parts), str(p)))
        if not found:
            return None
        path = found[0]
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def find_run_dir(path: str | Path) -> Path:
    """The server's run folder (holding ``cross_site_val/`` or the run record): given itself, a simulator
    workspace, or a downloaded job result (the shallowest match wins)."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: not a folder; expected a finished FLARE run (simulator workspace or downloaded result)")
    found = [p.parent.parent for p in path.rglob("cross_site_val/cross_val_results.json")]
    found += [p.parent for p in path.rglob(RUN_RECORD)]
    if not found:
        raise DataError(f"{path}: no cross_site_val/cross_val_results.json or {RUN_RECORD} found; "
                        "expected a FLARE run folder")
    return sorted(found, key=lambda p: (len(p.parts), str(p)))[0]


def best_model_note(run_dir: str | Path) -> list[str]:
    """What the "best" global model is, in words: after how many rounds of training, with which validation Dice,
    and, when the untrained initial model scored at least as well as every trained one, that it did.

    FLARE's model selector compares the validation Dice the sites report for the global model they *received*:
    in round r (counting from 0) that is the aggregate of round r-1, so the best model is always a trained one
    (from round 1 on; a 1-round run has none); the initial model's score (round 0) is only read here."""
    run_dir = find_run_dir(run_dir)
    record = read_run_record(run_dir / RUN_RECORD) if (run_dir / RUN_RECORD).is_file() else None
    if record is None:
        return []
    done = [r for r in record.get("rounds", []) if r.get("seconds") is not None]
    trained = len([r for r in done if r.get("updated_model")])
    best = record.get("best") or {}
    lines = []
    if best.get("round") is None or best.get("metric") is None:
        lines.append(f"best global model: none chosen (FLARE's selector compares trained models from the second round "
                     f"on; this run finished {len(done)} round(s))")
    else:
        # the model a site scored in round r is the aggregate of rounds 0..r-1: r rounds of training, counted over
        # the whole run (a resumed run's record carries the earlier rounds and their best)
        b = int(best["round"])
        lines.append(f"best global model: the one after {b} of {trained} round(s) of training (sites' validation "
                     f"Dice {best['metric']:.3f}); the final global model is the one after {trained}")
    first = next((r for r in done if r.get("round") == record.get("start_round", 0)), None)
    initial = _weighted_dice(first) if first else None
    if initial is not None and int(record.get("start_round") or 0) == 0:
        scores = [_weighted_dice(r) for r in done[1:]]
        scores = [x for x in scores if x is not None]
        if scores and initial >= max(scores):
            lines.append(f"note: the untrained initial model scored {initial:.3f} (round 0), at least as high as every "
                         f"trained model (best {max(scores):.3f}): training did not improve on it; the best model above "
                         "is the best trained one, not the initial model")
    return lines


def _weighted_dice(round_info: dict) -> float | None:
    """The sites' validation Dice in a round, weighted by their sample counts (as FLARE's selector weighs them)."""
    pairs = [(d, (round_info.get("accepted") or {}).get(site) or 1) for site, d in (round_info.get("val_dice") or {}).items()
             if isinstance(d, (int, float)) and math.isfinite(d)]
    total = sum(w for _, w in pairs)
    return sum(d * w for d, w in pairs) / total if total else None
