"""The algorithm seam: a loss over trajectories. Protocol only; no policy imports, ever."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import torch

from genalign.trajectory import Trajectory


@dataclass(frozen=True)
class SamplingPlan:
    """What an algorithm asks of the trainer for one epoch's data (plain data, no logic).

    - ``"rollouts"``: ``samples_per_prompt`` rollouts per prompt; with ``shared_noise`` the
      rollouts of one prompt start from the same initial state.
    - ``"branches"``: one prefix per prompt, then ``samples_per_prompt`` continuations from
      each prefix's own step ``round(branch_at · L)``, L = the prefix's number of active steps
      (a chain's T, a response's length) (``Policy.continue_from``); ``group`` = prefix.
    - ``"off_policy"``: per prompt, one sample of the reference checkpoint (``reference``)
      and one off-policy target from the algorithm's ``targets``; both are turned into
      forward-process trajectories (``Policy.forward_process``), and ``train_steps`` picks
      the steps to train.

    The sampling options (``shared_noise``, ``noise_window``, ``antithetic``) are policy
    capabilities: the algorithm's config names those it needs (``requires()``) and the config
    check refuses a policy that does not declare them.
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
    #: which weights serve as reference: "initial" (policy.reference()) or a snapshot index
    reference: int | Literal["initial"] = "initial"
    #: ``"rollouts"`` only: after ``advantages`` selects the rows to train, their outputs are
    #: re-encoded as data by ``Policy.forward_process`` (teacher-forced tokens, forward-noised
    #: images) and the loss trains on those trajectories instead of the sampled chains
    teacher_forced: bool = False


@dataclass
class LossTerms:
    """One loss call's contribution to an optimiser step: sums, never means.

    The trainer calls ``Algorithm.loss`` once per (minibatch, step chunk) of an accumulation
    window, back-propagates every ``total``, and scales the accumulated gradient once, so that
    the update is ∇(Σ total) / (Σ normaliser), the sums running over every call of the window
    and every process. How the data is cut into calls (``policy.step_chunk``,
    ``train_batch_size`` × ``gradient_accumulation_steps``, the number of processes, rows
    dropped or masked) therefore does not change the update.

    - ``total``: scalar tensor, the SUM of the per-entry loss terms of this call (carries
      gradients); inactive entries (mask False) contribute exactly 0.
    - ``normaliser``: this call's share of the denominator. A mean over active entries
      contributes its number of active entries (token-mean for text); a mean over sequences
      weights each entry by 1 / (its sequence's length) in ``total`` and contributes
      (entries here) / (sequence length) per sequence, which adds up to 1 per sequence across
      chunks; a constant normaliser contributes its constant split over the calls. It depends
      on the batch (masks, lengths, labels), never on the log-prob values: under DeepSpeed the
      trainer counts it before the backward passes, from a call with zero log-probs.
    - ``metrics``: per-entry diagnostics summed over the same entries as ``total``; the trainer
      reports Σ metric / Σ normaliser (a mean per entry, whatever the chunking).
    - ``counts``: per-row totals (e.g. ``pairs``); the trainer sums them over one pass over the
      data (the first step chunk of every minibatch of the first inner epoch) and all processes.
    """

    total: torch.Tensor
    normaliser: float
    metrics: dict[str, float] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)

    @property
    def mean(self) -> torch.Tensor:
        """``total / normaliser`` (0 when nothing is active): this call alone, as a mean."""
        return self.total / self.normaliser if self.normaliser > 0 else self.total * 0.0

    def metric(self, name: str) -> float:
        """A metric as a mean per entry of this call alone."""
        return self.metrics[name] / self.normaliser if self.normaliser > 0 else 0.0


class AlgorithmConfig(Protocol):
    """What the config check asks of every algorithm config, besides its fields and ``validate``."""

    name: str

    def requires(self) -> frozenset[str]:
        """The policy capabilities (sampling options) this configuration samples with."""
        ...

    def resolve_units(self, unit: str) -> None:
        """Fill hyper-parameters left at None whose meaning depends on the policy's log-prob unit
        (``"dimension_mean"``: per-dimension means over a latent; ``"token"``: one token)."""
        ...


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
        Per-condition statistics key on :func:`genalign.conditions.condition_key`.
        Rows with a NaN reward must get advantage 0 or NaN (the trainer drops them either way)
        and must not touch any statistic.
        A NaN advantage means "do not train this row" (B²-DiffuRL keeps only the best and
        worst branch); the trainer masks such rows out.
        """
        ...

    def train_steps(self, traj: Trajectory, generator: torch.Generator) -> torch.Tensor:
        """Which steps each row trains on: ``[B, K]`` long indices into ``traj``'s steps; −1 pads
        a row that trains fewer than K steps (the trainer masks those entries out)."""
        ...

    def loss(self, batch: Trajectory, log_probs: torch.Tensor, ref_log_probs: torch.Tensor | None) -> LossTerms:
        """The summed loss of one call (see :class:`LossTerms`).

        ``batch`` is a step subset ``[B, k]`` (rows whose ``mask`` is False at a step are not
        trained there, and must add 0 to ``total`` and to ``normaliser``); ``log_probs``
        ``[B, k]`` carry gradients; ``ref_log_probs`` ``[B, k]`` or None. The same data cut
        into different calls must give the same Σ total and Σ normaliser.
        """
        ...

    def targets(self, conditions: Sequence[Any], seeds: Sequence[int], like: Any, prompts: Any) -> Any:
        """Off-policy outputs for ``conditions`` (plan kind ``"off_policy"`` only; others raise).

        ``like``: the reference samples' outputs, whose format the targets must match (an image
        size, texts); ``prompts``: the prompt source, whose ``targets(conditions, seeds, like)``
        is the embedded world's ground truth. ``seeds``: one per condition.
        """
        ...

    def epoch_metrics(self) -> dict[str, float]:
        """Diagnostics of the last ``advantages`` call (e.g. zero-variance groups), logged per epoch."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
