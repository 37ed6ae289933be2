"""Every FedFMS job, built with FLARE's Job API (:class:`nvflare.job_config.api.FedJob`).

:class:`FedFMSJob` is a ``FedJob`` whose components are made from a variant's settings
(``fedfms.flare.jobs.job_settings``): FLARE's ``ScatterAndGather``, ``InTimeAccumulateWeightedAggregator``,
``PTFileModelPersistor``, ``IntimeModelSelector``, ``CrossSiteModelEval`` and tracking receivers, and the project's
executor, filters and federation monitor. ``export_job`` writes the classic JSON job that is checked in under
``jobs/``; ``simulator_run`` runs it in FLARE's simulator (``gpu="0,1"`` places the simulated sites on GPUs).

The FednnU-Net variants are the same job with four classes swapped and a planning workflow first
(``fedfms.flare.nnunet_job``), so every variant differs only in configuration.
"""

from __future__ import annotations

import functools
import json
import logging
import tempfile
from pathlib import Path

from nvflare.app_common.shareablegenerators.full_model_shareable_generator import FullModelShareableGenerator
from nvflare.app_common.widgets.convert_to_fed_event import ConvertToFedEvent
from nvflare.app_common.widgets.intime_model_selector import IntimeModelSelector
from nvflare.app_common.widgets.validation_json_generator import ValidationJsonGenerator
from nvflare.app_common.workflows.cross_site_model_eval import CrossSiteModelEval
from nvflare.app_common.aggregators.intime_accumulate_model_aggregator import InTimeAccumulateWeightedAggregator
from nvflare.app_opt.pt.file_model_locator import PTFileModelLocator
from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor
from nvflare.app_opt.tracking.tb.tb_receiver import TBAnalyticsReceiver
from nvflare.app_opt.tracking.tb.tb_writer import TBWriter
from nvflare.job_config.api import FedJob
from nvflare.job_config.defs import FilterType

from fedfms.errors import ConfigError
from fedfms.flare import jobs
from fedfms.flare.contribution_filter import ContributionCheckFilter
from fedfms.flare.executor import KEY_METRIC, FedFMSExecutor
from fedfms.flare.filters import TravelSetFilter
from fedfms.flare import he_job
from fedfms.flare.monitor import FederationMonitor
from fedfms.flare.robust_aggregator import RobustAggregator
from fedfms.flare.scatter_gather import LiveScatterAndGather
from fedfms.flare import nnunet_job
from fedfms.flare.personalise import PersonalisationRecorder

TRAVEL_SET_MODEL = "fedfms.flare.global_model.TravelSetModel"
# bitsandbytes, which FLARE's quantisation filters import, warns on CPUs with AVX512-BF16 that its optional 4-bit
# kernel package is missing; these jobs quantise to float16 only, so on every `fedfms` command that was noise
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# FLARE keeps a filter chain's tasks in a set; the exported JSON lists them in this order, so the files are stable
TASK_ORDER = ("train", "validate", "submit_model", "personalise")


