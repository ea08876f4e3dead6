"""Latent consistency models as a policy: multi-step consistency sampling is the MDP (RLCM).

The latent-diffusion policy (:mod:`genalign.policies.latent_diffusion`) with image latents and
the consistency kernel of :mod:`genalign.policies.lcm`.

Paper: Oertell, Chang, Zhang, Brantley, Sun, "RL for Consistency Models: Faster Reward
Guided Text-to-Image Generation" (RLCM, 2024), §4. State s_n = (x_τn, τ_n, c), action
a_n = x_τ(n+1), transition (:mod:`genalign.policies.lcm`):

    x̂0_n     = f_θ(x_τn, τ_n, c, w)                     (LCMScheduler's boundary scalings)
    x_τ(n+1) ~ N(√ᾱ_τ(n+1) · x̂0_n, (1 − ᾱ_τ(n+1)) I)

**Final step.** N sampling steps (``num_steps``, the UNet calls of
``LatentConsistencyModelPipeline(num_inference_steps=N)``) make N − 1 stochastic transitions
followed by one deterministic evaluation: the sample is f_θ(x_τ(N−1), τ_(N−1)), exactly as
``LCMScheduler.step`` returns ``denoised`` on its last step. A trajectory therefore has
T = N − 1 steps, each with a log-prob; the final f_θ has no density and is not a step (it
gets no ratio of its own, but it is the same θ that every scored step trains, and its output
is what the reward, hence every step's advantage, is computed on). ``num_steps`` must be >= 2.

**Log-prob convention.** The mean over latent dims of the elementwise Gaussian log-density,
as the DDIM step of the Stable Diffusion policy (:mod:`genalign.distributions`), so DDPO's
``clip_range`` and KL weights mean the same here.

**Guidance.** A UNet with a guidance embedding (``time_cond_proj_dim``, a distilled LCM) gets
``timestep_cond`` = embedding(w − 1) and one forward pass, as ``LatentConsistencyModelPipeline``;
a UNet without one (Stable Diffusion + LCM-LoRA, sampled with an LCMScheduler) gets
classifier-free guidance ε_u + w (ε_c − ε_u). Rollouts draw their noise exactly as the
diffusers pipelines do, so a seed gives the same image here and in plain diffusers (tested).

Fine-tuning and the reference are those of the SD policy (:mod:`genalign.policies.unet_tuning`):
LoRA through peft (reference = adapters disabled) or full (reference = frozen copy). An
LCM-LoRA given as ``lcm_lora`` is fused into the UNet first, so it is part of the reference.
The config and the pipeline loading are in :mod:`genalign.policies.consistency_config`.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict
from typing import Any

from diffusers import LCMScheduler

from genalign.policies.backbones import ImageLatents
from genalign.policies.consistency_config import (
    PIPELINE_GUIDANCE_SCALE,
    ConsistencyPolicyConfig,
    load_pipeline,
    not_lcm_message,
)
from genalign.policies.latent_diffusion import LatentDiffusionPolicy
from genalign.policies.lcm import LCMKernel
from genalign.policies.unet_tuning import (
    POLICY_FILE,
    merge_runtime,
    portable_location,
    resolve_location,
)

__all__ = ["PIPELINE_GUIDANCE_SCALE", "ConsistencyPolicy", "ConsistencyPolicyConfig"]


class ConsistencyPolicy(LatentDiffusionPolicy):
    """A latent consistency model (diffusers pipeline + LCMScheduler) behind the Policy protocol:
    image latents + the consistency-sampling kernel."""

    #: noise windows and antithetic pairs need a deterministic version of every step, and a
    #: consistency step's re-noising has none
    capabilities = LCMKernel.capabilities

    def __init__(self, pipeline: Any, config: ConsistencyPolicyConfig):
        if not isinstance(pipeline.scheduler, LCMScheduler):
            raise ValueError(not_lcm_message(config.pretrained or "the pipeline", type(pipeline.scheduler).__name__))
        embed_dim: int | None = pipeline.unet.config.time_cond_proj_dim
        default_w = PIPELINE_GUIDANCE_SCALE if embed_dim is not None else 1.0
        guidance_scale = config.guidance_scale if config.guidance_scale is not None else default_w
        if config.negative_prompt and (embed_dim is not None or guidance_scale == 1.0):
            raise ValueError(
                "'negative_prompt' is set but no unconditional branch is computed: "
                + ("the UNet has a guidance embedding (a distilled LCM has no negative prompt)"
                   if embed_dim else "guidance_scale is 1")
            )
        super().__init__(
            pipeline,
            config,
            ImageLatents(pipeline, config.height, config.width),
            LCMKernel(pipeline.scheduler, config.num_steps),
            guidance_scale=guidance_scale,
            embed_dim=embed_dim,
            negative_prompt=config.negative_prompt,
        )

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, path_or_id: str, config: ConsistencyPolicyConfig | None = None
    ) -> ConsistencyPolicy:
        """Load a LatentConsistencyModelPipeline, an SD pipeline + LCMScheduler (+ LCM-LoRA), or a saved policy."""
        config = copy.deepcopy(config) if config is not None else ConsistencyPolicyConfig()
        meta_path = os.path.join(path_or_id, POLICY_FILE)
        if os.path.isfile(meta_path):
            with open(meta_path) as f:
                meta = json.load(f)
            if meta["type"] != "consistency":
                raise ValueError(
                    f"{path_or_id} holds a {meta['type']!r} policy, not a consistency policy"
                )
            saved = ConsistencyPolicyConfig(**meta["config"])
            if (
                meta["finetune"] == "full"
            ):  # a complete pipeline with an LCMScheduler and any LCM-LoRA fused in
                merged = merge_runtime(saved, config, pretrained=path_or_id, base_keys=())
                merged.revision, merged.scheduler, merged.lcm_lora = None, "pretrained", ""
                return cls(load_pipeline(path_or_id, None, "pretrained", ""), merged)
            base_keys = ("revision", "scheduler", "lcm_lora")
            base = resolve_location(meta["base"], path_or_id)
            if saved.lcm_lora:
                saved.lcm_lora = resolve_location(saved.lcm_lora, path_or_id)
            policy = cls(
                load_pipeline(base, saved.revision, saved.scheduler, saved.lcm_lora),
                merge_runtime(saved, config, pretrained=base, base_keys=base_keys),
            )
            policy.tuning.load_lora(path_or_id)
            return policy
        config.pretrained = path_or_id
        return cls(
            load_pipeline(path_or_id, config.revision, config.scheduler, config.lcm_lora), config
        )

    def save_pretrained(self, directory: str) -> None:
        """LoRA: diffusers LoRA format, loadable with ``pipe.load_lora_weights(directory)`` on the
        base pipeline. Full: a complete pipeline with its LCMScheduler (any LCM-LoRA fused in)."""
        self.tuning.save(directory)
        config = asdict(self.config)
        base = portable_location(self.config.pretrained, directory)  # local: relative to `directory`
        if self.config.lcm_lora:
            config["lcm_lora"] = portable_location(self.config.lcm_lora, directory)
        meta = {
            "type": "consistency",
            "finetune": self.config.finetune,
            "base": base,
            "config": config,
        }
        with open(os.path.join(directory, POLICY_FILE), "w") as f:
            json.dump(meta, f, indent=2)
