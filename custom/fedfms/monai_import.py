"""Import MONAI without the integrations it loads on its own and fedfms never uses.

``import monai`` imports every MONAI subpackage (``load_submodules`` in ``monai/__init__.py``), and through them
every optional integration that happens to be installed: MLflow (``monai.handlers``), TensorBoard
(``monai.visualize``), matplotlib (``monai.utils.jupyter_utils``) and pandas (``monai.utils.profiling``). fedfms uses
MONAI's losses, metrics and BasicUNet, and none of these needs them. Yet every site's job process paid for them when
it started: 1.3 CPU-s (30 %) and 107 MB of memory more than the 3.1 CPU-s and 820 MB that FLARE, torch, SAM and
MONAI's own code take (bench/bench_site_start.py, 2 CPU cores). That is per site and per job: 16 simulated sites on one
machine pay it 16 times.

So while MONAI is imported, those packages are hidden: ``sys.modules[name] = None`` makes importing them fail, and
MONAI's ``optional_import`` takes that as "not installed". Afterwards they are unhidden. Anything that imports them
later in the process gets the real package: MLflow or TensorBoard tracking on the server, matplotlib in run reports.
What stays disabled in that process is only MONAI's own glue for them (``MLflowHandler``, the TensorBoard
visualisers, ``monai.utils.profiling``), which fedfms does not use.

Importing this module imports MONAI. Import it before the first ``monai`` import of a module, as
``from fedfms import monai_import  # noqa: F401``. A package imported before is not hidden, and if MONAI is already
imported nothing changes: code that needs MONAI's glue for them imports ``monai`` before fedfms."""

from __future__ import annotations

import sys
import threading

# MONAI loads these only if they are installed. A site's training does not use them.
UNUSED_INTEGRATIONS = ("mlflow", "tensorboard", "tensorboardX", "matplotlib", "pandas")

_lock = threading.Lock()


def import_monai():
    """``import monai`` with :data:`UNUSED_INTEGRATIONS` hidden for its duration (the ones not yet imported)."""
    with _lock:
        if "monai" in sys.modules:
            return sys.modules["monai"]
        hidden = [name for name in UNUSED_INTEGRATIONS if name not in sys.modules]
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
