"""What a consistency policy is built from: its config and the diffusers pipeline it loads.

A consistency policy (:mod:`genalign.policies.consistency`) runs on a
LatentConsistencyModelPipeline (a distilled LCM whose UNet takes a guidance embedding) or on
a Stable Diffusion folder sampled with an LCMScheduler and an LCM-LoRA fused into its UNet.
This module holds the config, its validation and that loading; the sampler step is
:mod:`genalign.policies.lcm`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from diffusers import LatentConsistencyModelPipeline, LCMScheduler, StableDiffusionPipeline

from genalign.configs import opt
from genalign.policies.unet_tuning import check_image_size, check_model_location

#: LatentConsistencyModelPipeline's default guidance scale (for a guidance-embedded UNet)
PIPELINE_GUIDANCE_SCALE = 8.5


@dataclass
class ConsistencyPolicyConfig:
    type: Literal["consistency"] = opt("consistency", "policy kind")
    pretrained: str = opt(
        "",
        "local directory or hub id of a diffusers LatentConsistencyModelPipeline, of a Stable Diffusion "
        "pipeline (with scheduler: lcm and LCM weights in lcm_lora), or a genalign consistency policy dir",
    )
    revision: str | None = opt(None, "hub revision (branch, tag or commit) of `pretrained`")
    scheduler: Literal["pretrained", "lcm"] = opt(
        "pretrained",
        "pretrained: the folder's own scheduler, which must be an LCMScheduler; lcm: an LCMScheduler built "
        "from the folder's scheduler config (a Stable Diffusion folder)",
    )
    lcm_lora: str = opt(
        "",
        "LCM-LoRA weights (directory, .safetensors file or hub id) fused into the UNet before fine-tuning",
    )
    num_steps: int = opt(
        4,
        "consistency sampling steps N (UNet calls per sample), >= 2; the MDP has N − 1 stochastic "
        "transitions (the horizon T) and the last f_θ output is the sample",
    )
    guidance_scale: float | None = opt(
        None,
        "guidance w. Guidance-embedded UNet (time_cond_proj_dim): embeds w − 1 as LatentConsistencyModelPipeline "
        "(default 8.5); otherwise classifier-free guidance (default 1.0 = none; LCM-LoRA works best at 1–2)",
    )
    negative_prompt: str = opt(
        "", "negative prompt of the CFG branch (only a UNet without guidance embedding, w > 1)"
    )
    height: int | None = opt(
        None, "image height in pixels (default: the UNet's sample size × VAE factor)"
    )
    width: int | None = opt(None, "image width in pixels (default: as height)")
    finetune: Literal["lora", "full"] = opt(
        "lora", "train LoRA adapters on the UNet, or all UNet weights"
    )
    lora_rank: int = opt(4, "LoRA rank r", ge=1)
    lora_alpha: float | None = opt(
        None, "LoRA alpha (scale = alpha / r); default: equal to the rank"
    )
    lora_targets: list[str] = opt(
        field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"]),
        "UNet module names that get LoRA adapters (diffusers attention projections by default)",
    )
    weight_dtype: Literal["float32", "float16", "bfloat16"] = opt(
        "float32",
        "dtype of the frozen weights (VAE, text encoder, UNet base); trainable weights stay fp32",
    )
    gradient_checkpointing: bool = opt(
        False, "recompute UNet activations in backward to save memory"
    )
    xformers: bool = opt(
        False, "use xformers memory-efficient attention (needs the `gpu` extra and CUDA)"
    )

    def validate(self) -> None:
        if not self.pretrained:
            raise ValueError("'pretrained' is required: a local pipeline directory or a hub id")
        check_model_location(self.pretrained, "pretrained")
        if self.lcm_lora and not os.path.isfile(self.lcm_lora):
            check_model_location(self.lcm_lora, "lcm_lora")
        if self.num_steps < 2:
            raise ValueError(
                f"'num_steps' must be >= 2, got {self.num_steps}: one-step consistency sampling has no stochastic "
                "transition to score"
            )
        check_image_size(self)
        local_scheduler = os.path.join(self.pretrained, "scheduler", "scheduler_config.json")
        if self.scheduler == "pretrained" and os.path.isfile(local_scheduler):
            with open(local_scheduler) as f:
                kind = json.load(f).get("_class_name")
            if kind != "LCMScheduler":
                raise ValueError(not_lcm_message(self.pretrained, kind))


def not_lcm_message(path: str, kind: str | None) -> str:
    return (
        f"'scheduler': {path} comes with a {kind}, but consistency sampling needs an LCMScheduler; for a Stable "
        "Diffusion folder set scheduler: lcm (and give the consistency weights in lcm_lora)"
    )


def load_pipeline(path_or_id: str, revision: str | None, scheduler: str, lcm_lora: str) -> Any:
    """A diffusers pipeline with an LCMScheduler, LCM-LoRA fused: LatentConsistencyModelPipeline for a
    guidance-embedded UNet, StableDiffusionPipeline otherwise (diffusers' own LCM-LoRA recipe)."""
    check_model_location(path_or_id, "pretrained")
    kwargs: dict[str, Any] = {}
    if scheduler == "lcm":
        kwargs["scheduler"] = LCMScheduler.from_pretrained(
            path_or_id, subfolder="scheduler", revision=revision
        )
    pipe = LatentConsistencyModelPipeline.from_pretrained(
        path_or_id,
        revision=revision,
        safety_checker=None,
        requires_safety_checker=False,
        use_safetensors=True,
        dtype=torch.float32,
        **kwargs,
    )
    if not isinstance(pipe.scheduler, LCMScheduler):
        raise ValueError(not_lcm_message(path_or_id, type(pipe.scheduler).__name__))
    if lcm_lora:
        if os.path.isfile(lcm_lora):
            pipe.load_lora_weights(
                os.path.dirname(lcm_lora) or ".",
                weight_name=os.path.basename(lcm_lora),
                adapter_name="lcm",
            )
        else:
            check_model_location(lcm_lora, "lcm_lora")
            pipe.load_lora_weights(lcm_lora, adapter_name="lcm")
        pipe.fuse_lora()
        pipe.unload_lora_weights()  # the fused weights stay; the adapter layers go
    if pipe.unet.config.time_cond_proj_dim is None:
        pipe = StableDiffusionPipeline(**pipe.components, requires_safety_checker=False)
    return pipe
