"""DDPO: PPO-clip policy gradient on the denoising MDP (DDPO_IS), or on tokens with sequence advantages.

Paper: Black, Janner, Du, Kostrikov, Levine, "Training Diffusion Models with Reinforcement
Learning" (2023), §4.3 and App. B. Symbols: ``adv -> A`` (per-prompt normalised reward,
clipped to ±adv_clip_max), ``ratio -> ρ_t = π_θ(a_t|s_t) / π_old(a_t|s_t)``,
``clip_range -> ε``.

    L = E_t max(−A ρ_t, −A clip(ρ_t, 1−ε, 1+ε))

Every trained step of a rollout shares the rollout's advantage (the reward arrives only
at the end, undiscounted). ``timestep_fraction`` trains a random subset of steps per row;
the trainer accumulates gradients over all of them before one optimizer step.

**Noise windows** (``noise_window: k``, off by default). Every rollout of DDPO's sampler draws
noise at all T steps, and every step is credited with the whole reward, though most of the
reward's variance is decided by a few early steps; the other steps' noise enters the
gradient as variance. With ``noise_window: k`` each prompt's rollouts take deterministic
DDIM steps (η = 0) except at k consecutive steps whose start is drawn per prompt and epoch
from ``noise_window_starts`` (MixGRPO, Li et al. 2025; TempFlow-GRPO's branching, He et al.
2025); only those steps are actions and are trained. With ``shared_noise`` the group reaches
the window from one state, and ``group_baseline`` makes the group's mean reward the baseline,
so a group's reward differences come from its window's noise alone. The loss is unchanged.
``antithetic`` (with ``shared_noise``) pairs the group's rollouts with mirrored step noise
(ε, −ε), a variance-reduction option (it cancels the part of the reward that is odd in the
noise; on the Shapes World quickstart it did not help); each rollout is still an exact sample
of the policy, so the gradient stays unbiased.

On a diffusion policy log-probs are per-dimension means (see genalign.distributions), so ρ
stays near 1 and the reference clip range is tiny (1e-4); on a token policy ρ is a token's
ratio and ε defaults to PPO's 0.2 (genalign.algorithms.units). Applied to a ConsistencyPolicy
this same object is RLCM; applied to an LM policy it is PPO-clip with sequence-level
advantages (every token of a response shares the response's advantage).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch

from genalign.algorithms.advantages import (
    PerPromptStats,
    active_steps,
    batch_normalize,
    check_noise_window,
    check_step_window,
    group_normalize,
    ppo_clip_loss,
    window_steps,
)
from genalign.algorithms.base import LossTerms, SamplingPlan
from genalign.algorithms.units import unit_default
from genalign.configs import opt
from genalign.trajectory import Trajectory


@dataclass
class DDPOConfig:
    name: Literal["ddpo"] = opt("ddpo", "algorithm name")
    clip_range: float | None = opt(
        None, "PPO clip ε on the per-step ratio; None: the policy's unit default, 1e-4 for per-dimension-mean log-probs (diffusion: the joint-ratio bound is about ε·D at latent size D, so transfer to D′ as ε·D/D′, docs/hyperparameter_units.md) and 0.2 for per-token log-probs"
    )
    adv_clip_max: float = opt(5.0, "advantages are clipped to [−adv_clip_max, adv_clip_max]")
    per_prompt_stat_tracking: bool = opt(True, "normalise rewards per prompt (with a history buffer), else per batch")
    stat_buffer_size: int = opt(32, "rewards kept per prompt for its running mean/std")
    stat_min_count: int = opt(16, "below this many rewards for a prompt, use the batch's mean/std")
    timestep_fraction: float = opt(1.0, "fraction of the window's steps trained per rollout (random per row)")
    step_window: list[float] = opt(
        [0.0, 1.0],
        "[start, end) of the chain, as fractions of its steps, that is trained: [0, 0.6] trains the first 60% "
        "(the steps that decide composition); late low-noise steps add gradient noise but little credit",
    )
    noise_window: int = opt(
        0,
        "0: every step of a rollout draws noise and is trained (the paper). k > 0: each prompt's rollouts draw "
        "noise at k consecutive steps only and take deterministic DDIM steps (η = 0) elsewhere; exactly those "
        "k steps are trained, so the reward differences they are credited with are their own (MixGRPO)",
    )
    noise_window_starts: list[float] = opt(
        [0.0, 1.0], "[lo, hi): each prompt's window starts at a chain fraction drawn uniformly from it, per epoch"
    )
    shared_noise: bool = opt(
        False, "the rollouts of one prompt start from the same x_T (with a noise window: reach it from the same state)"
    )
    antithetic: bool = opt(
        False,
        "with shared_noise: the rollouts of a prompt come in pairs whose step noise is mirrored (ε and -ε), so a "
        "pair leaves its shared state in opposite directions; needs an even train.samples_per_prompt",
    )
    group_baseline: bool = opt(
        False,
        "normalise each prompt's rewards by the mean/std of its own rollouts this epoch (their group) instead of "
        "the per-prompt history; the right baseline when the group shares x_T and a noise window",
    )

    def requires(self) -> frozenset[str]:
        needed = {"shared_noise"} if self.shared_noise else set()
        needed |= {"noise_window"} if self.noise_window else set()
        needed |= {"antithetic"} if self.antithetic else set()
        return frozenset(needed)

    def resolve_units(self, unit: str) -> None:
        self.clip_range = unit_default(self.clip_range, unit, {"dimension_mean": 1e-4, "token": 0.2}, "clip_range")

    def validate(self) -> None:
        if not 0 < self.timestep_fraction <= 1:
            raise ValueError(f"'timestep_fraction' must be in (0, 1], got {self.timestep_fraction}")
        check_step_window(self.step_window)
        if self.clip_range is not None and self.clip_range <= 0:
            raise ValueError(f"'clip_range' must be > 0, got {self.clip_range}")
        check_noise_window(self.noise_window, self.noise_window_starts, self.step_window, self.timestep_fraction)
        if self.antithetic and not self.shared_noise:
            raise ValueError("'antithetic' mirrors the noise of rollouts that share x_T: set 'shared_noise: true'")


class DDPO:
    needs_reference = False
    needs_snapshots = False

    def __init__(self, config: DDPOConfig | None = None, unit: str = "dimension_mean"):
        self.config = replace(config or DDPOConfig())
        self.config.resolve_units(unit)  # a copy: unset unit-dependent fields take the policy's defaults
        self.name = "ddpo"
        self.stats = PerPromptStats(self.config.stat_buffer_size, self.config.stat_min_count)

    def plan(self, epoch: int, num_snapshots: int, generator: torch.Generator) -> SamplingPlan:
        c = self.config
        return SamplingPlan(
            shared_noise=c.shared_noise,
            noise_window=c.noise_window,
            noise_window_starts=tuple(c.noise_window_starts),
            antithetic=c.antithetic,
        )

    def advantages(self, rewards: torch.Tensor, conditions: Sequence[Any], group: torch.Tensor) -> torch.Tensor:
        if self.config.group_baseline:
            return group_normalize(rewards, group)  # [N]
        if self.config.per_prompt_stat_tracking:
            return self.stats(rewards, conditions)  # [N]
        return batch_normalize(rewards)

    def train_steps(self, traj: Trajectory, generator: torch.Generator) -> torch.Tensor:
        if self.config.noise_window:
            return active_steps(traj.mask)  # [B, k]: the window's steps
        return window_steps(traj.batch_size, traj.num_steps, self.config.step_window, self.config.timestep_fraction, generator)

    def loss(self, batch: Trajectory, log_probs: torch.Tensor, ref_log_probs: torch.Tensor | None) -> LossTerms:
        adv = batch.advantages.to(log_probs.device).float()
        adv = adv.clamp(-self.config.adv_clip_max, self.config.adv_clip_max)
        if adv.ndim == 1:
            adv = adv.unsqueeze(1)  # [B, 1]: one advantage for every step of a rollout
        return ppo_clip_loss(adv, log_probs, batch.log_probs.to(log_probs.device), self.config.clip_range, batch.mask)

    def targets(self, conditions: Sequence[Any], seeds: Sequence[int], like: Any, prompts: Any) -> Any:
        raise ValueError("DDPO trains on its own rollouts: it has no off-policy targets")

    def epoch_metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"stats": self.stats.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stats.load_state_dict(state["stats"])
