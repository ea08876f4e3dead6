"""Rectified-flow models (SD3-family pipelines) as a policy over the denoising MDP.

The latent-diffusion policy (:mod:`genalign.policies.latent_diffusion`) with an SD3 backbone
(:class:`~genalign.policies.backbones.SD3Latents`: an MMDiT transformer on image latents,
conditioned on token and pooled prompt embeddings) and a stochastic flow-matching step
(:class:`~genalign.policies.flow_sde.FlowSDEKernel`): Flow-GRPO's SDE, or the
coefficient-preserving step. State s_j = (x_σj, σ_j, c), action a_j = x_σ(j+1); classifier-free
guidance on the velocity v = v_u + w (v_c − v_u), as ``StableDiffusion3Pipeline`` does.
Flow-GRPO is the ``grpo`` algorithm on this policy; every other algorithm that trains a
Stable Diffusion policy trains it through its config alone.

Rollouts draw x_1 exactly as ``StableDiffusion3Pipeline.__call__`` does (``randn_tensor`` over
the latent shape), so at a vanishing noise level a seed gives the pipeline's own image.
Fine-tuning is LoRA on the transformer (saved in diffusers' SD3 LoRA format, which
``pipe.load_lora_weights`` reads) or full.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from diffusers import StableDiffusion3Pipeline
from peft import LoraConfig

from genalign.configs import opt
from genalign.policies.backbones import SD3Latents
from genalign.policies.flow_sde import FlowSDEKernel
from genalign.policies.stable_diffusion import StableDiffusionPolicy
from genalign.policies.unet_tuning import check_image_size, check_model_location

__all__ = ["FlowMatchingPolicy", "FlowMatchingPolicyConfig"]

#: Flow-GRPO's LoRA targets: the joint attention's image and text projections of every MMDiT block.
SD3_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


@dataclass
class FlowMatchingPolicyConfig:
    type: Literal["flow_matching"] = opt("flow_matching", "policy kind")
    pretrained: str = opt("", "local directory or hub id of a diffusers StableDiffusion3Pipeline (or a genalign policy dir)")
    revision: str | None = opt(None, "hub revision (branch, tag or commit) of `pretrained`")
    num_steps: int = opt(10, "sampling steps per rollout (flow_grpo: all scored; cps: the last, to σ = 0, is deterministic)")
    sde: Literal["flow_grpo", "cps"] = opt(
        "flow_grpo", "stochastic step: Flow-GRPO's SDE (flow_grpo) or the coefficient-preserving step (cps)"
    )
    noise_level: float = opt(0.7, "noise level a of the SDE (Flow-GRPO: 0.7; cps: in (0, 1]); a -> 0 is the ODE")
    shift_mu: float | None = opt(None, "mu of a scheduler with dynamic shifting (use_dynamic_shifting); else unused")
    guidance_scale: float = opt(4.5, "classifier-free guidance weight w on the velocity (1.0 disables CFG)")
    negative_prompt: str = opt("", "negative prompt used for the unconditional branch of CFG")
    height: int | None = opt(None, "image height in pixels (default: the transformer's sample size × VAE factor)")
    width: int | None = opt(None, "image width in pixels (default: as height)")
    max_sequence_length: int = opt(256, "T5 tokens per prompt (zero tokens when the pipeline has no T5 encoder)")
    finetune: Literal["lora", "full"] = opt("lora", "train LoRA adapters on the transformer, or all its weights")
    lora_rank: int = opt(4, "LoRA rank r", ge=1)
    lora_alpha: float | None = opt(None, "LoRA alpha (scale = alpha / r); default: equal to the rank")
    lora_targets: list[str] = opt(
        field(default_factory=lambda: list(SD3_LORA_TARGETS)),
        "transformer module names that get LoRA adapters (the joint attention's projections by default)",
    )
    weight_dtype: Literal["float32", "float16", "bfloat16"] = opt(
        "float32", "dtype of the frozen weights (VAE, text encoders, transformer base); trainable weights stay fp32"
    )
    gradient_checkpointing: bool = opt(False, "recompute transformer activations in backward to save memory")
    xformers: bool = opt(False, "use xformers memory-efficient attention (needs the `gpu` extra and CUDA)")

    def validate(self) -> None:
        if not self.pretrained:
            raise ValueError("'pretrained' is required: a local pipeline directory or a hub id")
        check_model_location(self.pretrained, "pretrained")
        if self.num_steps < (2 if self.sde == "cps" else 1):
            raise ValueError(f"'num_steps' must be >= {2 if self.sde == 'cps' else 1} for sde {self.sde!r}, got {self.num_steps}")
        if not self.noise_level > 0 or (self.sde == "cps" and self.noise_level > 1):
            bound = "(0, 1]" if self.sde == "cps" else "> 0"
            raise ValueError(f"'noise_level' must be {bound} for sde {self.sde!r} (0 is the ODE, which has no "
                             f"log-density), got {self.noise_level}")
        if self.max_sequence_length < 1:
            raise ValueError(f"'max_sequence_length' must be >= 1, got {self.max_sequence_length}")
        check_image_size(self)


class FlowMatchingPolicy(StableDiffusionPolicy):
    """A diffusers StableDiffusion3Pipeline behind the Policy protocol: SD3 latents + a flow SDE kernel."""

    capabilities = FlowSDEKernel.capabilities
    policy_type = "flow_matching"
    config_class = FlowMatchingPolicyConfig
    pipeline_class = StableDiffusion3Pipeline

    @staticmethod
    def make_backbone(pipeline: Any, config: FlowMatchingPolicyConfig) -> SD3Latents:
        return SD3Latents(pipeline, config.height, config.width, config.max_sequence_length)

    def lora_config(self) -> LoraConfig:
        """The config's adapters, less the ones that can get no gradient: an SD3 block with
        ``context_pre_only`` (the last one) drops its text tokens' outputs, so the queries of
        those tokens (``add_q_proj``) reach nothing."""
        config = super().lora_config()
        dead = [f"transformer_blocks.{i}.attn.add_q_proj" for i, block in enumerate(self.denoiser.transformer_blocks)
                if getattr(block, "context_pre_only", False)]
        if dead and "add_q_proj" in self.config.lora_targets:
            config.exclude_modules = dead
        return config

    @classmethod
    def load_pipeline(cls, path_or_id: str, revision: str | None) -> Any:
        """The pipeline at ``path_or_id``; components its ``model_index.json`` leaves empty (SD3
        without the T5 encoder, no image encoder) load as None, as diffusers expects them passed."""
        check_model_location(path_or_id, "pretrained")
        index = cls.pipeline_class.load_config(path_or_id, revision=revision)
        absent = {name: None for name in ("text_encoder_3", "tokenizer_3", "image_encoder", "feature_extractor")
                  if index.get(name) in (None, [None, None])}
        return cls.pipeline_class.from_pretrained(path_or_id, revision=revision, use_safetensors=True,
                                                  dtype=torch.float32, **absent)

    @staticmethod
    def make_kernel(pipeline: Any, config: FlowMatchingPolicyConfig) -> FlowSDEKernel:
        return FlowSDEKernel(pipeline.scheduler, config.num_steps, config.noise_level, config.sde, config.shift_mu)
