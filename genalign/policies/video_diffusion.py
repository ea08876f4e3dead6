"""Text-to-video diffusion as a policy: a diffusers ``TextToVideoSDPipeline`` (a 3-D UNet) or an
``AnimateDiffPipeline`` (an image UNet with motion modules), chosen by the folder's
``model_index.json``.

The latent-diffusion policy (:mod:`genalign.policies.latent_diffusion`) with video latents
``[C, F, h, w]`` (:class:`~genalign.policies.backbones.VideoLatents`: every frame through the
image VAE) and the stochastic DDIM step: everything else, from classifier-free guidance to LoRA
fine-tuning and the frozen reference, is the Stable Diffusion policy's, so every algorithm that
trains an image model trains a video model through its config alone. Outputs are clips
``[B, F, 3, H, W]`` in [0, 1], the layout the video rewards read (:mod:`rewards.video`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from diffusers import AnimateDiffPipeline, DiffusionPipeline, TextToVideoSDPipeline

from genalign.configs import opt
from genalign.policies.backbones import MotionLatents, VideoLatents
from genalign.policies.stable_diffusion import (
    StableDiffusionPolicy,
    StableDiffusionPolicyConfig,
    check_model_location,
)

#: the text-to-video pipeline classes the policy loads, by their ``_class_name``
PIPELINES = {"TextToVideoSDPipeline": TextToVideoSDPipeline, "AnimateDiffPipeline": AnimateDiffPipeline}

__all__ = ["VideoDiffusionPolicy", "VideoDiffusionPolicyConfig"]


@dataclass
class VideoDiffusionPolicyConfig(StableDiffusionPolicyConfig):
    type: Literal["video_diffusion"] = opt("video_diffusion", "policy kind")  # type: ignore[assignment]
    pretrained: str = opt(
        "", "local directory or hub id of a diffusers TextToVideoSDPipeline or AnimateDiffPipeline (or a genalign policy dir)"
    )
    num_frames: int = opt(8, "frames per clip")

    def validate(self) -> None:
        super().validate()
        if self.num_frames < 2:
            raise ValueError(f"'num_frames' must be >= 2, got {self.num_frames}")


class VideoDiffusionPolicy(StableDiffusionPolicy):
    """A diffusers text-to-video pipeline behind the Policy protocol: video latents + the DDIM kernel."""

    policy_type = "video_diffusion"
    config_class = VideoDiffusionPolicyConfig
    pipeline_class = TextToVideoSDPipeline

    @staticmethod
    def make_backbone(pipeline: Any, config: VideoDiffusionPolicyConfig) -> VideoLatents:
        backbone = MotionLatents if isinstance(pipeline, AnimateDiffPipeline) else VideoLatents
        return backbone(pipeline, config.num_frames, config.height, config.width)

    @classmethod
    def load_pipeline(cls, path_or_id: str, revision: str | None) -> Any:
        check_model_location(path_or_id, "pretrained")
        name = DiffusionPipeline.load_config(path_or_id, revision=revision).get("_class_name")
        if name not in PIPELINES:
            raise ValueError(f"'policy.pretrained': {path_or_id} holds a {name}; the video policy loads "
                             f"{' or '.join(PIPELINES)}")
        return PIPELINES[name].from_pretrained(path_or_id, revision=revision, use_safetensors=True, dtype=torch.float32)
