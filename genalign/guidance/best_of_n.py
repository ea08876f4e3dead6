"""Best-of-N: draw N samples per condition, keep the one the reward likes best."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from genalign.guidance.svdd import ComputeCounter
from genalign.trajectory import Trajectory


@torch.no_grad()
def best_of_n(
    policy: Any,
    conditions: Sequence[Any],
    n: int,
    seeds: Sequence[int],
    reward: Any,
    counter: ComputeCounter | None = None,
) -> tuple[Trajectory, torch.Tensor]:
    """One output per condition: the argmax of the reward over ``n`` samples (``seeds``: one per
    sample, ``len(conditions) * n``). Returns the chosen rows and their scores ``[len(conditions)]``."""
    if len(seeds) != len(conditions) * n:
        raise ValueError(f"need {len(conditions) * n} seeds (n per condition), got {len(seeds)}")
    t0 = time.perf_counter()
    traj = policy.rollout(conditions, n, [int(s) for s in seeds])
    scores = reward(traj.outputs, traj.conditions).scores.float().view(len(conditions), n)  # [C, N]
    scores = torch.where(torch.isfinite(scores), scores, torch.full_like(scores, -torch.inf))
    best = scores.argmax(1)  # [C]
    chosen = traj[torch.arange(len(conditions)) * n + best.cpu()]
    chosen.group = torch.arange(len(conditions))
    if counter is not None:
        counter.model_evals += traj.batch_size * traj.num_steps
        counter.decoder_calls += traj.batch_size
        counter.reward_calls += traj.batch_size
        counter.wall_seconds += time.perf_counter() - t0
    return chosen, scores.gather(1, best.view(-1, 1)).view(-1)
