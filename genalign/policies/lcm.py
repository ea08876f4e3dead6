"""One step of multi-step consistency sampling as a Gaussian policy (RLCM's MDP).

Papers: Song et al., "Consistency Models" (2023), Alg. 1 (multistep sampling); Luo et al.,
"Latent Consistency Models" (2023), eq. 9 and Alg. 4; Oertell et al., "RL for Consistency
Models: Faster Reward Guided Text-to-Image Generation" (RLCM, 2024), §4. Symbols:
``t -> τ_n``, ``next_t -> τ_(n+1)``, ``alpha_next -> ᾱ_τ(n+1)``, ``x0 -> f_θ(x_τn, τ_n, c, w)``.

    x̂   = x0-estimate of the model output at τ_n (ε-, v- or x-prediction)
    f_θ = c_skip(τ_n) · x_τn + c_out(τ_n) · x̂          (boundary condition, LCMScheduler's)
    x_τ(n+1) ~ N(√ᾱ_τ(n+1) · f_θ, (1 − ᾱ_τ(n+1)) I)

with c_skip(t) = σ_d² / ((s t)² + σ_d²), c_out(t) = s t / √((s t)² + σ_d²), σ_d = 0.5 and
s = the scheduler's ``timestep_scaling``. The step reproduces ``diffusers.LCMScheduler.step``
(same scalings, same clipping, same noise draw from a generator; tested) and returns
log π(x_τ(n+1) | x_τn), the **mean over latent dims** (:mod:`genalign.distributions`, the
convention of the DDIM step, so DDPO's clip range means the same for both). fp32 throughout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.utils.torch_utils import randn_tensor

from genalign.distributions import gaussian_log_prob
from genalign.policies.ddim import StepOutput, _expand, expand_steps, x0_eps_from_output

#: σ_data of the boundary-condition scalings (LCMScheduler hard-codes it too)
SIGMA_DATA = 0.5


@dataclass(frozen=True)
class LCMConstants:
    """What the step needs from an LCMScheduler, captured once (plain tensors, no state)."""

    alphas_cumprod: torch.Tensor  # [num_train_timesteps] float32
    timesteps: torch.Tensor  # [N] long: the sampling schedule τ_0 > … > τ_(N−1)
    timestep_scaling: float
    prediction_type: str
    clip_sample: bool
    clip_sample_range: float

    @classmethod
    def from_scheduler(cls, scheduler, num_inference_steps: int) -> LCMConstants:
        cfg = scheduler.config
        if getattr(cfg, "thresholding", False):
            raise ValueError(
                "LCM scheduler config has thresholding=True (dynamic thresholding): its x̂0 depends on batch "
                "quantiles, so the step has no per-sample density; set thresholding=False"
            )
        if cfg.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unsupported prediction_type {cfg.prediction_type!r}")
        if num_inference_steps < 2:
            raise ValueError(
                f"num_steps must be >= 2, got {num_inference_steps}: one-step consistency sampling has no "
                "stochastic transition, so there is nothing to score"
            )
        scheduler.set_timesteps(num_inference_steps)
        return cls(
            alphas_cumprod=scheduler.alphas_cumprod.detach().float().cpu(),
            timesteps=scheduler.timesteps.detach().long().cpu().clone(),
            timestep_scaling=float(cfg.timestep_scaling),
            prediction_type=cfg.prediction_type,
            clip_sample=bool(cfg.clip_sample),
            clip_sample_range=float(cfg.clip_sample_range),
        )

    @property
    def num_transitions(self) -> int:
        """Stochastic steps of the chain: N − 1 (the last f_θ output is the sample itself)."""
        return len(self.timesteps) - 1

    def alpha(self, timesteps: torch.Tensor) -> torch.Tensor:
        """ᾱ_t for integer timesteps ``[B]`` -> ``[B]`` float32 on their device."""
        return self.alphas_cumprod[timesteps.long().cpu()].to(timesteps.device)

    def next_timesteps(self, step_ids: torch.Tensor) -> torch.Tensor:
        """τ_(n+1) for chain positions n ``[...]`` (each < N − 1) -> ``[...]`` long."""
        ids = step_ids.long().cpu()
        if ids.numel() and int(ids.max()) >= self.num_transitions:
            raise IndexError(
                f"chain step {int(ids.max())} has no successor in a schedule of {len(self.timesteps)} steps"
            )
        return self.timesteps[ids + 1].to(step_ids.device)


def boundary_scalings(
    timesteps: torch.Tensor, timestep_scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """c_skip, c_out at integer timesteps ``[B]`` -> two ``[B]`` float32 (LCMScheduler's formula)."""
    scaled = timesteps.float() * timestep_scaling
    c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5
    return c_skip, c_out


def consistency_function(
    consts: LCMConstants, model_output: torch.Tensor, timesteps: torch.Tensor, sample: torch.Tensor
) -> torch.Tensor:
    """f_θ(x_t, t) = c_skip x_t + c_out x̂ for model outputs and samples ``[B, C, h, w]`` -> ``[B, C, h, w]``."""
    sample = sample.float()
    x0, _ = x0_eps_from_output(
        model_output, sample, consts.alpha(timesteps), consts.prediction_type
    )
    if consts.clip_sample:
        x0 = x0.clamp(-consts.clip_sample_range, consts.clip_sample_range)
    c_skip, c_out = boundary_scalings(timesteps, consts.timestep_scaling)
    return _expand(c_out, sample) * x0 + _expand(c_skip, sample) * sample


def consistency_step(
    consts: LCMConstants,
    model_output: torch.Tensor,
    timesteps: torch.Tensor,
    next_timesteps: torch.Tensor,
    sample: torch.Tensor,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> StepOutput:
    """One transition x_τn -> x_τ(n+1) with its log-prob.

    model_output, sample: ``[B, C, h, w]``; timesteps, next_timesteps: ``[B]`` ints. If
    ``prev_sample`` is given it is scored instead of drawn; otherwise the noise is drawn exactly
    as ``LCMScheduler.step`` draws it. ``pred_original_sample`` of the result is f_θ.
    """
    denoised = consistency_function(consts, model_output, timesteps, sample)  # f_θ [B, C, h, w]
    alpha_next = consts.alpha(next_timesteps)  # ᾱ_τ(n+1) [B]
    a = _expand(alpha_next, denoised)
    mean = a.sqrt() * denoised  # [B, C, h, w]
    std = (1 - alpha_next).sqrt()  # [B]
    if prev_sample is None:
        noise = randn_tensor(
            model_output.shape,
            generator=generator,
            device=model_output.device,
            dtype=denoised.dtype,
        )
        prev_sample = mean + (1 - a).sqrt() * noise
    log_prob = gaussian_log_prob(prev_sample, mean, _expand(std, denoised))  # [B], mean over dims
    return StepOutput(prev_sample.detach(), log_prob, mean, std, denoised)


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of guidance weights ``[B]`` -> ``[B, dim]`` (the UNet's ``timestep_cond``).

    The same function as ``LatentConsistencyModelPipeline.get_guidance_scale_embedding`` (VDM's
    timestep embedding of 1000·w); the pipeline passes w = guidance_scale − 1.
    """
    w = w.float() * 1000.0
    half = dim // 2
    rate = torch.log(torch.tensor(10000.0)) / (half - 1)  # in fp32, as diffusers computes it
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -rate)  # [half]
    emb = w[:, None] * freqs[None, :].to(w.device)  # [B, half]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    if dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


class LCMKernel:
    """Multi-step consistency sampling as the step kernel of a latent-diffusion policy.

    ``num_steps`` sampling steps make T = N − 1 scored transitions; the sample is f_θ of the last
    action at τ_(N−1) (``finish``). The re-noising has no deterministic twin, so only shared
    initial noise is supported.
    """

    capabilities = frozenset({"shared_noise"})

    def __init__(self, scheduler, num_steps: int):
        from diffusers import LCMScheduler

        self.scheduler = LCMScheduler.from_config(scheduler.config)
        self.consts = LCMConstants.from_scheduler(self.scheduler, num_steps)  # also sets the timesteps
        self.num_steps = self.consts.num_transitions
        self.timesteps = self.consts.timesteps[: self.num_steps]  # [T]: τ_n of each transition
        self.init_noise_sigma = float(self.scheduler.init_noise_sigma)  # x_T = noise · this

    def step(self, model_output, timesteps, step_ids, sample, generator=None, stochastic=None, noise=None,
             prev_sample=None) -> StepOutput:
        if stochastic is not None or noise is not None:
            raise ValueError("a consistency step has no deterministic twin and draws its own noise")
        return consistency_step(self.consts, model_output, timesteps, self.consts.next_timesteps(step_ids), sample,
                                prev_sample=prev_sample, generator=generator)

    def finish(self, sample, model) -> torch.Tensor:
        """f_θ(x_τ(N−1), τ_(N−1)): ``model(latents, timesteps)`` gives the guided model output."""
        t = torch.full((sample.shape[0],), int(self.consts.timesteps[-1]), device=sample.device, dtype=torch.long)
        return consistency_function(self.consts, model(sample, t), t, sample)

    def predict_x0(self, model_output, timesteps, sample) -> torch.Tensor:
        """f_θ of ``sample``: a consistency model's one-step sample."""
        return consistency_function(self.consts, model_output, timesteps, sample)

    def forward_step(self, x0, timesteps, step_ids, eps) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x_τn = √ᾱ_τn x0 + √(1−ᾱ_τn) ε and the transition N(√ᾱ_τ(n+1) x0, (1−ᾱ_τ(n+1)) I) of a
        perfect f_θ (= x0), for ``x0`` ``[B, K, ...]`` at ``timesteps`` ``[B, K]``."""
        a_t = expand_steps(self.consts.alpha(timesteps.flatten()).view(timesteps.shape), x0)
        a_next = expand_steps(self.consts.alpha(self.consts.next_timesteps(step_ids).flatten()).view(step_ids.shape), x0)
        return a_t.sqrt() * x0 + (1 - a_t).sqrt() * eps, a_next.sqrt() * x0, (1 - a_next).sqrt()
