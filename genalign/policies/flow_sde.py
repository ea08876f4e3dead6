"""Flow-GRPO's stochastic sampler for rectified-flow models, as a Gaussian policy step.

Paper: Liu et al., "Flow-GRPO: Training Flow Matching Models via Online RL" (2025), the
ODE-to-SDE conversion; the coefficient-preserving variant is :mod:`genalign.policies.flow_cps`.

A rectified-flow model (SD3, FLUX, Wan) predicts a velocity v_θ(x_σ, σ) along the straight path
x_σ = (1 − σ) x0 + σ ε, σ from 1 (noise) to 0 (data), so v = ε − x0 and

    x̂0 = x − σ v,     ε̂ = x + (1 − σ) v,     score ∇log p_σ(x) = −ε̂ / σ.

The sampler of diffusers (``FlowMatchEulerDiscreteScheduler``) integrates the ODE dx = v dσ.
The reverse-time SDE with the same marginals at every σ adds noise of strength g and corrects
the drift by the score:

    dx = [v + g²/(2σ) (x + (1 − σ) v)] dσ + g dW,      g = a √(σ / (1 − σ)).

One Euler–Maruyama step from σ to σ' < σ (Δ = σ' − σ < 0) is the Gaussian

    μ   = x + [v + g²/(2σ) (x + (1 − σ) v)] Δ
    std = g √(−Δ)
    x'  ~ N(μ, std² I)

``a`` (``noise_level``) sets how stochastic sampling is (Flow-GRPO: 0.7); a → 0 is the ODE
step x + v Δ exactly. At σ = 1, g's denominator 1 − σ is 0: as Flow-GRPO does, it is taken at
the schedule's second σ instead, so the first step has a finite std.

The log-density is the project's unit: the mean over latent dimensions of the elementwise
Gaussian log-density (:func:`genalign.distributions.gaussian_log_prob`). A row can also take the
deterministic twin (the ODE step, log-prob 0), which noise windows (MixGRPO) use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.utils.torch_utils import randn_tensor

from genalign.distributions import gaussian_log_prob
from genalign.policies.ddim import StepOutput, expand_steps


@dataclass(frozen=True)
class FlowSchedule:
    """The σ schedule of a flow-matching scheduler, captured once (plain tensors, no state).

    ``sigmas`` ``[S + 1]``: σ_0 = the first (usually 1) … σ_S = 0; ``timesteps`` ``[S]``: what the
    model is fed at each σ (σ · num_train_timesteps, as the pipelines compute it).
    """

    sigmas: torch.Tensor  # [S + 1] float32
    timesteps: torch.Tensor  # [S] float32

    @classmethod
    def from_scheduler(cls, scheduler, num_steps: int, mu: float | None = None) -> FlowSchedule:
        from diffusers import FlowMatchEulerDiscreteScheduler

        if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
        if getattr(scheduler.config, "stochastic_sampling", False):
            raise ValueError("the scheduler config has stochastic_sampling=True; the flow kernel draws its own noise, "
                             "set stochastic_sampling=False")
        if getattr(scheduler.config, "invert_sigmas", False):
            raise ValueError("inverted σ schedules (invert_sigmas=True) are not supported")
        scheduler.set_timesteps(num_steps, mu=mu)
        sigmas = scheduler.sigmas.detach().float().cpu()
        if float(sigmas[-1]) != 0.0 or bool((sigmas[1:] >= sigmas[:-1]).any()):
            raise ValueError(f"a flow schedule must decrease strictly to σ = 0, got {sigmas.tolist()}")
        return cls(sigmas=sigmas, timesteps=scheduler.timesteps.detach().float().cpu())

    def at(self, step_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """σ and σ' of each step index (any shape) -> two float32 tensors of that shape."""
        ids = step_ids.long().cpu()
        return self.sigmas[ids].to(step_ids.device), self.sigmas[ids + 1].to(step_ids.device)


