"""The run record the server's federation monitor writes (``fedfms_run.json`` in the server's run folder):
what every round averaged, which site missed which round and why, and the run's status. Plain JSON, read
here without FLARE by ``fedfms simulate``, ``fedfms report`` and ``fedfms job resume``."""

from __future__ import annotations

import json
from pathlib import Path

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
