"""RAFT: reward-ranked fine-tuning (rejection sampling, then maximum likelihood on the best).

Paper: Dong, Xiong, Goyal, Zhang, Chow, Pan, Diao, Zhang, Shum, Zhang, "RAFT: Reward rAnked
FineTuning for Generative Foundation Model Alignment" (TMLR 2023), Algorithm 1. Each epoch
samples K outputs per condition, ranks them by reward, keeps the best, and fine-tunes on the
kept set with the likelihood loss. Symbols: ``select -> the ranking rule`` (each condition's
best of its K samples, "group_best", or the best 1/k of the whole batch, "top_fraction" with
``keep_fraction`` = 1/k), ``kept -> the set D' of the paper``.

    L = − 1/Σ_i |o_i| · Σ_{i ∈ kept} Σ_t log π_θ(o_i,t | ·)

a mean over the kept rows' active steps. For a language model this is supervised fine-tuning
on the kept responses with a token-mean loss; for a diffusion chain it is −log π of the
sampled denoising steps, the likelihood of the kept chain under the current policy (which
pulls the policy toward the kept samples).

``advantages`` marks the kept rows with 1.0 and every other row NaN (not trained); a NaN reward
is never kept, and with ``min_reward`` only samples whose reward reaches it are. Ties go to
the lowest row index.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch

from genalign.algorithms.advantages import window_steps
from genalign.algorithms.base import LossTerms, SamplingPlan
from genalign.configs import opt
from genalign.trajectory import Trajectory


@dataclass
class RAFTConfig:
    name: Literal["raft"] = opt("raft", "algorithm name")
    select: Literal["group_best", "top_fraction"] = opt(
        "group_best",
        "which samples are kept: 'group_best' = each condition's best sample (ties: the first); 'top_fraction' = "
        "the best keep_fraction of the whole batch by reward",
    )
    keep_fraction: float = opt(
        0.25, "'top_fraction' only: the fraction of the batch's finite-reward samples kept, ceil(fraction · n)"
    )
    min_reward: float | None = opt(
        None, "keep only samples whose reward is >= this (applied after ranking); null disables the threshold"
    )

    def validate(self) -> None:
        if not 0 < self.keep_fraction <= 1:
            raise ValueError(f"'keep_fraction' must be in (0, 1], got {self.keep_fraction}")

    def requires(self) -> frozenset[str]:
        """Policy capabilities this config needs (none)."""
        return frozenset()

    def resolve_units(self, unit: str) -> None:
        """Nothing here depends on the log-prob unit: a likelihood loss is one in any unit."""


def raft_select(rewards: torch.Tensor, group: torch.Tensor, config: RAFTConfig) -> torch.Tensor:
    """Kept rows ``[N]`` bool under ``config`` (NaN rewards are never kept)."""
    rewards = rewards.detach().float().cpu()  # [N]
    group = group.cpu()
    valid = torch.isfinite(rewards)
    keep = torch.zeros_like(valid)
    if not bool(valid.any()):
        return keep
    if config.select == "group_best":
        for g in group[valid].unique():
            rows = ((group == g) & valid).nonzero().view(-1)  # ascending row order
            keep[rows[int(torch.argmax(rewards[rows]))]] = True  # argmax returns the first maximum
    else:
        rows = valid.nonzero().view(-1)
        k = math.ceil(config.keep_fraction * len(rows))
        order = torch.sort(-rewards[rows], stable=True).indices  # best first; ties keep row order
        keep[rows[order[:k]]] = True
    if config.min_reward is not None:
        keep &= rewards >= config.min_reward
    return keep


class RAFT:
    needs_reference = False
    needs_snapshots = False

    def __init__(self, config: RAFTConfig | None = None, unit: str = "dimension_mean"):
        self.config = replace(config or RAFTConfig())
        self.config.resolve_units(unit)  # a copy: unset unit-dependent fields take the policy's defaults
        self.name = "raft"

    def plan(self, epoch: int, num_snapshots: int, generator: torch.Generator) -> SamplingPlan:
        return SamplingPlan(kind="rollouts")

    def advantages(self, rewards: torch.Tensor, conditions: Sequence[Any], group: torch.Tensor) -> torch.Tensor:
        """1.0 for kept rows, NaN (not trained) for the others: ``[N]``."""
        keep = raft_select(rewards, group, self.config)
        return torch.where(keep, torch.ones_like(rewards, dtype=torch.float32).cpu(), torch.tensor(float("nan")))

    def train_steps(self, traj: Trajectory, generator: torch.Generator) -> torch.Tensor:
        return window_steps(traj.batch_size, traj.num_steps, [0.0, 1.0], 1.0, generator)  # [B, T]: every step

    def loss(self, batch: Trajectory, log_probs: torch.Tensor, ref_log_probs: torch.Tensor | None) -> LossTerms:
        device = log_probs.device
        adv = batch.advantages.to(device).float()
        kept = torch.isfinite(adv) & (adv > 0)  # [B]: rows the trainer did not drop (it zeroes NaN advantages)
        if kept.ndim == 2:
            kept = kept.any(1)
        active = batch.mask.to(device) & kept.unsqueeze(1)  # [B, k]
        nll = torch.where(active, -log_probs, torch.zeros_like(log_probs))  # [B, k]
        total = nll.sum()
        with torch.no_grad():
            metrics = {"nll": float(total)}
            counts = {"kept": float(kept.sum())}  # rows, whichever of their steps this call holds
        return LossTerms(total, float(active.sum()), metrics, counts)

    def targets(self, conditions: Sequence[Any], seeds: Sequence[int], like: Any, prompts: Any) -> Any:
        raise ValueError("RAFT fine-tunes on its own best rollouts: it has no off-policy targets")

    def epoch_metrics(self) -> dict[str, float]:
        return {}  # the kept rows are counted per epoch by the loss ("kept")

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:  # RAFT keeps no statistics between epochs
            raise ValueError(f"RAFT has no state to restore, got keys {sorted(state)}")
