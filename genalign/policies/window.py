"""Noise windows: rollouts that draw noise at a few consecutive chain steps only.

A rollout with a window runs the deterministic version of its kernel (DDIM with η = 0)
outside ``[start, start + width)`` and the policy's stochastic kernel inside it. Only the
window's steps are actions (``Trajectory.mask``); with shared initial noise every rollout of
one condition reaches the window from the same state, so the reward differences within the
group are caused by the window's noise alone and the group mean estimates that state's value.
This is the branching and mixed ODE/SDE sampling of MixGRPO (Li et al. 2025) and
TempFlow-GRPO (He et al. 2025), here as a sampling option that any policy-gradient loss uses
unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class NoiseWindow:
    """Per condition, ``width`` consecutive stochastic steps from ``floor(start · T)``
    (moved back so the window fits the chain)."""

    starts: Sequence[float]  # one start per condition, fractions of the chain in [0, 1)
    width: int

    def __post_init__(self) -> None:
        if self.width < 1:
            raise ValueError(f"noise window width must be >= 1, got {self.width}")
        if any(not 0 <= s < 1 for s in self.starts):
            raise ValueError(f"noise window starts must lie in [0, 1), got {list(self.starts)}")

    @classmethod
    def draw(cls, num_conditions: int, width: int, starts: Sequence[float], generator: torch.Generator) -> NoiseWindow:
        """A window per condition, its start drawn uniformly from ``starts`` = [lo, hi)."""
        lo, hi = starts
        return cls((lo + (hi - lo) * torch.rand(num_conditions, generator=generator)).tolist(), width)

    def mask(self, n_per_condition: int, num_steps: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Stochastic steps of every row: ``[len(starts) * n_per_condition, num_steps]`` bool."""
        width = min(self.width, num_steps)
        first = torch.tensor([min(int(s * num_steps), num_steps - width) for s in self.starts], device=device)  # [P]
        steps = torch.arange(num_steps, device=device)  # [T]
        inside = (steps >= first[:, None]) & (steps < first[:, None] + width)  # [P, T]
        return inside.repeat_interleave(n_per_condition, 0)


def mirror_pairs(noise: torch.Tensor) -> torch.Tensor:
    """Antithetic pairs: row 2k+1 takes ``-noise`` of row 2k. Each row is still a standard
    normal draw, so every rollout keeps its distribution; a pair that starts from the same state
    sees mirrored noise. Rows of a condition are consecutive, so with an even group size no pair
    crosses two conditions.

    noise: ``[N, ...]`` with N even; returns the same shape.
    """
    if noise.shape[0] % 2:
        raise ValueError(f"antithetic pairs need an even number of rows, got {noise.shape[0]}")
    pairs = noise.reshape(noise.shape[0] // 2, 2, *noise.shape[1:])  # [N/2, 2, ...]
    return torch.stack([pairs[:, 0], -pairs[:, 0]], 1).reshape(noise.shape)
