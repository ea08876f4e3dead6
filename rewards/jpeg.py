"""JPEG compressibility and incompressibility, as defined by DDPO.

Paper: Black et al., "Training Diffusion Models with Reinforcement Learning" (2023), §6.1:
the image is saved as a JPEG at quality 95 and its size in kilobytes is the signal;
compressibility = −size, incompressibility = +size. Not differentiable (JPEG encoding).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from PIL import Image

from genalign.configs import opt
from rewards.base import RewardOutput, images_to_tensor, tensor_to_uint8


@dataclass
class JpegConfig:
    type: Literal["jpeg_compressibility", "jpeg_incompressibility"] = opt(
        "jpeg_compressibility", "compressibility rewards small files (−kB), incompressibility large ones (+kB)"
    )
    weight: float = opt(1.0, "weight (> 0) of this component in the summed reward; every reward is maximised", gt=0)
    quality: int = opt(95, "JPEG quality used to measure the size (DDPO uses 95)")


def jpeg_size_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """``[B, 3, H, W]`` in [0, 1] -> JPEG sizes in kB ``[B]``."""
    sizes = []
    for arr in tensor_to_uint8(images):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32)


class JpegCompressibility:
    differentiable = False

    def __init__(self, config: JpegConfig | None = None):
        self.config = config or JpegConfig()
        self.name = self.config.type
        self.sign = -1.0 if self.config.type == "jpeg_compressibility" else 1.0

    def __call__(self, outputs: Any, conditions: Sequence[Any]) -> RewardOutput:
        images = images_to_tensor(outputs)
        size = jpeg_size_kb(images, self.config.quality)  # [B]
        return RewardOutput(scores=self.sign * size, components={"jpeg_kb": size})
