"""The trajectory seam: a batch of B rollouts of T steps, whatever the modality.

Diffusion (T denoising steps, latents ``[C, h, w]`` for images, ``[C, F, h, w]`` for videos):
    states[b, j]  = x_t      before step j            [B, T, C, h, w]
    actions[b, j] = x_t'     after step j (the action) [B, T, C, h, w]
    timesteps[b, j] = t of step j                      [B, T]
A sampled chain has ``actions[:, j] == states[:, j+1]``; policies store it once, as two views
of one ``[B, T+1, ...]`` tensor (:func:`chained`), and indexing, concatenation and ``to`` keep
the two views sharing one tensor.
Token decoding (T = the longest response): ``actions`` are the generated token ids
``[B, T]``, ``states`` and ``timesteps`` are None (a state is the prompt plus the tokens
before it), and ``mask`` marks real (non-padding) tokens.

Per-row data a policy needs to recompute log-probs (prompt embeddings, initial noise,
prompt token ids, a VLM's image patches) lives in ``extras``. A value there is one of:

- a tensor with the batch on dim 0 and the same trailing shape in every trajectory;
- a list: one Python object per row;
- :class:`Ragged`: one tensor per row, shapes free (``pixel_values`` of ``[patches_b, D]``);
- :class:`Padded`: a ``[B, L, ...]`` tensor whose length ``L`` may differ between
  trajectories; concatenation pads to the longest on the declared side (left-padded
  prompt ids).

Everything indexes, concatenates and moves devices together, so algorithms and the trainer
never need to know what a field means. Trajectories of different T concatenate: the per-step
fields of the shorter ones are padded with inactive steps (``mask`` False).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F

BatchIndex = int | slice | Sequence[int] | torch.Tensor

#: per-step fields: ``[B, T, ...]`` (None allowed for states, actions, timesteps)
STEP_FIELDS = ("states", "actions", "timesteps", "log_probs", "mask", "step_ids")


@dataclass
class Ragged:
    """One tensor per row, of any shape (no shared batch dim): ``values[b]``."""

    values: list[torch.Tensor]

    def __len__(self) -> int:
        return len(self.values)

    def index(self, idx: torch.Tensor) -> Ragged:
        return Ragged([self.values[i] for i in idx.tolist()])

    @staticmethod
    def cat(parts: list[Ragged]) -> Ragged:
        return Ragged([v for p in parts for v in p.values])

    def to(self, device: torch.device | str) -> Ragged:
        return Ragged([v.to(device) for v in self.values])


@dataclass
class Padded:
    """A ``[B, L, ...]`` tensor whose length ``L`` may differ between trajectories.

    ``side`` says where the padding goes when trajectories concatenate (``"left"`` for
    prompts fed to a decoder, ``"right"`` for sequences that start aligned); ``pad_value``
    fills it.
    """

    tensor: torch.Tensor
    pad_value: float | int = 0
    side: Literal["left", "right"] = "right"

    def __len__(self) -> int:
        return self.tensor.shape[0]

    def index(self, idx: torch.Tensor) -> Padded:
        return Padded(self.tensor[idx.to(self.tensor.device)], self.pad_value, self.side)

    @staticmethod
    def cat(parts: list[Padded]) -> Padded:
        first = parts[0]
        if any((p.side, p.pad_value) != (first.side, first.pad_value) for p in parts):
            raise ValueError("cannot concatenate Padded values with different sides or pad values")
        length = max(p.tensor.shape[1] for p in parts)
        tensors = [pad_dim1(p.tensor, length, first.pad_value, first.side) for p in parts]
        return Padded(torch.cat(tensors, 0), first.pad_value, first.side)

    def to(self, device: torch.device | str) -> Padded:
        return Padded(self.tensor.to(device), self.pad_value, self.side)


def pad_dim1(x: torch.Tensor, length: int, value: float | int, side: str = "right") -> torch.Tensor:
    """Pad ``x`` ``[B, L, ...]`` to ``[B, length, ...]`` with ``value`` on ``side``."""
    extra = length - x.shape[1]
    if extra <= 0:
        return x
    pad = [0, 0] * (x.ndim - 2) + ([extra, 0] if side == "left" else [0, extra])
    if x.dtype == torch.bool:
        return F.pad(x.to(torch.uint8), pad, value=int(value)).bool()
    return F.pad(x, pad, value=value)


def chained(chain: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``states`` and ``actions`` as two views of one chain ``[B, T+1, ...]`` (x before step 0, then
    the result of every step): ``actions[:, j]`` is ``states[:, j+1]``, stored once."""
    return chain[:, :-1], chain[:, 1:]


def shared_chain(states: torch.Tensor | None, actions: torch.Tensor | None) -> torch.Tensor | None:
    """The chain ``[B, T+1, ...]`` that ``states`` and ``actions`` are views of (:func:`chained`), or None."""
    if states is None or actions is None or states.ndim < 3 or states.shape != actions.shape:
        return None
    if states.device != actions.device or states.untyped_storage().data_ptr() != actions.untyped_storage().data_ptr():
        return None
    if states.stride() != actions.stride() or actions.storage_offset() != states.storage_offset() + states.stride(1):
        return None
    b, t = states.shape[:2]
    return states.as_strided((b, t + 1, *states.shape[2:]), states.stride(), states.storage_offset())


