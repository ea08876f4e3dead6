"""Stable Diffusion (any diffusers SD-style pipeline) as a policy over the denoising MDP.

The latent-diffusion policy (:mod:`genalign.policies.latent_diffusion`) with image latents and
the stochastic DDIM step of :mod:`genalign.policies.ddim`: state s_j = (x_t, t, c), action
a_j = x_t' (the next latent), classifier-free guidance ε = ε_u + w (ε_c − ε_u). Rollouts draw
their noise exactly as ``StableDiffusionPipeline.__call__`` with a DDIM scheduler does, so a
seed gives the same image here and in plain diffusers (tested).

Fine-tuning is LoRA through peft (``unet.add_adapter``) or full; the reference policy is the
same UNet with adapters disabled (LoRA) or a frozen copy made on first use (full).
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from diffusers import StableDiffusionPipeline

from genalign.configs import opt
from genalign.policies.backbones import ImageLatents
from genalign.policies.ddim import DDIMKernel
from genalign.policies.latent_diffusion import LatentDiffusionPolicy
from genalign.policies.unet_tuning import (
    POLICY_FILE,
    check_image_size,
    check_model_location,
    merge_runtime,
    portable_location,
    resolve_location,
)

__all__ = ["POLICY_FILE", "StableDiffusionPolicy", "StableDiffusionPolicyConfig", "check_model_location"]


@dataclass
class StableDiffusionPolicyConfig:
    type: Literal["stable_diffusion"] = opt("stable_diffusion", "policy kind")
    pretrained: str = opt("", "local directory or hub id of a diffusers StableDiffusionPipeline (or a genalign policy dir)")
    revision: str | None = opt(None, "hub revision (branch, tag or commit) of `pretrained`")
    num_steps: int = opt(20, "DDIM denoising steps per rollout (the horizon T)")
    eta: float = opt(1.0, "DDIM eta in (0, 1]; must be > 0 for the step to have a log-density")
    first_step_eta: float | None = opt(
        None,
        "eta of the first DDIM step only (default: eta). At 1 on a zero-terminal-SNR schedule the first "
        "step keeps nothing of x_T, so what x_T would have decided is decided by that step's noise, an "
        "action the algorithm can credit",
    )
    guidance_scale: float = opt(5.0, "classifier-free guidance weight w (1.0 disables CFG)")
    negative_prompt: str = opt("", "negative prompt used for the unconditional branch of CFG")
    height: int | None = opt(None, "image height in pixels (default: the UNet's sample size × VAE factor)")
    width: int | None = opt(None, "image width in pixels (default: as height)")
    finetune: Literal["lora", "full"] = opt("lora", "train LoRA adapters on the UNet, or all UNet weights")
    lora_rank: int = opt(4, "LoRA rank r", ge=1)
    lora_alpha: float | None = opt(None, "LoRA alpha (scale = alpha / r); default: equal to the rank")
    lora_targets: list[str] = opt(
        field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"]),
        "UNet module names that get LoRA adapters (diffusers attention projections by default)",
    )
    weight_dtype: Literal["float32", "float16", "bfloat16"] = opt(
        "float32", "dtype of the frozen weights (VAE, text encoder, UNet base); trainable weights stay fp32"
    )
    gradient_checkpointing: bool = opt(False, "recompute UNet activations in backward to save memory")
    xformers: bool = opt(False, "use xformers memory-efficient attention (needs the `gpu` extra and CUDA)")

    def validate(self) -> None:
        if not self.pretrained:
            raise ValueError("'pretrained' is required: a local pipeline directory or a hub id")
        check_model_location(self.pretrained, "pretrained")
        if not 0 < self.eta <= 1:
            raise ValueError(f"'eta' must be in (0, 1] (eta = 0 has no log-density), got {self.eta}")
        if self.first_step_eta is not None and not 0 < self.first_step_eta <= 1:
            raise ValueError(f"'first_step_eta' must be in (0, 1] or null, got {self.first_step_eta}")
        if self.num_steps < 2:
            # DDIM's last step lands on ᾱ ≈ 1, where its std is ≈ 0: a one-step chain has no exploration
            raise ValueError(f"'num_steps' must be >= 2 (the last DDIM step is nearly noise-free), got {self.num_steps}")
        check_image_size(self)


class StableDiffusionPolicy(LatentDiffusionPolicy):
    """A diffusers StableDiffusionPipeline behind the Policy protocol: image latents + the DDIM kernel."""

    capabilities = DDIMKernel.capabilities
    policy_type = "stable_diffusion"
    config_class = StableDiffusionPolicyConfig
    pipeline_class = StableDiffusionPipeline

    def __init__(self, pipeline: Any, config: StableDiffusionPolicyConfig):
        super().__init__(
            pipeline,
            config,
            self.make_backbone(pipeline, config),
            self.make_kernel(pipeline, config),
            guidance_scale=config.guidance_scale,
            negative_prompt=config.negative_prompt,
        )

    @staticmethod
    def make_backbone(pipeline: Any, config: StableDiffusionPolicyConfig) -> ImageLatents:
        return ImageLatents(pipeline, config.height, config.width)

    @staticmethod
    def make_kernel(pipeline: Any, config: StableDiffusionPolicyConfig) -> DDIMKernel:
        return DDIMKernel(pipeline.scheduler, config.num_steps, config.eta, config.first_step_eta)

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path_or_id: str, config: Any = None) -> StableDiffusionPolicy:
        """Load a diffusers pipeline (local dir or hub id) or a saved genalign policy dir."""
        config = copy.deepcopy(config) if config is not None else cls.config_class()
        meta_path = os.path.join(path_or_id, POLICY_FILE)
        if os.path.isfile(meta_path):
            with open(meta_path) as f:
                meta = json.load(f)
            if meta["type"] != cls.policy_type:
                raise ValueError(f"{path_or_id} holds a {meta['type']!r} policy, not a {cls.policy_type!r} policy")
            saved = cls.config_class(**meta["config"])
            if meta["finetune"] == "full":
                pipe = cls.load_pipeline(path_or_id, None)
                return cls(pipe, _merge_runtime(saved, config, pretrained=path_or_id))
            base = resolve_location(meta["base"], path_or_id)
            pipe = cls.load_pipeline(base, saved.revision)
            policy = cls(pipe, _merge_runtime(saved, config, pretrained=base))
            policy.tuning.load_lora(path_or_id)
            return policy
        config.pretrained = path_or_id
        return cls(cls.load_pipeline(path_or_id, config.revision), config)

    @classmethod
    def load_pipeline(cls, path_or_id: str, revision: str | None) -> Any:
        check_model_location(path_or_id, "pretrained")
        extra = dict(safety_checker=None, requires_safety_checker=False) if cls.pipeline_class is StableDiffusionPipeline else {}
        return cls.pipeline_class.from_pretrained(path_or_id, revision=revision, use_safetensors=True, dtype=torch.float32, **extra)

    def save_pretrained(self, directory: str) -> None:
        """LoRA: diffusers LoRA format (``pipe.load_lora_weights(directory)`` works). Full: a pipeline."""
        self.tuning.save(directory)
        base = portable_location(self.config.pretrained, directory)  # local: relative to `directory`
        meta = {"type": self.policy_type, "finetune": self.config.finetune, "base": base, "config": asdict(self.config)}
        with open(os.path.join(directory, POLICY_FILE), "w") as f:
            json.dump(meta, f, indent=2)


def _merge_runtime(saved: StableDiffusionPolicyConfig, given: StableDiffusionPolicyConfig, pretrained: str) -> StableDiffusionPolicyConfig:
    """Saved adapter shape wins; sampling settings given at load time win."""
    return merge_runtime(saved, given, pretrained, base_keys=())
