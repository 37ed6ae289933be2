"""Homomorphic encryption of FedMSA's travel set (fedfms.flare.he, FLARE's HE components with TenSEAL).

Unit tests run without FLARE's runtime; the simulator tests (integration) run fedmsa_tiny encrypted end to end
and measure bytes and seconds per round with and without HE (docs/privacy-he.md)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

tenseal = pytest.importorskip("tenseal")

from nvflare.apis.dxo import DXO, DataKind, MetaKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.fl_constant import FLContextKey, ReservedKey, ReturnCode
from nvflare.job_config.fed_job_config import FedJobConfig

from fedfms.errors import ConfigError
from fedfms.flare import he
from fedfms.flare import he_job as job_he  # (a test below is named he_job)
from fedfms.flare.contribution_filter import ContributionCheckFilter
from fedfms.flare.replies import REASON_HEADER
from fedfms.flare.jobs import job_settings
from fedfms.flare.update_check import FROZEN_FINGERPRINT, expected_travel_spec

TINY = {"variant": "tiny", "mode": "fedmsa", "num_classes": 1, "pretrained": False, "init_seed": 0}


@pytest.fixture(scope="module")
def contexts(tmp_path_factory):
    startup = tmp_path_factory.mktemp("startup")
    server, client = he.write_contexts(startup)
    return tenseal.context_from(server.read_bytes()), tenseal.context_from(client.read_bytes())


def _update(seed=0, scale=0.1):
    rng = np.random.default_rng(seed)
    return {k: (rng.standard_normal(shape) * scale).astype(np.float32) for k, (shape, _) in expected_travel_spec(TINY).items()}


def _encrypted(weights, n, client_ctx):
    data = {k: tenseal.ckks_vector(client_ctx, (v.ravel() * np.float64(n)).tolist()) for k, v in weights.items()}
    meta = {MetaKey.NUM_STEPS_CURRENT_ROUND: n, MetaKey.PROCESSED_ALGORITHM: he.CKKS,
            MetaKey.PROCESSED_KEYS: {k: True for k in data}, FROZEN_FINGERPRINT: "f" * 64,
            MetaKey.INITIAL_METRICS: {"val_dice": 0.5}}
    return DXO(DataKind.WEIGHTS, data, meta=meta)


def test_contexts_are_hebuilders_and_only_the_sites_hold_the_secret_key(tmp_path, contexts):
    server, client = contexts
    assert client.is_private() and not server.is_private()
    assert client.global_scale == server.global_scale == 2 ** he.HE_PARAMS["scale_bits"]
    first = he.write_contexts(tmp_path)[1].read_bytes()
    assert he.write_contexts(tmp_path)[1].read_bytes() == first  # kept: a run's keys never change under the sites
    assert he.write_contexts(tmp_path, overwrite=True)[1].read_bytes() != first


def test_ciphertext_sum_scaled_by_the_sample_counts_is_fedavg_to_ckks_precision(contexts):
    """What the HE aggregator computes: sum of n_k-weighted ciphertexts x 1/sum(n_k), decrypted at a site."""
    server, client = contexts
    updates, counts = [_update(0), _update(1, scale=1.0)], [12, 30]
    encrypted = [_encrypted(w, n, client) for w, n in zip(updates, counts)]
    key = "mask_decoder.output_upscaling.0.weight"
    total = encrypted[0].data[key] + encrypted[1].data[key]
    average = np.array((total * (1.0 / sum(counts))).decrypt(secret_key=client.secret_key()))
    expected = sum(n * w[key].astype(np.float64).ravel() for w, n in zip(updates, counts)) / sum(counts)
    error = np.max(np.abs(average - expected))
    assert error < 1e-4, error  # scale 2^40: the simulator run measured 2.5e-6 (docs/privacy-he.md)


def _fl_ctx(site="site-1", task="train"):
    ctx = FLContext()
    ctx.set_prop(FLContextKey.TASK_NAME, task, private=True, sticky=False)
    ctx.set_prop(FLContextKey.SECURE_MODE, False, private=True, sticky=False)  # as the simulator (unsigned startup files)
    peer = FLContext()
    peer.set_prop(ReservedKey.IDENTITY_NAME, site, private=False, sticky=False)
    ctx.set_peer_context(peer)
    return ctx


def _check(check, dxo, site="site-1", task="train"):
    return check.process(dxo.to_shareable(), _fl_ctx(site, task))


def test_server_check_on_ciphertext_rejects_wrong_length_missing_key_plaintext_and_absurd_count(contexts):
    _, client = contexts
    check = ContributionCheckFilter(TINY, max_samples=1000, encrypted=True, persistor_id=None)
    good = _encrypted(_update(), 10, client)
    result = _check(check, good)
    assert result.get_return_code(ReturnCode.OK) == ReturnCode.OK, result.get_header(REASON_HEADER)

    short = _encrypted(_update(), 10, client)
    key = sorted(short.data)[0]
    short.data[key] = tenseal.ckks_vector(client, [1.0, 2.0, 3.0])
    reason = _check(check, short, "site-2").get_header(REASON_HEADER)
    assert "CKKS vector of 3 values, expected" in reason and key in reason

    missing = _encrypted(_update(), 10, client)
    missing.data.pop(key)
    assert "missing tensor" in _check(check, missing, "site-3").get_header(REASON_HEADER)

    absurd = _encrypted(_update(), 10**12, client)
    assert "above the job's max_samples" in _check(check, absurd, "site-4").get_header(REASON_HEADER)

    plaintext = DXO(DataKind.WEIGHTS, _update(), meta={MetaKey.NUM_STEPS_CURRENT_ROUND: 10})
    assert "not CKKS-encrypted" in _check(check, plaintext, "site-5").get_header(REASON_HEADER)

    unmarked = _encrypted(_update(), 10, client)
    unmarked.meta[MetaKey.PROCESSED_KEYS] = {key: False}
    assert "not marked encrypted" in _check(check, unmarked, "site-6").get_header(REASON_HEADER)

    bad_metric = _encrypted(_update(), 10, client)
    bad_metric.meta[MetaKey.INITIAL_METRICS] = {"val_dice": 7.0}
    assert "expected a number in [0, 1]" in _check(check, bad_metric, "site-7").get_header(REASON_HEADER)


def test_server_reads_ciphertext_bytes_under_its_own_context_only(tmp_path, contexts):
    from nvflare.fuel.sec.security_content_service import SecurityContentService

    _, client = contexts
    startup = tmp_path / "startup"
    he.write_contexts(startup)
    SecurityContentService.initialize(content_folder=str(startup))
    own_client = tenseal.context_from((startup / he.CLIENT_CONTEXT).read_bytes())
    check = ContributionCheckFilter(TINY, encrypted=True, persistor_id=None)
    weights = _update()
    sent = _encrypted(weights, 10, own_client)
    sent.data = {k: v.serialize() for k, v in sent.data.items()}  # what HECiphertextBytes sends
    shareable = sent.to_shareable()
    result = check.process(shareable, _fl_ctx())
    assert result.get_return_code(ReturnCode.OK) == ReturnCode.OK, result.get_header(REASON_HEADER)
    from nvflare.apis.dxo import from_shareable

    bound = from_shareable(result).data
    key = sorted(bound)[0]
    assert isinstance(bound[key], tenseal.CKKSVector) and not bound[key].context().is_private()
    # (the server's copy has no secret key; the site decrypts what the server adds up)
    np.testing.assert_allclose(bound[key].decrypt(own_client.secret_key()), weights[key].ravel() * 10, atol=1e-4)

    other = tenseal.context(tenseal.SCHEME_TYPE.CKKS, poly_modulus_degree=4096, coeff_mod_bit_sizes=[40, 20, 40])
    other.global_scale = 2**20
    foreign = _encrypted(weights, 10, own_client)
    foreign.data = {k: v.serialize() for k, v in foreign.data.items()}
    foreign.data[key] = tenseal.ckks_vector(other, weights[key].ravel().tolist()).serialize()
    reason = check.process(foreign.to_shareable(), _fl_ctx("site-2")).get_header(REASON_HEADER)
    assert "not a CKKS ciphertext of this federation's parameters" in reason, reason


def test_site_checks_in_plaintext_before_encrypting():
    check = he.HEPlaintextCheck(TINY)
    assert check.problems(_update()) == []
    nan = _update()
    key = sorted(nan)[0]
    nan[key][0] = np.nan
    assert any("NaN" in p for p in check.problems(nan))
    huge = _update()
    huge[key][0] = 1e9
    assert any("CKKS would overflow" in p for p in check.problems(huge))
    wrong = _update()
    matrix = next(k for k, v in wrong.items() if v.ndim > 1)
    wrong[matrix] = wrong[matrix].ravel()
    assert any("has shape" in p for p in check.problems(wrong))


def test_reshape_gives_decrypted_lists_the_travel_shapes():
    weights = _update()
    flat = DXO(DataKind.WEIGHTS, {k: v.ravel().astype(np.float64).tolist() for k, v in weights.items()})
    out = he.HEReshapeFilter(TINY).process_dxo(flat, flat.to_shareable(), FLContext())
    for k, v in weights.items():
        assert out.data[k].shape == v.shape and out.data[k].dtype == np.float32
        np.testing.assert_array_equal(out.data[k], v)


def test_builders_refuse_what_cannot_run_on_ciphertext():
    for bad in ({"aggregation": "median"}, {"norm_bound": 3.0}, {"transfer": "float16"}, {"privacy": "svt"},
                {"update": "weight_diff"}):
        with pytest.raises(ConfigError):
            job_he.site_filters(job_settings("fedmsa_tiny", sites=["a", "b"], **bad))


def _instance_json(obj) -> dict:
    """How FedJob writes a component: class path and the constructor arguments read back from attributes."""
    return {"path": f"{type(obj).__module__}.{type(obj).__qualname__}",
            "args": json.loads(json.dumps(FedJobConfig("he", 1)._get_args(obj, "")))}


def test_every_component_serializes_through_fedjob_and_rebuilds_the_same():
    from nvflare.fuel.utils.class_utils import instantiate_class

    s = job_settings("fedmsa_tiny", sites=["site-1", "site-2"])
    server = job_he.server_components(s)
    assert set(server) == {"shareable_generator", "aggregator", job_he.PERSISTOR_FILTER_ID, "federation_monitor",
                           "cross_site_validate"}
    results, data = job_he.site_filters(s)
    assert [tasks for tasks, _ in results] == [["train"], ["submit_model"]]
    instances = [*server.values(), *(f for _, chain in results + data for f in chain)]
    for obj in instances:
        spec = _instance_json(obj)
        rebuilt = instantiate_class(spec["path"], spec["args"])
        assert _instance_json(rebuilt) == spec, spec["path"]
    weigh = [chain[1].weigh_by_local_iter for _, chain in results]
    assert weigh == [True, False]  # training results carry n_k w_k; a submitted model is sent as it is
    assert server["aggregator"]._weigh_by_local_iter is False  # the sum is divided by sum(n_k) only
    assert server["federation_monitor"].expected_sites == ["site-1", "site-2"]


def test_fedjob_exports_the_he_components(tmp_path):
    from nvflare.job_config.api import FedJob
    from nvflare.job_config.defs import FilterType

    s = job_settings("fedmsa_tiny", sites=["site-1", "site-2"])
    job = FedJob(name="he", min_clients=2)
    for cid, obj in job_he.server_components(s).items():
        job.to_server(obj, id=cid)
    results, data = job_he.site_filters(s)
    for kind, chains in ((FilterType.TASK_RESULT, results), (FilterType.TASK_DATA, data)):
        for tasks, chain in chains:
            for f in chain:
                job.to_clients(f, tasks=tasks, filter_type=kind)
    job.export_job(str(tmp_path))
    server = json.loads((tmp_path / "he" / "app" / "config" / "config_fed_server.json").read_text())
    client = json.loads((tmp_path / "he" / "app" / "config" / "config_fed_client.json").read_text())
    assert [w["path"] for w in server["workflows"]] == ["fedfms.flare.he_server.CrossSiteModelEvalHE"]
    assert {c["id"] for c in server["components"]} == {"shareable_generator", "aggregator", job_he.PERSISTOR_FILTER_ID,
                                                       "federation_monitor"}
    chains = {tuple(c["tasks"]): [f["path"].rsplit(".", 1)[1] for f in c["filters"]] for c in client["task_result_filters"]}
    assert chains == {("train",): ["HEPlaintextCheck", "HEModelEncryptor", "HECiphertextBytes"],
                      ("submit_model",): ["HEPlaintextCheck", "HEModelEncryptor", "HECiphertextBytes"]}
    assert [f["path"].rsplit(".", 1)[1] for f in client["task_data_filters"][0]["filters"]] == ["HEModelDecryptor",
                                                                                               "HEReshapeFilter"]


# ------------------------------------------------------------------------------------------ simulator
SUPPORT_SOURCE = '''"""Test-only site filters for the HE simulator tests (written into the job's custom code)."""
import json
from pathlib import Path

from nvflare.apis.dxo import MetaKey, from_shareable
from nvflare.apis.filter import Filter
from nvflare.fuel.utils import fobs


class SizeRecorder(Filter):
    """Writes the serialized size of what passes (FLARE's FOBS encoding, what goes on the wire)."""

    def __init__(self, out_dir, direction):
        super().__init__()
        self.out_dir = Path(out_dir)
        self.direction = direction

    def process(self, shareable, fl_ctx):
        site = fl_ctx.get_identity_name()
        rnd = shareable.get_header("current_round")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"{site}_{self.direction}_r{rnd}.bytes.json"
        path.write_text(json.dumps(len(fobs.dumps(shareable))))
        return shareable


class CiphertextTamper(Filter):
    """A malicious site after the encryptor: one ciphertext too short, or an absurd sample count."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind

    def process(self, shareable, fl_ctx):
        import tenseal as ts

        from nvflare.app_opt.he.homomorphic_encrypt import load_tenseal_context_from_workspace

        dxo = from_shareable(shareable)
        if self.kind == "short":  # a ciphertext of 5 values in place of the first tensor's, as bytes like the rest
            key = sorted(dxo.data)[0]
            context = load_tenseal_context_from_workspace("client_context.tenseal", fl_ctx)
            dxo.data[key] = ts.ckks_vector(context, [0.0] * 5).serialize()
        elif self.kind == "huge_count":
            dxo.set_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND, 10**12)
        dxo.update_shareable(shareable)
        return shareable
'''


def he_job(job_dir: Path, site_extras: dict | None = None) -> Path:
    """Add test filters to a job written by ``test_simulator.write_job(..., encryption="he")`` (the job builder's
    HE flavour). ``site_extras``: app -> {"before": [...], "after": [...], "data_before": [...]}: filters (JSON)
    around the HE ones on the training result chain (before: on plaintext, after the travel-set check; after: on
    ciphertext) and before the decryptor."""
    for client_path in job_dir.glob("*/config/config_fed_client.json"):
        app = client_path.parent.parent.name
        extras = (site_extras or {}).get(app, {})
        client = json.loads(client_path.read_text())
        for chain in client["task_result_filters"]:
            if chain["tasks"] == ["train"]:
                travel, *rest = chain["filters"]
                assert travel["path"].endswith("TravelSetFilter") and rest[0]["path"].endswith("HEPlaintextCheck"), chain
                chain["filters"] = [travel, *extras.get("before", []), *rest, *extras.get("after", [])]
        for chain in client["task_data_filters"]:
            chain["filters"] = [*extras.get("data_before", []), *chain["filters"]]
        client_path.write_text(json.dumps(client, indent=1))
        (client_path.parent.parent / "custom" / "he_support.py").write_text(SUPPORT_SOURCE)
    return job_dir


def _recorders(out: Path) -> dict:
    return {"after": [{"path": "he_support.SizeRecorder", "args": {"out_dir": str(out), "direction": "up"}}],
            "data_before": [{"path": "he_support.SizeRecorder", "args": {"out_dir": str(out), "direction": "down"}}]}


@pytest.mark.integration
def test_encrypted_round_is_fedavg_of_what_sites_sent_and_bad_ciphertexts_are_rejected(tmp_path):
    import torch
    from test_simulator import make_sites, recorded, write_job

    from fedfms.run_record import read_run_record
    from fedfms.flare.simulate import run_simulation, server_job_dir

    sites = {"site-1": 3, "site-2": 6, "site-3": 3, "site-4": 3}
    data = make_sites(tmp_path / "data", sites)
    out = tmp_path / "recorded"
    recorder = {"path": "sim_support.RecordingFilter", "args": {"out_dir": str(out)}}
    job = write_job(tmp_path / "job", "fedmsa_tiny", {
        "app_good": {"sites": ["site-1", "site-2"], "executor": "sim_support.RecordingExecutor", "args": {"out_dir": str(out)}},
        "app_short": {"sites": ["site-3"]},
        "app_count": {"sites": ["site-4"]},
    }, num_rounds=2, min_sites=2, encryption="he")
    he_job(job, {
        "app_good": {"before": [recorder], **_recorders(out)},
        "app_short": {"after": [{"path": "he_support.CiphertextTamper", "args": {"kind": "short"}}]},
        "app_count": {"after": [{"path": "he_support.CiphertextTamper", "args": {"kind": "huge_count"}}]},
    })

    assert run_simulation(job, tmp_path / "ws", list(sites), data_root=data) == 3  # finished; two sites never counted
    assert (tmp_path / "ws" / "startup" / he.CLIENT_CONTEXT).is_file()

    # round 0's global model, decrypted by site-1 as the start of round 1, is the plain FedAvg of what the two
    # honest sites computed (recorded in plaintext just before encryption)
    sent = {s: recorded(out, s) for s in ("site-1", "site-2")}
    n = {s: sent[s][1]["num_samples"] for s in sent}
    assert n["site-1"] != n["site-2"]
    expected = {k: sum(n[s] * sent[s][0][k].astype(np.float64) for s in sent) / sum(n.values()) for k in sent["site-1"][0]}
    received = {s: dict(np.load(out / f"{s}_in_r1.npz")) for s in sent}
    assert set(received["site-1"]) == set(expected) == set(expected_travel_spec(TINY))
    errors = []
    for key, value in expected.items():
        got = received["site-1"][key]
        assert got.shape == value.shape and got.dtype == np.float32
        np.testing.assert_array_equal(got, received["site-2"][key])  # one ciphertext, both sites decrypt the same
        errors.append((np.max(np.abs(got - value)), np.max(np.abs(value))))
    worst_abs = max(e for e, _ in errors)
    worst_rel = max(e / max(m, 1e-12) for e, m in errors)
    print(f"\nHE vs plaintext FedAvg after round 0: max |error| {worst_abs:.2e}, max error / max |w| per tensor {worst_rel:.2e}")
    assert worst_rel < 1e-3 and worst_abs < 1e-4
    key = next(k for k in expected if not np.allclose(sent["site-1"][0][k], sent["site-2"][0][k]))
    assert not np.allclose(received["site-1"][key], sent["site-1"][0][key], atol=1e-4)  # not one site's model

    record = read_run_record(server_job_dir(tmp_path / "ws"))
    assert record["status"] == "completed_with_gaps", record["status"]
    assert [r["updated_model"] for r in record["rounds"]] == [True, True]
    for r in record["rounds"]:
        assert sorted(r["accepted"]) == ["site-1", "site-2"]
    missed = {site: info["missed"]["0"] for site, info in record["sites"].items() if info["missed"]}
    assert set(missed) == {"site-3", "site-4"}
    assert "CKKS vector of 5 values, expected" in missed["site-3"]
    assert "above the job's max_samples" in missed["site-4"]
    # the server's saved global model is ciphertext (bytes): it never held the plaintext average
    saved = torch.load(server_job_dir(tmp_path / "ws") / "app_server" / "FL_global_model.pt", weights_only=False)
    assert set(saved["model"]) == set(expected) and all(isinstance(v, bytes) for v in saved["model"].values())
    # cross-site evaluation: the encrypted global model and the sites' encrypted models, decrypted and scored at the sites
    cross = json.loads((server_job_dir(tmp_path / "ws") / "cross_site_val" / "cross_val_results.json").read_text())
    for site in ("site-1", "site-2"):
        assert 0.0 <= cross[site]["SRV_FL_global_model.pt"]["dice"] <= 1.0, cross
        assert 0.0 <= cross[site]["site-1"]["dice"] <= 1.0, cross
    up = [json.loads(p.read_text()) for p in out.glob("site-1_up_r*.bytes.json")]
    assert up and min(up) > 10 * sum(v.nbytes for v in sent["site-1"][0].values())


@pytest.fixture(scope="module")
def he_two_rounds(tmp_path_factory, federation_lock):
    """fedmsa_tiny encrypted, 2 sites of 3 and 6 volumes, 2 rounds, the size recorders at both sites: the HE
    figures of the bytes test and the run the resume test continues. (exit code, workspace, job, records)"""
    from test_simulator import make_sites, write_job

    from fedfms.flare.simulate import run_simulation

    tmp = tmp_path_factory.mktemp("he_two_rounds")
    data = make_sites(tmp / "data", {"site-1": 3, "site-2": 6})
    out = tmp / "recorded"
    job = he_job(write_job(tmp / "job", "fedmsa_tiny", {"app": {"sites": ["site-1", "site-2"]}}, num_rounds=2,
                           encryption="he"), {"app": _recorders(out)})
    with federation_lock():
        rc = run_simulation(job, tmp / "ws", ["site-1", "site-2"], data_root=data)
    return rc, tmp / "ws", job, out


SHARED_HE_RUN = pytest.mark.xdist_group("he_two_rounds")


@pytest.mark.integration
@SHARED_HE_RUN
def test_bytes_and_seconds_per_round_with_and_without_he(tmp_path, he_two_rounds):
    """The figures in docs/privacy-he.md (2 sites of 3 and 6 volumes, 2 rounds, fedmsa_tiny on CPU): the plaintext
    federation here, the encrypted one is the module's shared run."""
    from test_simulator import make_sites, write_job

    from fedfms.run_record import read_run_record
    from fedfms.flare.simulate import run_simulation, server_job_dir

    data = make_sites(tmp_path / "data", {"site-1": 3, "site-2": 6})
    runs = {"plain": (tmp_path / "plain" / "ws", tmp_path / "plain" / "recorded")}
    job = write_job(tmp_path / "plain" / "job", "fedmsa_tiny", {"app": {"sites": ["site-1", "site-2"]}}, num_rounds=2)
    client_path = job / "app" / "config" / "config_fed_client.json"
    client = json.loads(client_path.read_text())
    rec = _recorders(runs["plain"][1])  # the same recorders as on the encrypted job
    client["task_result_filters"] = [{"tasks": ["train"], "filters": [*client["task_result_filters"][0]["filters"], *rec["after"]]},
                                     {"tasks": ["submit_model"], "filters": client["task_result_filters"][0]["filters"]}]
    client["task_data_filters"] = [{"tasks": ["train"], "filters": rec["data_before"]}]
    client_path.write_text(json.dumps(client))
    (job / "app" / "custom" / "he_support.py").write_text(SUPPORT_SOURCE)
    assert run_simulation(job, runs["plain"][0], ["site-1", "site-2"], data_root=data) == 0
    rc, he_ws, _, he_out = he_two_rounds
    assert rc == 0
    runs["he"] = (he_ws, he_out)

    figures = {}
    for flavour, (ws, out) in runs.items():
        record = read_run_record(server_job_dir(ws))
        sizes = {p.name: json.loads(p.read_text()) for p in out.glob("*.bytes.json")}
        figures[flavour] = {
            "seconds": [r["seconds"] for r in record["rounds"]],
            "up": {r: max(v for k, v in sizes.items() if f"_up_r{r}." in k) for r in (0, 1)},
            "down": {r: max(v for k, v in sizes.items() if f"_down_r{r}." in k) for r in (0, 1)},
        }
    print()
    for flavour, f in figures.items():
        print(f"{flavour:5s} seconds per round {f['seconds']}, bytes per site up (result) r0 {f['up'][0]:,} r1 {f['up'][1]:,}, "
              f"down (global model) r0 {f['down'][0]:,} r1 {f['down'][1]:,}")
    assert figures["he"]["up"][0] > 10 * figures["plain"]["up"][0]
    assert math.isclose(figures["he"]["down"][0], figures["plain"]["down"][0], rel_tol=0.1)  # round 0: plaintext model


@pytest.mark.integration
@SHARED_HE_RUN
def test_a_stopped_he_run_resumes_with_its_own_key(tmp_path, he_two_rounds):
    """The continuing job starts from the run's encrypted global model: the simulator workspace gets that run's
    contexts (fresh keys would decrypt it to noise: NaN at the first step); other keys are refused in one line.
    The run continued is the module's shared 2-round run (one more round here)."""
    from fedfms.errors import ConfigError
    from fedfms.flare.jobs import resume_settings
    from fedfms.flare.fed_job import rewrite_job
    from fedfms.run_record import read_run_record
    from fedfms.flare.simulate import run_simulation, server_job_dir

    rc, ws1, first, _ = he_two_rounds
    sites = ["site-1", "site-2"]
    assert rc == 0
    more = rewrite_job(first, tmp_path / "job2", num_rounds=3, **resume_settings(server_job_dir(ws1)))

    he.write_contexts(tmp_path / "ws_other" / "startup")  # a workspace holding another key pair
    with pytest.raises(ConfigError, match="other TenSEAL contexts than the resumed run's"):
        job_he.prepare_simulation(tmp_path / "ws_other", more)

    assert run_simulation(more, tmp_path / "ws2", sites, data_root=ws1.parent / "data", quiet=True) == 0
    assert (tmp_path / "ws2" / "startup" / he.CLIENT_CONTEXT).read_bytes() == \
        (ws1 / "startup" / he.CLIENT_CONTEXT).read_bytes()
    record = read_run_record(server_job_dir(tmp_path / "ws2"))
    assert record["status"] == "completed" and [r["round"] for r in record["rounds"]] == [0, 1, 2]
    assert all(r["updated_model"] for r in record["rounds"])
