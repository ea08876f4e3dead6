"""Shared advantage and policy-gradient math, written once and unit-tested.

- :class:`PerPromptStats`: DDPO's per-prompt reward normalisation with a history buffer
  (Black et al. 2023, App. B; the ``min_count`` fallback to batch statistics follows the
  public ddpo-pytorch reference).
- :func:`ppo_clip_loss`: the clipped surrogate of PPO (Schulman et al. 2017, eq. 7).
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Sequence
from typing import Any

import torch

from genalign.algorithms.base import LossTerms
from genalign.conditions import condition_key


class PerPromptStats:
    """A_i = (r_i − μ_prompt) / (σ_prompt + 1e-6), with μ, σ over the last ``buffer_size``
    rewards of that prompt once it has ``min_count`` of them, else over the whole batch.
    Prompts are any conditions; their history is keyed on ``condition_key``."""

    def __init__(self, buffer_size: int, min_count: int):
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.buffers: dict[str, deque] = defaultdict(lambda: deque(maxlen=buffer_size))

    def __call__(self, rewards: torch.Tensor, prompts: Sequence[Any]) -> torch.Tensor:
        rewards = rewards.detach().float().cpu()  # [N]
        valid = torch.isfinite(rewards)
        adv = torch.zeros_like(rewards)
        if not bool(valid.any()):
            return adv
        batch_mean = rewards[valid].mean()
        batch_std = rewards[valid].std(unbiased=False) + 1e-6
        keys = [condition_key(p) for p in prompts]
        for key in dict.fromkeys(keys):
            rows = torch.tensor([i for i, k in enumerate(keys) if k == key and bool(valid[i])], dtype=torch.long)
            if len(rows) == 0:
                continue
            buf = self.buffers[key]
            buf.extend(rewards[rows].tolist())
            if len(buf) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                hist = torch.tensor(list(buf))
                mean, std = hist.mean(), hist.std(unbiased=False) + 1e-6
            adv[rows] = (rewards[rows] - mean) / std
        return adv

    def state_dict(self) -> dict[str, Any]:
        return {"buffers": {k: list(v) for k, v in self.buffers.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffers.clear()
        for k, v in state["buffers"].items():
            self.buffers[k].extend(v)


def batch_normalize(rewards: torch.Tensor) -> torch.Tensor:
    """(r − mean) / (std + 1e-6) over the finite rewards; NaN rows get 0."""
    rewards = rewards.detach().float()
    valid = torch.isfinite(rewards)
    adv = torch.zeros_like(rewards)
    if bool(valid.any()):
        r = rewards[valid]
        adv[valid] = (r - r.mean()) / (r.std(unbiased=False) + 1e-6)
    return adv


def group_normalize(rewards: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """(r − mean_g) / (std_g + 1e-6) within each group ``g`` of ``group`` ``[N]``; NaN rows get 0,
    and so does every row of a group whose rewards are all equal."""
    rewards = rewards.detach().float().cpu()
    group = group.cpu()
    adv = torch.zeros_like(rewards)
    for g in group.unique():
        rows = ((group == g) & torch.isfinite(rewards)).nonzero().view(-1)
        if len(rows):
            adv[rows] = batch_normalize(rewards[rows])
    return adv


def active_steps(mask: torch.Tensor) -> torch.Tensor:
    """The steps each row acts at (``mask`` ``[B, T]`` True) as indices ``[B, K]``, K = the most
    any row has; a row with fewer is padded with its inactive steps, which the loss masks out."""
    mask = mask.cpu()
    k = max(1, int(mask.sum(1).max()))
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)  # active steps first, in chain order
    return order[:, :k].sort(dim=1).values


def ppo_clip_loss(
    advantages: torch.Tensor, log_probs: torch.Tensor, old_log_probs: torch.Tensor, clip_range: float, mask: torch.Tensor
) -> LossTerms:
    """Clipped surrogate, summed over active entries (normaliser: their number).

    advantages: ``[B, 1]`` or ``[B, K]``; log_probs, old_log_probs, mask: ``[B, K]``.
    Per entry: max(−A ρ, −A clip(ρ, 1−ε, 1+ε)),  ρ = exp(log π_θ − log π_old); the trainer
    divides the sum over an optimiser step by the number of active entries of that step.
    """
    ratio = torch.exp(log_probs - old_log_probs)  # ρ_t(θ) [B, K]
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    m = mask.to(log_probs.device).float()
    total = torch.where(m > 0, torch.maximum(unclipped, clipped), torch.zeros_like(ratio)).sum()
    with torch.no_grad():
        delta = log_probs - old_log_probs
        metrics = {
            "approx_kl": float((0.5 * delta**2 * m).sum()),
            "clip_fraction": float((((ratio - 1.0).abs() > clip_range).float() * m).sum()),
            "ratio_mean": float((ratio * m).sum()),
        }
    return LossTerms(total, float(m.sum()), metrics)


def window_steps(
    batch_size: int, num_steps: int, window: Sequence[float], fraction: float, generator: torch.Generator
) -> torch.Tensor:
    """Indices of the steps each row trains: ``[B, K]``.

    ``window`` = [start, end) as fractions of the chain (step ``i`` is inside when
    ``start <= i / T < end``; at least one step always is); ``fraction`` of those steps is
    drawn at random per row (all of them when it is 1).
    """
    lo, hi = window
    inside = [i for i in range(num_steps) if lo <= i / num_steps < hi] or [min(int(lo * num_steps), num_steps - 1)]
    steps = torch.tensor(inside, dtype=torch.long)  # [W]
    k = max(1, int(round(len(inside) * fraction)))
    if k == len(inside):
        return steps.unsqueeze(0).expand(batch_size, -1).clone()  # [B, W]
    return torch.stack([steps[torch.randperm(len(inside), generator=generator)[:k].sort().values] for _ in range(batch_size)])
