"""Rejection-sampling self-improvement: keep the samples whose reward reaches a threshold and
fine-tune on them as data (supervised, teacher-forced).

Paper: Deng et al., "Boosting the Generalization and Reasoning of Vision Language Models with
Curriculum Reinforcement Learning" (Curr-ReFT, 2025), the rejection-sampling stage that follows
the curriculum: sample K responses per question, keep only the high-scoring ones, and fine-tune
on them with a small learning rate to keep the model's general abilities. The paper judged
responses with a strong model and a score threshold; here the threshold applies to the
configured reward. Symbols: ``min_reward -> the judge threshold``, ``kept -> the accepted set``.

Each epoch samples ``samples_per_prompt`` outputs per condition (plan ``rollouts``); every
sample with reward >= ``min_reward`` is kept (advantage 1, all others NaN = not trained); the
plan's ``teacher_forced`` asks the trainer to re-encode the kept outputs with
``Policy.forward_process``, so the loss is maximum likelihood of the kept outputs as data: for
a token policy the teacher-forced response tokens (+ EOS), for a diffusion policy the
forward-process noising steps of the kept images (the noise-prediction loss). The loss is the
token mean of the negative log-likelihood over the kept rows' active steps:

    L = − 1/Σ_i |o_i| · Σ_{i ∈ kept} Σ_t log π_θ(o_i,t | c_i, o_i,<t)

RAFT (genalign/algorithms/raft.py) ranks the samples of a group or batch and trains on the
sampled chains themselves; this stage keeps every sample above an absolute threshold and trains
on its outputs re-encoded as data, which for a diffusion policy is fine-tuning on the images
rather than on the chain that happened to produce them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch

from genalign.algorithms.advantages import check_step_window, window_steps
from genalign.algorithms.base import LossTerms, SamplingPlan
from genalign.configs import opt
from genalign.trajectory import Trajectory


@dataclass
class RejectionSFTConfig:
    name: Literal["rejection_sft"] = opt("rejection_sft", "algorithm name")
    min_reward: float = opt(1.0, "keep (and fine-tune on) every sample whose reward is >= this; the others are discarded")
    step_window: list[float] = opt(
        [0.0, 1.0],
        "[start, end) of the chain, as fractions of its steps, whose teacher-forced steps are trained (every "
        "token of a response is one step: keep [0, 1] for text); [0, 0.4] fits a diffusion model's high-noise "
        "steps only, where layout and motion are decided",
    )

    def validate(self) -> None:
        """Any finite threshold is valid (a NaN would keep nothing); the window is [start, end) in [0, 1]."""
        if self.min_reward != self.min_reward:
            raise ValueError("'min_reward' must be a number, got NaN")
        check_step_window(self.step_window)

    def requires(self) -> frozenset[str]:
        """Policy capabilities this config needs (none: every policy has ``forward_process``)."""
        return frozenset()

    def resolve_units(self, unit: str) -> None:
        """Nothing here depends on the log-prob unit: a likelihood loss is one in any unit."""


def sft_loss(batch: Trajectory, log_probs: torch.Tensor) -> LossTerms:
    """Σ of −log π over the active steps ``[B, k]`` of the rows with a positive finite advantage;
    normaliser = their number (a token mean once the trainer divides)."""
    device = log_probs.device
    adv = batch.advantages.to(device).float()
    kept = torch.isfinite(adv) & (adv > 0)  # [B]
    active = batch.mask.to(device) & kept.unsqueeze(1)  # [B, k]
    nll = torch.where(active, -log_probs, torch.zeros_like(log_probs))  # [B, k]
    total = nll.sum()
    with torch.no_grad():
        metrics = {"nll": float(total)}
        counts = {"kept": float(kept.sum())}
    return LossTerms(total, float(active.sum()), metrics, counts)


class RejectionSFT:
    needs_reference = False
    needs_snapshots = False

    def __init__(self, config: RejectionSFTConfig | None = None, unit: str = "dimension_mean"):
        self.config = replace(config or RejectionSFTConfig())
        self.config.resolve_units(unit)
        self.name = "rejection_sft"
        self._last: dict[str, float] = {}

    def plan(self, epoch: int, num_snapshots: int, generator: torch.Generator) -> SamplingPlan:
        return SamplingPlan(kind="rollouts", teacher_forced=True)

    def advantages(self, rewards: torch.Tensor, conditions: Sequence[Any], group: torch.Tensor) -> torch.Tensor:
        """1.0 for samples with reward >= ``min_reward``, NaN (not trained) otherwise: ``[N]``."""
        rewards = rewards.detach().float().cpu()  # [N]
        keep = torch.isfinite(rewards) & (rewards >= self.config.min_reward)
        self._last = {"accept_rate": int(keep.sum()) / len(keep) if len(keep) else 0.0}
        return torch.where(keep, torch.ones_like(rewards), torch.full_like(rewards, float("nan")))

    def train_steps(self, traj: Trajectory, generator: torch.Generator) -> torch.Tensor:
        return window_steps(traj.batch_size, traj.num_steps, self.config.step_window, 1.0, generator)  # [B, W]

    def loss(self, batch: Trajectory, log_probs: torch.Tensor, ref_log_probs: torch.Tensor | None) -> LossTerms:
        return sft_loss(batch, log_probs)

    def targets(self, conditions: Sequence[Any], seeds: Sequence[int], like: Any, prompts: Any) -> Any:
        raise ValueError("rejection_sft fine-tunes on its own accepted samples: it has no off-policy targets")

    def epoch_metrics(self) -> dict[str, float]:
        return dict(self._last)  # the fraction of this epoch's samples that were kept

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"rejection_sft has no state to restore, got keys {sorted(state)}")
