"""The reward seam: a callable that scores finished outputs against their conditions.

A reward model is any object with

    differentiable: bool        # True only if gradients flow from scores to image pixels
    name: str                   # used as the metric key prefix
    __call__(outputs, conditions) -> RewardOutput

``outputs`` are what a policy decodes: for images a float tensor ``[B, 3, H, W]`` in
``[0, 1]`` (a list of PIL images is accepted too and converted with
:func:`images_to_tensor`), for texts a list of strings. ``conditions`` is the list of
prompts (or other conditions) of length ``B``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image


@dataclass
class RewardOutput:
    """Scores of one batch.

    scores: ``[B]`` float32, the value an algorithm optimises.
    components: named ``[B]`` tensors (e.g. ``strict``, ``partial``, or the terms of a
        weighted sum); logged as metrics, never optimised directly.
    details: optional per-sample dicts (e.g. per-clause verdicts) for reports and JSONL.
    """

    scores: torch.Tensor
    components: dict[str, torch.Tensor] = field(default_factory=dict)
    details: list[dict[str, Any]] | None = None


@runtime_checkable
class RewardModel(Protocol):
    name: str
    differentiable: bool

    def __call__(self, outputs: Any, conditions: Sequence[Any]) -> RewardOutput: ...


def images_to_tensor(images: Any) -> torch.Tensor:
    """Accept ``[B, 3, H, W]`` floats in [0, 1] or a list of PIL images; return the tensor.

    Raises a clear error for another range or layout instead of guessing.
    """
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape [B, 3, H, W], got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"expected float images in [0, 1], got dtype {images.dtype}")
        lo, hi = float(images.detach().min()), float(images.detach().max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(
                f"expected images in [0, 1], got values in [{lo:.3f}, {hi:.3f}] "
                "(decode [-1, 1] outputs with (x + 1) / 2 first)"
            )
        return images
    if isinstance(images, Sequence) and all(isinstance(im, Image.Image) for im in images):
        arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    raise TypeError(f"cannot score outputs of type {type(images).__name__}; expected a tensor or PIL images")


def tensor_to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[B, 3, H, W]`` in [0, 1] -> ``[B, H, W, 3]`` uint8 (rounding, as PIL would)."""
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return arr.permute(0, 2, 3, 1).cpu().numpy()
