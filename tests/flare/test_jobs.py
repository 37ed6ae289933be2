"""The checked-in jobs are exactly what the single source of truth renders, and every piece resolves."""

import importlib
import json
from pathlib import Path

import pytest

from fedfms.cli import main
from fedfms.errors import ConfigError
from fedfms.flare.jobs import VARIANTS, component_paths, export_byoc, is_nnunet
from fedfms.flare.fed_job import class_allow_list, render_job, write_job
from fedfms.models import ModelConfig
from fedfms.nnunet.config import NnUNetConfig, check_model_config
from fedfms.training.trainer import TrainConfig

JOBS = Path(__file__).resolve().parents[2] / "jobs"


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_checked_in_job_matches_generator(name):
    for rel, content in render_job(name).items():
        path = JOBS / name / rel
        assert path.is_file(), f"{path} missing: run `make jobs`"
        assert json.loads(path.read_text()) == content, f"{path} is stale: run `make jobs`"
    assert not (JOBS / name / "app" / "custom").exists(), "checked-in jobs are the production flavour (no custom code)"


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_component_resolves_and_configs_parse(name):
    job = render_job(name)
    for path in component_paths(job):
        module, cls = path.rsplit(".", 1)
        assert hasattr(importlib.import_module(module), cls), path
    args = job["app/config/config_fed_client.json"]["executors"][0]["executor"]["args"]
    if is_nnunet({"model": args["model_config"]}):  # FednnU-Net: nnU-Net's settings, the network from the plan
        check_model_config(args["model_config"])
        NnUNetConfig.from_dict(args["train_config"])
    else:
        ModelConfig.from_dict(args["model_config"])
        TrainConfig.from_dict(args["train_config"])
    allow = class_allow_list()
    assert component_paths(job) <= set(allow)


@pytest.mark.parametrize("settings, expected", [({}, 2), ({"sites": ["a", "b", "c"]}, 2), ({"sites": ["a"]}, 1),
                                                ({"sites": ["a", "b", "c", "d"], "min_sites": 4}, 4)])
def test_min_clients_is_one_value_in_the_whole_job(settings, expected):
    """meta.json's min_clients (when FLARE's scheduler starts the job), the server config's and the workflow's (the
    fewest results a round goes on with) come from one setting and agree."""
    job = render_job("fedmsa_tiny", **settings)
    server = job["app/config/config_fed_server.json"]
    workflow = next(w for w in server["workflows"] if w["path"].endswith("ScatterAndGather"))
    assert job["meta.json"]["min_clients"] == server["min_clients"] == workflow["args"]["min_clients"] == expected


def test_variants_differ_only_in_configuration():
    shapes = {}
    for name in VARIANTS:
        job = render_job(name)
        shapes.setdefault(is_nnunet(VARIANTS[name]), set()).add(json.dumps(sorted(component_paths(job))))
    # every SAM/U-Net job is one shape; the FednnU-Net jobs are one other (planning, nnU-Net executor, plan-aware check)
    assert sorted(len(s) for s in shapes.values()) == [1, 1]
    assert {n for n in VARIANTS if is_nnunet(VARIANTS[n])} == {"fednnunet", "fednnunet_tiny"}
    msa, sam = render_job("fedmsa"), render_job("fedsam_l")
    msa_model = msa["app/config/config_fed_client.json"]["executors"][0]["executor"]["args"]["model_config"]
    sam_model = sam["app/config/config_fed_client.json"]["executors"][0]["executor"]["args"]["model_config"]
    assert (msa_model["variant"], msa_model["mode"]) == ("vit_b", "fedmsa")
    assert (sam_model["variant"], sam_model["mode"]) == ("vit_l", "fedsam")
    # the paper's local training settings
    train = msa["app/config/config_fed_client.json"]["executors"][0]["executor"]["args"]["train_config"]
    assert (train["lr"], train["batch_size"], train["betas"], train["epochs"]) == (1e-4, 6, [0.9, 0.999], 1)
    assert msa["app/config/config_fed_server.json"]["num_rounds"] == 100


def test_overrides_and_refusals(tmp_path):
    job = write_job("fedmsa", tmp_path / "j", num_rounds=3, num_classes=2, train={"lr": 5e-5})
    server = json.loads((job / "app/config/config_fed_server.json").read_text())
    client = json.loads((job / "app/config/config_fed_client.json").read_text())
    assert server["num_rounds"] == 3
    assert client["executors"][0]["executor"]["args"]["model_config"]["num_classes"] == 2
    assert client["executors"][0]["executor"]["args"]["train_config"]["lr"] == 5e-5
    assert client["executors"][0]["executor"]["args"]["train_config"]["batch_size"] == 6
    with pytest.raises(ConfigError, match="already exists"):
        write_job("fedmsa", tmp_path / "j")
    with pytest.raises(ConfigError, match="expected one of"):
        render_job("fedavg")
    with pytest.raises(ConfigError, match=r"train: unknown field\(s\) \['lrr'\]"):
        render_job("fedmsa", train={"lrr": 1e-4})
    with pytest.raises(ConfigError, match="model: unknown field"):
        render_job("fedmsa", model={"varaint": "vit_l"})


