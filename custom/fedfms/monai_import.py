"""Import MONAI without the integrations and optional packages it loads on its own and fedfms never uses.

``import monai`` imports every MONAI subpackage (``load_submodules`` in ``monai/__init__.py``), and through them
every optional integration that happens to be installed: MLflow (``monai.handlers``), TensorBoard
(``monai.visualize``), matplotlib (``monai.utils.jupyter_utils``) and pandas (``monai.utils.profiling``). fedfms uses
MONAI's losses, metrics and BasicUNet, and none of these needs them. Yet every site's job process paid for them when
it started: 1.3 CPU-s (30 %) and 107 MB of memory more than the 3.1 CPU-s and 820 MB that FLARE, torch, SAM and
MONAI's own code take (bench/bench_site_start.py, 2 CPU cores). That is per site and per job: 16 simulated sites on one
machine pay it 16 times. MONAI also imports SciPy, scikit-learn and scikit-image (through nibabel and its transforms and
metrics modules) for functions fedfms does not call (surface distances, connected components, embedding metrics):
another 0.96 CPU-s (21 %) and 84 MB per site process (4.55 -> 3.59 CPU-s on a slower 2-core machine).

So while MONAI is imported, those packages are hidden: ``sys.modules[name] = None`` makes importing them fail, and
MONAI's ``optional_import`` takes that as "not installed". Afterwards they are unhidden. Anything that imports them
later in the process gets the real package: MLflow or TensorBoard tracking on the server, matplotlib in run reports.
What stays disabled in that process is only MONAI's own glue for them (``MLflowHandler``, the TensorBoard
visualisers, ``monai.utils.profiling``) and MONAI's functions that need SciPy, scikit-learn or scikit-image (surface
distance and Hausdorff metrics, ``KeepLargestConnectedComponent``, ``FillHoles``, distance transforms), none of
which fedfms uses: it takes MONAI's ``DiceLoss``, ``compute_dice``, ``compute_iou``, ``get_confusion_matrix`` and
``BasicUNet`` (tests/test_monai_import.py runs them after this import). nibabel, imported by MONAI here, then
reads and writes NIfTI as usual; only its SPM-Analyze ``.mat`` side files need SciPy.

Importing this module imports MONAI. Import it before the first ``monai`` import of a module, as
``from fedfms import monai_import  # noqa: F401``. A package imported before is not hidden, and if MONAI is already
imported nothing changes: code that needs MONAI's glue for them imports ``monai`` before fedfms."""

from __future__ import annotations

import sys
import threading

# MONAI (and nibabel) load these through optional_import only if they are installed; a site's training uses none:
# the integrations, then the packages behind MONAI functions fedfms does not call.
HIDDEN_WHILE_IMPORTING = ("mlflow", "tensorboard", "tensorboardX", "matplotlib", "pandas", "scipy", "sklearn", "skimage")

_lock = threading.Lock()


def import_monai():
    """``import monai`` with :data:`HIDDEN_WHILE_IMPORTING` hidden for its duration (the ones not yet imported)."""
    with _lock:
        if "monai" in sys.modules:
            return sys.modules["monai"]
        hidden = [name for name in HIDDEN_WHILE_IMPORTING if name not in sys.modules]
        for name in hidden:
            sys.modules[name] = None
        try:
            import monai
        finally:
            for name in hidden:
                if sys.modules.get(name, 0) is None:
                    del sys.modules[name]
        return monai


monai = import_monai()
