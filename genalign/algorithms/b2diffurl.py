"""B²-DiffuRL: backward progressive training with branch sampling, on a PPO or a DPO loss.

Paper: Hu, Chen, Liang, Tang, Zhao, Liu, "Towards Better Alignment: Training Diffusion Models
with Reinforcement Learning Against Sparse Rewards" (CVPR 2025). Symbols: ``branch_step -> b``
(the split point of stage k), ``z -> the branch-normalised score``, ``threshold -> ±0.5``.

Backward progressive training: the chain is cut at a branch step b that starts near the end
(only the last steps are trained) and moves toward the first step, stage by stage, so the
sparse final reward is first credited to the few steps closest to it:

    b_k = round(T · (start + (end − start) · k / (stages − 1))),  k = 0 … stages−1

(then b stays at ``end`` for the remaining epochs), as a fraction of each prefix's own length
(a chain's T; a response's number of tokens, so text rows branch at their own token). Branch
sampling: per prompt one prefix x_T … x_b, then n continuations from x_b (``Policy.continue_from``). Their rewards are
z-scored against the prompt's history (DDPO's per-prompt statistics), so the comparison
measures what the steps after b contributed. Only the best and the worst branch of each
prefix are trained, each only when |z| exceeds the threshold, and only on steps >= b.

Loss ``ppo``: DDPO's PPO-clip with advantage z on the selected rows. Loss ``dpo``: the
best and worst branch form one pair, trained with D3PO's loss against the reference (per step on
a denoising chain, on the summed log-ratio of the continuation for tokens: genalign.algorithms.pairs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch

from genalign.algorithms.advantages import PerPromptStats, ppo_clip_loss
from genalign.algorithms.base import LossTerms, SamplingPlan
from genalign.algorithms.pairs import pair_dpo_loss
from genalign.algorithms.units import unit_default
from genalign.configs import opt
from genalign.trajectory import Trajectory


@dataclass
class B2DiffuRLConfig:
    name: Literal["b2diffurl"] = opt("b2diffurl", "algorithm name")
    loss: Literal["ppo", "dpo"] = opt("ppo", "base loss: DDPO's PPO-clip, or D3PO's per-step DPO on (best, worst)")
    stages: int = opt(5, "stages of backward progressive training")
    epochs_per_stage: int = opt(4, "epochs spent at each branch step")
    branch_start: float | None = opt(
        None,
        "branch step of the first stage, as a fraction of each prefix's length (1 = the end); None: the unit default, "
        "0.8 of a denoising chain, 0 of a response (short answers are decided by their first tokens, so a late branch "
        "point would compare continuations that differ only after the answer)",
    )
    branch_end: float = opt(0.0, "branch step of the last stage (0 = the first step: the whole chain)")
    select_threshold: float = opt(0.5, "a best/worst branch is trained only when its |z| exceeds this (a reward z-score: no latent-size scaling)")
    clip_range: float | None = opt(None, "PPO clip ε (loss: ppo); None: the policy's unit default, 1e-4 for per-dimension-mean log-probs (transfer to latent size D′ as ε·D/D′, docs/hyperparameter_units.md) and 0.2 for tokens")
    adv_clip_max: float = opt(5.0, "z is clipped to ±adv_clip_max (loss: ppo)")
    beta: float = opt(0.1, "DPO β (loss: dpo); on per-dimension-mean log-probs β weights the joint log-ratio by β/D (transfer to latent size D′ as β·D′/D, docs/hyperparameter_units.md); on tokens DPO's β on the sequence log-ratio")
    clip_eps: float | None = opt(None, "DPO ratio clip ε (loss: dpo; 0: no clip); None: the unit default, 0.1 per step for per-dimension-mean log-probs and 0 for tokens")
    stat_buffer_size: int = opt(32, "rewards kept per prompt for its running mean/std")
    stat_min_count: int = opt(16, "below this many rewards for a prompt, use the batch's mean/std")

    def requires(self) -> frozenset[str]:
        return frozenset()

    def resolve_units(self, unit: str) -> None:
        self.clip_range = unit_default(self.clip_range, unit, {"dimension_mean": 1e-4, "token": 0.2}, "clip_range")
        self.clip_eps = unit_default(self.clip_eps, unit, {"dimension_mean": 0.1, "token": 0.0}, "clip_eps")
        self.branch_start = unit_default(self.branch_start, unit, {"dimension_mean": 0.8, "token": 0.0}, "branch_start")

    def validate(self) -> None:
        if self.stages < 1 or self.epochs_per_stage < 1:
            raise ValueError(f"'stages' and 'epochs_per_stage' must be >= 1, got {self.stages}, {self.epochs_per_stage}")
        if self.branch_start is not None and not 0 <= self.branch_end <= self.branch_start < 1:
            raise ValueError(
                f"need 0 <= branch_end <= branch_start < 1, got branch_start={self.branch_start}, branch_end={self.branch_end}"
            )


class B2DiffuRL:
    needs_snapshots = False

    def __init__(self, config: B2DiffuRLConfig | None = None, unit: str = "dimension_mean"):
        self.config = replace(config or B2DiffuRLConfig())
        self.config.resolve_units(unit)
        self.name = "b2diffurl"
        self.needs_reference = self.config.loss == "dpo"
        self.stats = PerPromptStats(self.config.stat_buffer_size, self.config.stat_min_count)

    def branch_fraction(self, epoch: int) -> float:
        c = self.config
        stage = min(epoch // c.epochs_per_stage, c.stages - 1)
        if c.stages == 1:
            return c.branch_start
        return c.branch_start + (c.branch_end - c.branch_start) * stage / (c.stages - 1)

    def plan(self, epoch: int, num_snapshots: int, generator: torch.Generator) -> SamplingPlan:
        return SamplingPlan(kind="branches", branch_at=self.branch_fraction(epoch), whole_groups=self.config.loss == "dpo")

    def advantages(self, rewards: torch.Tensor, conditions: Sequence[Any], group: torch.Tensor) -> torch.Tensor:
        """z-scores ``[N]``; rows that are neither their branch's best nor worst beyond the
        threshold get NaN (not trained)."""
        z = self.stats(rewards, conditions)  # [N]; NaN rewards -> 0
        out = torch.full_like(z, float("nan"))
        valid = torch.isfinite(rewards)
        thr = self.config.select_threshold
        for g in group.unique():
            rows = ((group == g) & valid).nonzero().view(-1)
            if len(rows) < 2:
                continue
            best, worst = rows[z[rows].argmax()], rows[z[rows].argmin()]
            if best == worst:
                continue
            if z[best] > thr:
                out[best] = z[best]
            if z[worst] < -thr:
                out[worst] = z[worst]
        return out

    def train_steps(self, traj: Trajectory, generator: torch.Generator) -> torch.Tensor:
        """Each row's steps from its branch step b on: ``[B, K]``, K = the most any row has; a row
        with fewer is padded with −1 (not trained)."""
        if "branch_step" not in traj.extras:
            raise KeyError("B²-DiffuRL trains branched rollouts: extras['branch_step'] is missing")
        b = traj.extras["branch_step"].cpu().view(-1, 1)  # [B, 1]
        after = torch.arange(traj.num_steps).unsqueeze(0) >= b  # [B, T]
        k = max(1, int(after.sum(1).max()))
        order = torch.argsort((~after).to(torch.int8), dim=1, stable=True)[:, :k]  # the trained steps first, in order
        taken = torch.gather(after, 1, order)
        return torch.where(taken, order, torch.full_like(order, -1))

    def loss(self, batch: Trajectory, log_probs: torch.Tensor, ref_log_probs: torch.Tensor | None) -> LossTerms:
        adv = batch.advantages.to(log_probs.device).float()  # [B]; NaN rows are masked by the trainer
        mask = batch.mask.to(log_probs.device)
        if self.config.loss == "ppo":
            a = torch.nan_to_num(adv, nan=0.0).clamp(-self.config.adv_clip_max, self.config.adv_clip_max).unsqueeze(1)
            return ppo_clip_loss(a, log_probs, batch.log_probs.to(log_probs.device), self.config.clip_range, mask)
        if ref_log_probs is None:
            raise ValueError("B²-DiffuRL with loss 'dpo' needs reference log-probs")
        delta = log_probs - ref_log_probs.detach()  # [B, K]
        winners, losers = [], []
        for g in batch.group.unique():
            rows = (batch.group.to(adv.device) == g).nonzero().view(-1)
            a = adv[rows]
            if bool((a > 0).any()) and bool((a < 0).any()):
                winners.append(rows[torch.nan_to_num(a, nan=-1e9).argmax()])
                losers.append(rows[torch.nan_to_num(a, nan=1e9).argmin()])
        if not winners:
            return LossTerms(log_probs.sum() * 0.0, 0.0, counts={"pairs": 0.0})
        w, l_ = torch.stack(winners), torch.stack(losers)
        c = self.config
        terms = pair_dpo_loss(delta[w], delta[l_], mask[w], mask[l_], batch.aligned, c.beta, c.clip_eps)
        terms.counts = {"pairs": float(len(w))}
        return terms

    def targets(self, conditions: Sequence[Any], seeds: Sequence[int], like: Any, prompts: Any) -> Any:
        raise ValueError("B²-DiffuRL trains on its own branches: it has no off-policy targets")

    def epoch_metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"stats": self.stats.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stats.load_state_dict(state["stats"])
