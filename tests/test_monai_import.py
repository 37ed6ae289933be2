"""fedfms imports MONAI without the integrations MONAI loads on its own (MLflow, TensorBoard, matplotlib, pandas):
a site's job process does not pay for them, and they import as usual afterwards (fedfms/monai_import.py)."""

from __future__ import annotations

import json
import subprocess
import sys

from fedfms.monai_import import UNUSED_INTEGRATIONS

PROBE = """
import json, sys
{before}
import nvflare.private.fed.app.simulator.simulator_worker  # what a simulated site's process imports first
import fedfms.flare.executor
loaded = sorted(name for name in {hidden!r} if name in sys.modules)
from fedfms.training.trainer import DiceLoss
from fedfms.training.metrics import compute_dice
import torch
prediction = torch.zeros(1, 1, 8, 8); prediction[..., 2:6, 2:6] = 1
dice = float(compute_dice(prediction, prediction.clone()))
loss = float(DiceLoss(sigmoid=True)(torch.full((1, 1, 8, 8), 10.0) * (prediction * 2 - 1), prediction))
import matplotlib, matplotlib.pyplot, pandas, mlflow
later = [matplotlib.__name__, pandas.__name__, mlflow.__name__, hasattr(pandas, "DataFrame")]
print(json.dumps({{"loaded": loaded, "dice": dice, "loss": loss, "later": later}}))
"""


def _probe(before: str = "") -> dict:
    code = PROBE.format(before=before, hidden=UNUSED_INTEGRATIONS)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_sites_process_imports_monai_without_its_unused_integrations_and_they_import_normally_later():
    out = _probe()
    assert out["loaded"] == []  # without the hiding: ['matplotlib', 'mlflow', 'pandas', 'tensorboard']
    assert out["dice"] == 1.0 and out["loss"] < 0.01  # MONAI's metric and loss work as usual
    assert out["later"] == ["matplotlib", "pandas", "mlflow", True]


def test_an_integration_imported_before_fedfms_is_left_alone():
    out = _probe(before="import pandas")
    assert out["loaded"] == ["pandas"]
