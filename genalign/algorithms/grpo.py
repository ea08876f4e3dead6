"""GRPO: group-relative policy optimisation, with the loss aggregations of its successors.

Papers: Shao et al., "DeepSeekMath" (2024), §4.1 eqs. 3–4 (GRPO); Yu et al., "DAPO" (2025),
token-level loss and clip-higher; Liu et al., "Understanding R1-Zero-Like Training" (2025,
Dr. GRPO), no std scaling and a constant normaliser; Liu et al., "Flow-GRPO" (2025), the same
objective on the steps of a diffusion SDE. Symbols: ``group -> the G samples o_1..o_G of one
condition``, ``adv -> Â_i``, ``ratio -> ρ_i,t = π_θ(o_i,t | ·) / π_old(o_i,t | ·)``,
``clip_range_low / clip_range_high -> ε_low / ε_high``, ``beta -> β``, ``lengths[i] -> |o_i|``
(the active steps of row i), ``max_steps_normaliser -> L_max``.

    Â_i   = (r_i − mean_g r) / (std r + 1e-4)      std over the group, the batch, or 1 ("none")
    ℓ_i,t = max(−Â_i ρ_i,t, −Â_i clip(ρ_i,t, 1 − ε_low, 1 + ε_high)) + β k3_i,t
    k3    = exp(Δ) − Δ − 1,  Δ = log π_ref − log π_θ    (DeepSeekMath eq. 4)

    "grpo":    L = 1/n Σ_i 1/|o_i| Σ_t ℓ_i,t          (each sequence's mean, then the mean)
    "dapo":    L = 1/Σ_i |o_i| Σ_i Σ_t ℓ_i,t          (mean over every active step)
    "dr_grpo": L = 1/(n · L_max) Σ_i Σ_t ℓ_i,t        (a constant; L_max = max_steps_normaliser,
                                                        0: the trajectory's number of steps T)

n is the number of sequences in an optimiser step (the accumulation window). Each loss call
returns sums and its share of the denominator (genalign.algorithms.base.LossTerms): with
"grpo" an entry weighs 1/|o_i| and row i adds (its entries in the call)/|o_i|, with
"dr_grpo" it adds (its entries in the call)/|o_i| · L_max, so cutting rows into step chunks
leaves the update unchanged. Metrics are weighted the same way (per-entry means; "grpo" and
"dr_grpo" weigh each sequence equally).

Rows with a NaN reward get a NaN advantage (not trained) and do not enter any mean or std. A
group whose rewards are all equal has Â = 0 (no gradient from the surrogate); such groups are
counted every epoch (:meth:`GRPO.epoch_metrics`) and, with ``filter_zero_variance_groups``,
dropped. On a diffusion policy every denoising step is an action and the same object is
Flow-GRPO's objective on the policy's SDE (``shared_noise`` starts a group from one x_T).
``noise_window: k`` samples as MixGRPO (Li et al. 2025) and Flow-GRPO's fast variant do: each
condition's group takes the kernel's deterministic step except at k consecutive steps whose
start is drawn per condition from ``noise_window_starts``, and exactly those steps are trained.

Units: the clip ranges depend on what a log-prob is. For tokens (one token's log-prob per
step) ε = 0.2 is the usual value (DAPO's clip-higher raises ε_high to 0.28); for
per-dimension-mean latent log-probs ρ stays near 1 and DDPO's ε = 1e-4 applies. ``None`` picks
the value for the policy's unit (:meth:`GRPOConfig.resolve_units`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch

from genalign.algorithms.advantages import (
    active_steps,
    check_noise_window,
    check_step_window,
    clipped_surrogate,
    group_advantages,
    k3_kl,
    window_steps,
)
from genalign.algorithms.base import LossTerms, SamplingPlan
from genalign.configs import opt
from genalign.trajectory import Trajectory

#: clip ranges (low, high) per log-prob unit, used where the config leaves them None
DEFAULT_CLIP = {"token": (0.2, 0.2), "dimension_mean": (1e-4, 1e-4)}


@dataclass
class GRPOConfig:
    name: Literal["grpo"] = opt("grpo", "algorithm name")
    loss_aggregation: Literal["grpo", "dapo", "dr_grpo"] = opt(
        "grpo",
        "how per-step losses become one loss: 'grpo' = mean over each sequence's active steps, then mean over "
        "sequences; 'dapo' = mean over all active steps of the batch (token-level); 'dr_grpo' = sum over steps "
        "divided by a constant, (number of sequences) × max_steps_normaliser",
    )
    max_steps_normaliser: int = opt(
        0,
        "'dr_grpo' only: L_max in the constant normaliser (sequences × L_max); 0 = the number of steps T of the "
        "epoch's trajectories (for text the longest response; set it to the generation budget, max new tokens, "
        "for a normaliser that does not move with the sampled lengths)",
    )
    scale_rewards: Literal["group", "batch", "none"] = opt(
        "group",
        "advantage = (r − group mean) / (std + 1e-4) with the std over the group ('group', GRPO), over the whole "
        "batch ('batch'), or no division ('none', Dr. GRPO); the mean is always the group's",
    )
    clip_range_low: float | None = opt(
        None,
        "ε_low: the ratio is clipped below at 1 − ε_low; None = by the policy's log-prob unit: 0.2 for tokens, "
        "1e-4 for per-dimension-mean latent log-probs (DDPO's clip range)",
    )
    clip_range_high: float | None = opt(
        None,
        "ε_high: the ratio is clipped above at 1 + ε_high; None = by the policy's log-prob unit: 0.2 for tokens "
        "(DAPO's clip-higher uses 0.28), 1e-4 for per-dimension-mean latent log-probs",
    )
    beta: float = opt(
        0.0,
        "β: weight of the k3 KL estimate to the reference policy per step (exp(Δ) − Δ − 1, Δ = log π_ref − "
        "log π_θ); 0 disables it and no reference log-probs are computed. Per-dimension-mean latent log-probs make "
        "Δ about 1/D of the joint log-ratio, so a latent β weighs far less than a token β",
    )
    filter_zero_variance_groups: bool = opt(
        False, "drop groups whose rewards are all equal (zero advantage) from training; they are counted either way"
    )
    adv_clip_max: float = opt(0.0, "advantages are clipped to [−adv_clip_max, adv_clip_max]; 0 disables the clip")
    timestep_fraction: float = opt(
        1.0, "fraction of the window's steps trained per rollout (random per row; diffusion chains)"
    )
    step_window: list[float] = opt([0.0, 1.0], "[start, end) of the chain, as fractions of its steps, that is trained")
    shared_noise: bool = opt(
        False, "the rollouts of one condition start from the same initial noise (Flow-GRPO; a policy capability)"
    )
    noise_window: int = opt(
        0,
        "0: every step of a denoising rollout draws noise (Flow-GRPO). k > 0: each condition's rollouts draw noise "
        "at k consecutive steps only and take the kernel's deterministic step elsewhere; exactly those k steps are "
        "trained (MixGRPO, Flow-GRPO-Fast; a policy capability)",
    )
    noise_window_starts: list[float] = opt(
        [0.0, 1.0], "[lo, hi): each condition's window starts at a chain fraction drawn uniformly from it, per epoch"
    )

    def validate(self) -> None:
        for key in ("clip_range_low", "clip_range_high"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ValueError(f"'{key}' must be > 0 (or null for the log-prob unit's default), got {value}")
        if self.clip_range_low is not None and self.clip_range_low >= 1:
            raise ValueError(f"'clip_range_low' must be < 1 (the ratio's lower bound is 1 − ε_low), got {self.clip_range_low}")
        if self.beta < 0:
            raise ValueError(f"'beta' must be >= 0, got {self.beta}")
        if self.adv_clip_max < 0:
            raise ValueError(f"'adv_clip_max' must be >= 0 (0 disables it), got {self.adv_clip_max}")
        if self.max_steps_normaliser < 0:
            raise ValueError(f"'max_steps_normaliser' must be >= 0 (0: the trajectory's T), got {self.max_steps_normaliser}")
        if not 0 < self.timestep_fraction <= 1:
            raise ValueError(f"'timestep_fraction' must be in (0, 1], got {self.timestep_fraction}")
        check_step_window(self.step_window)
        check_noise_window(self.noise_window, self.noise_window_starts, self.step_window, self.timestep_fraction)

    def requires(self) -> frozenset[str]:
        """Policy capabilities this config needs."""
        return frozenset({"shared_noise"} if self.shared_noise else set()) | frozenset(
            {"noise_window"} if self.noise_window else set())

    def resolve_units(self, unit: str) -> None:
        """Fill the clip ranges left None with the defaults for the policy's log-prob ``unit``."""
        if unit not in DEFAULT_CLIP:
            raise ValueError(f"unknown log_prob_unit {unit!r} (expected one of {sorted(DEFAULT_CLIP)})")
        low, high = DEFAULT_CLIP[unit]
        if self.clip_range_low is None:
            self.clip_range_low = low
        if self.clip_range_high is None:
            self.clip_range_high = high


