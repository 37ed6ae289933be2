"""The FednnU-Net jobs, built by the project's one job builder (``fedfms.flare.fed_job``, FLARE's Job API).

A ``fednnunet`` job is a ``fedunet`` job (same federation settings, ``ScatterAndGather``, FLARE's sample-weighted
``InTimeAccumulateWeightedAggregator``, ``PTFileModelPersistor``, ``IntimeModelSelector``, ``FederationMonitor``,
``CrossSiteModelEval``, TensorBoard, the site's travel-set filter and the server's contribution check) with:

- the ``nnunet_planning`` workflow first (``fedfms.flare.nnunet_planning.NnUNetPlanning``);
- the persistor's model: ``NnUNetGlobalModel`` (the planned network, built once the plan exists);
- the contribution check: ``NnUNetContributionCheckFilter`` (the project's filter; its travel spec comes from
  the plan);
- the executor: ``fedfms.flare.nnunet_executor.NnUNetExecutor``, which also answers the two planning tasks;
- the train config: ``fedfms.nnunet.config.NnUNetConfig`` fields (nnU-Net's settings), the model config a plain
  ``{"variant": "nnunet", "mode": "fedsam", "num_classes": C, "pretrained": false}``;
- no timeout from an assumed speed: the rounds and the planning wait as long as the sites report progress
  (``fedfms.flare.liveness``); ``round_timeout`` is the only fixed outer bound.

``fedfms.flare.jobs`` holds the variants (``fednnunet``, ``fednnunet_tiny`` in ``VARIANTS``), checks their settings
and the builder takes :data:`NNUNET_KIND` for them, so ``fedfms job new fednnunet``, ``jobs/fednnunet``
and ``fedfms loso fednnunet`` work like the other variants (``fedfms.flare.fed_job.render_job("fednnunet", ...)``).
"""

from __future__ import annotations

from fedfms.flare.nnunet_executor import NnUNetExecutor
from fedfms.flare.nnunet_planning import NnUNetContributionCheckFilter, NnUNetPlanning
from fedfms.flare.nnunet_tasks import PLANNING_TASKS

GLOBAL_MODEL = "fedfms.flare.nnunet_planning.NnUNetGlobalModel"


class _NnUNetKind:
    """What the job builder (``fedfms.flare.fed_job.FedFMSJob``) swaps for a FednnU-Net job (module docstring)."""

    GLOBAL_MODEL = GLOBAL_MODEL
    PLANNING_TASKS = PLANNING_TASKS
    CheckFilter = NnUNetContributionCheckFilter
    Planning = NnUNetPlanning
    Executor = NnUNetExecutor


NNUNET_KIND = _NnUNetKind()
