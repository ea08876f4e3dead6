"""Stable Diffusion (any diffusers SD-style pipeline) as a policy over the denoising MDP.

State s_j = (x_t, t, c), action a_j = x_t' (the next latent), transition = the stochastic
DDIM step of :mod:`genalign.policies.ddim` with classifier-free guidance
ε = ε_u + w (ε_c − ε_u). Rollouts draw their noise exactly as
``StableDiffusionPipeline.__call__`` with a DDIM scheduler does, so a seed gives the same
image here and in plain diffusers (tested).

Fine-tuning is LoRA through peft (``unet.add_adapter``) or full; the reference policy is the
same UNet with adapters disabled (LoRA) or a frozen copy made on first use (full).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor
from peft import LoraConfig

from genalign.conditions import condition_text
from genalign.configs import opt
from genalign.distributions import gaussian_log_prob
from genalign.policies.base import check_options
from genalign.policies.ddim import DDIMConstants, ddim_std_and_eps_coef, ddim_step, predict_x0_eps
from genalign.policies.unet_tuning import (
    POLICY_FILE,
    UNetFinetune,
    as_generators,
    check_branch_steps,
    check_model_location,
    decode_latents,
    encode_images,
    make_lora_config,
    merge_runtime,
    per_row,
    portable_location,
    resolve_location,
    scale_model_input,
)
from genalign.policies.window import NoiseWindow, mirror_pairs
from genalign.trajectory import Trajectory

__all__ = ["POLICY_FILE", "StableDiffusionPolicy", "StableDiffusionPolicyConfig", "check_model_location"]


@dataclass
class StableDiffusionPolicyConfig:
    type: Literal["stable_diffusion"] = opt("stable_diffusion", "policy kind")
    pretrained: str = opt("", "local directory or hub id of a diffusers StableDiffusionPipeline (or a genalign policy dir)")
    revision: str | None = opt(None, "hub revision (branch, tag or commit) of `pretrained`")
    num_steps: int = opt(20, "DDIM denoising steps per rollout (the horizon T)")
    eta: float = opt(1.0, "DDIM eta in (0, 1]; must be > 0 for the step to have a log-density")
    guidance_scale: float = opt(5.0, "classifier-free guidance weight w (1.0 disables CFG)")
    negative_prompt: str = opt("", "negative prompt used for the unconditional branch of CFG")
    height: int | None = opt(None, "image height in pixels (default: the UNet's sample size × VAE factor)")
    width: int | None = opt(None, "image width in pixels (default: as height)")
    finetune: Literal["lora", "full"] = opt("lora", "train LoRA adapters on the UNet, or all UNet weights")
    lora_rank: int = opt(4, "LoRA rank r")
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
        if self.num_steps < 1:
            raise ValueError(f"'num_steps' must be >= 1, got {self.num_steps}")


class StableDiffusionPolicy:
    """A diffusers StableDiffusionPipeline behind the Policy protocol."""

    step_chunk = 1  # one UNet call (with CFG: 2B rows) per scored step keeps memory flat
    capabilities = frozenset({"shared_noise", "noise_window", "antithetic"})
    log_prob_unit = "dimension_mean"  # a DDIM step's Gaussian log-density, averaged over latent dims

    def __init__(self, pipeline: StableDiffusionPipeline, config: StableDiffusionPolicyConfig):
        self.config = config
        self.pipe = pipeline
        self.unet = pipeline.unet
        self.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
        self.scheduler.set_timesteps(config.num_steps)
        self.consts = DDIMConstants.from_scheduler(self.scheduler, config.num_steps)
        if not 0 < config.eta <= 1:
            raise ValueError(f"policy.eta must be in (0, 1], got {config.eta}")
        self.vae_scale = 2 ** (len(pipeline.vae.config.block_out_channels) - 1)
        self.height = config.height or pipeline.unet.config.sample_size * self.vae_scale
        self.width = config.width or self.height
        # LoRA adapters or all UNet weights; the reference is the UNet with adapters disabled
        # (LoRA) or a frozen copy of the starting weights (full).
        self.tuning = UNetFinetune(
            pipeline, config.finetune, self.lora_config(), config.weight_dtype, config.gradient_checkpointing, config.xformers
        )
        self.pipe.set_progress_bar_config(disable=True)

    # -- construction ----------------------------------------------------------------------
    def lora_config(self) -> LoraConfig:
        c = self.config
        return make_lora_config(c.lora_rank, c.lora_alpha, c.lora_targets)

    @classmethod
    def from_pretrained(cls, path_or_id: str, config: StableDiffusionPolicyConfig | None = None) -> StableDiffusionPolicy:
        """Load a diffusers pipeline (local dir or hub id) or a saved genalign policy dir."""
        config = copy.deepcopy(config) if config is not None else StableDiffusionPolicyConfig()
        meta_path = os.path.join(path_or_id, POLICY_FILE)
        if os.path.isfile(meta_path):
            with open(meta_path) as f:
                meta = json.load(f)
            saved = StableDiffusionPolicyConfig(**meta["config"])
            if meta["finetune"] == "full":
                pipe = _load_pipeline(path_or_id, None)
                return cls(pipe, _merge_runtime(saved, config, pretrained=path_or_id))
            base = resolve_location(meta["base"], path_or_id)
            pipe = _load_pipeline(base, saved.revision)
            policy = cls(pipe, _merge_runtime(saved, config, pretrained=base))
            policy.tuning.load_lora(path_or_id)
            return policy
        config.pretrained = path_or_id
        return cls(_load_pipeline(path_or_id, config.revision), config)

    # -- protocol ------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.unet.device

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
    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt and negative-prompt embeddings, as the pipeline computes them: 2 × ``[B, L, D]``."""
        cond, uncond = self.pipe.encode_prompt(
            list(prompts), self.device, 1, True, negative_prompt=[self.config.negative_prompt] * len(prompts)
        )
        return cond, uncond

    def _eps(self, latents: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        """Guided model output for latents ``[N, C, h, w]`` at timesteps ``[N]``.

        The one path to the UNet: the scheduler's model-input scaling is applied here, so
        rollouts, single steps, recomputed log-probs and x̂0 predictions all see the same input.
        """
        latents = scale_model_input(self.scheduler, latents, t)
        w = self.config.guidance_scale
        dtype = self.unet.dtype
        unet = self.tuning.module
        if w == 1.0:
            return unet(latents.to(dtype), t, encoder_hidden_states=cond.to(dtype)).sample.float()
        x = torch.cat([latents, latents]).to(dtype)  # [2N, C, h, w], uncond rows first as in diffusers
        out = unet(x, torch.cat([t, t]), encoder_hidden_states=torch.cat([uncond, cond]).to(dtype)).sample
        out_u, out_c = out.float().chunk(2)
        return out_u + w * (out_c - out_u)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``[N, C, h, w]`` -> images ``[N, 3, H, W]`` in [0, 1]."""
        return decode_latents(self.pipe.vae, latents)

    def _denoise(
        self,
        latents: torch.Tensor,
        cond: torch.Tensor,
        uncond: torch.Tensor,
        first_step: int,
        generator: Any,
        stochastic: torch.Tensor | None = None,
        antithetic: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run steps ``first_step..T-1``; returns states, actions ``[N, T', C, h, w]``, log-probs ``[N, T']``.

        ``stochastic`` ``[N, T]`` bool: steps that draw noise (η = config.eta); the others take
        the deterministic DDIM step (η = 0) and get log-prob 0. None: every step is stochastic.
        ``antithetic``: row 2k+1 takes the negated step noise of row 2k (the caller keeps each
        condition's group even, so pairs stay within a condition).
        """
        states, actions, log_probs = [], [], []
        n = latents.shape[0]
        for i, t in enumerate(self.scheduler.timesteps[first_step:], start=first_step):
            t_batch = torch.full((n,), int(t), device=latents.device, dtype=torch.long)
            eps = self._eps(latents, t_batch, cond, uncond)
            eta = self.config.eta if stochastic is None else stochastic[:, i].float() * self.config.eta  # [N]
            noise = None
            if antithetic:
                noise = mirror_pairs(randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype))
            out = ddim_step(self.consts, eps, t_batch, latents, eta, generator=generator, noise=noise)
            states.append(latents)
            actions.append(out.prev_sample)
            log_probs.append(out.log_prob)
            latents = out.prev_sample.to(latents.dtype)
        return torch.stack(states, 1), torch.stack(actions, 1), torch.stack(log_probs, 1)

    @torch.no_grad()
    def rollout(
        self,
        conditions: Sequence[Any],
        n_per_condition: int = 1,
        seeds: Any = None,
        shared_noise: bool = False,
        noise_window: NoiseWindow | None = None,
        antithetic: bool = False,
        **options: Any,
    ) -> Trajectory:
        """``seeds``: one int per row (or diffusers-style generators); options: ``shared_noise``,
        ``noise_window`` and ``antithetic`` (see ``capabilities``)."""
        check_options(type(self).__name__, self.capabilities, options)
        if antithetic and (not shared_noise or n_per_condition % 2):
            raise ValueError(
                f"antithetic pairs need shared_noise and an even number of samples per condition, got "
                f"shared_noise={shared_noise}, n_per_condition={n_per_condition}"
            )
        rows = [c for c in conditions for _ in range(n_per_condition)]
        n = len(rows)
        generator = as_generators(seeds, n)
        cond, uncond = self.encode([condition_text(c) for c in rows])
        shape = (n, self.unet.config.in_channels, self.height // self.vae_scale, self.width // self.vae_scale)
        if shared_noise:
            # x_T from each condition's first generator, repeated over its group; later step noise
            # still comes from every row's own generator, so the samples differ.
            first = generator[::n_per_condition] if isinstance(generator, list) else generator
            latents = randn_tensor((len(conditions), *shape[1:]), generator=first, device=self.device, dtype=cond.dtype)
            latents = latents.repeat_interleave(n_per_condition, 0)  # [N, C, h, w]
        else:
            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=cond.dtype)
        latents = latents * self.scheduler.init_noise_sigma  # x_T [N, C, h, w]
        steps = self.scheduler.timesteps.to(self.device)
        stochastic = None
        if noise_window is not None:
            if len(noise_window.starts) != len(conditions):
                raise ValueError(f"noise window has {len(noise_window.starts)} starts for {len(conditions)} conditions")
            stochastic = noise_window.mask(n_per_condition, len(steps), self.device)  # [N, T]
        states, actions, log_probs = self._denoise(latents.float(), cond, uncond, 0, generator, stochastic, antithetic)
        return Trajectory(
            conditions=rows,
            group=torch.arange(len(conditions), device=self.device).repeat_interleave(n_per_condition),
            states=states,
            actions=actions,
            timesteps=steps.unsqueeze(0).expand(n, -1).clone(),
            log_probs=log_probs,
            mask=torch.ones(n, len(steps), dtype=torch.bool, device=self.device) if stochastic is None else stochastic,
            step_ids=torch.arange(len(steps), device=self.device).unsqueeze(0).expand(n, -1).clone(),
            outputs=self.decode(actions[:, -1]),
            extras={"prompt_embeds": cond, "negative_prompt_embeds": uncond},
        )

    def log_prob(self, traj: Trajectory, steps: Sequence[int] | torch.Tensor) -> torch.Tensor:
        sub = traj.subset(steps)
        b, k = sub.log_probs.shape
        cond = traj.extras["prompt_embeds"].repeat_interleave(k, 0)  # [B*K, L, D]
        uncond = traj.extras["negative_prompt_embeds"].repeat_interleave(k, 0)
        x_t = sub.states.flatten(0, 1)  # [B*K, C, h, w]
        t = sub.timesteps.flatten()  # [B*K]
        eps = self._eps(x_t, t, cond, uncond)
        out = ddim_step(self.consts, eps, t, x_t, self.config.eta, prev_sample=sub.actions.flatten(0, 1))
        return out.log_prob.view(b, k)

    @torch.no_grad()
    def continue_from(self, traj: Trajectory, steps: torch.Tensor, n: int, seeds: Any = None) -> Trajectory:
        """``n`` continuations per row from the state before its step ``steps[b]`` (``[B]``);
        rows that branch at the same step are denoised together."""
        steps = check_branch_steps(steps, traj.batch_size, traj.num_steps)
        parent = traj[torch.arange(traj.batch_size).repeat_interleave(n)]
        child_steps = steps.repeat_interleave(n)  # [B*n]
        gens = per_row(as_generators(seeds, parent.batch_size), parent.batch_size)
        states, actions, log_probs = parent.states.clone(), parent.actions.clone(), parent.log_probs.clone()
        for b in child_steps.unique().tolist():
            rows = (child_steps == b).nonzero().view(-1)
            idx = rows.to(self.device)
            row_gens = [gens[i] for i in rows.tolist()]
            st, ac, lp = self._denoise(
                parent.states[idx, b].float(), parent.extras["prompt_embeds"][idx],
                parent.extras["negative_prompt_embeds"][idx], b, row_gens if row_gens[0] is not None else None,
            )
            states[idx, b:], actions[idx, b:], log_probs[idx, b:] = st, ac, lp
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
            outputs=self.decode(actions[:, -1]),
            extras=extras,
        )

    @torch.no_grad()
    def start(self, conditions: Sequence[Any], n_per_condition: int = 1, seeds: Any = None) -> Trajectory:
        """A partial trajectory before its first step: x_T drawn exactly as ``rollout`` draws it,
        every step masked out (``mask`` False) until :meth:`step` takes it."""
        rows = [c for c in conditions for _ in range(n_per_condition)]
        n = len(rows)
        generator = as_generators(seeds, n)
        cond, uncond = self.encode([condition_text(c) for c in rows])
        c, h, w = self.unet.config.in_channels, self.height // self.vae_scale, self.width // self.vae_scale
        latents = randn_tensor((n, c, h, w), generator=generator, device=self.device, dtype=cond.dtype)
        latents = latents.float() * self.scheduler.init_noise_sigma  # x_T [N, C, h, w]
        steps = self.scheduler.timesteps.to(self.device)
        t = len(steps)
        states = torch.zeros(n, t, c, h, w, device=self.device)
        states[:, 0] = latents
        return Trajectory(
            conditions=rows,
            group=torch.arange(len(conditions), device=self.device).repeat_interleave(n_per_condition),
            states=states,
            actions=torch.zeros_like(states),
            timesteps=steps.unsqueeze(0).expand(n, -1).clone(),
            log_probs=torch.zeros(n, t, device=self.device),
            mask=torch.zeros(n, t, dtype=torch.bool, device=self.device),
            step_ids=torch.arange(t, device=self.device).unsqueeze(0).expand(n, -1).clone(),
            extras={"prompt_embeds": cond, "negative_prompt_embeds": uncond},
        )

    def row_generators(self, conditions: Sequence[Any], n_per_condition: int, seeds: Sequence[int]) -> list[torch.Generator]:
        """The generators ``rollout`` builds from ``seeds`` (one per row): passed to :meth:`start`
        and then :meth:`step`, they continue each row's stream, so the steps reproduce ``rollout``."""
        return as_generators(list(seeds), len(conditions) * n_per_condition)

    @torch.no_grad()
    def step(self, traj: Trajectory, step: int, n: int = 1, seeds: Any = None) -> Trajectory:
        """Take step ``step`` from each row's state, ``n`` candidates per row (``B * n`` rows,
        row-major; ``group`` = parent row). The one-step kernel is the rollout's, so ``start``
        followed by T calls with n = 1 and the same generators reproduces ``rollout``."""
        if not 0 <= step < traj.num_steps:
            raise IndexError(f"step {step} outside 0..{traj.num_steps - 1}")
        child = traj[torch.arange(traj.batch_size, device=traj.states.device).repeat_interleave(n)]
        generator = as_generators(seeds, child.batch_size)
        x_t = child.states[:, step].float()
        t_batch = child.timesteps[:, step]
        eps = self._eps(x_t, t_batch, child.extras["prompt_embeds"], child.extras["negative_prompt_embeds"])
        out = ddim_step(self.consts, eps, t_batch, x_t, self.config.eta, generator=generator)
        states, actions, log_probs, mask = child.states.clone(), child.actions.clone(), child.log_probs.clone(), child.mask.clone()
        actions[:, step] = out.prev_sample
        log_probs[:, step] = out.log_prob
        mask[:, step] = True
        if step + 1 < traj.num_steps:
            states[:, step + 1] = out.prev_sample
        finished = step + 1 == traj.num_steps
        return Trajectory(
            conditions=child.conditions,
            group=torch.arange(traj.batch_size, device=self.device).repeat_interleave(n),
            states=states,
            actions=actions,
            timesteps=child.timesteps,
            log_probs=log_probs,
            mask=mask,
            step_ids=child.step_ids,
            outputs=self.decode(out.prev_sample) if finished else None,
            extras=dict(child.extras),
        )

    @torch.no_grad()
    def forward_process(self, conditions: Sequence[Any], outputs: torch.Tensor, seeds: Any = None) -> Trajectory:
        """Trajectories that reach given images, drawn from the forward (noising) process at every
        chain step.

        ``outputs`` ``[B, 3, H, W]`` in [0, 1] are encoded to x_0 (VAE mean); for every chain step
        j (timestep t, previous timestep t') the state is x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε and the action
        x_t' = √ᾱ_t' x_0 + √(1−ᾱ_t'−σ_t²) ε + σ_t z, the DDIM(η) step taken with the true x_0 and ε —
        a draw from q(x_t' | x_t, x_0), with fresh ε, z per step (as Diffusion-DPO draws t). The
        algorithm picks which steps to train. ``log_prob`` of these actions is the Gaussian that
        Diffusion-DPO's noise-prediction loss comes from, so preference losses over them need
        nothing beyond the trajectory seam.
        """
        rows = list(conditions)
        b, k = len(rows), self.config.num_steps
        if outputs.shape[0] != b:
            raise ValueError(f"{b} conditions and {outputs.shape[0]} outputs must match")
        x0 = encode_images(self.pipe.vae, outputs)  # [B, C, h, w]
        steps = torch.arange(k, device=self.device).unsqueeze(0).expand(b, -1)  # [B, T]
        timesteps = self.scheduler.timesteps.to(self.device)[steps]  # [B, T]
        gens = per_row(as_generators(seeds, b), b)
        shape = x0.shape[1:]
        eps = torch.stack([randn_tensor((k, *shape), generator=g, device=self.device) for g in gens])  # [B, T, C, h, w]
        z = torch.stack([randn_tensor((k, *shape), generator=g, device=self.device) for g in gens])
        x0k = x0.unsqueeze(1).expand(-1, k, *shape)  # [B, T, C, h, w]
        a_t, a_prev = self.consts.alphas(timesteps.flatten())  # [B*T] each
        a_t, a_prev = a_t.view(b, k, 1, 1, 1), a_prev.view(b, k, 1, 1, 1)
        sigma, eps_coef = ddim_std_and_eps_coef(a_t, a_prev, self.config.eta)  # σ_t, √(1 − ᾱ_t' − σ_t²)
        states = a_t.sqrt() * x0k + (1 - a_t).sqrt() * eps  # x_t
        mean = a_prev.sqrt() * x0k + eps_coef * eps
        actions = mean + sigma * z  # x_t' ~ q(x_t' | x_t, x_0)
        # The behaviour log-prob is that of the forward posterior q, which drew the actions.
        log_probs = gaussian_log_prob(actions.flatten(0, 1), mean.flatten(0, 1), sigma.flatten(0, 1)).view(b, k)
        cond, uncond = self.encode([condition_text(c) for c in rows])
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
            extras={"prompt_embeds": cond, "negative_prompt_embeds": uncond},
        )

    @torch.no_grad()
    def predict_final(self, traj: Trajectory, step: int) -> torch.Tensor:
        if step == traj.num_steps:
            return self.decode(traj.actions[:, -1])
        x_t, t = traj.states[:, step].float(), traj.timesteps[:, step]
        eps = self._eps(x_t, t, traj.extras["prompt_embeds"], traj.extras["negative_prompt_embeds"])
        x0, _ = predict_x0_eps(self.consts, eps, t, x_t)  # Tweedie estimate x̂0 [B, C, h, w]
        return self.decode(x0)

    def save_pretrained(self, directory: str) -> None:
        """LoRA: diffusers LoRA format (``pipe.load_lora_weights(directory)`` works). Full: a pipeline."""
        self.tuning.save(directory)
        base = portable_location(self.config.pretrained, directory)  # local: relative to `directory`
        meta = {"type": "stable_diffusion", "finetune": self.config.finetune, "base": base, "config": asdict(self.config)}
        with open(os.path.join(directory, POLICY_FILE), "w") as f:
            json.dump(meta, f, indent=2)


def _merge_runtime(saved: StableDiffusionPolicyConfig, given: StableDiffusionPolicyConfig, pretrained: str) -> StableDiffusionPolicyConfig:
    """Saved adapter shape wins; sampling settings given at load time win."""
    return merge_runtime(saved, given, pretrained, base_keys=())


def _load_pipeline(path_or_id: str, revision: str | None) -> StableDiffusionPipeline:
    check_model_location(path_or_id, "pretrained")
    return StableDiffusionPipeline.from_pretrained(
        path_or_id,
        revision=revision,
        safety_checker=None,
        requires_safety_checker=False,
        use_safetensors=True,
        dtype=torch.float32,
    )