def test_fednnunet_is_a_variant_of_the_renderer(tmp_path, capsys):
    assert main(["job", "new", "fednnunet", str(tmp_path / "nn"), "--sites", "a,b,c", "--rounds", "5",
                 "--train", '{"iterations_per_epoch": 20}']) == 0
    client = json.loads((tmp_path / "nn/app/config/config_fed_client.json").read_text())
    executor = client["executors"][0]["executor"]
    assert executor["path"] == "fedfms.flare.nnunet_executor.NnUNetExecutor"
    assert executor["args"]["train_config"]["iterations_per_epoch"] == 20
    assert executor["args"]["train_config"]["total_epochs"] == 5  # nnU-Net's poly schedule over the 5 rounds
    server = json.loads((tmp_path / "nn/app/config/config_fed_server.json").read_text())
    assert server["workflows"][0]["path"] == "fedfms.flare.nnunet_planning.NnUNetPlanning"
    capsys.readouterr()
    assert main(["job", "new", "fednnunet", str(tmp_path / "ref"), "--flavour", "reference"]) == 2
    assert "no flavour 'reference'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"train: unknown field\(s\) \['batch_sise'\]"):  # nnU-Net's fields
        render_job("fednnunet_tiny", train={"batch_sise": 2})
    with pytest.raises(ConfigError, match="do not apply to the nnU-Net baseline"):
        render_job("fednnunet", model={"head": "reference"})
    project, plain = render_job("fednnunet", flavour="project"), render_job("fednnunet")
    assert all(project[k] == plain[k] for k in plain if k != "meta.json")  # the default flavour changes nothing


