"""The server side of FednnU-Net: the planning workflow that runs before ``ScatterAndGather``, the global model
that holds the plan's network, and the contribution check that takes its travel spec from that plan.

Planning (:class:`NnUNetPlanning`), two broadcasts:

1. task ``nnunet_fingerprint``: every site answers with its fingerprint -- only the counts listed in
   ``fedfms.nnunet.fingerprint`` (checked against that list here; anything else stops the job);
2. the server merges them (``merge_fingerprints``) and plans once with nnU-Net's own ExperimentPlanner
   (``make_plan``); it writes the plan as ``nnunet_plan.json`` beside the global model, hands it to the global
   model (the persistor's :class:`NnUNetGlobalModel`, which builds the planned network the first round starts
   from), and records what it received in ``nnunet_fingerprints.json``;
3. task ``nnunet_plan``: the plan goes to every site, which builds its trainer from it and answers with the plan's
   SHA-256; any other answer, or a site missing, stops the job before any training.

From then on every site reports the plan digest with each update (the executors' frozen-weights fingerprint
field), and :class:`NnUNetContributionCheckFilter` rejects an update trained with any other plan.
"""

from __future__ import annotations

import json
from pathlib import Path

from nvflare.apis.client import Client
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.fl_constant import FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.controller_spec import Task
from nvflare.apis.impl.controller import Controller
from nvflare.apis.shareable import Shareable
from nvflare.apis.signal import Signal
from torch import nn

from fedfms.errors import FedFMSError
from fedfms.flare.contribution_filter import ContributionCheckFilter
from fedfms.flare.nnunet_tasks import DIGEST_KEY, FINGERPRINT_TASK, PLAN_KEY, PLAN_TASK
from fedfms.flare.replies import REASON_HEADER
from fedfms.flare.update_check import FROZEN_FINGERPRINT
from fedfms.nnunet.config import NnUNetConfig, PlanError, check_model_config
from fedfms.nnunet.evaluate import PLAN_FILE, write_plan
from fedfms.nnunet.fingerprint import fingerprint_problems, merge_fingerprints
from fedfms.nnunet.plan import build_network, describe, make_plan, plan_digest, travel_state

FINGERPRINTS_FILE = "nnunet_fingerprints.json"


class NnUNetGlobalModel(nn.Module):
    """The global model for ``PTFileModelPersistor``: the planned nnU-Net network, all of which travels.

    The persistor builds it when the job starts, before any plan exists; :class:`NnUNetPlanning` calls
    :meth:`set_plan` before ``ScatterAndGather`` asks the persistor for the initial model. ``fingerprint`` is the
    plan's digest (what the contribution check compares with each site's)."""

    def __init__(self, **model_config):
        super().__init__()
        self.config = check_model_config(model_config, "persistor model config")
        self.plan: dict | None = None
        self.network: nn.Module | None = None
        self.fingerprint: str | None = None

    def set_plan(self, plan: dict) -> None:
        if len(plan["classes"]) != self.config.get("num_classes", 1):
            raise PlanError(f"the plan has {len(plan['classes'])} class(es) {plan['classes']}; the job says "
                            f"num_classes={self.config.get('num_classes', 1)}")
        self.network = build_network(plan, deep_supervision=True)
        self.plan = plan
        self.fingerprint = plan_digest(plan)

    def travel_spec(self) -> dict | None:
        """key -> (shape, dtype) of the planned network; None before the plan."""
        if self.network is None:
            return None
        return {k: (tuple(v.shape), v.dtype) for k, v in travel_state(self.network).items()}

    def state_dict(self, *args, **kwargs):
        if self.network is None:
            raise PlanError("the global nnU-Net model has no plan yet: the job's nnunet_planning workflow must run "
                            "before scatter_and_gather")
        return {k: v.cpu().clone() for k, v in travel_state(self.network).items()}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if self.network is None:
            raise PlanError("the global nnU-Net model has no plan yet")
        return self.network.load_state_dict(state_dict, strict=False, assign=assign)  # aliases load with their tensors


