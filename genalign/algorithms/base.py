"""The algorithm seam: a loss over trajectories. Protocol only; no policy imports, ever."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from genalign.trajectory import Trajectory


@runtime_checkable
class Algorithm(Protocol):
    name: str
    #: the trainer computes ``ref_log_probs`` (policy.reference()) only when this is True
    needs_reference: bool

    def advantages(self, rewards: torch.Tensor, conditions: Sequence[Any], group: torch.Tensor) -> torch.Tensor:
        """Rewards ``[N]`` of one epoch (all processes gathered) -> advantages ``[N]`` or ``[N, T]``.

        Called with identical inputs on every process, so stateful statistics stay in sync.
        Rows with a NaN reward must get advantage 0 and must not touch any statistic.
        """
        ...

    def train_steps(self, traj: Trajectory, generator: torch.Generator) -> torch.Tensor:
        """Which steps each row trains on: ``[B, K]`` long indices into ``traj``'s steps."""
        ...

    def loss(
        self, batch: Trajectory, log_probs: torch.Tensor, ref_log_probs: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """``batch`` is a step subset ``[B, k]``; ``log_probs`` ``[B, k]`` carry gradients."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
