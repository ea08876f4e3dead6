"""The algorithm seam: a loss over trajectories. Protocol only; no policy imports, ever."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import torch

from genalign.trajectory import Trajectory


@dataclass(frozen=True)
class SamplingPlan:
    """What an algorithm asks of the trainer for one epoch's data (plain data, no logic).

    - ``"rollouts"``: ``samples_per_prompt`` rollouts per prompt; with ``shared_noise`` the
      rollouts of one prompt start from the same initial noise.
    - ``"branches"``: one prefix per prompt, then ``samples_per_prompt`` continuations from
      the chain step ``round(branch_at · T)`` (``Policy.continue_from``); ``group`` = prefix.
    - ``"off_policy"``: per prompt, one sample of the reference checkpoint (``reference``)
      and one off-policy target from the algorithm's ``targets``; both are turned into
      forward-process trajectories (``Policy.forward_process``) at ``steps_per_sample`` steps.
    """

    kind: Literal["rollouts", "branches", "off_policy"] = "rollouts"
    shared_noise: bool = False
    #: ``"rollouts"`` only: > 0 draws noise at this many consecutive steps per rollout (a
    #: :class:`~genalign.policies.window.NoiseWindow`), the rest of the chain is deterministic
    noise_window: int = 0
    #: range of chain fractions [lo, hi) from which each prompt's window start is drawn
    noise_window_starts: tuple[float, float] = (0.0, 1.0)
    #: ``"rollouts"`` with ``shared_noise`` only: rows of a prompt in pairs with mirrored step noise
    antithetic: bool = False
    branch_at: float = 0.0
    #: minibatches hold whole groups (pairwise losses need both rows of a pair)
    whole_groups: bool = False
    steps_per_sample: int = 1
    #: which weights serve as reference: "initial" (policy.reference()) or a snapshot index
    reference: int | Literal["initial"] = "initial"


@runtime_checkable
class Algorithm(Protocol):
    name: str
    #: the trainer computes ``ref_log_probs`` (under the plan's reference) only when True
    needs_reference: bool
    #: the trainer keeps a snapshot of the trainable weights at every epoch start (SePPO)
    needs_snapshots: bool

    def plan(self, epoch: int, num_snapshots: int, generator: torch.Generator) -> SamplingPlan:
        """How to sample epoch ``epoch``. ``num_snapshots`` trainable-weight snapshots (one
        per past epoch, index 0 = the initial weights) exist to choose a reference from."""
        ...

    def advantages(self, rewards: torch.Tensor, conditions: Sequence[Any], group: torch.Tensor) -> torch.Tensor:
        """Rewards ``[N]`` of one epoch (all processes gathered) -> advantages ``[N]`` or ``[N, T]``.

        Called with identical inputs on every process, so stateful statistics stay in sync.
        Rows with a NaN reward must get advantage 0 and must not touch any statistic.
        A NaN advantage means "do not train this row" (B²-DiffuRL keeps only the best and
        worst branch); the trainer masks such rows out.
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