class NnUNetContributionCheckFilter(ContributionCheckFilter):
    """The project's :class:`ContributionCheckFilter`, every check unchanged; its travel spec (keys, shapes, dtypes)
    is the planned network's, from the server's :class:`NnUNetGlobalModel` (``travel_spec()``, which the base class
    asks the persistor's model for), since it only exists once the plan does. Here only the messages differ: no
    plan yet, and a fingerprint mismatch reported as what it is here, another plan."""

    NO_SPEC_REASON = "the server holds no nnU-Net plan (the planning workflow did not finish)"

    def travel_spec(self, fl_ctx: FLContext) -> dict | None:
        if self._spec is None and self._global_model(fl_ctx) is None:
            return None  # never the model_config's spec: an nnU-Net network is only known from its plan
        return super().travel_spec(fl_ctx)

    def _problems(self, shareable: Shareable, fl_ctx: FLContext, site: str, training: bool):
        problems, dxo, n = super()._problems(shareable, fl_ctx, site, training)
        if training and dxo is not None:
            theirs, model = dxo.get_meta_prop(FROZEN_FINGERPRINT), self._global_model(fl_ctx)
            ours = str(getattr(model, "fingerprint", None))[:12]
            problems = [f"it trained with another nnU-Net plan than the server's (plan digest {str(theirs)[:12]} vs "
                        f"{ours})" if p.startswith("its frozen weights differ") else p for p in problems]
        return problems, dxo, n

    def _global_model(self, fl_ctx: FLContext):
        engine = fl_ctx.get_engine()
        persistor = engine.get_component(self.persistor_id) if engine else None
        model = getattr(persistor, "model", None)
        return model if isinstance(model, NnUNetGlobalModel) else None


def _reason(result: Shareable | None) -> str:
    if result is None:
        return "no answer (the site is gone, or the job's round_timeout passed)"
    rc = result.get_return_code(ReturnCode.OK)
    return result.get_header(REASON_HEADER) or f"the site returned {rc}"


def _read_fingerprint(result: Shareable):
    """(the site's fingerprint, None) or (None, why it is refused)."""
    try:
        fp = from_shareable(result).data
    except Exception as exc:
        return None, f"not a fingerprint ({type(exc).__name__}: {exc})"
    problems = fingerprint_problems(fp)
    return (None, "fingerprint refused: " + "; ".join(problems)) if problems else (fp, None)