class GRPO:
    needs_snapshots = False

    def __init__(self, config: GRPOConfig | None = None, unit: str = "dimension_mean"):
        self.config = replace(config or GRPOConfig())
        self.config.resolve_units(unit)  # a copy: unset unit-dependent fields take the policy's defaults
        self.name = "grpo"
        self.needs_reference = self.config.beta > 0
        self.last_groups = 0  # groups with a finite reward in the last advantages() call
        self.last_zero_variance_groups = 0
        self.num_steps: int | None = None  # T of the last trajectory given to train_steps ("dr_grpo")

    def plan(self, epoch: int, num_snapshots: int, generator: torch.Generator) -> SamplingPlan:
        c = self.config
        return SamplingPlan(kind="rollouts", shared_noise=c.shared_noise, noise_window=c.noise_window,
                            noise_window_starts=tuple(c.noise_window_starts))

    def advantages(self, rewards: torch.Tensor, conditions: Sequence[Any], group: torch.Tensor) -> torch.Tensor:
        """Group-relative advantages ``[N]``; NaN for NaN rewards (and filtered flat groups)."""
        c = self.config
        adv, flat = group_advantages(rewards, group, c.scale_rewards)  # [N], [N]
        valid = torch.isfinite(adv)
        group = group.cpu()
        self.last_groups = len(group[valid].unique())
        self.last_zero_variance_groups = len(group[flat].unique())
        if c.filter_zero_variance_groups:
            adv[flat] = float("nan")
        if c.adv_clip_max > 0:
            adv = adv.clamp(-c.adv_clip_max, c.adv_clip_max)  # NaN stays NaN
        return adv

    def epoch_metrics(self) -> dict[str, float]:
        """Counts from the last :meth:`advantages` call: groups, and those with all-equal rewards."""
        return {"zero_variance_groups": float(self.last_zero_variance_groups), "groups": float(self.last_groups)}

    def train_steps(self, traj: Trajectory, generator: torch.Generator) -> torch.Tensor:
        self.num_steps = traj.num_steps
        if self.config.noise_window:
            return active_steps(traj.mask)  # [B, k]: the window's steps
        return window_steps(traj.batch_size, traj.num_steps, self.config.step_window, self.config.timestep_fraction, generator)

    def _max_steps(self) -> int:
        if self.config.max_steps_normaliser > 0:
            return self.config.max_steps_normaliser
        if self.num_steps is None:
            raise ValueError(
                "loss_aggregation 'dr_grpo' with max_steps_normaliser 0 takes T from train_steps(), which has not run: "
                "call it first or set 'max_steps_normaliser'"
            )
        return self.num_steps

    def loss(self, batch: Trajectory, log_probs: torch.Tensor, ref_log_probs: torch.Tensor | None) -> LossTerms:
        c = self.config
        if c.clip_range_low is None or c.clip_range_high is None:
            raise ValueError(
                "GRPO's clip ranges are unset: give 'clip_range_low'/'clip_range_high' or call "
                "config.resolve_units(policy.log_prob_unit)"
            )
        if c.beta > 0 and ref_log_probs is None:
            raise ValueError("GRPO with beta > 0 needs reference log-probs")
        device = log_probs.device
        adv = torch.nan_to_num(batch.advantages.to(device).float(), nan=0.0)
        if adv.ndim == 1:
            adv = adv.unsqueeze(1)  # [B, 1]: one advantage for every step of a sequence
        old = batch.log_probs.to(device)
        active = batch.mask.to(device)  # [B, k]
        # inactive entries (padding) score ratio 1 and Δ = 0, so nothing there can turn into inf or NaN
        lp = torch.where(active, log_probs, old)
        terms, ratio = clipped_surrogate(adv, lp, old, c.clip_range_low, c.clip_range_high)  # [B, k]
        kl = None
        if c.beta > 0:
            kl = k3_kl(lp, torch.where(active, ref_log_probs.to(device), lp.detach()))
            terms = terms + c.beta * kl
        m = active.float()
        lengths = batch.lengths if batch.lengths is not None else batch.mask.sum(1)
        inv_len = 1.0 / lengths.to(device).float().clamp(min=1).unsqueeze(1)  # [B, 1]
        # share: each entry's part of the denominator; weight: its factor in the sum
        if c.loss_aggregation == "grpo":
            share = m * inv_len
            weight = share
        elif c.loss_aggregation == "dapo":
            share = weight = m
        else:  # "dr_grpo": the row's steps add up to L_max in the denominator, each step weighs 1
            share = m * inv_len * self._max_steps()
            weight = m
        total = (weight * terms).sum()  # inactive entries have weight 0 and finite terms
        with torch.no_grad():
            delta = lp - old
            lo, hi = 1.0 - c.clip_range_low, 1.0 + c.clip_range_high
            metrics = {
                "clip_fraction": float((((ratio < lo) | (ratio > hi)).float() * share).sum()),
                "approx_kl": float((0.5 * delta**2 * share).sum()),
                "ratio_mean": float((ratio * share).sum()),
            }
            if kl is not None:
                metrics["kl"] = float((kl * share).sum())
        return LossTerms(total, float(share.sum()), metrics)

    def targets(self, conditions: Sequence[Any], seeds: Sequence[int], like: Any, prompts: Any) -> Any:
        raise ValueError("GRPO trains on its own rollouts: it has no off-policy targets")

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:  # GRPO keeps no statistics between epochs
            raise ValueError(f"GRPO has no state to restore, got keys {sorted(state)}")
