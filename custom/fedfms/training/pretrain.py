"""Pretraining a small SAM offline, honestly: the ``tiny`` variant learns to segment synthetic scenes.

No SAM weights can be downloaded here, and a *random* frozen encoder is the one configuration the paper says
not to use (FedMSA -PT). So ``fedfms pretrain`` makes a small foundation model the way SAM's own pretraining
works in spirit, on data that is *not* any task it is later tuned for: an endless stream of generated grey
scenes (:func:`synthetic_batch`), each a dark surround, a large textured "body" and a few objects inside it that
differ from the body by brightness (either polarity), by texture only, or both, under random smooth intensity
inhomogeneity, gamma, blur and noise. The model learns to segment "the objects inside the body", whatever makes
them stand out. Nothing of a brain, MRI template or any demo site goes in.

The whole ``tiny`` SAM trains (image encoder, prompt encoder's no-mask embedding, mask decoder, prompt-free, as
``fedfms.models`` builds it); the result is saved in the official checkpoint key layout (``image_encoder.*``,
``prompt_encoder.*``, ``mask_decoder.*``; no class head, no adapters), so it loads through the same strict loader
as ``sam_vit_b_01ec64.pth``: ``{"variant": "tiny", "pretrained": true, "checkpoint": "<file>"}``. A JSON file
beside it records the command's settings, the loss curve and the file's SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from scipy import ndimage

from fedfms.errors import ConfigError
from fedfms.progress import bar, drawn
from fedfms.models import ModelConfig, build_model
from fedfms.models.checkpoint import SAM_PREFIXES, load_sam_weights

GENERATOR = "fedfms.training.pretrain.synthetic_batch v1"
ASSETS = Path(__file__).resolve().parents[1] / "assets"
DEMO_CHECKPOINT = ASSETS / "sam_tiny_synthetic.pth"  # made by `fedfms pretrain` (ASSETS/README.md says how)
DEFAULTS = {"steps": 3000, "batch_size": 32, "lr": 2e-3, "weight_decay": 0.01, "seed": 0}


# ----------------------------------------------------------------------------------------------------------------
# data: generated scenes (numpy, seeded)


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Zero-mean, unit-std noise with features about ``sigma`` pixels wide (coarse noise upsampled bicubically
    for wide features, a small Gaussian filter for fine ones: fast enough to generate scenes on the fly)."""
    if sigma >= 2:
        coarse = max(2, int(round(size / (1.5 * sigma))))
        n = torch.from_numpy(rng.standard_normal((1, 1, coarse, coarse)).astype(np.float32))
        n = torch.nn.functional.interpolate(n, size=(size, size), mode="bicubic", align_corners=False)[0, 0].numpy()
    else:
        n = rng.standard_normal((size, size)).astype(np.float32)
        if sigma > 0:
            n = ndimage.gaussian_filter(n, sigma, mode="wrap", truncate=2.0)
    return (n - n.mean()) / (n.std() + 1e-6)


def _ellipse(rng: np.random.Generator, size: int, centre, radius, wobble: float = 0.0) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    dy, dx = yy - centre[0], xx - centre[1]
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    r = np.sqrt((u / radius[0]) ** 2 + (v / radius[1]) ** 2)
    if wobble:
        theta = np.arctan2(v, u)
        k = rng.integers(2, 6)
        r = r * (1 + wobble * np.sin(k * theta + rng.uniform(0, 2 * np.pi)))
    return r <= 1.0


def _blob(rng: np.random.Generator, size: int, within: np.ndarray, fraction: float, sigma: float) -> np.ndarray:
    """A branching, irregular region: the top ``fraction`` of smooth noise inside ``within``."""
    field = _smooth_noise(rng, size, sigma)
    inside = field[within]
    if inside.size == 0:
        return np.zeros_like(within)
    return within & (field > np.quantile(inside, 1 - fraction))