def test_byoc_export_carries_the_package(tmp_path):
    out = export_byoc(JOBS / "fedmsa_tiny", tmp_path / "byoc")
    assert (out / "app" / "custom" / "fedfms" / "flare" / "executor.py").is_file()
    assert not list((out / "app" / "custom").rglob("__pycache__"))
    assert json.loads((out / "meta.json").read_text()) == render_job("fedmsa_tiny")["meta.json"]


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["job", "new", "fedmsa", str(tmp_path / "j")]) == 0
    assert main(["job", "new", "fedmsa", str(tmp_path / "j")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "already exists" in err[0]
    assert main(["job", "new", "fedmsa", str(tmp_path / "k"), "--train", "{lr"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--train: not valid JSON" in err[0]
    assert main(["job", "allow-list"]) == 0
    allowed = json.loads(capsys.readouterr().out)["class_allow_list"]
    assert "fedfms.flare.executor.FedFMSExecutor" in allowed and not any(e.endswith(".") for e in allowed)


def test_float16_transfer_quantizes_both_directions_after_the_travel_check():
    job = render_job("fedmsa", transfer="float16")
    client, server = job["app/config/config_fed_client.json"], job["app/config/config_fed_server.json"]
    out_filters = [f["path"].rsplit(".", 1)[1] for f in client["task_result_filters"][0]["filters"]]
    assert out_filters == ["TravelSetFilter", "ModelQuantizer"]
    assert client["task_data_filters"][0]["filters"][0]["path"].endswith("ModelDequantizer")
    assert server["task_data_filters"][0]["filters"][0]["path"].endswith("ModelQuantizer")
    assert server["task_result_filters"][0]["filters"][0]["path"].endswith("ModelDequantizer")
    assert set(server["task_data_filters"][0]["tasks"]) == {"train", "validate"}
    allow = class_allow_list()
    assert component_paths(job) <= set(allow)
    with pytest.raises(ConfigError, match="transfer"):
        render_job("fedmsa", transfer="int8")


def _canonical(files: dict[str, dict]) -> dict[str, dict]:
    """FLARE keeps a filter chain's tasks in a set: compare them as sets."""
    for content in files.values():
        for key in ("task_data_filters", "task_result_filters"):
            for chain in content.get(key, []):
                chain["tasks"] = sorted(chain["tasks"])
    return files


@pytest.mark.parametrize("name", ["fedmsa", "fedsam_tiny", "fednnunet"])
def test_flare_export_job_writes_the_checked_in_job(tmp_path, name):
    """The checked-in JSON is what FLARE's own FedJob.export_job writes (jobs/job.py --export), not a hand renderer.
    (The script's main() in this process; test_job_py_runs_the_job_in_flares_simulator runs it as a program.)"""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fedfms_job_script", JOBS / "job.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main([name, "--export", str(tmp_path)]) == 0
    exported = {p.relative_to(tmp_path / name).as_posix(): json.loads(p.read_text())
                for p in (tmp_path / name).rglob("*.json")}
    checked_in = {p.relative_to(JOBS / name).as_posix(): json.loads(p.read_text()) for p in (JOBS / name).rglob("*.json")}
    assert _canonical(exported) == _canonical(checked_in)


def test_an_argument_the_job_api_would_drop_stops_the_export():
    """FedJob writes a component's arguments from same-named attributes; a class keeping one under another name
    would run with its default. The builder refuses to write such a job."""
    from nvflare.apis.filter import Filter
    from nvflare.job_config.defs import FilterType

    from fedfms.flare.fed_job import build_job

    class RenamesItsArgument(Filter):
        def __init__(self, bound: float = 1.0):
            super().__init__()
            self.limit = bound

        def process(self, shareable, fl_ctx):
            return shareable

    RenamesItsArgument.__module__ = "fedfms.flare.filters"  # as if it were the package's (no custom code copied)
    job = build_job("fedmsa_tiny")
    job.to_server(job._made(RenamesItsArgument, bound=3.0), filter_type=FilterType.TASK_DATA, tasks=["validate"])
    with pytest.raises(RuntimeError, match=r"lost arguments of fedfms.flare.filters.RenamesItsArgument.*'bound': 3.0"):
        job.files()


@pytest.mark.integration
def test_job_py_runs_the_job_in_flares_simulator(tmp_path):
    """NVFlare's example convention: job.py builds the job (FedFMSRecipe) and runs it in FLARE's SimEnv (gpu_config when
    asked); the run lands in WORKSPACE/<variant>."""
    import subprocess
    import sys

    from fedfms.data.synthetic import make_disc_site
    from fedfms.run_record import read_run_record

    for i, site in enumerate(["site-1", "site-2"]):
        make_disc_site(tmp_path / "data" / site, site=site, num_volumes=2 + i, slices_per_volume=3, seed=i)
    done = subprocess.run([sys.executable, str(JOBS / "job.py"), "fedmsa_tiny", "--simulate", str(tmp_path / "ws"),
                           "--data-root", str(tmp_path / "data"), "--rounds", "1"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    record = read_run_record(next((tmp_path / "ws").rglob("fedfms_run.json")).parent)
    assert record["status"] == "completed" and record["expected_sites"] == ["site-1", "site-2"]
    assert list((tmp_path / "ws").rglob("FL_global_model.pt"))


def test_he_is_a_fedmsa_setting_that_refuses_what_cannot_run_on_ciphertext():
    from fedfms.flare.jobs import variant_settings

    files = render_job("fedmsa", encryption="he", sites=["a", "b"])
    server, client = files["app/config/config_fed_server.json"], files["app/config/config_fed_client.json"]
    paths = component_paths(files)
    assert {"nvflare.app_opt.he.model_encryptor.HEModelEncryptor", "nvflare.app_opt.he.model_decryptor.HEModelDecryptor",
            "nvflare.app_opt.he.intime_accumulate_model_aggregator.HEInTimeAccumulateWeightedAggregator"} <= paths
    assert paths <= set(class_allow_list())
    persistor = next(c for c in server["components"] if c["id"] == "persistor")
    assert persistor["args"]["filter_id"] == "model_serialize_filter"
    check = server["task_result_filters"][0]["filters"][-1]
    assert check["path"].endswith("ContributionCheckFilter") and check["args"]["encrypted"] is True
    for chain in client["task_result_filters"]:  # every result is checked in plaintext at the site, then encrypted
        assert [f["path"].rsplit(".", 1)[1] for f in chain["filters"]][:3] == ["TravelSetFilter", "HEPlaintextCheck", "HEModelEncryptor"]
    for variant, extra, message in [("fedsam", {}, "for FedMSA's travel set"), ("fednnunet", {}, "for FedMSA's travel set"),
                                    ("fedmsa", {"transfer": "float16"}, "ciphertexts travel"),
                                    ("fedmsa", {"aggregation": "median"}, "robust aggregation"),
                                    ("fedmsa", {"privacy": "svt"}, "not combined with HE")]:
        with pytest.raises(ConfigError, match=message):
            variant_settings(variant, encryption="he", **extra)
