"""PickScore: a CLIP-H fine-tuned on Pick-a-Pic human preferences, as a reward.

Paper: Kirstain et al., "Pick-a-Pic: An Open Dataset of User Preferences for Text-to-Image
Generation" (2023), §4: score(x, y) = exp(t) · cos(E_T(x), E_I(y)) with the model's learned
logit scale t (≈ 100 × cosine). The published model is a transformers ``CLIPModel``
(``yuvalkirstain/PickScore_v1``) used with the processor of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``;
both are given as paths or hub ids. Preprocessing is done in torch from the processor's
settings (shortest-side resize, centre crop, normalise), so the reward is differentiable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from genalign.configs import opt
from rewards.base import RewardOutput, images_to_tensor
from rewards.open_clip_backbone import clip_preprocess


@dataclass
class PickScoreConfig:
    type: Literal["pickscore"] = opt("pickscore", "PickScore: logit_scale · cos(image, text) from a preference-tuned CLIP")
    weight: float = opt(1.0, "weight (> 0) of this component in the summed reward; every reward is maximised", gt=0)
    model: str = opt("yuvalkirstain/PickScore_v1", "transformers CLIPModel: local directory or hub id")
    processor: str = opt("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "tokenizer and image-processor settings: directory or hub id")


def _features(out: Any) -> torch.Tensor:
    """Projected, L2-normalised features: ``get_*_features`` returns a tensor in transformers 4
    and an output whose ``pooler_output`` holds the projection in transformers 5."""
    feats = out if isinstance(out, torch.Tensor) else out.pooler_output
    return F.normalize(feats.float(), dim=-1)


class PickScore:
    differentiable = True
    name = "pickscore"

    def __init__(self, config: PickScoreConfig | None = None, device: str | torch.device = "cpu"):
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        from genalign.policies.stable_diffusion import check_model_location

        self.config = config or PickScoreConfig()
        check_model_location(self.config.model, "model")
        check_model_location(self.config.processor, "processor")
        self.model = CLIPModel.from_pretrained(self.config.model).to(device).eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(self.config.processor)
        proc = CLIPImageProcessor.from_pretrained(self.config.processor)
        crop = proc.crop_size
        size = int(crop["height"] if hasattr(crop, "__getitem__") and not isinstance(crop, int) else crop)
        self.preprocess_cfg = {"size": size, "mean": tuple(proc.image_mean), "std": tuple(proc.image_std)}

    def __call__(self, outputs: Any, conditions: Sequence[Any]) -> RewardOutput:
        device = self.model.device
        images = images_to_tensor(outputs).to(device)
        img = _features(self.model.get_image_features(pixel_values=clip_preprocess(images, self.preprocess_cfg)))
        tok = self.tokenizer([str(c) for c in conditions], padding=True, truncation=True, return_tensors="pt").to(device)
        txt = _features(self.model.get_text_features(**tok))
        cos = (img * txt).sum(-1)  # [B]
        scores = self.model.logit_scale.exp() * cos
        return RewardOutput(scores=scores, components={"cosine": cos.detach()})
