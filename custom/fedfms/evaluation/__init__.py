"""The paper's evaluation: held-out sites scored on all their samples, leave-one-site-out folds, and the
centralised (pooled) baseline. See docs/evaluation.md.

Scoring and centralised training are FLARE-free like the rest of the ML core; the LOSO protocol, which
runs FLARE's simulator, is imported on first use, so ``import fedfms.evaluation`` works without FLARE."""

from fedfms.evaluation.centralized import train_centralized
from fedfms.evaluation.scoring import evaluate_sites, format_site_rows, mean_row, resolve_model_config

_PROTOCOL = ("METHODS", "EvaluationError", "collect", "format_loso_table", "leave_one_site_out")

__all__ = ["evaluate_sites", "format_site_rows", "mean_row", "resolve_model_config", "train_centralized", *_PROTOCOL]


def __getattr__(name):
    if name in _PROTOCOL:
        from fedfms.evaluation import protocol

        return getattr(protocol, name)
    raise AttributeError(f"module 'fedfms.evaluation' has no attribute {name!r}")
