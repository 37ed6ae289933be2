"""The server's components of an HE job (``fedfms.flare.he`` has the contexts, checks and site filters): the
federation monitor that checks an encrypted aggregate, and FLARE's HE cross-site evaluation, fixed."""

from __future__ import annotations

import numpy as np
from nvflare.apis.dxo import MetaKey, from_shareable
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.app_constant import AppConstants

from fedfms.flare.he import encrypted_aggregate_problems, is_ciphertext
from fedfms.flare.monitor import FederationMonitor


class HEFederationMonitor(FederationMonitor):
    """The federation monitor for an encrypted run: the aggregate is ciphertext, so it is checked by key and
    ciphertext length (:func:`encrypted_aggregate_problems`) instead of shape and finiteness, and is never cast
    (the site decrypts it). A bad aggregate leaves the global model as it was, as in a plaintext run."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._sizes: dict[str, int | None] | None = None

    def _round_started(self, fl_ctx: FLContext) -> None:
        super()._round_started(fl_ctx)
        sizes = {}
        for key, value in (self._previous_global or {}).items():
            sizes[key] = value.size() if is_ciphertext(value) else int(np.size(value)) if isinstance(value, np.ndarray) else None
        if self._sizes is None or all(v is not None for v in sizes.values()):
            self._sizes = sizes if self._sizes is None else {k: sizes.get(k) or self._sizes.get(k) for k in self._sizes}

    def _after_aggregation(self, fl_ctx: FLContext) -> None:
        if self._round is None:
            return
        if self._round["status"] == "failed":
            self._round["updated_model"] = False
            return
        shareable = fl_ctx.get_prop(AppConstants.AGGREGATION_RESULT)
        try:
            dxo = from_shareable(shareable)
            problems = encrypted_aggregate_problems(dxo.data, self._sizes or {})
        except Exception as exc:
            dxo, problems = None, [f"aggregate unreadable ({type(exc).__name__}: {exc})"]
        if not problems and dxo is not None:
            self._round["updated_model"] = True
            return
        self._round["updated_model"] = False
        self._round["aggregate"] = "; ".join(problems)
        self.log_error(fl_ctx, f"round {self._round['round']}: the aggregate is not used ({'; '.join(problems)}); "
                               "the global model stays as it was")
        if dxo is not None and self._previous_global:
            dxo.data = dict(self._previous_global)
            dxo.set_meta_prop(MetaKey.PROCESSED_KEYS, {k: not isinstance(v, np.ndarray) for k, v in dxo.data.items()})
            dxo.update_shareable(shareable)


def _cross_site_class():
    from nvflare.app_opt.he.cross_site_model_eval import HECrossSiteModelEval
    from nvflare.app_opt.he.homomorphic_encrypt import serialize_nested_dict

    class CrossSiteModelEvalHE(HECrossSiteModelEval):
        """FLARE's HE cross-site evaluation, working again: FLARE 2.9's base class saves models with
        ``_save_dxo_content``, while ``HECrossSiteModelEval`` still overrides the old ``_save_validation_content``,
        so ciphertexts were saved as CKKS objects and the validate broadcast's deep copy of them fails on the
        server ("the current context is public"). Saved as bytes, they copy; the sites' decryptor reads bytes."""

        def _save_dxo_content(self, name, save_dir, dxo, fl_ctx):
            serialize_nested_dict(dxo.data)
            return super()._save_dxo_content(name, save_dir, dxo, fl_ctx)

    CrossSiteModelEvalHE.__module__ = __name__
    CrossSiteModelEvalHE.__qualname__ = "CrossSiteModelEvalHE"
    return CrossSiteModelEvalHE


def __getattr__(name):  # the class subclasses an optional FLARE module: made on first use
    if name == "CrossSiteModelEvalHE":
        cls = _cross_site_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