class FedFMSJob(FedJob):
    """A FedFMS job from settings (``fedfms.flare.jobs.job_settings``).

    Args:
        settings: a variant's checked settings with what is derived from them.
        recipe: what ``meta.json`` keeps to re-make the job (variant and overrides).
    """

    def __init__(self, settings: jobs.JobSettings, recipe: dict | None = None):
        self.job_settings = js = settings
        s = js.values
        meta = {jobs.RECIPE_KEY: recipe} if recipe else None
        super().__init__(name=s["name"], min_clients=js.min_clients, meta_props=meta)
        # the sites have fedfms installed (production flavour): no source is copied into app/custom
        self.set_app_packages(["fedfms"])
        self.sites = list(s["sites"]) if s["sites"] else None
        self._intended: list[tuple[object, dict]] = []  # (component, the arguments it was made with)
        self.kind = nnunet_job.NNUNET_KIND if js.nnunet else None
        self.settings = s
        self._add_server(js)
        self._add_sites(js)

    def _made(self, cls, **args):
        args = {k: v for k, v in args.items() if v is not None}  # None: not set here, the class default applies
        obj = cls(**args)
        # FedJob leaves out an argument equal to the class default; the ones set here stay in the JSON, so an
        # administrator reads e.g. weigh_by_local_iter=true (FedAvg by sample counts) in the job itself
        obj._always_serialize_args = tuple(args)
        self._intended.append((obj, args))
        return obj

    # -- server ---------------------------------------------------------------------------------------------------
    def _add_server(self, js: jobs.JobSettings) -> None:
        kind, s, t = self.kind, js.values, js.timeouts
        self.to_server({
            "num_rounds": s["num_rounds"] - s["start_round"],
            "min_clients": js.min_clients,
            # FLARE's dead-site handling: once the server has dropped a site (no heartbeat for the kit's
            # heart_beat_timeout), a round stops waiting for it after this grace period (default 60 s), checked
            # from this long after a task starts (default 30 s)
            "dead_client_grace_period": jobs.DEAD_CLIENT_GRACE_S,
            "dead_client_check_lead_time": jobs.DEAD_CLIENT_LEAD_S,
            "server": {"task_request_interval": s["task_request_interval"]},
        })
        quantize = self._quantizer(s)
        if quantize:
            self.to_server(quantize, filter_type=FilterType.TASK_DATA, tasks=js.model_tasks_out)
        # every result is checked (after float16 is restored) before the workflow, the model selector or the
        # aggregator reads it; a bad one turns into an error reply naming the reason
        dequantize = self._dequantizer(s)
        if dequantize:
            self.to_server(dequantize, filter_type=FilterType.TASK_RESULT, tasks=jobs.MODEL_TASKS_BACK)
        he = self._he(s)
        # under HE: FLARE's HE generator, aggregator and cross-site evaluation, a serialize filter for the persistor,
        # the monitor and the server's check on ciphertext (fedfms.flare.he_job, docs/privacy-he.md)
        he_parts = he.server_components(js, make=self._made) if he else {}
        check_args = {"model_config": s["model"], "max_samples": s["max_samples"], "site_samples": s["site_samples"]}
        if s["update"] != "weights":
            check_args["data_kinds"] = [js.update_kind]
        if he:
            check_args.update(he.CONTRIBUTION_CHECK_ARGS)
        check = self._made(kind.CheckFilter if kind else ContributionCheckFilter, **check_args)
        self.to_server(check, filter_type=FilterType.TASK_RESULT, tasks=jobs.MODEL_TASKS_BACK)

        persistor_args = {"model": {"path": kind.GLOBAL_MODEL if kind else TRAVEL_SET_MODEL, "args": dict(s["model"])}}
        if s["resume"]:
            persistor_args["source_ckpt_file_full_name"] = s["resume"]["global_model"]
        if he:
            persistor_args["filter_id"] = he.PERSISTOR_FILTER_ID
        self.to_server(self._made(PTFileModelPersistor, **persistor_args), id="persistor")
        if he:
            self.to_server(he_parts[he.PERSISTOR_FILTER_ID], id=he.PERSISTOR_FILTER_ID)
        self.to_server(he_parts.get("shareable_generator") or self._made(FullModelShareableGenerator), id="shareable_generator")
        self.to_server(he_parts.get("aggregator") or self._aggregator(js), id="aggregator")
        self.to_server(self._made(IntimeModelSelector, key_metric=KEY_METRIC, weigh_by_local_iter=True), id="model_selector")
        self.to_server(he_parts.get("federation_monitor") or self._made(FederationMonitor, **js.monitor_args),
                       id="federation_monitor")
        self.to_server(self._made(PTFileModelLocator, pt_persistor_id="persistor"), id="model_locator")
        self.to_server(self._made(ValidationJsonGenerator), id="json_generator")
        self.to_server(self._made(TBAnalyticsReceiver, events=["fed.analytix_log_stats"]), id="tb_receiver")
        if s["tracking"] == "mlflow":
            from nvflare.app_opt.tracking.mlflow.mlflow_receiver import MLflowReceiver

            # no tracking_uri: FLARE's receiver writes a SQLite store (mlflow.db) into the job's result folder, offline
            self.to_server(self._made(MLflowReceiver, events=["fed.analytix_log_stats"], kw_args={
                "experiment_name": "fedfms", "run_name": s.get("name", "run"),
                "experiment_tags": {"mlflow.note.content": "FedFMS on NVIDIA FLARE"}}), id="mlflow_receiver")

        if kind:
            self.to_server(self._made(kind.Planning, planning_config=dict(s["train"]),
                                      expected_sites=sorted(s["sites"]) if s["sites"] else None,
                                      persistor_id="persistor", timeout=t["plan"]), id="nnunet_planning")
        self.to_server(self._made(
            LiveScatterAndGather,
            min_clients=js.min_clients,
            num_rounds=s["num_rounds"] - s["start_round"],
            start_round=s["start_round"],
            # a round waits for every site as long as it reports progress (a slow site is averaged, not dropped);
            # a dead or silent site is ended by the federation monitor through FLARE's dead-client handling;
            # train_timeout: the job's round_timeout, an outer bound only (0: none)
            train_timeout=t["train"],
            aggregator_id="aggregator",
            persistor_id="persistor",
            shareable_generator_id="shareable_generator",
            train_task_name="train",
            # failed and rejected sites are recorded by the federation monitor, which applies min_sites
            ignore_result_error=True,
            memory_gc_rounds=s["memory_gc_rounds"],
        ), id="scatter_and_gather")
        if s.get("personalise"):
            self._add_personalisation(js)
        self.to_server(he_parts.get("cross_site_validate") or self._made(
            CrossSiteModelEval, model_locator_id="model_locator", submit_model_timeout=t["submit"],
            validation_timeout=t["validate"]), id="cross_site_validate")

    def _add_personalisation(self, js: jobs.JobSettings) -> None:
        """After the last round: FLARE's BroadcastAndProcess sends the final global model to every site, which
        fine-tunes and scores its personalised model (fedfms.flare.personalise); before cross-site evaluation."""
        from nvflare.app_common.workflows.broadcast_and_process import BroadcastAndProcess

        s = js.values
        self.to_server(self._made(PersonalisationRecorder, personalise=s["personalise"], model_locator_id="model_locator",
                                  expected_sites=sorted(s["sites"]) if s["sites"] else None,
                                  alone_epochs=js.alone_epochs or None), id="personalisation")
        self.to_server(self._made(BroadcastAndProcess, processor="personalisation", task_name=jobs.PERSONALISE_TASK,
                                  min_responses_required=0, wait_time_after_min_received=0,
                                  timeout=js.personalise_timeout), id="personalise")

    @staticmethod
    def _he(s: dict):
        return he_job if s.get("encryption") == "he" else None

    def _aggregator(self, js: jobs.JobSettings):
        s = js.values
        if s["aggregation"] == "fedavg" and s["norm_bound"] is None:
            # FLARE's own FedAvg: weight = NUM_STEPS_CURRENT_ROUND, which the executor sets to the site's number of
            # training samples, so the result is sum(n_k w_k) / sum(n_k)
            return self._made(InTimeAccumulateWeightedAggregator, expected_data_kind=js.update_kind,
                              weigh_by_local_iter=True)
        return self._made(RobustAggregator, method="mean" if s["aggregation"] == "fedavg" else s["aggregation"],
                          trim_fraction=s["trim_fraction"], norm_bound=s["norm_bound"],
                          norm_bound_action=s["norm_bound_action"], expected_data_kind=js.update_kind)

    def _quantizer(self, s: dict):
        if s["transfer"] == "float32":
            return None
        from nvflare.app_opt.pt.quantization.quantizer import ModelQuantizer

        return self._made(ModelQuantizer, quantization_type=s["transfer"])

    def _dequantizer(self, s: dict):
        if s["transfer"] == "float32":
            return None
        from nvflare.app_opt.pt.quantization.dequantizer import ModelDequantizer

        return self._made(ModelDequantizer)

    # -- sites ----------------------------------------------------------------------------------------------------
    def _add_sites(self, js: jobs.JobSettings) -> None:
        kind, s = self.kind, js.values
        executor_args = {"model_config": s["model"], "train_config": s["train"], "data_dir": s["data_dir"],
                         "transfer": s["transfer"]}
        if s["update"] != "weights":
            executor_args["update"] = s["update"]
        if s["processes_per_site"] != 1:
            executor_args["processes_per_site"] = s["processes_per_site"]
        if not kind and s["round_timeout"]:
            # a site's multi-process round (its own processes_per_site included) ends where the server stops waiting
            executor_args["round_timeout_s"] = js.timeouts["train"]
        if s.get("personalise"):
            executor_args.update(personalise=s["personalise"], alone_epochs=js.alone_epochs or None)
        tasks = ["train", "validate", "submit_model", *(kind.PLANNING_TASKS if kind else []),
                 *([jobs.PERSONALISE_TASK] if s.get("personalise") else [])]
        self.to_clients(self._made(kind.Executor if kind else FedFMSExecutor, **executor_args), tasks=tasks)

        # the travel-set check runs first, on the float32 weights the site computed; then (training updates only)
        # differential privacy; then quantisation. FLARE allows one chain per task set, so with privacy the
        # training task gets its own chain.
        he = self._he(s)
        if he:
            # the plaintext travel-set check, then the HE site filters (checked again, encrypted, sent as bytes);
            # incoming models are decrypted and reshaped
            results, data = he.site_filters(js, make=self._made)
            for tasks_of_chain, chain in results:
                for f in [self._travel_filter(s), *chain]:
                    self.to_clients(f, filter_type=FilterType.TASK_RESULT, tasks=tasks_of_chain)
            for tasks_of_chain, chain in data:
                for f in chain:
                    self.to_clients(f, filter_type=FilterType.TASK_DATA, tasks=tasks_of_chain)
            self._add_site_tracking()
            return
        back = jobs.MODEL_TASKS_BACK
        chains = [(["train"], [t for t in back if t != "train"])] if s["privacy"] else [(back,)]
        for chain in chains:
            for i, tasks_of_chain in enumerate(chain):
                self.to_clients(self._travel_filter(s), filter_type=FilterType.TASK_RESULT, tasks=tasks_of_chain)
                if s["privacy"] and i == 0:
                    self.to_clients(self._privacy_filter(s), filter_type=FilterType.TASK_RESULT, tasks=tasks_of_chain)
                quantize = self._quantizer(s)
                if quantize:
                    self.to_clients(quantize, filter_type=FilterType.TASK_RESULT, tasks=tasks_of_chain)
        dequantize = self._dequantizer(s)
        if dequantize:
            self.to_clients(dequantize, filter_type=FilterType.TASK_DATA, tasks=js.model_tasks_out)
        self._add_site_tracking()

    def _add_site_tracking(self) -> None:
        self.to_clients(self._made(TBWriter), id="tb_writer")
        self.to_clients(self._made(ConvertToFedEvent, events_to_convert=["analytix_log_stats"], fed_event_prefix="fed."),
                        id="event_to_fed")

    def _travel_filter(self, s: dict):
        if self.kind:
            # every tensor of the planned network travels; the exact key set is the server's check (the plan only
            # exists once the job runs)
            return self._made(TravelSetFilter, mode="fedsam")
        return self._made(TravelSetFilter, mode=s["model"]["mode"], model_config=s["model"])

    def _privacy_filter(self, s: dict):
        module, _, name = jobs.PRIVACY_FILTERS[s["privacy"]].rpartition(".")
        cls = getattr(__import__(module, fromlist=[name]), name)
        return self._made(cls, **dict(s["privacy_args"] or {}))

    # -- files ----------------------------------------------------------------------------------------------------
    def files(self) -> dict[str, dict]:
        """Relative path -> JSON content of every file ``export_job`` writes, in a stable form: filter chains'
        tasks in :data:`TASK_ORDER`, ``meta.json``'s ``deploy_map`` naming the job's sites when it has them
        (FLARE's Job API deploys one app to ``@ALL``)."""
        with tempfile.TemporaryDirectory(prefix="fedfms-job-") as tmp:
            root = self._flare_export(tmp)
            found = {str(p.relative_to(root)): json.loads(p.read_text()) for p in sorted(root.rglob("*.json"))}
            leftovers = [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.suffix != ".json"]
        if leftovers:
            raise RuntimeError(f"FedJob exported files besides the JSON configs: {leftovers}")
        return self._stable(found)

    def export_job(self, job_root: str):
        """FLARE's export in the stable form of :meth:`files`: what ``fedfms job new`` writes. FLARE calls this to
        submit a job (``Recipe.export``, its POC and production environments' ``submit_job``), so a submitted job names
        its sites in ``deploy_map`` as the written one does. Files besides the JSON configs (the code a BYOC recipe
        ships in ``custom/``) stay as FLARE wrote them."""
        root = self._flare_export(job_root)
        found = {str(p.relative_to(root)): json.loads(p.read_text()) for p in sorted(root.glob("*/config/*.json"))}
        found["meta.json"] = json.loads((root / "meta.json").read_text())
        for rel, content in self._stable(found).items():
            (root / rel).write_text(json.dumps(content, indent=2) + "\n")

    def _flare_export(self, job_root) -> Path:
        FedJob.export_job(self, str(job_root))
        return Path(job_root) / self.name

    def _stable(self, found: dict[str, dict]) -> dict[str, dict]:
        for content in found.values():
            for key in ("task_data_filters", "task_result_filters"):
                for chain in content.get(key, []):
                    chain["tasks"] = sorted(chain["tasks"], key=lambda t: (TASK_ORDER.index(t) if t in TASK_ORDER else 99, t))
        if self.sites:
            found["meta.json"]["deploy_map"] = {"app": ["server", *self.sites]}
        self._check_arguments(found)
        return found

    def _check_arguments(self, files: dict[str, dict]) -> None:
        """FedJob writes a component's arguments from its attributes of the same name; an argument a class keeps
        under another name would be left out silently and the component would run with its default. Every
        argument given here must be in the exported JSON."""
        exported = jobs.components(files)
        for obj, args in self._intended:
            path = f"{type(obj).__module__}.{type(obj).__name__}"
            wanted = dict(args)
            if not any(p == path and all(_same(a.get(k, _MISSING), v) for k, v in wanted.items()) for p, a in exported):
                raise RuntimeError(f"FedJob lost arguments of {path}: expected {wanted} in the exported job "
                                   "(the class must keep each constructor argument under the same attribute name)")

    def write(self, out_dir: str | Path, overwrite: bool = False) -> Path:
        """Write the job into ``out_dir`` (any folder name); an existing folder only with ``overwrite``."""
        out_dir = Path(out_dir)
        if out_dir.exists() and not overwrite:
            raise ConfigError(f"{out_dir}: job folder already exists; pass --overwrite to replace it")
        files = self.files()
        if out_dir.exists():
            for stale in out_dir.rglob("config_fed_*.json"):
                stale.unlink()
        for rel, content in files.items():
            path = out_dir / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(content, indent=2) + "\n")
        return out_dir


