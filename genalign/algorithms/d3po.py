"""D3PO: DPO on pairs of rollouts of one condition, per denoising step (or per sequence on tokens).

Paper: Yang, Tao, Lyu, Ge, Huo, Li, "Using Human Feedback to Fine-tune Diffusion Models
without Any Reward Model" (CVPR 2024), §4 and eq. 11. Symbols: ``beta -> β``,
``clip_eps -> ε``, ``delta -> log π_θ(a_j|s_j) − log π_ref(a_j|s_j)``; ``w``/``l`` the
preferred and the rejected rollout of a pair.

Each prompt's K rollouts start from the same initial noise x_T, so the two members of a
pair differ only by the policy's own step noise. Every one of the K(K−1)/2 pairs gets a
label from the preference source; the label of the final images is applied at every trained
step j (the paper's assumption that a preferred image implies preferred steps):

    L_j = −log σ(β · (clamp(Δ_w,j, log(1−ε), log(1+ε)) − clamp(Δ_l,j, log(1−ε), log(1+ε))))

Ties give no loss. The reference is the pretrained model (LoRA adapters disabled). Both rows
of a pair train the same steps. β = 0.1 and ε = 0.1 are the paper's values (ε = 0.2 made
images fall apart there). Log-probs are per-dimension means, so Δ is small and the loss starts
at log 2 with gradient −β/2 (∇ log π(w) − ∇ log π(l)).

On token trajectories (``aligned`` False) step j of two responses follows different prefixes,
so there is nothing to pair step by step: each row's log-ratios are summed over its tokens and
the pair gets one logit, which is DPO on self-generated pairs (genalign.algorithms.pairs); the
ratio clip defaults to none there (ε = 0), and every token is trained.
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
    window_steps,
)
from genalign.algorithms.base import LossTerms, SamplingPlan
from genalign.algorithms.pairs import group_pairs, pair_dpo_loss
from genalign.algorithms.preferences import ParetoPreference, RewardPreference, StoredPreference
from genalign.algorithms.units import unit_default
from genalign.configs import opt
from genalign.trajectory import Trajectory


@dataclass
class D3POConfig:
    name: Literal["d3po"] = opt("d3po", "algorithm name")
    beta: float = opt(0.1, "β: sharpness of the DPO logit; on per-dimension-mean log-probs (diffusion) β weights the joint log-ratio by β/D: to transfer to another latent size D′ use β·D′/D (docs/hyperparameter_units.md); on tokens it is DPO's β on the sequence log-ratio")
    clip_eps: float | None = opt(None, "ε: the ratio π_θ/π_ref is clipped to [1−ε, 1+ε] (0: no clip); None: the policy's unit default, 0.1 per step for per-dimension-mean log-probs (the joint-ratio bound is about ε·D: transfer to latent size D′ as ε·D/D′, docs/hyperparameter_units.md) and 0 (plain DPO) for tokens")
    preference: Literal["reward", "pareto", "store"] = opt(
        "reward", "label source: compare the reward, Pareto-compare its components, or read stored labels"
    )
    store_path: str = opt("", "SQLite preference store (preference: store); see genalign/preference_store.py")
    tie_tolerance: float = opt(0.0, "reward differences at or below this are ties (no loss)")
    timestep_fraction: float = opt(1.0, "fraction of the window's steps trained per pair (same steps for both rows)")
    step_window: list[float] = opt([0.0, 1.0], "[start, end) of the chain, as fractions, that is trained")
    noise_window: int = opt(
        0,
        "0: every step draws noise and is trained (the paper). k > 0: each prompt's rollouts share a deterministic "
        "chain (η = 0) up to a window of k noisy steps, then continue deterministically; only those k steps are "
        "trained, so a pair's preference is credited to the only steps where the two rows differ",
    )
    noise_window_starts: list[float] = opt(
        [0.0, 1.0], "[lo, hi): each prompt's window starts at a chain fraction drawn uniformly from it, per epoch"
    )

    def requires(self) -> frozenset[str]:
        needed = {"shared_noise"}  # the two rows of a pair start from the same state
        return frozenset(needed | ({"noise_window"} if self.noise_window else set()))

    def resolve_units(self, unit: str) -> None:
        self.clip_eps = unit_default(self.clip_eps, unit, {"dimension_mean": 0.1, "token": 0.0}, "clip_eps")

    def validate(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"'beta' must be > 0, got {self.beta}")
        if self.clip_eps is not None and not 0 <= self.clip_eps < 1:
            raise ValueError(f"'clip_eps' must be in [0, 1), got {self.clip_eps}")
        if self.preference == "store" and not self.store_path:
            raise ValueError("'store_path' is required when preference is 'store'")
        if not 0 < self.timestep_fraction <= 1:
            raise ValueError(f"'timestep_fraction' must be in (0, 1], got {self.timestep_fraction}")
        check_step_window(self.step_window)
        check_noise_window(self.noise_window, self.noise_window_starts, self.step_window, self.timestep_fraction)


def build_preference(config: D3POConfig):
    if config.preference == "reward":
        return RewardPreference(config.tie_tolerance)
    if config.preference == "pareto":
        return ParetoPreference(config.tie_tolerance)
    return StoredPreference(config.store_path)


class D3PO:
    needs_reference = True
    needs_snapshots = False

    def __init__(self, config: D3POConfig | None = None, unit: str = "dimension_mean"):
        self.config = replace(config or D3POConfig())
        self.config.resolve_units(unit)
        self.name = "d3po"
        self.preference = build_preference(self.config)

    def plan(self, epoch: int, num_snapshots: int, generator: torch.Generator) -> SamplingPlan:
        c = self.config
        return SamplingPlan(kind="rollouts", shared_noise=True, whole_groups=True, noise_window=c.noise_window,
                            noise_window_starts=tuple(c.noise_window_starts))

    def advantages(self, rewards: torch.Tensor, conditions: Sequence[Any], group: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(rewards, dtype=torch.float32)  # labels come from pairs, not advantages

    def train_steps(self, traj: Trajectory, generator: torch.Generator) -> torch.Tensor:
        """One draw of steps per group, shared by its rows: ``[B, K]`` (unaligned rows: all steps)."""
        if not traj.aligned:
            return torch.arange(traj.num_steps).unsqueeze(0).expand(traj.batch_size, -1).clone()
        if self.config.noise_window:
            return active_steps(traj.mask)  # [B, k]: the window's steps, the same for a group's rows
        groups = traj.group.cpu()
        uniq = groups.unique()
        drawn = window_steps(len(uniq), traj.num_steps, self.config.step_window, self.config.timestep_fraction, generator)
        where = {int(g): i for i, g in enumerate(uniq)}
        return drawn[torch.tensor([where[int(g)] for g in groups])]  # [B, K]

    def loss(self, batch: Trajectory, log_probs: torch.Tensor, ref_log_probs: torch.Tensor | None) -> LossTerms:
        if ref_log_probs is None:
            raise ValueError("D3PO needs reference log-probs")
        pairs = group_pairs(batch.group.to(log_probs.device))  # [P, 2]
        labels = self.preference(batch, pairs.cpu()).to(log_probs.device)  # [P] in {+1, 0, −1}
        keep = labels != 0
        unlabelled = float((~keep).sum())  # ties, or pairs a preference store has no label for
        pairs, labels = pairs[keep], labels[keep]
        if len(pairs) == 0:
            return LossTerms(log_probs.sum() * 0.0, 0.0, counts={"pairs": 0.0, "unlabelled_pairs": unlabelled})
        w = torch.where(labels > 0, pairs[:, 0], pairs[:, 1])  # [P]
        l_ = torch.where(labels > 0, pairs[:, 1], pairs[:, 0])
        delta = log_probs - ref_log_probs.detach()  # [B, K]
        mask = batch.mask.to(log_probs.device)
        terms = pair_dpo_loss(delta[w], delta[l_], mask[w], mask[l_], batch.aligned, self.config.beta, self.config.clip_eps)
        terms.counts = {"pairs": float(len(pairs)), "unlabelled_pairs": unlabelled}
        return terms

    def targets(self, conditions: Sequence[Any], seeds: Sequence[int], like: Any, prompts: Any) -> Any:
        raise ValueError("D3PO compares its own rollouts: it has no off-policy targets")

    def epoch_metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:  # D3PO keeps no statistics between epochs
            raise ValueError(f"D3PO has no state to restore, got keys {sorted(state)}")
