"""Server-side result filter: every site result is checked before the workflow, the model selector or the
aggregator sees it. A bad result becomes an error reply naming the reason, so nothing downstream ever
reads it (FLARE's ``ScatterAndGather`` then treats it like any failed site)."""

from __future__ import annotations

from nvflare.apis.dxo import DataKind, MetaKey, from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import FLContextKey, ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.app_constant import AppConstants

import numpy as np

from fedfms.flare.update_check import (
    DEFAULT_MAX_SAMPLES,
    FROZEN_FINGERPRINT,
    expected_travel_spec,
    find_problems,
    local_part_problems,
    metric_problems,
    sample_count_problem,
)
from fedfms.flare.he import ciphertext_problems, server_context
from fedfms.flare.replies import error_reply


class ContributionCheckFilter(Filter):
    """Checks each site result of ``train_task_name`` (and models submitted for cross-site evaluation):

    - the weights are exactly the travel set of ``model_config``: keys, shapes, dtypes, finite values (when
      the ``persistor_id`` component's model offers ``travel_spec()``, e.g. FednnU-Net's network, which only
      exists once the federation's plan does, that spec instead; ``None`` from it: nothing is accepted yet); a
      personalised job's travel set leaves out the sites' ``local_parts``, and a result holding any of them is
      refused, naming it;
    - the sample count (FedAvg weight) is a positive integer, at most ``max_samples`` (or exactly the count
      ``site_samples`` pins for the site), and the same in every round as in the site's first accepted round;
    - the frozen-weights fingerprint equals the server's global model's (the ``persistor_id`` component's
      :class:`~fedfms.flare.global_model.TravelSetModel`; without one, the first accepted site's);
    - self-reported validation metrics, which pick the best model, are numbers in [0, 1].

    A result that passes goes on with its float arrays in float64, so FLARE's stock weighted sum
    (``InTimeAccumulateWeightedAggregator``) accumulates in float64; the monitor casts the average back.
    A result that fails becomes ``BAD_TASK_DATA`` with the reason in the ``fedfms_reason`` header.
    ``data_kinds``: what a training result must be (``["WEIGHT_DIFF"]`` when the job sends updates as
    differences to the global model; the same keys, shapes, dtypes and finiteness apply).
    ``encrypted``: the job encrypts updates (``fedfms.flare.he``): shapes, dtypes and NaN cannot be seen in
    ciphertext, so the weights are checked by key and ciphertext length instead (the site checked the rest in
    plaintext before encrypting); sample count, metrics and fingerprint are plaintext meta and checked as
    always; the ciphertexts go on unchanged.
    """

    def __init__(self, model_config: dict, max_samples: int = DEFAULT_MAX_SAMPLES, site_samples: dict | None = None,
                 persistor_id: str = "persistor", train_task_name: str = AppConstants.TASK_TRAIN,
                 submit_model_task_name: str = AppConstants.TASK_SUBMIT_MODEL,
                 data_kinds: list[str] | None = None, encrypted: bool = False):
        super().__init__()
        self.model_config = dict(model_config)
        self.max_samples = int(max_samples)
        self.site_samples = {str(k): int(v) for k, v in (site_samples or {}).items()}
        self.persistor_id = persistor_id
        self.train_task_name = train_task_name
        self.submit_model_task_name = submit_model_task_name
        self.data_kinds = list(data_kinds or [DataKind.WEIGHTS])
        self.encrypted = bool(encrypted)
        self._he_context = None
        self.first_counts: dict[str, int] = {}
        self.reference_fingerprint: tuple[str, str] | None = None
        self.rejected: list[tuple[str, int | None, str]] = []
        self._spec = None

    # why nothing can be accepted while the persistor's model offers no travel spec yet
    NO_SPEC_REASON = "the server's global model has no travel set yet"

    @property
    def spec(self) -> dict:
        if self._spec is None:
            self._spec = expected_travel_spec(self.model_config)
        return self._spec

    def travel_spec(self, fl_ctx: FLContext) -> dict | None:
        """key -> (shape, dtype) a result must have: the persistor's model's ``travel_spec()`` when it has one
        (kept once known), else the travel set of ``model_config``."""
        if self._spec is None:
            offer = getattr(self._persistor_model(fl_ctx), "travel_spec", None)
            if callable(offer):
                spec = offer()
                if spec is None:
                    return None
                self._spec = dict(spec)
        return self.spec

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        task = fl_ctx.get_prop(FLContextKey.TASK_NAME)
        if task not in (self.train_task_name, self.submit_model_task_name):
            return shareable
        if shareable.get_return_code(ReturnCode.OK) != ReturnCode.OK:
            return shareable  # already a failure; the monitor records its reason
        site = self._site(shareable, fl_ctx)
        try:
            problems, dxo, n = self._problems(shareable, fl_ctx, site, training=task == self.train_task_name)
        except Exception as exc:  # a check must never take the round down
            problems, dxo, n = [f"result could not be checked ({type(exc).__name__}: {exc})"], None, None
        contribution_round = shareable.get_cookie(AppConstants.CONTRIBUTION_ROUND)
        if problems:
            reason = "; ".join(problems)
            self.rejected.append((site, contribution_round, reason))
            where = f" at round {contribution_round}" if task == self.train_task_name else f" ({task})"
            self.log_error(fl_ctx, f"rejected contribution from {site}{where}: {reason}")
            return error_reply(ReturnCode.BAD_TASK_DATA, f"rejected by the server: {reason}", shareable)
        if task != self.train_task_name:
            return shareable
        self.first_counts.setdefault(site, n)
        if self.reference_fingerprint is None:
            self.reference_fingerprint = (site, dxo.get_meta_prop(FROZEN_FINGERPRINT))
            self.log_info(fl_ctx, f"frozen-weights fingerprint of this run: {self.reference_fingerprint[1][:12]} (from {site})")
        if not self.encrypted:
            dxo.data = {k: v.astype(np.float64) if v.dtype.kind == "f" else v for k, v in dxo.data.items()}
        dxo.update_shareable(shareable)
        return shareable

    @staticmethod
    def _site(shareable: Shareable, fl_ctx: FLContext) -> str:
        peer = fl_ctx.get_peer_context()
        name = peer.get_identity_name() if peer is not None else None
        return name or shareable.get_peer_prop(key=ReservedKey.IDENTITY_NAME, default="?")

    def _problems(self, shareable: Shareable, fl_ctx: FLContext, site: str, training: bool):
        try:
            dxo = from_shareable(shareable)
        except Exception as exc:
            return [f"not a DXO ({type(exc).__name__}: {exc})"], None, None
        expected = self.data_kinds if training else [DataKind.WEIGHTS]  # submitted models are whole models
        if dxo.data_kind not in expected:
            return [f"data kind is {dxo.data_kind}, expected {' or '.join(expected)}"], dxo, None
        spec = self.travel_spec(fl_ctx)
        if spec is None:
            return [self.NO_SPEC_REASON], dxo, None
        if self.encrypted:
            if self._he_context is None:
                self._he_context = server_context(fl_ctx)
            problems = ciphertext_problems(dxo, spec, self._he_context)  # ciphertexts bound to the server's context
        else:
            problems = find_problems(dxo.data, spec)
        if isinstance(dxo.data, dict):
            problems = local_part_problems(dxo.data, self.model_config) + problems
        if not training:
            return problems, dxo, None
        n = dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND)
        count = sample_count_problem(n, self.max_samples, self.site_samples.get(site), self.first_counts.get(site))
        if count:
            problems.append(count)
        problems += metric_problems(dxo.get_meta_prop(MetaKey.INITIAL_METRICS))
        fingerprint = dxo.get_meta_prop(FROZEN_FINGERPRINT)
        reference = self.reference_fingerprint or self._server_fingerprint(fl_ctx)
        if reference is not None and self.reference_fingerprint is None:
            self.reference_fingerprint = reference
        if not isinstance(fingerprint, str):
            problems.append(f"no fingerprint of the frozen weights (meta {FROZEN_FINGERPRINT})")
        elif reference and fingerprint != reference[1]:
            problems.append(f"its frozen weights differ from {reference[0]}'s (fingerprint {fingerprint[:12]} vs "
                            f"{reference[1][:12]}): another SAM checkpoint file or init_seed")
        return problems, dxo, n

    def _persistor_model(self, fl_ctx: FLContext):
        engine = fl_ctx.get_engine()
        persistor = engine.get_component(self.persistor_id) if engine and self.persistor_id else None
        return getattr(persistor, "model", None)

    def _server_fingerprint(self, fl_ctx: FLContext) -> tuple[str, str] | None:
        fingerprint = getattr(self._persistor_model(fl_ctx), "fingerprint", None)
        return ("the server's global model", fingerprint) if isinstance(fingerprint, str) else None
