"""HPSv2 / HPSv2.1: human preference score from an open_clip ViT-H-14 fine-tuned on HPD v2.

Paper: Wu et al., "Human Preference Score v2" (2023). The whole CLIP model is fine-tuned; the
score is the plain cosine of the normalised image and text embeddings — no logit scale —
typically ≈ 0.25–0.30 on SD-1.x images. Its eval preprocessing resizes the longest side and
pads to a square (not a centre crop). v2.0 and v2.1 checkpoints give scores that are not
comparable, so the version is recorded with every score (``details``).

The checkpoint (``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt``) holds a ``state_dict``
for ``ViT-H-14``; it is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from genalign.configs import opt
from rewards.base import RewardOutput, images_to_tensor
from rewards.open_clip_backbone import clip_preprocess_pad, load_open_clip, load_weights_file


@dataclass
class HPSConfig:
    type: Literal["hps"] = opt("hps", "HPSv2/v2.1: plain cosine from a preference-tuned open_clip ViT-H-14")
    weight: float = opt(1.0, "weight (> 0) of this component in the summed reward; every reward is maximised", gt=0)
    checkpoint: str = opt("", "the HPS checkpoint file (.pt with a 'state_dict', or .safetensors)")
    version: Literal["v2.0", "v2.1"] = opt("v2.1", "which HPS release the checkpoint is (recorded with each score)")
    model: str = opt("ViT-H-14", "open_clip architecture (HPS uses ViT-H-14), or a JSON architecture config")

    def validate(self) -> None:
        if not self.checkpoint:
            raise ValueError("'checkpoint' is required: the HPS weights file")
        if not os.path.isfile(self.checkpoint):
            raise FileNotFoundError(f"'checkpoint': HPS weights not found: {self.checkpoint!r}")


class HPSReward:
    differentiable = True
    name = "hps"

    def __init__(self, config: HPSConfig, device: str | torch.device = "cpu"):
        config.validate()
        self.config = config
        self.model, self.tokenizer, self.preprocess_cfg = load_open_clip(config.model, "", device)
        state = {k.removeprefix("module."): v for k, v in load_weights_file(config.checkpoint, "checkpoint").items()}
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"'checkpoint' does not fit {config.model}: missing {missing[:3]}, unexpected {unexpected[:3]}")
        self.model.eval().requires_grad_(False)

    def __call__(self, outputs: Any, conditions: Sequence[Any]) -> RewardOutput:
        device = next(self.model.parameters()).device
        images = images_to_tensor(outputs).to(device)
        img = F.normalize(self.model.encode_image(clip_preprocess_pad(images, self.preprocess_cfg)).float(), dim=-1)
        txt = F.normalize(self.model.encode_text(self.tokenizer([str(c) for c in conditions]).to(device)).float(), dim=-1)
        scores = (img * txt).sum(-1)  # plain cosine [B]
        return RewardOutput(scores=scores, components={"hps": scores.detach()},
                            details=[{"hps_version": self.config.version} for _ in range(len(scores))])
