"""One latent-diffusion policy over the denoising MDP: a backbone composed with a step kernel.

State s_j = (x_j, t_j, c), action a_j = x_(j+1), transition = the kernel's stochastic step.

- The **backbone** (:mod:`genalign.policies.backbones`) says what the latents are: their shape
  (images ``[C, h, w]``, videos ``[C, F, h, w]``), how they cross the VAE, which denoiser (a
  UNet, or an SD3 MMDiT transformer) reads which prompt embeddings, which pipeline class saves
  LoRA adapters.
- The **step kernel** says how a step moves them and what its log-density is: DDIM(η)
  (:class:`genalign.policies.ddim.DDIMKernel`; T = num_steps, the last action is the sample),
  multi-step consistency sampling (:class:`genalign.policies.lcm.LCMKernel`; T = N − 1, the
  sample is f_θ of the last action) or a flow-matching SDE
  (:class:`genalign.policies.flow_sde.FlowSDEKernel`: Flow-GRPO's, or the coefficient-preserving
  step). Kernels declare their sampling ``capabilities``.
- **Guidance** is the policy's: classifier-free guidance ε_u + w (ε_c − ε_u), or a guidance
  embedding fed to a distilled UNet (``timestep_cond``), or none.

No line here depends on the latent rank or the denoiser's architecture, so Stable Diffusion,
consistency models, video diffusion and rectified-flow transformers are this one class with
different parts (:class:`~genalign.policies.StableDiffusionPolicy`,
:class:`~genalign.policies.ConsistencyPolicy`, :class:`~genalign.policies.VideoDiffusionPolicy`,
:class:`~genalign.policies.FlowMatchingPolicy`).

**States and actions are stored once.** Along a sampled chain a_j = s_(j+1), so a rollout keeps
one ``[B, T+1, ...]`` tensor and ``states``/``actions`` are two views of it
(:func:`genalign.trajectory.chained`); trajectory indexing, concatenation and moves keep them
shared. Trajectories drawn from the forward process have independent states and actions.

Rollouts draw their noise exactly as the diffusers pipelines do (x_T from ``randn_tensor`` over
the latent shape, then each step's noise from each row's generator), so a seed gives the same
sample here and in plain diffusers (tested for the image pipelines).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor
from peft import LoraConfig

from genalign import timing
from genalign.conditions import condition_text
from genalign.distributions import gaussian_log_prob
from genalign.policies.base import check_options
from genalign.policies.lcm import guidance_embedding
from genalign.policies.unet_tuning import (
    DenoiserFinetune,
    as_generators,
    check_branch_steps,
    make_lora_config,
    per_row,
    scale_model_input,
)
from genalign.policies.window import NoiseWindow, mirror_pairs
from genalign.trajectory import Trajectory, chained, full_chain


class LatentDiffusionPolicy:
    """A diffusers pipeline behind the Policy protocol: ``backbone`` + ``kernel`` + guidance.

    ``guidance_scale`` w: with ``embed_dim`` set the UNet gets the embedding of w − 1 and one
    forward pass; otherwise w != 1 runs classifier-free guidance against ``negative_prompt``.
    """

    step_chunk = 1  # one UNet call (with CFG: 2B rows) per scored step keeps memory flat
    log_prob_unit = "dimension_mean"  # the step's Gaussian log-density, averaged over latent dims

    def __init__(self, pipeline: Any, config: Any, backbone: Any, kernel: Any, guidance_scale: float,
                 embed_dim: int | None = None, negative_prompt: str = ""):
        self.config, self.pipe, self.backbone, self.kernel = config, pipeline, backbone, kernel
        self.denoiser = backbone.denoiser  # the UNet or transformer that fine-tuning adapts
        self.scheduler = kernel.scheduler
        self.consts = getattr(kernel, "consts", None)
        #: width of the guidance embedding; None: classifier-free guidance (or none at w = 1)
        self.embed_dim = embed_dim
        self.guidance_scale = guidance_scale
        self.cfg = embed_dim is None and guidance_scale != 1.0
        self.negative_prompt = negative_prompt
        self.tuning = DenoiserFinetune(pipeline, config.finetune, self.lora_config(), config.weight_dtype,
                                       config.gradient_checkpointing, config.xformers, backbone.denoiser_name)
        self.pipe.set_progress_bar_config(disable=True)
        # the denoiser's weight dtype, read once: diffusers' ``.dtype`` walks every submodule, and
        # the model is called once per step (fine-tuning never changes the dtype)
        self.model_dtype = self.denoiser.dtype
        self._negative_cache: tuple[Any, dict[str, torch.Tensor]] | None = None  # (prompt, device), embeddings

    def lora_config(self) -> LoraConfig:
        """The adapters of ``finetune: lora`` from the config's ``lora_rank``, ``lora_alpha``, ``lora_targets``."""
        c = self.config
        return make_lora_config(c.lora_rank, c.lora_alpha, c.lora_targets)

    # -- protocol: training ----------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    @property
    def timesteps(self) -> torch.Tensor:
        """t of each scored step: ``[T]`` long on the policy's device."""
        return self.kernel.timesteps.to(self.device)

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

    # -- the model -------------------------------------------------------------------------
    def _embed_keys(self) -> tuple[str, ...]:
        keys = self.backbone.embed_keys
        return (*keys, *(f"negative_{k}" for k in keys)) if self.cfg else keys

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Prompt embeddings as the pipeline computes them (``[B, L, D]``, with an SD3 backbone
        also pooled ``[B, D']``), and the negative prompt's with CFG (keys ``negative_*``)."""
        prompts = list(prompts)
        embeds = self.backbone.encode_prompt(prompts, None)
        if self.cfg:  # the negative prompt is the same for every row: encoded once, then broadcast
            for key, value in self._negative_embeds().items():
                embeds[f"negative_{key}"] = value.expand(len(prompts), *value.shape[1:])
        return embeds

    def _negative_embeds(self) -> dict[str, torch.Tensor]:
        """The negative prompt's embeddings ``[1, ...]`` per embed key, encoded on first use (the
        text encoders are never trained; a changed ``negative_prompt`` or device is re-encoded)."""
        key = (self.negative_prompt, str(self.device))
        if self._negative_cache is None or self._negative_cache[0] != key:
            self._negative_cache = (key, self.backbone.encode_prompt([self.negative_prompt], None))
        return self._negative_cache[1]

    def _model_output(self, latents: torch.Tensor, t: torch.Tensor, embeds: dict[str, torch.Tensor]) -> torch.Tensor:
        """Guided denoiser output (fp32) for latents ``[N, ...]`` at timesteps ``[N]``.

        The one path to the denoiser: the scheduler's model-input scaling is applied here, so
        rollouts, single steps, recomputed log-probs and x̂0 predictions all see the same input.
        """
        latents = scale_model_input(self.scheduler, latents, t)
        module, dtype = self.tuning.module, self.model_dtype
        keys = self.backbone.embed_keys
        cond = {k: embeds[k].to(dtype) for k in keys}
        forward = self.backbone.forward
        if self.embed_dim is not None:
            w = torch.full((latents.shape[0],), self.guidance_scale - 1.0, device=latents.device)  # [N]
            w_emb = guidance_embedding(w, self.embed_dim).to(dtype)  # [N, D_w]
            return forward(module, latents.to(dtype), t, cond, timestep_cond=w_emb).float()
        if not self.cfg:
            return forward(module, latents.to(dtype), t, cond).float()
        x = torch.cat([latents, latents]).to(dtype)  # [2N, ...], uncond rows first as in diffusers
        both = {k: torch.cat([embeds[f"negative_{k}"].to(dtype), cond[k]]) for k in keys}
        out_u, out_c = forward(module, x, torch.cat([t, t]), both).float().chunk(2)
        return out_u + self.guidance_scale * (out_c - out_u)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Clean latents ``[N, ...]`` -> outputs (images ``[N, 3, H, W]``, clips ``[N, F, 3, H, W]``)."""
        with timing.phase("decode"):
            return self.backbone.decode(latents)

    def _finish(self, latents: torch.Tensor, embeds: dict[str, torch.Tensor]) -> torch.Tensor:
        """The sample's clean latents from the last action ``[N, ...]``."""
        return self.kernel.finish(latents, lambda x, t: self._model_output(x, t, embeds))

    def _denoise(self, latents: torch.Tensor, embeds: dict[str, torch.Tensor], first_step: int, generator: Any,
                 stochastic: torch.Tensor | None = None, antithetic: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run steps ``first_step..T-1`` from ``latents`` ``[N, ...]``.

        Returns the chain ``[N, T'+1, ...]`` (the start, then every action), log-probs ``[N, T']``
        and the sample's clean latents ``[N, ...]``. ``stochastic`` ``[N, T]`` bool: steps that
        draw noise (the others take the kernel's deterministic step and get log-prob 0); None:
        every step. ``antithetic``: row 2k+1 takes the negated step noise of row 2k.
        """
        chain, log_probs = [latents], []
        n = latents.shape[0]
        for j in range(first_step, self.kernel.num_steps):
            t = self.kernel.timesteps[j].to(latents.device).expand(n).clone()  # [N]: the kernel's dtype
            ids = torch.full((n,), j, device=latents.device, dtype=torch.long)
            noise = None
            if antithetic:
                noise = mirror_pairs(randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype))
            out = self.kernel.step(self._model_output(latents, t, embeds), t, ids, latents, generator=generator,
                                   stochastic=None if stochastic is None else stochastic[:, j], noise=noise)
            latents = out.prev_sample.to(latents.dtype)
            chain.append(latents)
            log_probs.append(out.log_prob)
        return torch.stack(chain, 1), torch.stack(log_probs, 1), self._finish(latents, embeds)

    def _groups(self, n_groups: int, per_group: int) -> torch.Tensor:
        return torch.arange(n_groups, device=self.device).repeat_interleave(per_group)  # [N]

    def _chain_trajectory(self, rows: list[Any], group: torch.Tensor, chain: torch.Tensor, log_probs: torch.Tensor,
                          mask: torch.Tensor, outputs: Any, extras: dict[str, Any]) -> Trajectory:
        """A trajectory over a whole sampled chain ``[N, T+1, ...]`` (states and actions its two views)."""
        n, t = log_probs.shape
        states, actions = chained(chain)
        return Trajectory(
            conditions=rows,
            group=group,
            states=states,
            actions=actions,
            timesteps=self.timesteps.unsqueeze(0).expand(n, -1).clone(),
            log_probs=log_probs,
            mask=mask,
            step_ids=torch.arange(t, device=self.device).unsqueeze(0).expand(n, -1).clone(),
            outputs=outputs,
            extras=extras,
        )

    def _initial_noise(self, n_cond: int, n_per_condition: int, generator: Any, dtype: torch.dtype,
                       shared_noise: bool) -> torch.Tensor:
        """x_T ``[N, ...]`` as the pipelines draw it; with ``shared_noise`` each condition's first
        generator draws its group's x_T (later step noise still comes from every row's own)."""
        shape = (n_cond * n_per_condition, *self.backbone.latent_shape())
        if shared_noise:
            first = generator[::n_per_condition] if isinstance(generator, list) else generator
            latents = randn_tensor((n_cond, *shape[1:]), generator=first, device=self.device, dtype=dtype)
            latents = latents.repeat_interleave(n_per_condition, 0)
        else:
            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=dtype)
        return latents.float() * self.kernel.init_noise_sigma

    # -- protocol: sampling ----------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, conditions: Sequence[Any], n_per_condition: int = 1, seeds: Any = None, shared_noise: bool = False,
                noise_window: NoiseWindow | None = None, antithetic: bool = False, **options: Any) -> Trajectory:
        """``seeds``: one int per row (or diffusers-style generators); options: those named in
        ``capabilities`` (``shared_noise``, and with a DDIM kernel ``noise_window``, ``antithetic``)."""
        check_options(type(self).__name__, self.capabilities,
                      dict(options, noise_window=noise_window is not None, antithetic=antithetic))
        if antithetic and (not shared_noise or n_per_condition % 2):
            raise ValueError(
                f"antithetic pairs need shared_noise and an even number of samples per condition, got "
                f"shared_noise={shared_noise}, n_per_condition={n_per_condition}"
            )
        rows = [c for c in conditions for _ in range(n_per_condition)]
        n = len(rows)
        generator = as_generators(seeds, n)
        embeds = self.encode([condition_text(c) for c in rows])
        latents = self._initial_noise(len(conditions), n_per_condition, generator, embeds["prompt_embeds"].dtype, shared_noise)
        stochastic = None
        if noise_window is not None:
            if len(noise_window.starts) != len(conditions):
                raise ValueError(f"noise window has {len(noise_window.starts)} starts for {len(conditions)} conditions")
            stochastic = noise_window.mask(n_per_condition, self.kernel.num_steps, self.device)  # [N, T]
        chain, log_probs, sample = self._denoise(latents, embeds, 0, generator, stochastic, antithetic)
        mask = torch.ones(n, self.kernel.num_steps, dtype=torch.bool, device=self.device) if stochastic is None else stochastic
        return self._chain_trajectory(rows, self._groups(len(conditions), n_per_condition), chain, log_probs, mask,
                                      self.decode(sample), embeds)

    def log_prob(self, traj: Trajectory, steps: Sequence[int] | torch.Tensor) -> torch.Tensor:
        sub = traj.subset(steps)
        b, k = sub.log_probs.shape
        embeds = {key: traj.extras[key].repeat_interleave(k, 0) for key in self._embed_keys()}  # [B*K, L, D]
        x_t = sub.states.flatten(0, 1)  # [B*K, ...]
        t = sub.timesteps.flatten()  # [B*K]
        out = self.kernel.step(self._model_output(x_t, t, embeds), t, sub.step_ids.flatten(), x_t,
                               prev_sample=sub.actions.flatten(0, 1))
        return out.log_prob.view(b, k)

    @torch.no_grad()
    def continue_from(self, traj: Trajectory, steps: torch.Tensor, n: int, seeds: Any = None) -> Trajectory:
        """``n`` continuations per row from the state before its step ``steps[b]`` (``[B]``);
        rows that branch at the same step are denoised together."""
        steps = check_branch_steps(steps, traj.batch_size, traj.num_steps)
        parent = traj[torch.arange(traj.batch_size).repeat_interleave(n)]
        child_steps = steps.repeat_interleave(n)  # [B*n]
        gens = per_row(as_generators(seeds, parent.batch_size), parent.batch_size)
        chain, log_probs = full_chain(parent).clone(), parent.log_probs.clone()  # [B*n, T+1, ...]
        samples = torch.zeros_like(chain[:, -1])
        for b in child_steps.unique().tolist():
            idx = (child_steps == b).nonzero().view(-1).to(self.device)
            row_gens = [gens[i] for i in idx.tolist()]
            embeds = {key: parent.extras[key][idx] for key in self._embed_keys()}
            part, lp, sample = self._denoise(parent.states[idx, b].float(), embeds, b, row_gens if row_gens[0] is not None else None)
            chain[idx, b:], log_probs[idx, b:], samples[idx] = part, lp, sample
        extras = dict(parent.extras)
        extras["branch_step"] = child_steps.to(self.device)
        return self._chain_trajectory(parent.conditions, self._groups(traj.batch_size, n), chain, log_probs, parent.mask,
                                      self.decode(samples), extras)

    @torch.no_grad()
    def start(self, conditions: Sequence[Any], n_per_condition: int = 1, seeds: Any = None) -> Trajectory:
        """A partial trajectory before its first step: x_T drawn exactly as ``rollout`` draws it,
        every step masked out (``mask`` False) until :meth:`step` takes it."""
        rows = [c for c in conditions for _ in range(n_per_condition)]
        n, t = len(rows), self.kernel.num_steps
        generator = as_generators(seeds, n)
        embeds = self.encode([condition_text(c) for c in rows])
        latents = randn_tensor((n, *self.backbone.latent_shape()), generator=generator, device=self.device,
                               dtype=embeds["prompt_embeds"].dtype)
        chain = torch.zeros(n, t + 1, *latents.shape[1:], device=self.device)
        chain[:, 0] = latents.float() * self.kernel.init_noise_sigma
        return self._chain_trajectory(rows, self._groups(len(conditions), n_per_condition), chain,
                                      torch.zeros(n, t, device=self.device),
                                      torch.zeros(n, t, dtype=torch.bool, device=self.device), None, embeds)

    def row_generators(self, conditions: Sequence[Any], n_per_condition: int, seeds: Sequence[int]) -> list[torch.Generator]:
        """The generators ``rollout`` builds from ``seeds`` (one per row): passed to :meth:`start`
        and then :meth:`step`, they continue each row's stream, so the steps reproduce ``rollout``."""
        return as_generators(list(seeds), len(conditions) * n_per_condition)

    @torch.no_grad()
    def step(self, traj: Trajectory, step: int, n: int = 1, seeds: Any = None) -> Trajectory:
        """Take step ``step`` from each row's state, ``n`` candidates per row (``B * n`` rows,
        row-major; ``group`` = parent row). The kernel is the rollout's, so ``start`` followed by
        T calls with n = 1 and the same generators reproduces ``rollout``; after the last step
        ``outputs`` holds the decoded samples."""
        if not 0 <= step < traj.num_steps:
            raise IndexError(f"step {step} outside 0..{traj.num_steps - 1}")
        child = traj[torch.arange(traj.batch_size, device=traj.states.device).repeat_interleave(n)]
        generator = as_generators(seeds, child.batch_size)
        embeds = {key: child.extras[key] for key in self._embed_keys()}
        x_t = child.states[:, step].float()
        t = child.timesteps[:, step]
        out = self.kernel.step(self._model_output(x_t, t, embeds), t, child.step_ids[:, step], x_t, generator=generator)
        chain, log_probs, mask = full_chain(child).clone(), child.log_probs.clone(), child.mask.clone()
        chain[:, step + 1] = out.prev_sample
        log_probs[:, step] = out.log_prob
        mask[:, step] = True
        finished = step + 1 == traj.num_steps
        outputs = self.decode(self._finish(out.prev_sample, embeds)) if finished else None
        return self._chain_trajectory(child.conditions, self._groups(traj.batch_size, n), chain, log_probs, mask, outputs,
                                      dict(child.extras))

    @torch.no_grad()
    def forward_process(self, conditions: Sequence[Any], outputs: torch.Tensor, seeds: Any = None) -> Trajectory:
        """Trajectories that reach given outputs, drawn from the forward (noising) process.

        ``outputs`` are encoded to x_0 (VAE mean). For every chain step j (fresh ε, z per step, as
        Diffusion-DPO draws t) the state is x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε and the action is drawn
        from the kernel's step taken with the true x_0 (DDIM: the posterior q(x_t' | x_t, x_0);
        consistency: N(√ᾱ_t' x_0, (1−ᾱ_t') I), a perfect f_θ). ``log_probs`` are that Gaussian's;
        log π_θ of these actions is a denoising regression onto x_0, which is what preference
        losses over off-policy outputs (Diffusion-DPO, SePPO) need. The algorithm picks the steps.
        """
        rows = list(conditions)
        b, k = len(rows), self.kernel.num_steps
        if len(outputs) != b:
            raise ValueError(f"{b} conditions and {len(outputs)} outputs must match")
        x0 = self.backbone.encode(outputs)  # [B, ...]
        steps = torch.arange(k, device=self.device).unsqueeze(0).expand(b, -1)  # [B, T]
        timesteps = self.timesteps[steps]  # [B, T]
        gens = per_row(as_generators(seeds, b), b)
        shape = x0.shape[1:]
        eps = torch.stack([randn_tensor((k, *shape), generator=g, device=self.device) for g in gens])  # [B, T, ...]
        z = torch.stack([randn_tensor((k, *shape), generator=g, device=self.device) for g in gens])
        x0k = x0.unsqueeze(1).expand(-1, k, *shape)  # [B, T, ...]
        states, mean, std = self.kernel.forward_step(x0k, timesteps, steps, eps)
        actions = mean + std * z
        log_probs = gaussian_log_prob(actions.flatten(0, 1), mean.flatten(0, 1), std.expand_as(mean).flatten(0, 1)).view(b, k)
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
        """The decoded estimate of the final sample from the state before ``step`` (the kernel's
        x̂0: DDIM's Tweedie estimate, a consistency model's one-step sample); ``step == T``: the
        finished output."""
        embeds = {key: traj.extras[key] for key in self._embed_keys()}
        if step == traj.num_steps:
            return self.decode(self._finish(traj.actions[:, -1].float(), embeds))
        x_t, t = traj.states[:, step].float(), traj.timesteps[:, step]
        return self.decode(self.kernel.predict_x0(self._model_output(x_t, t, embeds), t, x_t))

