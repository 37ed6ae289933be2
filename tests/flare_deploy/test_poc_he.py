"""Homomorphic encryption with real provisioned kits (POC: mutual TLS, signed startup folders): FLARE's HEBuilder
puts the TenSEAL contexts into the kits, a job made with ``encryption="he"`` runs, and the server never holds a
plaintext model or the secret key."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from fedfms.deploy import poc
from fedfms.deploy import runtime as rt
from fedfms.flare.he import CLIENT_CONTEXT, SERVER_CONTEXT
from fedfms.flare.fed_job import write_job

from .deploy_support import logs_digest


@pytest.mark.integration
def test_he_job_runs_in_a_provisioned_federation(tmp_path):
    import tenseal as ts
    import torch

    sites = ["site-1", "site-2"]
    job = write_job("fedmsa_tiny", tmp_path / "fedmsa_tiny_he", sites=sites, encryption="he")
    ws = tmp_path / "poc"
    t0 = time.time()
    try:
        res = poc.cycle(str(ws), str(job), str(tmp_path / "results"), sites=sites, synthetic_data=True, he=True,
                        timeout=900, fork_jobs=True)
        state = poc.load_state(ws)
        assert res["status"] == "FINISHED:COMPLETED", logs_digest(state["logs"])
        assert res["problems"] == [], res["problems"]
        prod = Path(state["prod_dir"])
        # HEBuilder's contexts, signed with the rest of the kit: the server's holds no secret key
        assert (prod / "server" / "startup" / SERVER_CONTEXT).is_file()
        assert not (prod / "server" / "startup" / CLIENT_CONTEXT).exists()
        assert not ts.context_from((prod / "server" / "startup" / SERVER_CONTEXT).read_bytes()).has_secret_key()
        for site in sites:
            assert ts.context_from((prod / site / "startup" / CLIENT_CONTEXT).read_bytes()).has_secret_key()
        server_ws = Path(res["result"]) / "workspace"
        saved = torch.load(server_ws / "app_server" / "FL_global_model.pt", weights_only=False)
        assert saved["model"] and all(isinstance(v, bytes) for v in saved["model"].values())  # ciphertext only
        record = json.loads(next(server_ws.rglob("fedfms_run.json")).read_text())
        assert record["status"] == "completed" and sorted(record["sites"]) == sites
        scores = json.loads(next(server_ws.rglob("cross_val_results.json")).read_text())
        assert set(scores) == set(sites) and all(0.0 <= v["dice"] <= 1.0 for s in scores.values() for v in s.values())
    finally:
        pids = poc.load_state(ws).get("pids", {}).values() if (ws / "fedfms_poc.json").is_file() else []
        rt.kill_all(pids, paths=[ws])
        print(f"HE POC cycle wall time: {time.time() - t0:.1f} s")
