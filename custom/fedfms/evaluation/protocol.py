"""Old import path of the leave-one-site-out protocol, kept for callers: the FLARE-free parts only.

The protocol now lives in :mod:`fedfms.evaluation.loso` (folds, checks, scoring) and
:mod:`fedfms.evaluation.results` (gathering, CSV, table); ``leave_one_site_out``, which runs FLARE's simulator,
in :mod:`fedfms.flare.loso_runner`. New code imports from those."""

from fedfms.evaluation.loso import (BEST_GLOBAL_MODEL, GLOBAL_MODEL, check_sites, discover_sites, run_fold, run_loso,
                                    train_config)
from fedfms.evaluation.results import (FOLD_FILE, METHODS, RESULTS_CSV, RESULTS_JSON, EvaluationError, collect, format_loso_table,
                                       json_safe, write_csv)

__all__ = ["BEST_GLOBAL_MODEL", "FOLD_FILE", "GLOBAL_MODEL", "METHODS", "RESULTS_CSV", "RESULTS_JSON", "EvaluationError",
           "check_sites", "collect", "discover_sites", "format_loso_table", "json_safe", "run_fold", "run_loso",
           "train_config", "write_csv"]
