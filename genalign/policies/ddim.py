"""The stochastic DDIM step (eta > 0) as a Gaussian policy with a closed-form log-prob.

Paper: Song et al., "Denoising Diffusion Implicit Models" (2021), eq. 12, as used by
DDPO (Black et al., 2023). Symbols: ``alpha_t -> ᾱ_t``, ``alpha_prev -> ᾱ_t'``,
``x0_hat -> x̂0`` (the Tweedie estimate), ``std -> σ_t``, ``mean -> μ``.

    x̂0  = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t
    σ_t = η √((1−ᾱ_t')/(1−ᾱ_t)) √(1 − ᾱ_t/ᾱ_t')
    μ   = √ᾱ_t' x̂0 + √(1 − ᾱ_t' − σ_t²) ε
    x_t' ~ N(μ, σ_t² I)

The ε coefficient is computed in the factored form

    1 − ᾱ_t' − σ_t² = (1−ᾱ_t') · [(1−ᾱ_t) − η² (1 − ᾱ_t/ᾱ_t')] / (1−ᾱ_t)

(see :func:`ddim_std_and_eps_coef`), which is exactly 0 in float arithmetic where it is 0
in exact arithmetic (η = 1 from a zero-terminal-SNR ᾱ_T = 0, or ᾱ_t' = 1), whatever the
last bits of the schedule.

The step reproduces ``diffusers.DDIMScheduler.step`` (same prev-timestep rule, same
clipping, same noise draw from a generator) and additionally returns log π(x_t' | x_t),
the mean over latent dims (see :mod:`genalign.distributions`). Everything runs in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.utils.torch_utils import randn_tensor

from genalign.distributions import gaussian_log_prob


@dataclass(frozen=True)
class DDIMConstants:
    """What the step needs from a DDIMScheduler, captured once (plain tensors, no state)."""

    alphas_cumprod: torch.Tensor  # [num_train_timesteps] float32
    final_alpha_cumprod: float
    step_size: int  # num_train_timesteps // num_inference_steps
    prediction_type: str
    clip_sample: bool
    clip_sample_range: float

    @classmethod
    def from_scheduler(cls, scheduler, num_inference_steps: int) -> DDIMConstants:
        cfg = scheduler.config
        if getattr(cfg, "thresholding", False):
            raise ValueError(
                "DDIM scheduler config has thresholding=True (dynamic thresholding): its x̂0 depends "
                "on batch quantiles, so the step has no per-sample density; set thresholding=False"
            )
        if cfg.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unsupported prediction_type {cfg.prediction_type!r}")
        if cfg.set_alpha_to_one:
            raise ValueError(
                "DDIM scheduler config has set_alpha_to_one=True: the final step is deterministic "
                "(σ = 0) and has no log-density; use set_alpha_to_one=False (Stable Diffusion's setting)"
            )
        return cls(
            alphas_cumprod=scheduler.alphas_cumprod.detach().float().cpu(),
            final_alpha_cumprod=float(scheduler.final_alpha_cumprod),
            step_size=cfg.num_train_timesteps // num_inference_steps,
            prediction_type=cfg.prediction_type,
            clip_sample=bool(cfg.clip_sample),
            clip_sample_range=float(cfg.clip_sample_range),
        )

    def alphas(self, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ᾱ_t and ᾱ_t' for integer timesteps ``[B]`` -> two ``[B]`` float32 tensors."""
        t = timesteps.long().cpu()
        prev = t - self.step_size
        table = self.alphas_cumprod
        alpha_t = table[t]
        alpha_prev = torch.where(prev >= 0, table[prev.clamp(min=0)], torch.full_like(alpha_t, self.final_alpha_cumprod))
        return alpha_t.to(timesteps.device), alpha_prev.to(timesteps.device)


@dataclass
class StepOutput:
    prev_sample: torch.Tensor  # x_t'  [B, C, h, w]
    log_prob: torch.Tensor  # [B]
    mean: torch.Tensor  # μ     [B, C, h, w]
    std: torch.Tensor  # σ_t   [B]
    pred_original_sample: torch.Tensor  # x̂0 [B, C, h, w]


def _expand(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.ndim - 1)))


def x0_eps_from_output(
    model_output: torch.Tensor, sample: torch.Tensor, alpha_t: torch.Tensor, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """x̂0 and ε (fp32, no clipping) from a model output of any prediction type, given ᾱ_t ``[B]``.

    model_output, sample: ``[B, C, h, w]``. Shared by every scheduler-shaped step (DDIM, LCM)
    and by the consistency distillation's teacher.
    """
    model_output, sample = model_output.float(), sample.float()
    a = _expand(alpha_t.to(sample.device, torch.float32), sample)  # [B, 1, 1, 1]
    if prediction_type == "epsilon":
        x0 = (sample - (1 - a).sqrt() * model_output) / a.sqrt()
        eps = model_output
    elif prediction_type == "v_prediction":
        x0 = a.sqrt() * sample - (1 - a).sqrt() * model_output
        eps = a.sqrt() * model_output + (1 - a).sqrt() * sample
    elif prediction_type == "sample":
        x0 = model_output
        eps = (sample - a.sqrt() * x0) / (1 - a).sqrt()
    else:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}")
    return x0, eps


