"""Latent consistency models as a policy: multi-step consistency sampling is the MDP (RLCM).

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
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict
from typing import Any

import torch
from diffusers import LCMScheduler
from diffusers.utils.torch_utils import randn_tensor
from peft import LoraConfig

from genalign.conditions import condition_text
from genalign.distributions import gaussian_log_prob
from genalign.policies.base import check_options
from genalign.policies.consistency_config import (
    PIPELINE_GUIDANCE_SCALE,
    ConsistencyPolicyConfig,
    load_pipeline,
    not_lcm_message,
)
from genalign.policies.lcm import (
    LCMConstants,
    consistency_function,
    consistency_step,
    guidance_embedding,
)
from genalign.policies.unet_tuning import (
    POLICY_FILE,
    UNetFinetune,
    as_generators,
    check_branch_steps,
    decode_latents,
    encode_images,
    make_lora_config,
    merge_runtime,
    per_row,
    portable_location,
    resolve_location,
    scale_model_input,
)
from genalign.trajectory import Trajectory

__all__ = ["PIPELINE_GUIDANCE_SCALE", "ConsistencyPolicy", "ConsistencyPolicyConfig"]


class ConsistencyPolicy:
    """A latent consistency model (diffusers pipeline + LCMScheduler) behind the Policy protocol."""

    step_chunk = 1  # one UNet call per scored step keeps memory flat
    #: noise windows and antithetic pairs need a deterministic version of every step, and a
    #: consistency step's re-noising has none
    capabilities = frozenset({"shared_noise"})
    log_prob_unit = "dimension_mean"  # the re-noising Gaussian's log-density, averaged over latent dims

    def __init__(self, pipeline: Any, config: ConsistencyPolicyConfig):
        if not isinstance(pipeline.scheduler, LCMScheduler):
            raise ValueError(
                not_lcm_message(
                    config.pretrained or "the pipeline", type(pipeline.scheduler).__name__
                )
            )
        self.config = config
        self.pipe = pipeline
        self.unet = pipeline.unet
        self.scheduler = LCMScheduler.from_config(pipeline.scheduler.config)
        self.consts = LCMConstants.from_scheduler(
            self.scheduler, config.num_steps
        )  # also sets the timesteps
        #: width of the guidance embedding; None: the UNet takes classifier-free guidance instead
        self.embed_dim: int | None = self.unet.config.time_cond_proj_dim
        default_w = PIPELINE_GUIDANCE_SCALE if self.embed_dim is not None else 1.0
        self.guidance_scale = (
            config.guidance_scale if config.guidance_scale is not None else default_w
        )
        self.cfg = self.embed_dim is None and self.guidance_scale != 1.0
        if config.negative_prompt and not self.cfg:
            raise ValueError(
                "'negative_prompt' is set but no unconditional branch is computed: "
                + (
                    "the UNet has a guidance embedding (a distilled LCM has no negative prompt)"
                    if self.embed_dim
                    else "guidance_scale is 1"
                )
            )
        self.vae_scale = 2 ** (len(pipeline.vae.config.block_out_channels) - 1)
        self.height = config.height or pipeline.unet.config.sample_size * self.vae_scale
        self.width = config.width or self.height
        self.tuning = UNetFinetune(
            pipeline,
            config.finetune,
            self.lora_config(),
            config.weight_dtype,
            config.gradient_checkpointing,
            config.xformers,
        )
        self.pipe.set_progress_bar_config(disable=True)

    # -- construction ----------------------------------------------------------------------
    def lora_config(self) -> LoraConfig:
        c = self.config
        return make_lora_config(c.lora_rank, c.lora_alpha, c.lora_targets)

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

    # -- protocol ------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def timesteps(self) -> torch.Tensor:
        """The sampling schedule τ_0 > … > τ_(N−1): ``[N]`` long on the policy's device."""
        return self.consts.timesteps.to(self.device)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return self.tuning.parameters()

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return self.tuning.state_dict()

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.tuning.load_state_dict(state)

    def prepare(self, accelerator: Any) -> list[torch.nn.Module]:
        return self.tuning.prepare(accelerator)

    def reference(self) -> AbstractContextManager[None]:
        return self.tuning.reference()

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Prompt embeddings ``[B, L, D]`` as the pipeline computes them (and the negative ones with CFG)."""
        if not self.cfg:
            cond, _ = self.pipe.encode_prompt(list(prompts), self.device, 1, False)
            return {"prompt_embeds": cond}
        cond, uncond = self.pipe.encode_prompt(
            list(prompts),
            self.device,
            1,
            True,
            negative_prompt=[self.config.negative_prompt] * len(prompts),
        )
        return {"prompt_embeds": cond, "negative_prompt_embeds": uncond}

    def _model_output(
        self, latents: torch.Tensor, t: torch.Tensor, embeds: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Guided UNet output for latents ``[N, C, h, w]`` at timesteps ``[N]`` (fp32).

        The one path to the UNet: the scheduler's model-input scaling is applied here, so
        rollouts, single steps, recomputed log-probs and f_θ all see the same input.
        """
        latents = scale_model_input(self.scheduler, latents, t)
        unet, dtype = self.tuning.module, self.unet.dtype
        cond = embeds["prompt_embeds"].to(dtype)
        if self.embed_dim is not None:
            w = torch.full(
                (latents.shape[0],), self.guidance_scale - 1.0, device=latents.device
            )  # [N]
            w_emb = guidance_embedding(w, self.embed_dim).to(dtype)  # [N, D_w]
            return unet(
                latents.to(dtype), t, timestep_cond=w_emb, encoder_hidden_states=cond
            ).sample.float()
        if not self.cfg:
            return unet(latents.to(dtype), t, encoder_hidden_states=cond).sample.float()
        x = torch.cat([latents, latents]).to(
            dtype
        )  # [2N, C, h, w], uncond rows first as in diffusers
        uncond = embeds["negative_prompt_embeds"].to(dtype)
        out_u, out_c = (
            unet(x, torch.cat([t, t]), encoder_hidden_states=torch.cat([uncond, cond]))
            .sample.float()
            .chunk(2)
        )
        return out_u + self.guidance_scale * (out_c - out_u)

    def _final(self, latents: torch.Tensor, embeds: dict[str, torch.Tensor]) -> torch.Tensor:
        """The sample f_θ(x_τ(N−1), τ_(N−1)) from the last state ``[N, C, h, w]``."""
        t = torch.full(
            (latents.shape[0],),
            int(self.consts.timesteps[-1]),
            device=latents.device,
            dtype=torch.long,
        )
        return consistency_function(self.consts, self._model_output(latents, t, embeds), t, latents)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``[N, C, h, w]`` -> images ``[N, 3, H, W]`` in [0, 1]."""
        return decode_latents(self.pipe.vae, latents)

    def _sample(
        self,
        latents: torch.Tensor,
        embeds: dict[str, torch.Tensor],
        first_step: int,
        generator: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run transitions ``first_step..T-1`` and the final f_θ.

        Returns states, actions ``[N, T', C, h, w]``, log-probs ``[N, T']`` and the sample latents ``[N, C, h, w]``.
        """
        states, actions, log_probs = [], [], []
        n, schedule = latents.shape[0], self.consts.timesteps
        for j in range(first_step, self.consts.num_transitions):
            t = torch.full((n,), int(schedule[j]), device=latents.device, dtype=torch.long)
            t_next = torch.full((n,), int(schedule[j + 1]), device=latents.device, dtype=torch.long)
            out = consistency_step(
                self.consts,
                self._model_output(latents, t, embeds),
                t,
                t_next,
                latents,
                generator=generator,
            )
            states.append(latents)
            actions.append(out.prev_sample)
            log_probs.append(out.log_prob)
            latents = out.prev_sample
        return (
            torch.stack(states, 1),
            torch.stack(actions, 1),
            torch.stack(log_probs, 1),
            self._final(latents, embeds),
        )

    def _chain_index(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """timesteps and step_ids ``[n, T]`` of a full trajectory."""
        t = self.consts.num_transitions
        timesteps = self.timesteps[:t].unsqueeze(0).expand(n, -1).clone()
        return timesteps, torch.arange(t, device=self.device).unsqueeze(0).expand(n, -1).clone()

    @torch.no_grad()
    def rollout(
        self,
        conditions: Sequence[Any],
        n_per_condition: int = 1,
        seeds: Any = None,
        shared_noise: bool = False,
        **options: Any,
    ) -> Trajectory:
        """``seeds``: one int per row (or diffusers-style generators); option ``shared_noise``."""
        check_options(type(self).__name__, self.capabilities, options)
        rows = [c for c in conditions for _ in range(n_per_condition)]
        n = len(rows)
        generator = as_generators(seeds, n)
        embeds = self.encode([condition_text(c) for c in rows])
        dtype = embeds["prompt_embeds"].dtype
        shape = (
            n,
            self.unet.config.in_channels,
            self.height // self.vae_scale,
            self.width // self.vae_scale,
        )
        if shared_noise:
            # x_T from each condition's first generator, repeated over its group; the re-noising
            # still draws from every row's own generator, so the samples differ.
            first = generator[::n_per_condition] if isinstance(generator, list) else generator
            latents = randn_tensor(
                (len(conditions), *shape[1:]), generator=first, device=self.device, dtype=dtype
            )
            latents = latents.repeat_interleave(n_per_condition, 0)  # [N, C, h, w]
        else:
            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=dtype)
        latents = latents.float() * self.scheduler.init_noise_sigma  # x_τ0 [N, C, h, w]
        states, actions, log_probs, sample = self._sample(latents, embeds, 0, generator)
        timesteps, step_ids = self._chain_index(n)
        return Trajectory(
            conditions=rows,
            group=torch.arange(len(conditions), device=self.device).repeat_interleave(
                n_per_condition
            ),
            states=states,
            actions=actions,
            timesteps=timesteps,
            log_probs=log_probs,
            mask=torch.ones(n, states.shape[1], dtype=torch.bool, device=self.device),
            step_ids=step_ids,
            outputs=self.decode(sample),
            extras=embeds,
        )

    def log_prob(self, traj: Trajectory, steps: Sequence[int] | torch.Tensor) -> torch.Tensor:
        sub = traj.subset(steps)
        b, k = sub.log_probs.shape
        embeds = {
            key: traj.extras[key].repeat_interleave(k, 0) for key in self._embed_keys()
        }  # [B*K, L, D]
        x_t = sub.states.flatten(0, 1)  # [B*K, C, h, w]
        t = sub.timesteps.flatten()  # [B*K]
        t_next = self.consts.next_timesteps(sub.step_ids.flatten())  # [B*K]
        out = consistency_step(
            self.consts,
            self._model_output(x_t, t, embeds),
            t,
            t_next,
            x_t,
            prev_sample=sub.actions.flatten(0, 1),
        )
        return out.log_prob.view(b, k)

    def _embed_keys(self) -> tuple[str, ...]:
        return ("prompt_embeds", "negative_prompt_embeds") if self.cfg else ("prompt_embeds",)

    @torch.no_grad()
    def continue_from(self, traj: Trajectory, steps: torch.Tensor, n: int, seeds: Any = None) -> Trajectory:
        """``n`` continuations per row from the state before its step ``steps[b]`` (``[B]``);
        rows that branch at the same step are sampled together."""
        steps = check_branch_steps(steps, traj.batch_size, traj.num_steps)
        parent = traj[torch.arange(traj.batch_size).repeat_interleave(n)]
        child_steps = steps.repeat_interleave(n)  # [B*n]
        gens = per_row(as_generators(seeds, parent.batch_size), parent.batch_size)
        states, actions, log_probs = parent.states.clone(), parent.actions.clone(), parent.log_probs.clone()
        samples = torch.zeros_like(parent.actions[:, -1])  # [B*n, C, h, w]
        for b in child_steps.unique().tolist():
            idx = (child_steps == b).nonzero().view(-1).to(self.device)
            row_gens = [gens[i] for i in idx.tolist()]
            embeds = {key: parent.extras[key][idx] for key in self._embed_keys()}
            st, ac, lp, sample = self._sample(
                parent.states[idx, b].float(), embeds, b, row_gens if row_gens[0] is not None else None
            )
            states[idx, b:], actions[idx, b:], log_probs[idx, b:], samples[idx] = st, ac, lp, sample
        extras = dict(parent.extras)
        extras["branch_step"] = child_steps.to(self.device)
        return Trajectory(
            conditions=parent.conditions,
            group=torch.arange(traj.batch_size, device=self.device).repeat_interleave(n),
            states=states,
            actions=actions,
            timesteps=parent.timesteps,
            log_probs=log_probs,
            mask=parent.mask,
            step_ids=parent.step_ids,
            outputs=self.decode(samples),
            extras=extras,
        )

    @torch.no_grad()
    def start(self, conditions: Sequence[Any], n_per_condition: int = 1, seeds: Any = None) -> Trajectory:
        """A partial trajectory before its first step: x_τ0 drawn exactly as ``rollout`` draws it,
        every step masked out (``mask`` False) until :meth:`step` takes it."""
        rows = [c for c in conditions for _ in range(n_per_condition)]
        n = len(rows)
        generator = as_generators(seeds, n)
        embeds = self.encode([condition_text(c) for c in rows])
        c, h, w = (
            self.unet.config.in_channels,
            self.height // self.vae_scale,
            self.width // self.vae_scale,
        )
        latents = randn_tensor(
            (n, c, h, w),
            generator=generator,
            device=self.device,
            dtype=embeds["prompt_embeds"].dtype,
        )
        t = self.consts.num_transitions
        states = torch.zeros(n, t, c, h, w, device=self.device)
        states[:, 0] = latents.float() * self.scheduler.init_noise_sigma
        timesteps, step_ids = self._chain_index(n)
        return Trajectory(
            conditions=rows,
            group=torch.arange(len(conditions), device=self.device).repeat_interleave(
                n_per_condition
            ),
            states=states,
            actions=torch.zeros_like(states),
            timesteps=timesteps,
            log_probs=torch.zeros(n, t, device=self.device),
            mask=torch.zeros(n, t, dtype=torch.bool, device=self.device),
            step_ids=step_ids,
            extras=embeds,
        )

    def row_generators(self, conditions: Sequence[Any], n_per_condition: int, seeds: Sequence[int]) -> list[torch.Generator]:
        """The generators ``rollout`` builds from ``seeds`` (one per row): passed to :meth:`start`
        and then :meth:`step`, they continue each row's stream, so the steps reproduce ``rollout``."""
        return as_generators(list(seeds), len(conditions) * n_per_condition)

    @torch.no_grad()
    def step(self, traj: Trajectory, step: int, n: int = 1, seeds: Any = None) -> Trajectory:
        """Take transition ``step`` from each row's state, ``n`` candidates per row (``B * n`` rows,
        row-major; ``group`` = parent row). After the last transition the final f_θ gives
        ``outputs``. ``start`` then T calls with n = 1 and the same generators equal ``rollout``."""
        if not 0 <= step < traj.num_steps:
            raise IndexError(f"step {step} outside 0..{traj.num_steps - 1}")
        child = traj[torch.arange(traj.batch_size, device=traj.states.device).repeat_interleave(n)]
        generator = as_generators(seeds, child.batch_size)
        embeds = {key: child.extras[key] for key in self._embed_keys()}
        x_t = child.states[:, step].float()
        t = child.timesteps[:, step]
        t_next = self.consts.next_timesteps(child.step_ids[:, step])
        out = consistency_step(
            self.consts, self._model_output(x_t, t, embeds), t, t_next, x_t, generator=generator
        )
        states, actions, log_probs, mask = (
            child.states.clone(),
            child.actions.clone(),
            child.log_probs.clone(),
            child.mask.clone(),
        )
        actions[:, step] = out.prev_sample
        log_probs[:, step] = out.log_prob
        mask[:, step] = True
        finished = step + 1 == traj.num_steps
        if not finished:
            states[:, step + 1] = out.prev_sample
        return Trajectory(
            conditions=child.conditions,
            group=torch.arange(traj.batch_size, device=self.device).repeat_interleave(n),
            states=states,
            actions=actions,
            timesteps=child.timesteps,
            log_probs=log_probs,
            mask=mask,
            step_ids=child.step_ids,
            outputs=self.decode(self._final(out.prev_sample, embeds)) if finished else None,
            extras=dict(child.extras),
        )

    @torch.no_grad()
    def forward_process(self, conditions: Sequence[Any], outputs: torch.Tensor, seeds: Any = None) -> Trajectory:
        """Trajectories that reach given images: the sampler's own kernel with f_θ replaced by the truth.

        ``outputs`` ``[B, 3, H, W]`` in [0, 1] are encoded to x_0 (VAE mean). For every chain step
        n < T (fresh noise per step) the state is x_τn = √ᾱ_τn x_0 + √(1−ᾱ_τn) ε and the
        action x_τ(n+1) = √ᾱ_τ(n+1) x_0 + √(1−ᾱ_τ(n+1)) z: the consistency transition of a
        perfect f_θ (= x_0). Unlike DDIM's posterior q(x_t' | x_t, x_0), the action does not
        depend on the state given x_0 — in consistency sampling it does not either. ``log_probs``
        are that Gaussian's; log π_θ of these actions is, up to noise and a constant,
        −ᾱ_τ(n+1) ‖f_θ(x_τn) − x_0‖² / (2(1−ᾱ_τ(n+1))): a consistency regression onto x_0, which
        is what preference losses over off-policy outputs (SePPO) need.
        """
        rows = list(conditions)
        b, k = len(rows), self.consts.num_transitions
        if outputs.shape[0] != b:
            raise ValueError(f"{b} conditions and {outputs.shape[0]} outputs must match")
        steps = torch.arange(k, device=self.device).unsqueeze(0).expand(b, -1)  # [B, T]
        x0 = encode_images(self.pipe.vae, outputs)  # [B, C, h, w]
        timesteps = self.timesteps[steps]  # [B, K]
        t_next = self.consts.next_timesteps(steps)  # [B, K]; refuses n = T (no successor)
        gens = per_row(as_generators(seeds, b), b)
        shape = x0.shape[1:]
        eps = torch.stack(
            [randn_tensor((k, *shape), generator=g, device=self.device) for g in gens]
        )  # [B, K, C, h, w]
        z = torch.stack([randn_tensor((k, *shape), generator=g, device=self.device) for g in gens])
        x0k = x0.unsqueeze(1).expand(-1, k, *shape)  # [B, K, C, h, w]
        a_t = self.consts.alpha(timesteps.flatten()).view(b, k, 1, 1, 1)
        a_next = self.consts.alpha(t_next.flatten()).view(b, k, 1, 1, 1)
        states = a_t.sqrt() * x0k + (1 - a_t).sqrt() * eps  # x_τn
        mean = a_next.sqrt() * x0k
        std = (1 - a_next).sqrt()
        actions = mean + std * z  # x_τ(n+1)
        log_probs = gaussian_log_prob(
            actions.flatten(0, 1), mean.flatten(0, 1), std.flatten(0, 1)
        ).view(b, k)
        return Trajectory(
            conditions=rows,
            group=torch.arange(b, device=self.device),
            states=states,
            actions=actions,
            timesteps=timesteps,
            log_probs=log_probs,
            mask=torch.ones(b, k, dtype=torch.bool, device=self.device),
            step_ids=steps.clone(),
            outputs=outputs,
            extras=self.encode([condition_text(c) for c in rows]),
        )

    @torch.no_grad()
    def predict_final(self, traj: Trajectory, step: int) -> torch.Tensor:
        """f_θ of the state before ``step``, decoded: a consistency model's one-step sample.
        ``step == T``: the finished output, f_θ of the last action."""
        embeds = {key: traj.extras[key] for key in self._embed_keys()}
        if step == traj.num_steps:
            return self.decode(self._final(traj.actions[:, -1].float(), embeds))
        x_t, t = traj.states[:, step].float(), traj.timesteps[:, step]
        return self.decode(
            consistency_function(self.consts, self._model_output(x_t, t, embeds), t, x_t)
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