class NnUNetPlanning(Controller):
    """Federated nnU-Net planning before training (module docstring).

    Args:
        planning_config: the job's nnU-Net settings (``fedfms.nnunet.config.NnUNetConfig`` fields; the planner
            reads ``PLAN_FIELDS``).
        expected_sites: the sites that must send a fingerprint (default: every site connected to the job).
        persistor_id: the ``PTFileModelPersistor`` whose model is the :class:`NnUNetGlobalModel`.
        timeout: seconds each broadcast waits for every site (reading and converting a site's data included).
    """

    def __init__(self, planning_config: dict | None = None, expected_sites: list[str] | None = None,
                 persistor_id: str = "persistor", timeout: int = 600, fingerprint_task_name: str = FINGERPRINT_TASK,
                 plan_task_name: str = PLAN_TASK):
        super().__init__()
        self.planning_config = dict(planning_config or {})
        self.config = NnUNetConfig.from_dict(self.planning_config, "nnunet_planning planning_config")
        self.expected_sites = sorted(expected_sites) if expected_sites else None
        self.persistor_id = persistor_id
        self.timeout = int(timeout)
        self.fingerprint_task_name = fingerprint_task_name
        self.plan_task_name = plan_task_name
        self.plan: dict | None = None
        self.digest: str | None = None
        self._results: dict[str, Shareable] = {}

    def start_controller(self, fl_ctx: FLContext):
        pass

    def stop_controller(self, fl_ctx: FLContext):
        pass

    def process_result_of_unknown_task(self, client: Client, task_name: str, client_task_id: str, result: Shareable,
                                       fl_ctx: FLContext):
        self.log_warning(fl_ctx, f"ignoring a late result of task {task_name} from {client.name}")

    def _collect(self, client_task, fl_ctx: FLContext) -> None:
        self._results[client_task.client.name] = client_task.result

    def _gather(self, name: str, data: Shareable, sites: list[str], abort_signal: Signal, fl_ctx: FLContext, read):
        """Send task ``name`` to every site and read each answer with ``read(result) -> (value, problem)``:
        ({site: value}, {site: reason}) for the answers, or None when the job was aborted meanwhile."""
        values, failed = {}, {}
        for site, result in self._broadcast(name, data, sites, abort_signal, fl_ctx).items():
            if abort_signal.triggered:
                return None
            if result is None or result.get_return_code(ReturnCode.OK) != ReturnCode.OK:
                failed[site] = _reason(result)
                continue
            value, problem = read(result)
            if problem:
                failed[site] = problem
            else:
                values[site] = value
        return values, failed

    def _broadcast(self, name: str, data: Shareable, sites: list[str], abort_signal: Signal, fl_ctx: FLContext) -> dict:
        self._results = {}
        task = Task(name, data, timeout=self.timeout, result_received_cb=self._collect)
        self.broadcast_and_wait(task, fl_ctx, targets=sites, min_responses=len(sites), abort_signal=abort_signal)
        return {site: self._results.get(site) for site in sites}

    def _stop(self, fl_ctx: FLContext, reason: str) -> None:
        self.log_error(fl_ctx, f"nnU-Net planning failed: {reason}")
        self.system_panic(f"nnU-Net planning failed: {reason}", fl_ctx)

    def control_flow(self, abort_signal: Signal, fl_ctx: FLContext):
        engine = fl_ctx.get_engine()
        sites = self.expected_sites or sorted(c.name for c in engine.get_clients())
        if not sites:
            return self._stop(fl_ctx, "no site is part of the job")
        self.log_info(fl_ctx, f"nnU-Net planning: asking {sites} for their fingerprints")

        # 1. fingerprints
        gathered = self._gather(self.fingerprint_task_name, Shareable(), sites, abort_signal, fl_ctx, _read_fingerprint)
        if gathered is None:
            return
        fingerprints, failed = gathered
        if failed:
            return self._stop(fl_ctx, "; ".join(f"site {s}: {r}" for s, r in sorted(failed.items())))

        # 2. one plan
        try:
            merged = merge_fingerprints(fingerprints)
            plan = make_plan(merged, self.config)
            model = self._global_model(fl_ctx)
            model.set_plan(plan)
        except FedFMSError as exc:
            return self._stop(fl_ctx, str(exc))
        self.plan, self.digest = plan, plan_digest(plan)
        app_root = Path(fl_ctx.get_prop(FLContextKey.APP_ROOT) or ".")
        write_plan(plan, app_root)
        (app_root / FINGERPRINTS_FILE).write_text(json.dumps({
            "received": fingerprints, "merged": {k: v for k, v in merged.items() if k != "nnunet_fingerprint"},
            "plan_digest": self.digest}, indent=1) + "\n")
        self.log_info(fl_ctx, f"nnU-Net plan {self.digest[:12]} from {merged['num_cases']} cases at {len(sites)} sites: "
                              f"{describe(plan)}; written to {app_root / PLAN_FILE}")

        # 3. the plan to every site; each answers with the digest of the plan it built its trainer from
        def read_digest(result: Shareable):
            try:
                theirs = from_shareable(result).data.get(DIGEST_KEY)
            except Exception as exc:
                theirs = f"unreadable ({type(exc).__name__})"
            return theirs, (None if theirs == self.digest else
                            f"built its trainer from plan {str(theirs)[:12]}, not {self.digest[:12]}")

        data = DXO(DataKind.APP_DEFINED, {PLAN_KEY: plan}).to_shareable()
        gathered = self._gather(self.plan_task_name, data, sites, abort_signal, fl_ctx, read_digest)
        if gathered is None:
            return
        _, failed = gathered
        if failed:
            return self._stop(fl_ctx, "; ".join(f"site {s}: {r}" for s, r in sorted(failed.items())))
        self.log_info(fl_ctx, f"every site ({', '.join(sites)}) trains with nnU-Net plan {self.digest[:12]}")

    def _global_model(self, fl_ctx: FLContext) -> NnUNetGlobalModel:
        persistor = fl_ctx.get_engine().get_component(self.persistor_id)
        model = getattr(persistor, "model", None)
        if not isinstance(model, NnUNetGlobalModel):
            raise PlanError(f"component {self.persistor_id!r} holds a {type(model).__name__}, not the NnUNetGlobalModel "
                            "the planned network goes into")
        return model