def predict_x0_eps(
    consts: DDIMConstants, model_output: torch.Tensor, timesteps: torch.Tensor, sample: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """x̂0 and ε from the model output, for any prediction type (clipping applied to x̂0)."""
    alpha_t, _ = consts.alphas(timesteps)
    x0, eps = x0_eps_from_output(model_output, sample, alpha_t, consts.prediction_type)
    if consts.clip_sample:
        # diffusers clips x̂0 but keeps ε as predicted (use_clipped_model_output=False).
        x0 = x0.clamp(-consts.clip_sample_range, consts.clip_sample_range)
    return x0, eps


def ddim_std_and_eps_coef(
    alpha_t: torch.Tensor, alpha_prev: torch.Tensor, eta: float | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """σ_t and the ε coefficient √(1 − ᾱ_t' − σ_t²) of the DDIM(η) step, elementwise (fp32).

    ``alpha_t``, ``alpha_prev``: ᾱ_t and ᾱ_t' of any (same) shape; ``eta``: one value or a
    tensor broadcastable to them. With r = 1 − ᾱ_t/ᾱ_t' and σ_t² = η² (1−ᾱ_t') r / (1−ᾱ_t),

        1 − ᾱ_t' − σ_t² = (1−ᾱ_t') · [(1−ᾱ_t) − η² r] / (1−ᾱ_t).

    Subtracting σ_t² from 1 − ᾱ_t' after rounding both leaves a residue of a few 1e-8 where
    the exact value is 0, and its square root (~2e-4) then multiplies ε. In the factored form
    the zero cases are exact: at ᾱ_t = 0, r = 1 − 0 = 1 and the bracket is 1 − η² (0 at η = 1);
    at ᾱ_t' = 1 the factor 1 − ᾱ_t' is 0. ᾱ_t = 1 (no noise at t; then ᾱ_t' = 1 too) has no
    stochastic step: σ_t = 0 and the coefficient is √(1 − ᾱ_t') = 0. The clamp only guards
    η > 1, where the DDIM step is undefined.
    """
    alpha_t, alpha_prev = alpha_t.float(), alpha_prev.float()
    eta = torch.as_tensor(eta, dtype=torch.float32, device=alpha_t.device)
    one_minus_a = 1 - alpha_t  # 1 − ᾱ_t
    noisy = one_minus_a > 0
    denom = torch.where(noisy, one_minus_a, torch.ones_like(one_minus_a))
    r = 1 - alpha_t / alpha_prev  # 1 − ᾱ_t/ᾱ_t'
    variance = torch.where(noisy, (1 - alpha_prev) / denom * r, torch.zeros_like(r))  # σ_t² / η²
    std = eta * variance.clamp(min=0).sqrt()  # σ_t
    coef_sq = torch.where(noisy, (1 - alpha_prev) * (one_minus_a - eta**2 * r) / denom, 1 - alpha_prev)
    return std, coef_sq.clamp(min=0).sqrt()


def ddim_step(
    consts: DDIMConstants,
    model_output: torch.Tensor,
    timesteps: torch.Tensor,
    sample: torch.Tensor,
    eta: float | torch.Tensor,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    noise: torch.Tensor | None = None,
) -> StepOutput:
    """One stochastic DDIM step x_t -> x_t' with its log-prob.

    model_output, sample: ``[B, C, h, w]``; timesteps: ``[B]`` ints (may differ per row).
    ``eta``: one value, or ``[B]`` per row where 0 marks a deterministic row (x_t' = μ, no
    log-density: its ``log_prob`` is 0 and must be masked out by the caller; the noise is
    still drawn so every row's generator advances the same way).
    If ``prev_sample`` is given, it is scored (log π(prev_sample | sample)) instead of drawn;
    otherwise the noise is drawn exactly as ``DDIMScheduler.step`` draws it, or taken from
    ``noise`` ``[B, C, h, w]`` when the caller drew it (antithetic pairs).
    """
    per_row = torch.is_tensor(eta)
    eta_rows = torch.as_tensor(eta, dtype=torch.float32).to(sample.device).expand(sample.shape[0])  # [B]
    if not per_row and float(eta) <= 0:
        raise ValueError("eta must be > 0: a deterministic DDIM step (eta = 0) has no log-density")
    if bool((eta_rows < 0).any()):
        raise ValueError("eta must be >= 0 per row")
    x0, eps = predict_x0_eps(consts, model_output, timesteps, sample)
    alpha_t, alpha_prev = consts.alphas(timesteps)  # [B], [B]
    std, eps_coef = ddim_std_and_eps_coef(alpha_t, alpha_prev, eta_rows)  # σ_t, √(1 − ᾱ_t' − σ_t²)  [B] each
    stochastic = eta_rows > 0  # [B]
    if bool((std[stochastic] <= 0).any()):
        raise ValueError("DDIM step has σ = 0 at this timestep, so no log-density exists")
    if prev_sample is not None and not bool(stochastic.all()):
        raise ValueError("cannot score a deterministic (eta = 0) DDIM step: it has no log-density")
    a_prev = _expand(alpha_prev, sample)
    s = _expand(std, sample)
    mean = a_prev.sqrt() * x0 + _expand(eps_coef, sample) * eps  # μ [B, C, h, w]
    if prev_sample is None:
        if noise is None:
            noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype)
        prev_sample = mean + s * noise.float()
    safe = _expand(torch.where(stochastic, std, torch.ones_like(std)), sample)  # σ, 1 on deterministic rows
    log_prob = torch.where(stochastic, gaussian_log_prob(prev_sample, mean, safe), torch.zeros_like(std))  # [B]
    return StepOutput(prev_sample.detach(), log_prob, mean, std, x0)


def expand_steps(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-step scalars ``[B, K]`` broadcast against per-step latents ``[B, K, ...]`` of any rank."""
    return v.view(*v.shape, *([1] * (like.ndim - v.ndim)))


class DDIMKernel:
    """The DDIM(η) step as the step kernel of a latent-diffusion policy.

    T = ``num_steps`` scored steps; the last action is the sample. Every step has a
    deterministic twin (η = 0), so noise windows and antithetic noise are supported. Latents
    may have any shape after the batch dim (images ``[C, h, w]``, videos ``[C, F, h, w]``).
    """

    capabilities = frozenset({"shared_noise", "noise_window", "antithetic"})

    def __init__(self, scheduler, num_steps: int, eta: float, first_step_eta: float | None = None):
        from diffusers import DDIMScheduler

        for name, value in (("eta", eta), ("first_step_eta", first_step_eta)):
            if value is not None and not 0 < value <= 1:
                raise ValueError(f"policy.{name} must be in (0, 1], got {value}")
        self.scheduler = DDIMScheduler.from_config(scheduler.config)
        self.scheduler.set_timesteps(num_steps)
        self.consts = DDIMConstants.from_scheduler(self.scheduler, num_steps)
        # η of each step [T]; the first may differ: at η = 1 from ᾱ_T = 0 the first step keeps
        # nothing of x_T, so whatever x_T would have decided is decided by that step's noise.
        self.eta_steps = torch.full((num_steps,), float(eta))
        if first_step_eta is not None:
            self.eta_steps[0] = first_step_eta
        self.timesteps = self.scheduler.timesteps.long()  # [T]: t of each step
        self.num_steps = num_steps
        self.init_noise_sigma = float(self.scheduler.init_noise_sigma)  # x_T = noise · this

    def step(self, model_output, timesteps, step_ids, sample, generator=None, stochastic=None, noise=None,
             prev_sample=None) -> StepOutput:
        """Step ``sample`` ``[N, ...]`` at ``timesteps`` ``[N]``; ``stochastic`` ``[N]`` bool marks rows
        that draw noise (the others take the η = 0 step and get log-prob 0); None: every row."""
        eta = self.eta_steps.to(sample.device)[step_ids.to(sample.device)]  # [N]
        if stochastic is not None:
            eta = stochastic.float() * eta
        return ddim_step(self.consts, model_output, timesteps, sample, eta, prev_sample=prev_sample,
                         generator=generator, noise=noise)

    def finish(self, sample, model) -> torch.Tensor:
        """The clean latents after the last step: the last action itself."""
        return sample

    def predict_x0(self, model_output, timesteps, sample) -> torch.Tensor:
        """The Tweedie estimate x̂0 of ``sample`` at ``timesteps``."""
        return predict_x0_eps(self.consts, model_output, timesteps, sample)[0]

    def forward_step(self, x0, timesteps, step_ids, eps) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """State, mean and std of q(x_t' | x_t, x0) for clean latents ``x0`` ``[B, K, ...]`` at
        ``timesteps`` ``[B, K]``: x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε and μ = √ᾱ_t' x0 + √(1 − ᾱ_t' − σ_t²) ε,
        the DDIM(η) step taken with the true x0 and ε."""
        a_t, a_prev = self.consts.alphas(timesteps.flatten())  # [B*K] each
        a_t, a_prev = expand_steps(a_t.view(timesteps.shape), x0), expand_steps(a_prev.view(timesteps.shape), x0)
        eta = expand_steps(self.eta_steps.to(x0.device)[step_ids.to(x0.device)], x0)  # [B, K, 1, ...]
        sigma, eps_coef = ddim_std_and_eps_coef(a_t, a_prev, eta)
        state = a_t.sqrt() * x0 + (1 - a_t).sqrt() * eps
        return state, a_prev.sqrt() * x0 + eps_coef * eps, sigma
