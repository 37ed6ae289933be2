"""The FednnU-Net core runs without FLARE: importing it must not import nvflare (as the rest of the ML core)."""

import subprocess
import sys

CORE = ["fedfms.nnunet.config", "fedfms.nnunet.plan", "fedfms.nnunet.sitedata", "fedfms.nnunet.fingerprint",
        "fedfms.nnunet.inference", "fedfms.nnunet.trainer", "fedfms.nnunet.evaluate"]


def test_nnunet_core_does_not_import_nvflare():
    code = ";".join([f"import {m}" for m in CORE] + [
        "import fedfms.nnunet.trainer as t; t._nnunet_trainer_class()",  # nnU-Net's own trainer module too
        "import sys", "print(sorted(m for m in sys.modules if m.startswith('nvflare')))"])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out.splitlines()[-1] == "[]", f"the nnU-Net core pulled in FLARE: {out}"


def test_the_job_config_side_does_not_import_nnunet():
    """The server's job renderer and settings stay light: nnU-Net is imported where it plans or trains."""
    code = ("import fedfms.nnunet.config, fedfms.flare.nnunet_job, sys; "
            "print(sorted(m for m in sys.modules if m.startswith(('nnunetv2', 'dynamic_network_architectures'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out.splitlines()[-1] == "[]", out
