"""CLIPScore: image–text agreement as a reward.

Paper: Hessel et al., "CLIPScore: A Reference-free Evaluation Metric for Image Captioning"
(2021), eq. 1 with w = 100 (the common text-to-image convention; the paper's w = 2.5):

    CLIPScore(c, v) = max(100 · cos(E_I(v), E_T(c)), 0)

Differentiable with respect to the pixels (torch preprocessing).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from genalign.configs import opt
from rewards.base import RewardOutput, images_to_tensor
from rewards.open_clip_backbone import clip_preprocess, load_open_clip


@dataclass
class ClipScoreConfig:
    type: Literal["clip_score"] = opt("clip_score", "CLIPScore: max(100·cos(image, text), 0)")
    weight: float = opt(1.0, "weight (> 0) of this component in the summed reward; every reward is maximised", gt=0)
    model: str = opt("ViT-L-14-quickgelu", "open_clip architecture name, or a JSON architecture config path")
    pretrained: str = opt("openai", "open_clip tag, local checkpoint file, or hf-hub:org/repo")
    scale: float = opt(100.0, "w in max(w·cos, 0)")


class ClipScore:
    differentiable = True
    name = "clip_score"

    def __init__(self, config: ClipScoreConfig | None = None, device: str | torch.device = "cpu"):
        self.config = config or ClipScoreConfig()
        self.model, self.tokenizer, self.preprocess_cfg = load_open_clip(self.config.model, self.config.pretrained, device)

    def cosine(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        img = F.normalize(self.model.encode_image(clip_preprocess(images.to(device), self.preprocess_cfg)).float(), dim=-1)
        txt = F.normalize(self.model.encode_text(self.tokenizer([str(p) for p in prompts]).to(device)).float(), dim=-1)
        return (img * txt).sum(-1)  # [B]

    def __call__(self, outputs: Any, conditions: Sequence[Any]) -> RewardOutput:
        cos = self.cosine(images_to_tensor(outputs), conditions)
        scores = (self.config.scale * cos).clamp(min=0)
        return RewardOutput(scores=scores, components={"cosine": cos.detach()})
