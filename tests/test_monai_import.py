"""fedfms imports MONAI without the integrations MONAI loads on its own (MLflow, TensorBoard, matplotlib, pandas) and
the optional packages behind functions fedfms does not call (SciPy, scikit-learn, scikit-image): a site's job process
does not pay for them, MONAI's parts fedfms uses work, and they import as usual afterwards (fedfms/monai_import.py)."""

from __future__ import annotations

import json
import subprocess
import sys

# named here, not taken from fedfms.monai_import, so that a shorter list there fails the test
MONAI_EXTRAS_FEDFMS_DOES_NOT_USE = ("mlflow", "tensorboard", "tensorboardX", "matplotlib", "pandas",
                                    "scipy", "sklearn", "skimage")

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
from monai.metrics import compute_iou, get_confusion_matrix
from fedfms.models.unet import UNetSegmenter
iou = float(compute_iou(prediction, prediction.clone()))
confusion = get_confusion_matrix(prediction, prediction.clone()).flatten().tolist()
unet_shape = list(UNetSegmenter(2, image_size=128, features=(4, 4, 8, 8, 16, 4)).eval()(torch.zeros(1, 3, 128, 128)).shape)
import matplotlib, matplotlib.pyplot, pandas, mlflow
import scipy.ndimage, sklearn.metrics, skimage.measure
later = [matplotlib.__name__, pandas.__name__, mlflow.__name__, hasattr(pandas, "DataFrame"),
         int(scipy.ndimage.label(prediction[0, 0].numpy())[1]), float(sklearn.metrics.accuracy_score([1, 0], [1, 0])),
         int(skimage.measure.label(prediction[0, 0].numpy().astype(int)).max())]
print(json.dumps({{"loaded": loaded, "dice": dice, "loss": loss, "iou": iou, "confusion": confusion,
                  "unet_shape": unet_shape, "later": later}}))
"""


def _probe(before: str = "") -> dict:
    code = PROBE.format(before=before, hidden=MONAI_EXTRAS_FEDFMS_DOES_NOT_USE)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_sites_process_imports_monai_without_its_unused_integrations_and_they_import_normally_later():
    out = _probe()
    # without the hiding: ['matplotlib', 'mlflow', 'pandas', 'scipy', 'skimage', 'sklearn', 'tensorboard']
    assert out["loaded"] == []
    # MONAI's loss, metrics and BasicUNet, all fedfms takes from MONAI, work as usual
    assert out["dice"] == 1.0 and out["iou"] == 1.0 and out["loss"] < 0.01
    assert out["confusion"] == [16.0, 0.0, 48.0, 0.0]  # tp, fp, tn, fn of the 4x4 square in 8x8
    assert out["unet_shape"] == [1, 2, 32, 32]
    # and the hidden packages import and work afterwards
    assert out["later"] == ["matplotlib", "pandas", "mlflow", True, 1, 1.0, 1]


def test_an_integration_imported_before_fedfms_is_left_alone():
    out = _probe(before="import pandas")
    assert out["loaded"] == ["pandas"]
