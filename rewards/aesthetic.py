"""The LAION aesthetic predictor v2: a linear MLP on the L2-normalised CLIP image embedding.

Source: LAION's "improved aesthetic predictor" (Schuhmann, 2022), trained on SAC + LAION-Logos
+ AVA ratings with OpenAI CLIP ViT-L/14 (QuickGELU) embeddings. The head is
768→1024→128→64→16→1 with dropout between the first layers and no activations; its state dict
keys are ``layers.{0,2,4,6,7}.{weight,bias}`` (the dropouts sit at 1, 3, 5), which this module
reproduces so the published file loads as is. Without the L2 normalisation scores come out
around 20–30 instead of the usual 4–7.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from genalign.configs import opt
from rewards.base import RewardOutput, images_to_tensor
from rewards.open_clip_backbone import clip_preprocess, load_open_clip, load_weights_file


class AestheticHead(nn.Module):
    def __init__(self, in_dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.layers(embedding).squeeze(-1)


def load_head(path: str, in_dim: int) -> AestheticHead:
    head = AestheticHead(in_dim)
    head.load_state_dict(load_weights_file(path, "head"))
    return head.eval().requires_grad_(False)


@dataclass
class AestheticConfig:
    type: Literal["aesthetic"] = opt("aesthetic", "LAION aesthetic predictor v2 (CLIP ViT-L/14 + linear MLP)")
    weight: float = opt(1.0, "weight (> 0) of this component in the summed reward; every reward is maximised", gt=0)
    head: str = opt("", "MLP weights: the published .pth (loaded with weights_only=True) or a .safetensors file")
    model: str = opt("ViT-L-14-quickgelu", "open_clip architecture of the embedding (QuickGELU for OpenAI weights)")
    pretrained: str = opt("openai", "open_clip tag, local checkpoint file, or hf-hub:org/repo")

    def validate(self) -> None:
        if not self.head:
            raise ValueError("'head' is required: the aesthetic MLP weights file")
        if not os.path.isfile(self.head):
            raise FileNotFoundError(f"'head': aesthetic head weights not found: {self.head!r}")


class AestheticReward:
    differentiable = True
    name = "aesthetic"

    def __init__(self, config: AestheticConfig, device: str | torch.device = "cpu"):
        config.validate()
        self.config = config
        self.model, _, self.preprocess_cfg = load_open_clip(config.model, config.pretrained, device)
        self.head = load_head(config.head, int(self.model.visual.output_dim)).to(device)

    def __call__(self, outputs: Any, conditions: Sequence[Any]) -> RewardOutput:
        images = images_to_tensor(outputs).to(next(self.model.parameters()).device)
        emb = self.model.encode_image(clip_preprocess(images, self.preprocess_cfg)).float()
        scores = self.head(F.normalize(emb, dim=-1))
        return RewardOutput(scores=scores, components={"aesthetic": scores.detach()})
