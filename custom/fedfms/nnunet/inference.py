"""Prediction and scoring with a planned nnU-Net network, the way nnU-Net predicts, scored the way this project
scores every model.

Each case goes through nnU-Net's preprocessing (``DefaultPreprocessor.run_case_npy``), nnU-Net's
``nnUNetPredictor`` (Gaussian-weighted sliding window at the plan's patch size, mirroring test-time
augmentation on both axes unless switched off) and back into the full image (outside the non-zero crop:
background, as nnU-Net's export does). The result is turned into one logit per class whose sigmoid is the
class probability nnU-Net would compute (softmax: ``z_k - logsumexp(others)``, so ``sigmoid = softmax_k``;
regions: the region logit itself), and scored by :class:`fedfms.training.metrics.SegmentationMetric` like
every other model: this project's rule (probability > 0.5) and the paper code's rule applied to the
probabilities, as for the authors' U-Net.
"""

from __future__ import annotations

import contextlib
import io
import math
from typing import Sequence

import numpy as np
import torch

from fedfms.nnunet.plan import managers
from fedfms.nnunet.sitedata import NnUNetSiteData
from fedfms.training.metrics import SegmentationMetric

OUTSIDE_LOGIT = 30.0  # outside nnU-Net's crop: background with probability 1 - sigmoid(-30) ~ 1 - 1e-13
MIRROR_AXES = (0, 1)  # nnUNetTrainer's mirroring axes for a 2D plan (inference_allowed_mirroring_axes)
REFERENCE_ON = "probabilities"  # the paper code's thresholds apply to probabilities, as for its U-Net


def per_class_logits(z: torch.Tensor, label_mode: str) -> torch.Tensor:
    """(heads, H, W) network logits -> (C, H, W) logits whose sigmoid is each class's probability."""
    z = z.float()
    if label_mode == "regions":
        return z
    out = []
    for k in range(1, z.shape[0]):
        others = torch.cat([z[:k], z[k + 1:]])
        out.append(z[k] - torch.logsumexp(others, dim=0))
    return torch.stack(out)


class NnUNetInference:
    """nnU-Net inference on site cases with ``network`` (which it switches to eval and back per call)."""

    def __init__(self, plan: dict, network: torch.nn.Module, device: torch.device, mirror: bool = True,
                 tile_step_size: float = 0.5):
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        self.plan = plan
        self.managers = managers(plan)
        self.network = network
        self.device = device
        pm, cm, _ = self.managers
        with contextlib.redirect_stdout(io.StringIO()):  # it prints a notice on every non-CUDA device
            self.predictor = nnUNetPredictor(tile_step_size=tile_step_size, use_gaussian=True, use_mirroring=mirror,
                                             perform_everything_on_device=device.type == "cuda", device=device,
                                             verbose=False, verbose_preprocessing=False, allow_tqdm=False)
        self.predictor.manual_initialization(network, pm, cm, None, plan["dataset_json"], "nnUNetTrainer", MIRROR_AXES)

    @torch.no_grad()
    def full_logits(self, data: NnUNetSiteData, index: int) -> torch.Tensor:
        """(heads, H, W) logits of one case at its full size, background outside the non-zero crop."""
        pre, _, props = data.nnunet_case(index, self.plan, self.managers, with_seg=False)
        decoder = self.network.decoder
        deep, decoder.deep_supervision = decoder.deep_supervision, False
        try:
            z = self.predictor.predict_sliding_window_return_logits(torch.from_numpy(pre)).float()[:, 0].cpu()
        finally:
            decoder.deep_supervision = deep
        heads = z.shape[0]
        H, W = props["shape_before_cropping"][1:]
        (_, _), (y0, y1), (x0, x1) = props["bbox_used_for_cropping"]
        full = torch.full((heads, H, W), -OUTSIDE_LOGIT)
        if self.plan["label_mode"] == "softmax":
            full[0] = OUTSIDE_LOGIT
        full[:, y0:y1, x0:x1] = z
        return full

    @torch.no_grad()
    def score(self, data: NnUNetSiteData, indices: Sequence[int], loss_fn=None) -> dict:
        """``LocalTrainer.evaluate``'s keys (both rules, per class, 3D) over ``indices``; ``loss`` is
        ``loss_fn(logits, target)`` (nnU-Net's loss without deep supervision) when given, else NaN."""
        metric = SegmentationMetric(data.classes, reference_on=REFERENCE_ON)
        total, n = 0.0, 0
        mode = self.plan["label_mode"]
        was_training = self.network.training
        self.network.eval()
        try:
            for i in indices:
                z = self.full_logits(data, i)
                target = torch.from_numpy(data.targets(i))
                metric.update(per_class_logits(z, mode)[None], target[None], [data.cases[i].volume])
                if loss_fn is not None:
                    if mode == "regions":
                        t = target[None]
                    else:
                        t = torch.from_numpy(data.label_map(i, mode)[0].astype(np.float32))[None]
                    total += float(loss_fn(z[None].to(self.device), t.to(self.device)))
                n += 1
        finally:
            self.network.train(was_training)
        result = metric.aggregate()
        result["loss"] = total / n if n and loss_fn is not None else math.nan
        result["num_samples"] = n
        return result