def full_chain(traj: Trajectory) -> torch.Tensor:
    """``[B, T+1, ...]``: the states followed by the last action (a view when they are stored as a
    chain). For a sampled trajectory, where every action is the next state, this is the chain."""
    chain = shared_chain(traj.states, traj.actions)
    return chain if chain is not None else torch.cat([traj.states, traj.actions[:, -1:]], 1)


def _with_chain(values: dict[str, Any], chain: torch.Tensor | None) -> dict[str, Any]:
    """``values`` with states and actions replaced by views of ``chain`` (when there is one)."""
    if chain is not None:
        values["states"], values["actions"] = chained(chain)
    return values


def _index_any(value: Any, idx: torch.Tensor) -> Any:
    """Index the batch dim of a tensor, a list, or a Ragged/Padded value by a 1-D long tensor."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return value[idx.to(value.device)]
    if isinstance(value, (Ragged, Padded)):
        return value.index(idx)
    return [value[i] for i in idx.tolist()]


def _cat_any(values: list[Any], name: str) -> Any:
    if values[0] is None:
        if any(v is not None for v in values):
            raise ValueError(f"cannot concatenate trajectories where '{name}' is set in some but not all")
        return None
    if isinstance(values[0], (Ragged, Padded)):
        if any(type(v) is not type(values[0]) for v in values):
            raise ValueError(f"cannot concatenate '{name}': mixed value kinds")
        return type(values[0]).cat(values)
    if isinstance(values[0], torch.Tensor):
        shapes = {tuple(v.shape[1:]) for v in values}
        if len(shapes) > 1:
            raise ValueError(
                f"cannot concatenate '{name}': trailing shapes differ {sorted(shapes)} (store values whose length "
                f"varies as Padded, values without a shared shape as Ragged)"
            )
        return torch.cat(values, dim=0)
    return [x for v in values for x in v]


def concat_outputs(parts: Sequence[Any]) -> Any:
    """Outputs of several batches as one: tensors along dim 0, lists joined."""
    if isinstance(parts[0], torch.Tensor):
        return torch.cat([p.to(parts[0].device) for p in parts], 0)
    return [x for p in parts for x in p]


def _pad_steps(traj: Trajectory, t: int) -> Trajectory:
    """``traj`` with its per-step fields right-padded to ``t`` steps (inactive: mask False)."""
    extra = t - traj.num_steps
    if extra == 0:
        return traj
    values: dict[str, Any] = {}
    for name in STEP_FIELDS:
        v = getattr(traj, name)
        if v is not None:
            values[name] = pad_dim1(v, t, 0)
    last = traj.step_ids[:, -1:] if traj.num_steps else torch.full_like(traj.step_ids[:, :1], -1)
    values["step_ids"] = torch.cat([traj.step_ids, last + torch.arange(1, extra + 1, device=last.device)], 1)
    for name in ("values", "advantages"):
        v = getattr(traj, name)
        if v is not None and v.ndim == 2:
            values[name] = pad_dim1(v, t, 0)
    return replace(traj, **values)


@dataclass
class Trajectory:
    """B rollouts of T steps. Shapes in field comments; ``...`` is the per-step state shape."""

    conditions: list[Any]  # B condition objects (prompts, dicts, questions with images); never stringified
    group: torch.Tensor  # [B] long: rollouts with equal ids share a condition (or a prefix)
    log_probs: torch.Tensor  # [B, T] float32, at rollout time (π_old), in the policy's log_prob_unit
    mask: torch.Tensor  # [B, T] bool, False for padding or inactive steps
    step_ids: torch.Tensor  # [B, T] long: position of each column in the full rollout
    states: torch.Tensor | None = None  # [B, T, ...] (diffusion x_t; None for tokens)
    actions: torch.Tensor | None = None  # [B, T, ...] (diffusion x_t'; token ids [B, T])
    timesteps: torch.Tensor | None = None  # [B, T] (diffusion only)
    outputs: Any = None  # decoded results: [B, 3, H, W] images in [0, 1], or a list of B texts
    rewards: torch.Tensor | None = None  # [B]
    advantages: torch.Tensor | None = None  # [B] or [B, T]
    values: torch.Tensor | None = None  # [B, T] optional value estimates
    #: [B] long: active steps of each full row; ``subset`` sets it (from ``mask``) before it cuts
    #: steps, so a sequence-mean loss divides by the whole row's length whatever the chunking
    lengths: torch.Tensor | None = None
    #: True when step j of two rows of a group is the same kind of decision (a denoising step at one
    #: timestep), so a loss may pair rows step by step; False for token sequences, whose steps only
    #: mean something together (a pairwise loss sums each row's log-ratios before comparing rows)
    aligned: bool = True
    extras: dict[str, Any] = field(default_factory=dict)  # per-row values (see the module docstring)

    # -- construction checks -------------------------------------------------------------
    def __post_init__(self) -> None:
        b, t = self.log_probs.shape
        if len(self.conditions) != b:
            raise ValueError(f"{len(self.conditions)} conditions for a batch of {b}")
        for name in ("group", *STEP_FIELDS):
            value = getattr(self, name)
            if value is None:
                continue
            if value.shape[0] != b:
                raise ValueError(f"Trajectory.{name} has batch {value.shape[0]}, expected {b}")
            if name != "group" and value.shape[1] != t:
                raise ValueError(f"Trajectory.{name} has {value.shape[1]} steps, expected {t}")
        if self.lengths is not None and self.lengths.shape != (b,):
            raise ValueError(f"Trajectory.lengths must be [B={b}], got {tuple(self.lengths.shape)}")
        for key, value in self.extras.items():
            n = len(value) if isinstance(value, (list, tuple, Ragged, Padded)) else value.shape[0] if isinstance(value, torch.Tensor) else None
            if n is not None and n != b:
                raise ValueError(f"Trajectory.extras[{key!r}] has {n} rows, expected {b}")

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
        chain = shared_chain(self.states, self.actions)
        skip = ("extras", "aligned") if chain is None else ("extras", "aligned", "states", "actions")
        values = {f.name: _index_any(getattr(self, f.name), idx) for f in fields(self) if f.name not in skip}
        values = _with_chain(values, None if chain is None else _index_any(chain, idx))
        values["extras"] = {k: _index_any(v, idx) for k, v in self.extras.items()}
        return Trajectory(**values, aligned=self.aligned)

    @staticmethod
    def cat(trajs: Sequence[Trajectory]) -> Trajectory:
        """Concatenate along the batch dim; shorter trajectories are padded with inactive steps."""
        if not trajs:
            raise ValueError("Trajectory.cat needs at least one trajectory")
        keys = set(trajs[0].extras)
        if any(set(t.extras) != keys for t in trajs):
            raise ValueError("cannot concatenate trajectories with different extras keys")
        if len({t.aligned for t in trajs}) > 1:
            raise ValueError("cannot concatenate aligned and unaligned trajectories")
        t_max = max(t.num_steps for t in trajs)
        if any(t.num_steps != t_max for t in trajs):
            trajs = [_pad_steps(t, t_max) for t in trajs]  # padding steps are inactive: lengths do not change
        if any(t.lengths is not None for t in trajs):
            trajs = [t if t.lengths is not None else replace(t, lengths=t.mask.sum(1)) for t in trajs]
        chains = [shared_chain(t.states, t.actions) for t in trajs]
        stored_once = all(c is not None for c in chains)
        skip = ("extras", "aligned", "outputs") + (("states", "actions") if stored_once else ())
        values = {f.name: _cat_any([getattr(t, f.name) for t in trajs], f.name) for f in fields(Trajectory) if f.name not in skip}
        values = _with_chain(values, _cat_any(chains, "states") if stored_once else None)
        outs = [t.outputs for t in trajs]
        if any(o is None for o in outs) and not all(o is None for o in outs):
            raise ValueError("cannot concatenate trajectories where 'outputs' is set in some but not all")
        values["outputs"] = None if outs[0] is None else concat_outputs(outs)
        values["extras"] = {k: _cat_any([t.extras[k] for t in trajs], f"extras.{k}") for k in keys}
        return Trajectory(**values, aligned=trajs[0].aligned)

    def to(self, device: torch.device | str) -> Trajectory:
        """Move every tensor (extras included) to ``device``; lists stay as they are."""

        def move(v: Any) -> Any:
            return v.to(device) if isinstance(v, (torch.Tensor, Ragged, Padded)) else v

        chain = shared_chain(self.states, self.actions)
        skip = ("extras", "aligned") if chain is None else ("extras", "aligned", "states", "actions")
        values = {f.name: move(getattr(self, f.name)) for f in fields(self) if f.name not in skip}
        values = _with_chain(values, None if chain is None else move(chain))
        values["extras"] = {k: move(v) for k, v in self.extras.items()}
        return Trajectory(**values, aligned=self.aligned)

    # -- step operations -----------------------------------------------------------------
    def subset(self, steps: Sequence[int] | torch.Tensor) -> Trajectory:
        """A view on some steps: ``steps`` is ``[K]`` (same steps for every row) or ``[B, K]``.

        Per-step fields become ``[B, K, ...]``; ``step_ids`` keeps the original positions so a
        policy can still find the matching timestep and noise level, and ``lengths`` keeps the
        full rows' active-step counts.
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

        per_step = {name: take(getattr(self, name)) for name in STEP_FIELDS if getattr(self, name) is not None}
        if self.values is not None:
            per_step["values"] = take(self.values)
        if self.advantages is not None and self.advantages.ndim == 2:
            per_step["advantages"] = take(self.advantages)
        lengths = self.lengths if self.lengths is not None else self.mask.sum(1)
        return replace(self, **per_step, lengths=lengths)

    def with_rewards(self, rewards: torch.Tensor) -> Trajectory:
        if rewards.shape != (self.batch_size,):
            raise ValueError(f"rewards must be [B={self.batch_size}], got {tuple(rewards.shape)}")
        return replace(self, rewards=rewards.float())