_MISSING = object()


def _same(a, b) -> bool:
    """Equal as JSON would keep them (tuples are lists, dict order does not matter)."""
    try:
        return json.loads(json.dumps(a)) == json.loads(json.dumps(b))
    except (TypeError, ValueError):
        return a is b


def build_job(name: str, **overrides) -> FedFMSJob:
    """The job of variant ``name`` with ``overrides`` (any of ``jobs.SETTING_KEYS``) as FLARE's Job API object (a
    ``FedJob``): ``export_job`` / ``simulator_run`` as any FLARE job. ``meta.json`` keeps the recipe (variant and
    overrides), so a job can be re-made for other sites or continued after a stop without editing JSON."""
    recipe = {"variant": name, "settings": {k: v for k, v in overrides.items() if v is not None}}
    return FedFMSJob(jobs.job_settings(name, **overrides), recipe)


def render_job(name: str, **overrides) -> dict[str, dict]:
    """Relative path -> JSON content of every file of the job, as FLARE's ``export_job`` writes it."""
    return build_job(name, **overrides).files()


def write_job(name: str, out_dir: str | Path, overwrite: bool = False, **overrides) -> Path:
    return build_job(name, **overrides).write(out_dir, overwrite=overwrite)


def rewrite_job(job_dir: str | Path, out_dir: str | Path, overwrite: bool = False, **changes) -> Path:
    """Write ``job_dir``'s recipe again with ``changes`` (e.g. the sites of this run) into ``out_dir``."""
    recipe = jobs.job_recipe(job_dir)
    if recipe is None:
        raise ConfigError(f"{job_dir}/meta.json has no {jobs.RECIPE_KEY!r}: the job was not made by `fedfms job new`; "
                          "make it with `fedfms job new` (or edit its JSON by hand)")
    variant, settings = recipe
    if "min_clients" in settings and "min_sites" in changes:
        settings.pop("min_clients")
    return write_job(variant, out_dir, overwrite=overwrite, **{**settings, **{k: v for k, v in changes.items() if v is not None}})


