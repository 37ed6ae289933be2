"""The job-building half of homomorphic encryption (``fedfms.flare.he`` holds the components FLARE runs): which
server components and site filter chains an HE job uses, what the server's contribution check is told, and, for
the simulator, the TenSEAL contexts and allow-list entries a workspace needs before an HE job starts.

The builders return component instances whose constructor arguments are all stored under the same name (or
``_name``), so FLARE's ``FedJob`` can serialize them."""

from __future__ import annotations

import json
from pathlib import Path

from nvflare.apis.dxo import DataKind

from fedfms.errors import ConfigError
from fedfms.flare import he, he_server
from fedfms.flare.jobs import JobSettings, check_he_settings, components, job_recipe

PERSISTOR_FILTER_ID = "model_serialize_filter"  # the persistor's filter_id under HE (saves ciphertexts as bytes)
MODEL_TASKS_IN = ["train", "validate"]
CONTRIBUTION_CHECK_ARGS = {"encrypted": True}  # the server's ContributionCheckFilter under HE


def job_he_classes(job_dir: str | Path) -> list[str]:
    """FLARE HE class paths a job folder's configs name (empty: the job does not use HE)."""
    found: set[str] = set()
    for config in sorted(Path(job_dir).glob("*/config/config_fed_*.json")):
        try:
            found |= {path for path, _ in components(json.loads(config.read_text())) if path.startswith("nvflare.app_opt.he.")}
        except (OSError, json.JSONDecodeError):
            continue
    return sorted(found)


def _contexts_of_resumed_run(job_dir: str | Path, startup: Path) -> None:
    """A job that continues a stopped HE run (``fedfms job resume``) starts from that run's encrypted global model,
    which only that run's secret key decrypts (a fresh key pair would decrypt it to noise: NaN at the first step):
    its contexts, from the simulator workspace above the run record, go into ``startup`` too."""
    recipe = job_recipe(job_dir)
    record = (recipe[1].get("resume") or {}).get("record") if recipe else None
    if not record:
        return
    found = next((p / "startup" for p in Path(record).parents if (p / "startup" / he.CLIENT_CONTEXT).is_file()), None)
    if found is None:
        raise ConfigError(f"{job_dir}: continues the HE run of {record}, but no startup/{he.CLIENT_CONTEXT} is above it; "
                          "expected the stopped run's simulator workspace (its global model needs that run's key)")
    if found.resolve() == startup.resolve():
        return
    theirs = [(found / name).read_bytes() for name in (he.SERVER_CONTEXT, he.CLIENT_CONTEXT)]
    if (startup / he.CLIENT_CONTEXT).is_file():
        if (startup / he.CLIENT_CONTEXT).read_bytes() != theirs[1]:
            raise ConfigError(f"{startup}: holds other TenSEAL contexts than the resumed run's ({found}); use a new "
                              "workspace, or copy that run's contexts there")
        return
    startup.mkdir(parents=True, exist_ok=True)
    for name, content in zip((he.SERVER_CONTEXT, he.CLIENT_CONTEXT), theirs):
        (startup / name).write_bytes(content)
    (startup / he.CLIENT_CONTEXT).chmod(0o600)


def prepare_simulation(workspace: str | Path, job_dir: str | Path) -> bool:
    """For a job that uses FLARE's HE components: the TenSEAL contexts in the simulator's ``startup/`` (kept
    across runs of the same workspace) and the HE classes in the simulated sites' ``class_allow_list``.
    Returns whether the job uses HE (nothing is written otherwise)."""
    classes = job_he_classes(job_dir)
    if not classes:
        return False
    _contexts_of_resumed_run(job_dir, Path(workspace) / "startup")
    he.write_contexts(Path(workspace) / "startup")
    resources = Path(workspace) / "local" / "resources.json"
    current = json.loads(resources.read_text()) if resources.is_file() else {"format_version": 2}
    allowed = list(current.get("class_allow_list") or [])
    current["class_allow_list"] = allowed + [c for c in classes if c not in allowed]
    resources.parent.mkdir(parents=True, exist_ok=True)
    resources.write_text(json.dumps(current, indent=2))
    return True


def _construct(cls, **args):
    return cls(**args)


def server_components(settings: JobSettings, make=_construct) -> dict[str, object]:
    """Server components by id, to replace (or add) in a plaintext job: ``shareable_generator``, ``aggregator``,
    ``model_serialize_filter`` (new: the persistor's ``filter_id`` must name it, :data:`PERSISTOR_FILTER_ID`),
    ``federation_monitor`` (same arguments, HE-aware aggregate check) and the workflow ``cross_site_validate``.
    The server's ``ContributionCheckFilter`` takes ``encrypted=True``. ``make(cls, **args)`` constructs each one
    (the job builder's records what it set, to check the exported job)."""
    from nvflare.app_opt.he.intime_accumulate_model_aggregator import HEInTimeAccumulateWeightedAggregator
    from nvflare.app_opt.he.model_serialize_filter import HEModelSerializeFilter
    from nvflare.app_opt.he.model_shareable_generator import HEModelShareableGenerator

    check_he_settings(settings.values)
    timeouts = settings.timeouts
    return {
        "shareable_generator": make(HEModelShareableGenerator, tenseal_context_file=he.SERVER_CONTEXT),
        # the sites weigh by n_k before encrypting; the aggregator divides the ciphertext sum by sum(n_k)
        "aggregator": make(HEInTimeAccumulateWeightedAggregator, expected_data_kind=DataKind.WEIGHTS, weigh_by_local_iter=False),
        PERSISTOR_FILTER_ID: make(HEModelSerializeFilter, tenseal_context_file=he.SERVER_CONTEXT),
        "federation_monitor": make(he_server.HEFederationMonitor, **settings.monitor_args),
        "cross_site_validate": make(he_server.CrossSiteModelEvalHE, tenseal_context_file=he.SERVER_CONTEXT,
                                    model_locator_id="model_locator",
                                    submit_model_timeout=timeouts["submit"], validation_timeout=timeouts["validate"]),
    }


def site_filters(settings: JobSettings, make=_construct) -> tuple[list, list]:
    """(result chains, data chains), each a list of ``(tasks, [filter instances])`` with disjoint tasks.
    Result chains go after the site's ``TravelSetFilter`` of the same tasks: the plaintext check, then FLARE's
    encryptor (training results weighted by the sample count, submitted models not), then the ciphertexts as
    bytes (:class:`~fedfms.flare.he.HECiphertextBytes`). Data chains (incoming
    models): FLARE's decryptor, then the reshape to the travel set's shapes."""
    from nvflare.app_opt.he.model_decryptor import HEModelDecryptor
    from nvflare.app_opt.he.model_encryptor import HEModelEncryptor

    check_he_settings(settings.values)
    model = settings.values["model"]
    max_abs = settings.values.get("he_max_abs") or he.DEFAULT_MAX_ABS

    def outgoing(weigh: bool) -> list:
        return [make(he.HEPlaintextCheck, model_config=model, max_abs=max_abs),
                make(HEModelEncryptor, tenseal_context_file=he.CLIENT_CONTEXT, weigh_by_local_iter=weigh),
                make(he.HECiphertextBytes)]

    results = [(["train"], outgoing(True)), (["submit_model"], outgoing(False))]
    data = [(list(MODEL_TASKS_IN), [make(HEModelDecryptor, tenseal_context_file=he.CLIENT_CONTEXT),
                                    make(he.HEReshapeFilter, model_config=model)])]
    return results, data
