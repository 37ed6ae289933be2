"""The paper's evaluation: held-out sites scored on all their samples, leave-one-site-out folds, and the
centralised (pooled) baseline. See docs/evaluation.md.

FLARE-free like the rest of the ML core (tests/test_layering.py checks it, lazy imports included): scoring,
centralised training, the LOSO protocol (:mod:`fedfms.evaluation.loso`) and its results files
(:mod:`fedfms.evaluation.results`). The federated half of a LOSO fold, which runs FLARE's simulator, is
:mod:`fedfms.flare.loso_runner` (``leave_one_site_out``)."""

from fedfms.evaluation.centralized import train_centralized
from fedfms.evaluation.results import METHODS, EvaluationError, collect, format_loso_table
from fedfms.evaluation.scoring import evaluate_sites, format_site_rows, mean_row, resolve_model_config

__all__ = ["METHODS", "EvaluationError", "collect", "evaluate_sites", "format_loso_table", "format_site_rows", "mean_row",
           "resolve_model_config", "train_centralized"]
