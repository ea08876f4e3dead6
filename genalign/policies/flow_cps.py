"""The coefficient-preserving SDE step for rectified-flow models (Flow-CPS).

Paper: Wang & Yu, "Coefficients-Preserving Sampling for Reinforcement Learning with Flow
Matching" (2025). Flow-GRPO's Euler–Maruyama step (:mod:`genalign.policies.flow_sde`) adds
more noise than the next state's noise coefficient accounts for, so its samples stay noisy
at few steps. This step instead rebuilds the next state with the coefficients the straight
path has at σ': with x̂0 = x − σ v and ε̂ = x + (1 − σ) v,

    std = σ' sin(a π / 2)
    μ   = (1 − σ') x̂0 + √(σ'² − std²) ε̂ = (1 − σ') x̂0 + σ' cos(a π / 2) ε̂
    x'  ~ N(μ, std² I)

so the noise in x' has total coefficient σ', as the path x_σ' = (1 − σ') x0 + σ' ε requires.
a = 0 is the ODE (Euler) step x + (σ' − σ) v; a = 1 replaces ε̂ by fresh noise (diffusers'
``stochastic_sampling``). The step into σ' = 0 has std 0: it is the deterministic x̂0, which
the kernel takes as its ``finish``. Log-prob unit: the mean over latent dimensions.
"""

from __future__ import annotations

import math

import torch

from genalign.policies.ddim import StepOutput, expand_steps
from genalign.policies.flow_sde import FlowSchedule, _gaussian_step, x0_eps_from_velocity


def cps_mean_std(velocity: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
                 noise_level: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """μ ``[B, ...]`` and std ``[B]`` of the coefficient-preserving step; ``sigma``, ``sigma_next``,
    ``noise_level`` ``[B]`` (noise_level 0: the ODE step)."""
    sigma, sigma_next = sigma.float().to(sample.device), sigma_next.float().to(sample.device)
    angle = noise_level.float().to(sample.device) * (math.pi / 2)  # [B]
    x0, eps = x0_eps_from_velocity(velocity, sample, expand_steps(sigma, sample))
    mean = expand_steps(1 - sigma_next, x0) * x0 + expand_steps(sigma_next * torch.cos(angle), eps) * eps
    return mean, sigma_next * torch.sin(angle)


def cps_step(schedule: FlowSchedule, velocity: torch.Tensor, step_ids: torch.Tensor, sample: torch.Tensor,
             noise_level: float | torch.Tensor, prev_sample: torch.Tensor | None = None,
             generator: torch.Generator | list[torch.Generator] | None = None,
             noise: torch.Tensor | None = None) -> StepOutput:
    """One coefficient-preserving step x_σ -> x_σ' with its log-prob; arguments as
    :func:`genalign.policies.flow_sde.flow_sde_step` (``noise_level`` in [0, 1], 0 per row: the
    ODE step with log-prob 0)."""
    a = torch.as_tensor(noise_level, dtype=torch.float32).to(sample.device).expand(sample.shape[0])  # [B]
    if bool((a < 0).any()) or bool((a > 1).any()):
        raise ValueError(f"noise_level must lie in [0, 1] for the coefficient-preserving step, got {noise_level}")
    stochastic = a > 0
    if prev_sample is not None and not bool(stochastic.all()):
        raise ValueError("cannot score a deterministic (noise_level = 0) flow step: it has no log-density")
    sigma, sigma_next = schedule.at(step_ids)
    mean, std = cps_mean_std(velocity, sample, sigma, sigma_next, a)
    return _gaussian_step(mean, std, stochastic, sample, sigma, velocity, prev_sample, generator, noise)