def x0_eps_from_velocity(velocity: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x̂0 = x − σ v and ε̂ = x + (1 − σ) v; ``sigma`` broadcastable to ``sample``."""
    velocity, sample = velocity.float(), sample.float()
    return sample - sigma * velocity, sample + (1 - sigma) * velocity


def sde_mean_std(velocity: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
                 sigma_cap: float, noise_level: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """μ and std of Flow-GRPO's SDE step (module docstring); ``sigma``, ``sigma_next`` ``[B]``,
    ``noise_level`` one value or ``[B]`` (0: the ODE step, std 0). ``sigma_cap`` stands in for
    σ = 1 in g's denominator. Returns μ ``[B, ...]`` and std ``[B]``."""
    a = torch.as_tensor(noise_level, dtype=torch.float32, device=sample.device).expand(sample.shape[0])  # [B]
    sigma, sigma_next = sigma.float().to(sample.device), sigma_next.float().to(sample.device)
    dt = sigma_next - sigma  # [B], < 0
    g = a * (sigma / (1 - torch.where(sigma >= 1, torch.full_like(sigma, sigma_cap), sigma))).sqrt()  # [B]
    s, d, g2 = (expand_steps(v, sample) for v in (sigma, dt, g * g))
    velocity, sample = velocity.float(), sample.float()
    mean = sample + (velocity + g2 / (2 * s) * (sample + (1 - s) * velocity)) * d
    return mean, g * (-dt).sqrt()


def flow_sde_step(schedule: FlowSchedule, velocity: torch.Tensor, step_ids: torch.Tensor, sample: torch.Tensor,
                  noise_level: float | torch.Tensor, prev_sample: torch.Tensor | None = None,
                  generator: torch.Generator | list[torch.Generator] | None = None,
                  noise: torch.Tensor | None = None) -> StepOutput:
    """One SDE step x_σ -> x_σ' with its log-prob.

    velocity, sample: ``[B, ...]``; step_ids ``[B]`` (index into the schedule; may differ per
    row). ``noise_level``: one value, or ``[B]`` where 0 marks a deterministic row (the ODE
    step, log-prob 0, to be masked out by the caller; its noise is still drawn so every row's
    generator advances the same way). ``prev_sample`` given: it is scored instead of drawn;
    else the noise is drawn as diffusers draws it, or taken from ``noise``.
    """
    a = torch.as_tensor(noise_level, dtype=torch.float32).to(sample.device).expand(sample.shape[0])  # [B]
    if bool((a < 0).any()):
        raise ValueError(f"noise_level must be >= 0, got {noise_level}")
    stochastic = a > 0  # [B]
    if prev_sample is not None and not bool(stochastic.all()):
        raise ValueError("cannot score a deterministic (noise_level = 0) flow step: it has no log-density")
    sigma, sigma_next = schedule.at(step_ids)
    mean, std = sde_mean_std(velocity, sample, sigma, sigma_next, float(schedule.sigmas[1]), a)
    return _gaussian_step(mean, std, stochastic, sample, sigma, velocity, prev_sample, generator, noise)


def _gaussian_step(mean: torch.Tensor, std: torch.Tensor, stochastic: torch.Tensor, sample: torch.Tensor,
                   sigma: torch.Tensor, velocity: torch.Tensor, prev_sample: torch.Tensor | None, generator: object,
                   noise: torch.Tensor | None) -> StepOutput:
    """Draw (or score) x' ~ N(mean, std²) per row; rows not ``stochastic`` take x' = mean, log-prob 0."""
    if bool((std[stochastic] <= 0).any()):
        raise ValueError("this flow step has std = 0 at its σ, so it has no log-density")
    if prev_sample is None:
        if noise is None:
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        prev_sample = mean + expand_steps(std, mean) * noise.float()
    safe = expand_steps(torch.where(stochastic, std, torch.ones_like(std)), mean)
    log_prob = torch.where(stochastic, gaussian_log_prob(prev_sample, mean, safe), torch.zeros_like(std))  # [B]
    x0 = sample.float() - expand_steps(sigma.float().to(sample.device), sample) * velocity.float()
    return StepOutput(prev_sample.detach(), log_prob, mean, std, x0)


class FlowSDEKernel:
    """A stochastic flow-matching step as the step kernel of a latent-diffusion policy.

    ``sde="flow_grpo"``: Flow-GRPO's SDE on every one of the ``num_steps`` steps (T = num_steps;
    the last action, at σ = 0, is the sample). ``sde="cps"``: the coefficient-preserving step
    (:mod:`genalign.policies.flow_cps`), whose last step (to σ = 0) has no noise: T = num_steps − 1
    scored steps and ``finish`` takes the last one, x̂0 of the last action. Every step has a
    deterministic twin (the ODE step), so noise windows and antithetic noise are supported.
    """

    capabilities = frozenset({"shared_noise", "noise_window", "antithetic"})
    init_noise_sigma = 1.0

    def __init__(self, scheduler, num_steps: int, noise_level: float, sde: str = "flow_grpo", mu: float | None = None):
        from diffusers import FlowMatchEulerDiscreteScheduler

        if sde not in ("flow_grpo", "cps"):
            raise ValueError(f"unknown sde {sde!r}; choose flow_grpo or cps")
        if not noise_level > 0:
            raise ValueError(f"noise_level must be > 0 (0 is the ODE, which has no log-density), got {noise_level}")
        if sde == "cps" and not noise_level <= 1:
            raise ValueError(f"the coefficient-preserving step needs noise_level in (0, 1], got {noise_level}")
        if sde == "cps" and num_steps < 2:
            raise ValueError("the coefficient-preserving sampler needs num_steps >= 2 (its last step is deterministic)")
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
        self.schedule = FlowSchedule.from_scheduler(self.scheduler, num_steps, mu)
        self.sde, self.noise_level = sde, noise_level
        self.num_steps = num_steps if sde == "flow_grpo" else num_steps - 1
        self.timesteps = self.schedule.timesteps[: self.num_steps]  # [T]: what the model sees at each scored step

    def step(self, model_output, timesteps, step_ids, sample, generator=None, stochastic=None, noise=None,
             prev_sample=None) -> StepOutput:
        """Step ``sample`` ``[N, ...]`` (the guided velocity ``model_output``); ``stochastic`` ``[N]``
        bool marks rows that draw noise (the others take the ODE step, log-prob 0); None: every row."""
        a = self.noise_level if stochastic is None else stochastic.float() * self.noise_level
        if self.sde == "cps":
            from genalign.policies.flow_cps import cps_step

            return cps_step(self.schedule, model_output, step_ids, sample, a, prev_sample=prev_sample,
                            generator=generator, noise=noise)
        return flow_sde_step(self.schedule, model_output, step_ids, sample, a, prev_sample=prev_sample,
                             generator=generator, noise=noise)

    def finish(self, sample, model) -> torch.Tensor:
        """The clean latents: the last action (flow_grpo), or x̂0 at the last σ (cps)."""
        if self.sde == "flow_grpo":
            return sample
        t = self.schedule.timesteps[-1].to(sample.device).expand(sample.shape[0])
        return x0_eps_from_velocity(model(sample, t), sample, float(self.schedule.sigmas[-2]))[0]

    def predict_x0(self, model_output, timesteps, sample) -> torch.Tensor:
        """x̂0 = x − σ v at ``timesteps`` ``[N]`` (each one of the schedule's)."""
        sigma = self._sigma_of(timesteps)
        return x0_eps_from_velocity(model_output, sample, expand_steps(sigma, sample))[0]

    def _sigma_of(self, timesteps: torch.Tensor) -> torch.Tensor:
        table = self.schedule.timesteps.to(timesteps.device)
        hit = (timesteps.float().reshape(-1, 1) == table[None]).float()  # [N, S]
        if not bool((hit.sum(1) == 1).all()):
            raise ValueError(f"timesteps {timesteps.tolist()} are not all on this kernel's schedule")
        return self.schedule.sigmas[hit.argmax(1).cpu()].to(timesteps.device).view(timesteps.shape)

    def forward_step(self, x0, timesteps, step_ids, eps) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """State, mean and std of the kernel's step taken with the true x0 and ε, for clean latents
        ``x0`` ``[B, K, ...]`` at steps ``step_ids`` ``[B, K]``: x_σ = (1 − σ) x0 + σ ε and the step's
        Gaussian with v = ε − x0."""
        b, k = step_ids.shape
        sigma, _ = self.schedule.at(step_ids)  # [B, K]
        state = (1 - expand_steps(sigma, x0)) * x0 + expand_steps(sigma, x0) * eps
        flat = lambda v: v.flatten(0, 1)  # noqa: E731  [B*K, ...]
        out = self.step(flat(eps - x0), flat(timesteps), flat(step_ids), flat(state),
                        noise=torch.zeros_like(flat(state)))
        mean = out.mean.view_as(x0)
        return state, mean, expand_steps(out.std.view(b, k), x0)
