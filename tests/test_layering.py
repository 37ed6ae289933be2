"""The ML core runs without FLARE: importing it must not import nvflare."""

import subprocess
import sys

CORE = ["fedfms.models", "fedfms.data.site_dataset", "fedfms.data.preparers.registry", "fedfms.training.trainer",
        "fedfms.training.metrics", "fedfms.training.predict", "fedfms.evaluation", "fedfms.report", "fedfms.aggregation",
        "fedfms.run_record", "fedfms.capacity"]


def test_core_modules_do_not_import_nvflare():
    code = ";".join([f"import {m}" for m in CORE] + ["import sys", "print(sorted(m for m in sys.modules if m.startswith('nvflare')))"])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"the ML core pulled in FLARE: {out}"
