"""What the asset recipes share: training data, augmentation, the step/time budget with its
learning-rate schedule, seeding, and publishing a finished output folder.

Seeds: training scene i of run seed s renders with seed ``s · TRAIN_SEEDS_PER_RUN + i``;
evaluation scenes start at :data:`EVAL_SEED_BASE`, so no evaluation render was ever trained on.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
import torch.nn.functional as F

# Sampling weight of each prompt tier (1 = one object ... 5 = counts) during training.
TIER_WEIGHTS = {1: 0.35, 2: 0.3, 3: 0.15, 4: 0.1, 5: 0.1}
EVAL_SEED_BASE = 2**40  # evaluation scene seeds start here; training seeds stay below
TRAIN_SEEDS_PER_RUN = 10_000_000  # training scene i of run seed s uses seed s * this + i


# --------------------------------------------------------------------------- seeds, sizes, versions
def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def command_line(prog: str, argv: Sequence[str] | None) -> str:
    """The command as typed: ``prog`` and ``argv`` (default: this process's arguments)."""
    return " ".join([prog, *(argv if argv is not None else sys.argv[1:])])


def versions(*libraries: ModuleType) -> dict[str, str]:
    """``{"python": ..., "torch": ..., <library>: <version>, ...}`` for a training log."""
    return dict(
        python=platform.python_version(),
        torch=torch.__version__,
        **{lib.__name__: lib.__version__ for lib in libraries},
    )


# --------------------------------------------------------------------------- data
class ShapesStream:
    """Endless batches of (images [B, 3, S, S] in [-1, 1], prompts) from train-split prompts.

    Tiers are drawn with ``tier_weights`` (default ``TIER_WEIGHTS``); each image gets a fresh
    render seed.
    """

    def __init__(self, seed: int, size: int = 32, pool_per_tier: int = 4000, tier_weights: dict | None = None):
        from genalign.toyworld import parse_prompt, render, sample_prompts

        tier_weights = {t: w for t, w in (tier_weights or TIER_WEIGHTS).items() if w > 0}
        self.render, self.parse, self.size = render, parse_prompt, size
        self.rng = np.random.default_rng(seed)
        self.tiers = sorted(tier_weights)
        self.weights = np.array([tier_weights[t] for t in self.tiers]) / sum(tier_weights.values())
        self.pools = {
            t: sample_prompts(t, pool_per_tier, split="train", seed=seed + t) for t in self.tiers
        }
        self.specs: dict[str, object] = {}

    def prompts(self, n: int) -> list[str]:
        tiers = self.rng.choice(self.tiers, size=n, p=self.weights)
        return [self.pools[t][self.rng.integers(len(self.pools[t]))] for t in tiers]

    def batch(self, n: int) -> tuple[torch.Tensor, list[str]]:
        prompts = self.prompts(n)
        seeds = self.rng.integers(0, 2**31 - 1, size=n)
        arrays = []
        for p, s in zip(prompts, seeds):
            if p not in self.specs:
                self.specs[p] = self.parse(p)
            img = self.render(self.specs[p], int(s), size=self.size).convert("RGB")
            arrays.append(np.asarray(img, dtype=np.float32))
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # [B, 3, S, S]
        return x / 127.5 - 1.0, prompts


# --------------------------------------------------------------------------- augmentation
def _hue_matrix(angle: torch.Tensor) -> torch.Tensor:
    """Rotation about the grey axis by ``angle`` radians ``[B]`` -> ``[B, 3, 3]`` (Rodrigues)."""
    k = torch.full((3,), 1 / math.sqrt(3.0))
    cross = torch.tensor([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    outer = torch.outer(k, k)
    c, s = angle.cos().view(-1, 1, 1), angle.sin().view(-1, 1, 1)
    return c * torch.eye(3) + s * cross + (1 - c) * outer  # [B, 3, 3]


def _blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image Gaussian blur: images ``[B, 3, H, W]``, sigma ``[B]`` pixels (5x5 kernel)."""
    b, c, h, w = images.shape
    r = torch.arange(-2, 3, dtype=images.dtype)
    k1 = torch.exp(-(r.view(1, -1) ** 2) / (2 * sigma.view(-1, 1) ** 2))  # [B, 5]
    k1 = k1 / k1.sum(1, keepdim=True)
    k2 = (k1[:, :, None] * k1[:, None, :]).repeat_interleave(c, 0)  # [B*3, 5, 5]
    out = F.conv2d(F.pad(images.reshape(1, b * c, h, w), (2, 2, 2, 2), mode="replicate"), k2[:, None], groups=b * c)
    return out.view(b, c, h, w)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Make clean renders ``[B, 3, H, W]`` in [0, 1] look like a tiny generator's samples.

    Per image, each with its own probability: hue rotation ±15° and saturation x0.75-1.15
    (p=0.8), brightness x0.85-1.15 (p=0.8), downscale to 1/2 or 3/4 and back (p=0.4),
    Gaussian blur σ 0.3-0.9 px at 32 px (p=0.5), Gaussian noise σ 0-0.05 (p=0.5).
    """
    b, _, h, w = images.shape

    def coin(p: float) -> torch.Tensor:
        return torch.rand(b, generator=generator) < p  # [B]

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(b, generator=generator)  # [B]

    x = images
    jitter = coin(0.8)
    hue = torch.where(jitter, uniform(-15.0, 15.0), torch.zeros(b)) * math.pi / 180
    x = torch.einsum("bij,bjhw->bihw", _hue_matrix(hue), x)
    grey = x.mean(1, keepdim=True)  # [B, 1, H, W]
    sat = torch.where(jitter, uniform(0.75, 1.15), torch.ones(b)).view(b, 1, 1, 1)
    x = grey + sat * (x - grey)
    bright = torch.where(coin(0.8), uniform(0.85, 1.15), torch.ones(b)).view(b, 1, 1, 1)
    x = (x * bright).clamp(0, 1)
    resample = coin(0.4)
    half = coin(0.5)
    for picked, factor in ((resample & half, 0.5), (resample & ~half, 0.75)):
        if picked.any():
            small = F.interpolate(x[picked], scale_factor=factor, mode="bilinear", antialias=True)
            x[picked] = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    blurred = coin(0.5)
    if blurred.any():
        x[blurred] = _blur(x[blurred], uniform(0.3, 0.9)[blurred] * h / 32)
    noise = torch.where(coin(0.5), uniform(0.0, 0.05), torch.zeros(b)).view(b, 1, 1, 1)
    x = x + noise * torch.randn(x.shape, generator=generator)
    return x.clamp(0, 1)


# --------------------------------------------------------------------------- budget
class Budget:
    """Ends a phase after ``steps`` steps or ``minutes`` of wall time, whichever comes first.

    ``lr_factor`` is a linear warm-up then a cosine decay over the progress fraction
    max(step / steps, elapsed / minutes), so the schedule completes under either limit.
    ``minutes`` 0 or None: no time cap.
    """

    def __init__(self, steps: int, minutes: float | None, warmup: int):
        self.steps, self.warmup, self.start = steps, warmup, time.monotonic()
        self.seconds = 60 * minutes if minutes else math.inf

    def progress(self, step: int) -> float:
        return min(1.0, max(step / self.steps, (time.monotonic() - self.start) / self.seconds))

    def done(self, step: int) -> bool:
        return self.progress(step) >= 1.0

    def lr_factor(self, step: int) -> float:
        warm = min(1.0, (step + 1) / self.warmup)
        return warm * 0.5 * (1 + math.cos(math.pi * self.progress(step)))

    def elapsed(self) -> float:
        return round(time.monotonic() - self.start, 1)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


class LossCurve:
    """A loss curve: the means of per-step values over each window of ``every`` steps."""

    def __init__(self, every: int, budget: Budget):
        self.every, self.budget = every, budget
        self.points: list[dict] = []
        self._sums: Counter = Counter()

    def add(self, step: int, values: dict[str, float], **current: float) -> dict | None:
        """Record one step's ``values``; after every ``every``-th step append and return the
        point ``{step, wall_s, **current, **window means of values}`` (else None)."""
        self._sums.update(values, n=1)
        if step % self.every:
            return None
        n = self._sums.pop("n")
        point = dict(step=step, wall_s=self.budget.elapsed(), **current, **{k: v / n for k, v in self._sums.items()})
        self.points.append(point)
        self._sums.clear()
        return point


# --------------------------------------------------------------------------- output folders
def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def write_training_log(tmp: Path, log: dict, t0: float) -> None:
    """Close a build: record its total wall time (since ``t0``, a ``time.monotonic()``) and the
    folder's size in ``log``, and write ``log`` as ``tmp/training_log.json``."""
    log["total_wall_s"] = round(time.monotonic() - t0, 1)
    log["folder_bytes"] = folder_bytes(tmp)
    (tmp / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")


def publish_folder(tmp: Path, out: Path) -> None:
    """Make a finished build folder ``tmp`` the asset at ``out``: readable modes, then a rename.

    A previous ``out`` is moved aside first and deleted only once ``tmp`` is in place, so a
    failed build never leaves a half-written asset and never destroys a good one.
    """
    for path in [tmp, *tmp.rglob("*")]:  # mkdtemp and safetensors leave owner-only modes
        path.chmod(0o755 if path.is_dir() else 0o644)
    if out.exists():
        old = out.with_name(f".{out.name}-old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)


@contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """A fresh folder beside ``out`` to build the asset in; published to ``out``
    (:func:`publish_folder`) when the block ends, deleted if it raises."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        yield tmp
        publish_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