def generate_all(jobs_root: str | Path) -> list[Path]:
    """(Re)write every variant under ``jobs_root``: what is checked in."""
    return [write_job(name, Path(jobs_root) / name, overwrite=True) for name in jobs.VARIANTS]


def _allow_list_renders():
    """Option sets that, over every variant, reach each branch of the job builder (and so every class it names)."""
    for name in jobs.VARIANTS:
        options = [{"transfer": transfer, "privacy": privacy} for transfer in jobs.TRANSFER_TYPES
                   for privacy in (None, *jobs.PRIVACY_FILTERS)]
        options.append({"aggregation": "median", "norm_bound": 3.0})
        if jobs.VARIANTS[name]["model"].get("mode") == "fedmsa" and not jobs.is_nnunet(jobs.VARIANTS[name]):
            options.append({"encryption": "he"})
        if not jobs.is_nnunet(jobs.VARIANTS[name]):
            options.append({"personalise": "finetune:1", "transfer": "float16"})
        for option in options:
            yield name, option


@functools.cache
def _class_allow_list() -> tuple[str, ...]:
    found = set()
    for name, option in _allow_list_renders():
        found |= jobs.component_paths(render_job(name, tracking="mlflow", **option))
    return tuple(sorted(found))


def class_allow_list() -> list[str]:
    """The ``class_allow_list`` a site needs to run every job here without custom code: exactly the classes the jobs
    name, stock FLARE and this package's alike. No prefix entry: a prefix (``"fedfms."``) would admit every callable
    below it, functions such as ``site_setup.add_class_allow_list`` included, which a job could call with arguments
    of its choosing. Rendering every variant takes seconds, so the list is made once per process."""
    return list(_class_allow_list())