def _scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One grey scene in [0, 1] and its object mask (both ``size`` x ``size``)."""
    c = size / 2
    if rng.random() < 0.8:  # a body with a dark surround; otherwise the body fills the view
        body = _ellipse(rng, size, rng.normal(c, size * 0.06, 2), rng.uniform(0.3, 0.48, 2) * size, wobble=rng.uniform(0, 0.15))
    else:
        body = np.ones((size, size), dtype=bool)
    inner = ndimage.binary_erosion(body, iterations=max(1, int(size * 0.04)))
    objects = np.zeros((size, size), dtype=bool)
    kind = rng.random()
    if kind < 0.4:  # a few compact objects
        for _ in range(rng.integers(1, 5)):
            centre = rng.uniform(0.25, 0.75, 2) * size
            objects |= _ellipse(rng, size, centre, rng.uniform(0.05, 0.2, 2) * size, wobble=rng.uniform(0, 0.3))
    elif kind < 0.8:  # one branching region (a tissue inside an organ)
        objects = _blob(rng, size, inner, rng.uniform(0.2, 0.6), rng.uniform(3, 9))
    else:  # a ring-like layer: the body's rim
        rim = inner & ~ndimage.binary_erosion(inner, iterations=int(rng.integers(3, 10)))
        objects = rim
    objects &= inner

    body_mean = rng.uniform(0.25, 0.75)
    texture_only = rng.random() < 0.2
    delta = rng.uniform(-0.03, 0.03) if texture_only else rng.choice([-1, 1]) * rng.uniform(0.08, 0.4)
    object_mean = float(np.clip(body_mean + delta, 0.05, 1.0))
    surround = rng.uniform(0.0, 0.15)
    body_tex = rng.uniform(0.0, 0.08) * _smooth_noise(rng, size, rng.uniform(0.5, 4))
    obj_sigma = rng.uniform(0.5, 4)
    obj_amp = rng.uniform(0.08, 0.18) if texture_only else rng.uniform(0.0, 0.08)
    obj_tex = obj_amp * _smooth_noise(rng, size, obj_sigma)
    soft = rng.uniform(0.0, 1.5)  # partial volume at the edges

    def soften(m: np.ndarray) -> np.ndarray:
        m = m.astype(np.float32)
        return ndimage.gaussian_filter(m, soft, truncate=2.0) if soft > 0.2 else m

    b, o = soften(body), soften(objects)
    image = surround * (1 - b) + b * ((body_mean + body_tex) * (1 - o) + (object_mean + obj_tex) * o)
    # scanner-like effects: smooth multiplicative inhomogeneity, gamma, noise
    bias = np.exp(rng.uniform(0.0, 0.35) * _smooth_noise(rng, size, size / 4))
    image = np.clip(image * bias, 0, None)
    image = image / (np.percentile(image, 99.5) + 1e-6)
    image = np.clip(image, 0, 1) ** rng.uniform(0.6, 1.6)
    image = image + rng.uniform(0.0, 0.05) * rng.standard_normal(image.shape)
    if rng.random() < 0.5:
        image, objects = image[:, ::-1], objects[:, ::-1]
    k = int(rng.integers(0, 4))
    image, objects = np.rot90(image, k), np.rot90(objects, k)
    return np.clip(image, 0, 1).astype(np.float32), objects


def synthetic_batch(rng: np.random.Generator, n: int, image_size: int = 128, mask_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` generated scenes: images ``(n, 3, S, S)`` in [0, 1] (grey in all three channels) and object masks
    ``(n, 1, M, M)`` in {0, 1} (a mask pixel is an object when most of its image pixels are)."""
    if image_size % mask_size:
        raise ConfigError(f"image_size {image_size} must be a multiple of mask_size {mask_size}")
    f = image_size // mask_size
    images, masks = [], []
    for _ in range(n):
        image, mask = _scene(rng, image_size)
        images.append(image)
        masks.append(mask.reshape(mask_size, f, mask_size, f).mean(axis=(1, 3)) > 0.5)
    x = torch.from_numpy(np.stack(images))[:, None].expand(-1, 3, -1, -1).contiguous()
    y = torch.from_numpy(np.stack(masks).astype(np.float32))[:, None]
    return x, y


# ----------------------------------------------------------------------------------------------------------------
# training and saving


def sam_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of an official SAM checkpoint: image encoder, prompt encoder, mask decoder (no class head,
    no adapters), as contiguous CPU float32 copies."""
    return {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in model.state_dict().items()
            if k.startswith(SAM_PREFIXES) and ".space_adapter." not in k and ".mlp_adapter." not in k}


def save_sam_checkpoint(model: torch.nn.Module, path: str | os.PathLike, variant: str = "tiny") -> Path:
    """Write ``model``'s SAM tensors as a plain state dict (the layout of ``sam_vit_b_01ec64.pth``), then load it
    back through :func:`fedfms.models.checkpoint.load_sam_weights` into a freshly built model, so a file that the
    strict loader would refuse is never left behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(sam_state_dict(model), tmp)
    try:
        probe = build_model(ModelConfig(variant=variant, mode="fedmsa", pretrained=False))
        load_sam_weights(probe, tmp, variant)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    return path


def sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def provenance_path(checkpoint: str | os.PathLike) -> Path:
    return Path(checkpoint).with_suffix(".json")


def pretrain(
    out: str | os.PathLike,
    steps: int = DEFAULTS["steps"],
    batch_size: int = DEFAULTS["batch_size"],
    lr: float = DEFAULTS["lr"],
    weight_decay: float = DEFAULTS["weight_decay"],
    seed: int = DEFAULTS["seed"],
    threads: int | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] | None = print,
    log_every: int = 100,
    command: str | None = None,
) -> Path:
    """Train the whole ``tiny`` SAM on :func:`synthetic_batch` scenes for ``steps`` steps (AdamW, cosine decay
    after a short warm-up, BCE + Dice), then save it with :func:`save_sam_checkpoint` and its provenance
    (:func:`provenance_path`). The same ``seed`` (and thread count) gives the same file."""
    # here, not at the top: `fedfms --help` reads DEFAULTS and needs no MONAI
    from fedfms import monai_import  # noqa: F401
    from monai.losses import DiceLoss

    out = Path(out)
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} is {value!r}; expected a positive integer")
    if not lr > 0:
        raise ConfigError(f"lr is {lr!r}; expected a positive learning rate")
    if out.exists() and not overwrite:
        raise ConfigError(f"{out}: already exists; pass --overwrite to replace it")
    if out.exists() and out.is_dir():
        raise ConfigError(f"{out}: is a folder; expected the checkpoint file to write (e.g. {out / 'sam_tiny.pth'})")
    if threads:
        torch.set_num_threads(threads)
    say = log or (lambda _msg: None)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    cfg = ModelConfig(variant="tiny", mode="fedsam", pretrained=False, init_seed=seed)
    model = build_model(cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    warmup = max(1, min(200, steps // 10))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))))
    bce, dice = torch.nn.BCEWithLogitsLoss(), DiceLoss(sigmoid=True)
    image_size, mask_size = model.image_size, model.mask_size
    curve, window, start = [], [], time.perf_counter()
    say(f"pretraining tiny SAM: {steps} steps x {batch_size} generated scenes, seed {seed}, lr {lr:g}")
    # on a terminal a bar (with the running loss) replaces the lines every log_every steps
    steps_bar = bar(total=steps, desc="pretrain", unit="step")
    for step in range(1, steps + 1):
        images, masks = synthetic_batch(rng, batch_size, image_size, mask_size)
        logits = model(images).float()
        loss = bce(logits, masks) + dice(logits, masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"pretraining loss became {value} at step {step}; try a lower --lr")
        window.append(value)
        steps_bar.update()
        if step % log_every == 0 or step == steps:
            mean = sum(window) / len(window)
            curve.append({"step": step, "loss": round(mean, 5)})
            steps_bar.set_postfix_str(f"loss {mean:.4f}")
            if not drawn(steps_bar):
                say(f"  step {step}/{steps}: loss {mean:.4f} ({time.perf_counter() - start:.0f} s)")
            window = []
    steps_bar.close()
    seconds = time.perf_counter() - start
    path = save_sam_checkpoint(model, out)
    info = {
        "checkpoint": path.name,
        "sha256": sha256(path),
        "bytes": path.stat().st_size,
        "variant": "tiny",
        "layout": "official SAM state dict (image_encoder.*, prompt_encoder.*, mask_decoder.*); no head, no adapters",
        "command": command,
        "data": f"{GENERATOR}: generated grey scenes (dark surround, textured body, objects inside it that differ by "
                "brightness of either polarity, texture only, or both; smooth inhomogeneity, gamma, blur, noise); "
                "no image from any dataset",
        "settings": {"steps": steps, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "seed": seed,
                     "threads": torch.get_num_threads(), "loss": "bce + dice", "optimizer": "AdamW, warm-up + cosine",
                     "image_size": image_size, "mask_size": mask_size},
        "seconds": round(seconds, 1),
        "loss_curve": curve,
        "software": {"torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version()},
    }
    provenance_path(path).write_text(json.dumps(info, indent=2) + "\n")
    say(f"wrote {path} ({info['bytes']} bytes, sha256 {info['sha256'][:12]}...) in {seconds:.0f} s; provenance {provenance_path(path)}")
    return path
