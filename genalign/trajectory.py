"""The trajectory seam: a batch of B rollouts of T steps, whatever the modality.

Diffusion (T denoising steps, latents ``[C, h, w]``):
    states[b, j]  = x_t      before step j            [B, T, C, h, w]
    actions[b, j] = x_t'     after step j (the action) [B, T, C, h, w]
    timesteps[b, j] = t of step j                      [B, T]
Token decoding (T = max new tokens): states hold prefix positions, actions the tokens,
and ``mask`` marks real (non-padding) steps.

Per-sample tensors a policy needs to recompute log-probs (prompt embeddings, initial
noise, attention masks) live in ``extras`` with the batch on dim 0. Everything indexes,
concatenates and moves devices together, so algorithms and the trainer never need to
know what a field means.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

BatchIndex = int | slice | Sequence[int] | torch.Tensor


def _index_any(value: Any, idx: torch.Tensor) -> Any:
    """Index the batch dim of a tensor or a list by a 1-D long tensor."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return value[idx.to(value.device)]
    return [value[i] for i in idx.tolist()]


def _cat_any(values: list[Any]) -> Any:
    if values[0] is None:
        if any(v is not None for v in values):
            raise ValueError("cannot concatenate trajectories where a field is set in some but not all")
        return None
    if isinstance(values[0], torch.Tensor):
        return torch.cat(values, dim=0)
    return [x for v in values for x in v]


@dataclass
class Trajectory:
    """B rollouts of T steps. Shapes in field comments; ``...`` is the per-step state shape."""

    conditions: list[Any]  # B prompts / questions / scene specs
    group: torch.Tensor  # [B] long: rollouts with equal ids share a condition (or a prefix)
    states: torch.Tensor  # [B, T, ...]
    actions: torch.Tensor  # [B, T, ...]
    timesteps: torch.Tensor  # [B, T]
    log_probs: torch.Tensor  # [B, T] float32, at rollout time (π_old)
    mask: torch.Tensor  # [B, T] bool, False for padding steps
    step_ids: torch.Tensor  # [B, T] long: position of each column in the full rollout
    outputs: Any = None  # decoded results: [B, 3, H, W] images in [0, 1], or a list of B texts
    rewards: torch.Tensor | None = None  # [B]
    advantages: torch.Tensor | None = None  # [B] or [B, T]
    values: torch.Tensor | None = None  # [B, T] optional value estimates
    extras: dict[str, Any] = field(default_factory=dict)  # per-sample tensors/lists, batch on dim 0

    # -- construction checks -------------------------------------------------------------
    def __post_init__(self) -> None:
        b, t = self.log_probs.shape
        if len(self.conditions) != b:
            raise ValueError(f"{len(self.conditions)} conditions for a batch of {b}")
        for name in ("group", "states", "actions", "timesteps", "mask", "step_ids"):
            value = getattr(self, name)
            if value.shape[0] != b:
                raise ValueError(f"Trajectory.{name} has batch {value.shape[0]}, expected {b}")
        for name in ("states", "actions", "timesteps", "mask", "step_ids"):
            if getattr(self, name).shape[1] != t:
                raise ValueError(f"Trajectory.{name} has {getattr(self, name).shape[1]} steps, expected {t}")

    @property
    def batch_size(self) -> int:
        return self.log_probs.shape[0]

    @property
    def num_steps(self) -> int:
        return self.log_probs.shape[1]

    def __len__(self) -> int:
        return self.batch_size

    # -- batch operations ----------------------------------------------------------------
    def __getitem__(self, index: BatchIndex) -> Trajectory:
        """Select rollouts (batch rows). Keeps every field aligned."""
        if isinstance(index, int):
            index = [index]
        if isinstance(index, slice):
            index = range(*index.indices(self.batch_size))
        idx = torch.as_tensor(list(index) if not isinstance(index, torch.Tensor) else index).cpu()
        if idx.dtype == torch.bool:
            if idx.shape != (self.batch_size,):
                raise IndexError(f"boolean index of shape {tuple(idx.shape)} for a batch of {self.batch_size}")
            idx = idx.nonzero().flatten()
        idx = idx.long()
        values = {f.name: _index_any(getattr(self, f.name), idx) for f in fields(self) if f.name != "extras"}
        values["extras"] = {k: _index_any(v, idx) for k, v in self.extras.items()}
        return Trajectory(**values)

    @staticmethod
    def cat(trajs: Sequence[Trajectory]) -> Trajectory:
        """Concatenate along the batch dim (all must have the same number of steps)."""
        if not trajs:
            raise ValueError("Trajectory.cat needs at least one trajectory")
        if len({t.num_steps for t in trajs}) > 1:
            raise ValueError(f"cannot concatenate trajectories with different numbers of steps: {[t.num_steps for t in trajs]}")
        keys = set(trajs[0].extras)
        if any(set(t.extras) != keys for t in trajs):
            raise ValueError("cannot concatenate trajectories with different extras keys")
        values = {f.name: _cat_any([getattr(t, f.name) for t in trajs]) for f in fields(Trajectory) if f.name != "extras"}
        values["extras"] = {k: _cat_any([t.extras[k] for t in trajs]) for k in keys}
        return Trajectory(**values)

    def to(self, device: torch.device | str) -> Trajectory:
        """Move every tensor (extras included) to ``device``; lists stay as they are."""

        def move(v: Any) -> Any:
            return v.to(device) if isinstance(v, torch.Tensor) else v

        values = {f.name: move(getattr(self, f.name)) for f in fields(self) if f.name != "extras"}
        values["extras"] = {k: move(v) for k, v in self.extras.items()}
        return Trajectory(**values)

    # -- step operations -----------------------------------------------------------------
    def subset(self, steps: Sequence[int] | torch.Tensor) -> Trajectory:
        """A view on some steps: ``steps`` is ``[K]`` (same steps for every row) or ``[B, K]``.

        Per-step fields become ``[B, K, ...]``; ``step_ids`` keeps the original positions so a
        policy can still find the matching timestep and noise level.
        """
        idx = torch.as_tensor(steps, dtype=torch.long)
        if idx.ndim == 1:
            idx = idx.unsqueeze(0).expand(self.batch_size, -1)
        if idx.ndim != 2 or idx.shape[0] != self.batch_size:
            raise ValueError(f"steps must be [K] or [B={self.batch_size}, K], got {tuple(idx.shape)}")
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.num_steps):
            raise IndexError(f"step index out of range for a trajectory of {self.num_steps} steps")

        def take(v: torch.Tensor) -> torch.Tensor:
            i = idx.to(v.device)
            return torch.gather(v, 1, i.view(*i.shape, *([1] * (v.ndim - 2))).expand(*i.shape, *v.shape[2:]))

        per_step = {name: take(getattr(self, name)) for name in ("states", "actions", "timesteps", "log_probs", "mask", "step_ids")}
        if self.values is not None:
            per_step["values"] = take(self.values)
        if self.advantages is not None and self.advantages.ndim == 2:
            per_step["advantages"] = take(self.advantages)
        return replace(self, **per_step)

    def with_rewards(self, rewards: torch.Tensor) -> Trajectory:
        if rewards.shape != (self.batch_size,):
            raise ValueError(f"rewards must be [B={self.batch_size}], got {tuple(rewards.shape)}")
        return replace(self, rewards=rewards.float())
