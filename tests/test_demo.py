"""`fedfms demo`: seven ways to a segmenter, scored on the same validation slices; one line per round on the console;
pictures of predictions; the pretrained FedMSA beats its -PT ablation; each site's personalised model, compared with
the better of global and alone. (A shortened demo: 3 rounds x 2 epochs.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fedfms.cli import main
from fedfms.demo import DEMO_PERSONALISE, INVERTED_SITE, METHOD_KEYS, SCARCE_SITE

SITES = ("site-1", "site-2", "site-3", "site-4")
PROGRESS = re.compile(r"^round (\d+)/(\d+)  site-1 loss \d\.\d{3} Dice \d\.\d{3} \| site-2 loss .* \| site-3 loss .* "
                      r"\| site-4 loss .* \| \d+\.\d s$")


def _table(out: Path) -> dict:
    tables = sorted(out.glob("runs/*/demo_table.json"))
    assert len(tables) == 1, tables
    return json.loads(tables[0].read_text())


def test_baselines_alone_are_reproducible_to_the_last_digit(tmp_path, capsys):
    args = ["demo", "--rounds", "1", "--epochs", "1", "--methods", "threshold,alone"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    a, b = _table(tmp_path / "a"), _table(tmp_path / "b")
    assert list(a["methods"]) == ["threshold", "alone"]
    assert all(a["methods"][k]["sites"] == b["methods"][k]["sites"] for k in ("threshold", "alone"))
    assert a["thresholds"] == b["thresholds"]
    # the scarce site trains on one scan and is validated on another
    assert a["sites"][SCARCE_SITE]["train"] < a["sites"]["site-1"]["train"] / 3
    assert "[2/2] each site alone (FedMSA model): site-1 0." in capsys.readouterr().out


def test_demo_refuses_unknown_methods_in_one_line(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--methods", "threshold,magic"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --methods: unknown method(s) ['magic']; expected some of {', '.join(METHOD_KEYS)}"]


@pytest.mark.integration
def test_shortened_demo_table_pictures_and_pretrained_beats_minus_pt(tmp_path, capfd):
    # capfd: the progress lines come from FLARE's server logging, which writes to the process's stdout stream
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--rounds", "3", "--epochs", "2"]) == 0
    console = capfd.readouterr().out
    lines = console.splitlines()

    # one line per round and federated run, nothing of FLARE's INFO log
    progress = [PROGRESS.match(line) for line in lines if line.startswith("round ")]
    assert len(progress) == 9 and all(progress), [l for l in lines if l.startswith("round ")]
    assert [int(m.group(1)) for m in progress] == [1, 2, 3] * 3 and {m.group(2) for m in progress} == {"3"}
    assert not any(" - INFO - " in line or "task_id=" in line for line in lines)
    # three federations: the personalised row (finetune only) is the FedMSA federation's sites, fine-tuned
    assert sum(line.startswith("finished: every round averaged every site") for line in lines) == 3
    assert any(line.startswith(f"[4/7] FedMSA personalised ({DEMO_PERSONALISE}): each site fine-tuned the FedMSA run's")
               for line in lines)

    # the table: every method a row, the four sites and their mean as columns
    start = lines.index(next(l for l in lines if l.startswith("validation Dice")))
    header, rule, *rows = lines[start + 1: start + 10]
    assert header.split() == ["method", "site-1", "site-2", "site-3", "(scarce)", "site-4", "(inverted)", "mean"]
    assert set(rule) == {"-", " "}
    assert [r.split("  ")[0] for r in rows] == ["threshold per site", "each site alone (FedMSA model)",
                                                "FedMSA, pretrained encoder", f"FedMSA personalised ({DEMO_PERSONALISE})",
                                                "FedMSA -PT (random encoder)", "FedSAM, pretrained",
                                                "centralised (FedMSA, pooled)"]
    assert lines[start + 10].startswith(f"at the scarce {SCARCE_SITE}: FedMSA (pretrained)")
    # below it, each site's personalised model against the better of global and alone, and the verdict
    comparison = lines.index(f"personalised FedMSA ({DEMO_PERSONALISE}) against the better of the global FedMSA model and "
                             "the site alone:")
    assert lines[comparison + 1].split()[:4] == ["site", "FedMSA", "global", "personalised"]
    assert [line.split()[0] for line in lines[comparison + 3: comparison + 8]] == [*SITES, "mean"]
    assert lines[comparison + 8].startswith(("at every site the personalised model", "below the better of global and alone"))

    table = _table(out)
    assert list(table["methods"]) == list(METHOD_KEYS)
    for key, method in table["methods"].items():
        assert set(method["sites"]) == set(SITES), key
        for site, scores in method["sites"].items():
            assert 0 <= scores["dice"] <= 1 and scores["num_samples"] == table["sites"][site]["val"], (key, site)

    def mean(key):
        return sum(table["methods"][key]["sites"][s]["dice"] for s in SITES) / len(SITES)

    # the point of the pretrained encoder: FedMSA on it beats FedMSA on a random one
    assert mean("fedmsa") > mean("fedmsa_pt") + 0.02, table["methods"]

    # the demo scores the federations exactly as FLARE's own cross-site evaluation does (same slices, same rule)
    run_dir = Path(table["federated_runs"]["fedmsa"])
    cross = json.loads((run_dir / "cross_site_val" / "cross_val_results.json").read_text())
    for site in SITES:
        assert abs(cross[site]["SRV_FL_global_model.pt"]["dice"] - table["methods"]["fedmsa"]["sites"][site]["dice"]) < 1e-6
    # the personalised row: each site's own model, as its FLARE site saved and scored it on the same slices; the
    # global row is the same federation's global model (the sites' "global" is the FedMSA row)
    record = table["personalisation_record"]
    assert record["personalise"] == DEMO_PERSONALISE and table["sites"][INVERTED_SITE]["train"] > 0
    for site in SITES:
        entry = record["sites"][site]
        assert entry["status"] == "ok" and entry["files"]["personal"].endswith(f"{site}/simulate_job/fedfms_personal/personal_model.pt")
        assert abs(entry["personal"]["dice"] - table["methods"]["fedmsa_personal"]["sites"][site]["dice"]) < 1e-6
        assert abs(entry["global"]["dice"] - table["methods"]["fedmsa"]["sites"][site]["dice"]) < 1e-6

    figure = next(out.glob("runs/*/report.png"))
    assert figure.stat().st_size > 50_000

    # the same pictures from `fedfms report` on one of the runs, and from `fedfms predict --overlay`
    png = tmp_path / "report.png"
    assert main(["report", str(run_dir.parent.parent), "--png", str(png), "--data-root", str(out / "sites")]) == 0
    report = capfd.readouterr().out
    assert png.stat().st_size > 50_000 and "best global model: the one after" in report
    job = next(out.glob("runs/*/fedmsa/job"))
    image = next((out / "sites" / SCARCE_SITE / "images").glob("*.png"))
    assert main(["predict", str(image), "--job", str(job), "--weights", str(run_dir / "app_server" / "FL_global_model.pt"),
                 "--out", str(tmp_path / "pred"), "--overlay", "--classes", "wm"]) == 0
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == [f"{image.stem}_wm.png", f"{image.stem}_wm_overlay.png"]
