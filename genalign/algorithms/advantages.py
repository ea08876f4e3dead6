"""Shared advantage and policy-gradient math, written once and unit-tested.

- :class:`PerPromptStats`: DDPO's per-prompt reward normalisation with a history buffer
  (Black et al. 2023, App. B; the ``min_count`` fallback to batch statistics follows the
  public ddpo-pytorch reference).
- :func:`ppo_clip_loss`: the clipped surrogate of PPO (Schulman et al. 2017, eq. 7).
- :func:`group_advantages`: GRPO's group-relative advantages (Shao et al. 2024, §4.1.2) with
  the std taken over the group, the batch, or not at all (Liu et al. 2025, Dr. GRPO).
- :func:`clipped_surrogate`, :func:`k3_kl`: per-entry PPO terms with separate low/high clip
  ranges (Yu et al. 2025, DAPO's clip-higher) and the k3 KL estimator (Schulman 2020).
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


def check_step_window(window: Sequence[float]) -> None:
    """Validate a ``step_window`` setting: ``[start, end)`` with 0 <= start < end <= 1."""
    if len(window) != 2 or not 0 <= window[0] < window[1] <= 1:
        raise ValueError(f"'step_window' must be [start, end) with 0 <= start < end <= 1, got {list(window)}")


def check_noise_window(width: int, starts: Sequence[float], step_window: Sequence[float], timestep_fraction: float) -> None:
    """Validate a noise-window setting (DDPO, GRPO): width >= 0, starts [lo, hi) in [0, 1], and
    the step selection left at its defaults, since a window trains exactly its own steps."""
    if width < 0:
        raise ValueError(f"'noise_window' must be >= 0, got {width}")
    lo, hi = (list(starts) + [None, None])[:2]
    if len(starts) != 2 or not 0 <= lo < hi <= 1:
        raise ValueError(f"'noise_window_starts' must be [lo, hi) with 0 <= lo < hi <= 1, got {list(starts)}")
    if width and (list(step_window) != [0.0, 1.0] or timestep_fraction != 1.0):
        raise ValueError(
            "'noise_window' trains exactly the window's steps: leave 'step_window' and 'timestep_fraction' at "
            "their defaults"
        )


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


def group_advantages(
    rewards: torch.Tensor, group: torch.Tensor, scale: str = "group", eps: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor]:
    """A_i = (r_i − mean_g) / (std + eps) over the finite rewards: ``(advantages [N], flat [N])``.

    The mean is always the group's (rows with equal ``group`` ids ``[N]``); ``scale`` picks the
    std: ``"group"`` (the group's), ``"batch"`` (all finite rewards'), ``"none"`` (no division).
    Stds are population stds (divide by n). A NaN/inf reward gets a NaN advantage and takes no
    part in any mean or std. ``flat`` marks the finite rows of groups whose finite rewards are
    all equal (a group of one included): their advantage is exactly 0.
    """
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    rewards = rewards.detach().float().cpu()  # [N]
    group = group.cpu()
    valid = torch.isfinite(rewards)
    adv = torch.full_like(rewards, float("nan"))
    flat = torch.zeros_like(valid)
    if not bool(valid.any()):
        return adv, flat
    batch_std = rewards[valid].std(unbiased=False)
    for g in group[valid].unique():
        rows = ((group == g) & valid).nonzero().view(-1)
        r = rewards[rows]
        centred = r - r.mean()
        if bool((r == r[0]).all()):
            flat[rows] = True
            centred = torch.zeros_like(r)  # exactly 0, whatever the rounding of the mean
        if scale == "group":
            centred = centred / (r.std(unbiased=False) + eps)
        elif scale == "batch":
            centred = centred / (batch_std + eps)
        adv[rows] = centred
    return adv, flat


def clipped_surrogate(
    advantages: torch.Tensor, log_probs: torch.Tensor, old_log_probs: torch.Tensor, clip_low: float, clip_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-entry PPO-clip loss with an asymmetric trust region: ``(terms [B, K], ratio [B, K])``.

    advantages ``[B, 1]`` or ``[B, K]``; log_probs, old_log_probs ``[B, K]``.
    term = max(−A ρ, −A clip(ρ, 1 − clip_low, 1 + clip_high)), ρ = exp(log π_θ − log π_old).
    No masking here: the caller weights and masks the terms.
    """
    ratio = torch.exp(log_probs - old_log_probs)  # ρ [B, K]
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    return torch.maximum(unclipped, clipped), ratio


def k3_kl(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """k3 estimate of KL(π_θ ‖ π_ref) per entry: exp(Δ) − Δ − 1, Δ = log π_ref − log π_θ.

    Non-negative, 0 at Δ = 0; its gradient in log π_θ is 1 − exp(Δ): positive where π_θ > π_ref,
    so descending it pulls log π_θ toward log π_ref. ``ref_log_probs`` are taken as constants.
    """
    delta = ref_log_probs.detach() - log_probs  # Δ [B, K]
    return torch.exp(delta) - delta - 1.0
