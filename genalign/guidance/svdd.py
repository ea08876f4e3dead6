"""SVDD: soft value-based decoding — reward guidance without fine-tuning or reward gradients.

Paper: Li, Zhao, Uehara et al., "Derivative-Free Guidance in Continuous and Discrete Diffusion
Models with Soft Value-Based Decoding" (2024), Alg. 1. Symbols: ``num_candidates -> M``,
``alpha -> α``, ``value -> v(x_{t−1}, c)``.

The target is p*(x_{t−1} | x_t) ∝ p_pre(x_{t−1} | x_t) · exp(v(x_{t−1}) / α). At every chain
step each row draws M candidates from the pretrained policy's own stochastic step, values them
and keeps one: the argmax when α = 0 (the paper's default), else a draw from softmax(v / α).

- SVDD-PM (:class:`PMValue`): v = reward(decode(x̂0(x_{t−1}))), the reward of the Tweedie
  estimate (``Policy.predict_final``); no training.
- SVDD-MC: v is a learned time-conditioned regressor (any callable ``(traj, step) -> [B]``).

Chunks (``chunk`` = k): each candidate takes k steps with its own generator before it is valued,
so a decision is made every k steps (k = 1 is the paper's per-step rule). On token policies a
step is a token and x̂0 is the greedy completion of the prefix (``predict_final``), so each
decision compares M continuations of k tokens by the reward of their greedy completions.

Generators: candidate 0 of a row continues the row's own generator and candidates 1…M−1 use
generators derived from the row's seed, so M = 1 reproduces plain sampling bit-for-bit.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from genalign.progress import progress as progress_bar
from genalign.trajectory import Trajectory

#: a value estimate of the finished sample from the state after ``step`` steps: (traj, step) -> [B]
Value = Callable[[Trajectory, int], torch.Tensor]


@dataclass
class ComputeCounter:
    """What a sampler spent: model evaluations are policy rows × steps (CFG doubles the rows a
    UNet sees; that factor is the same for every method and left out; for a token policy a step
    is one decoded token), decoder and reward calls are per sample."""

    model_evals: int = 0
    decoder_calls: int = 0
    reward_calls: int = 0
    wall_seconds: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, float]:
        return {"model_evals": self.model_evals, "decoder_calls": self.decoder_calls,
                "reward_calls": self.reward_calls, "wall_seconds": round(self.wall_seconds, 4), **self.extra}


class PMValue:
    """SVDD-PM: the reward of the decoded Tweedie estimate x̂0 of the state (token policies: of
    the greedy completion of the prefix)."""

    def __init__(self, policy: Any, reward: Any, counter: ComputeCounter | None = None):
        self.policy, self.reward, self.counter = policy, reward, counter

    def __call__(self, traj: Trajectory, step: int) -> torch.Tensor:
        # the state is the whole sample: decoded, and no row acts at or after ``step``
        finished = traj.outputs is not None and (step == traj.num_steps or not bool(traj.mask[:, step:].any()))
        outputs = traj.outputs if finished else self.policy.predict_final(traj, step)
        if self.counter is not None:
            self.counter.reward_calls += traj.batch_size
            if not finished:  # finished candidates were decoded by Policy.step (counted by the sampler)
                self.counter.decoder_calls += traj.batch_size
                self.counter.model_evals += self._prediction_cost(traj, step)
        return self.reward(outputs, traj.conditions).scores.float()

    def _prediction_cost(self, traj: Trajectory, step: int) -> int:
        """Model evaluations behind ``predict_final``: one ε prediction per row; for a token
        policy a greedy completion, counted as at most T − step tokens for each row that took
        the last step (rows that ended before it decode nothing)."""
        if getattr(self.policy, "log_prob_unit", None) != "token":
            return traj.batch_size
        running = traj.mask[:, step - 1] if step > 0 else torch.ones(traj.batch_size, dtype=torch.bool)
        return int(running.sum()) * (traj.num_steps - step)


def select_candidates(values: torch.Tensor, alpha: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """values ``[B, M]`` -> chosen candidate per row ``[B]``: argmax (α = 0) or softmax(v/α) draws.
    Non-finite values are never chosen unless a row has nothing else."""
    v = torch.where(torch.isfinite(values), values, torch.full_like(values, -torch.inf))
    if alpha == 0:
        return v.argmax(1)
    logits = v / alpha
    all_bad = torch.isinf(logits).all(1, keepdim=True)
    probs = torch.softmax(torch.where(all_bad, torch.zeros_like(logits), logits), 1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).view(-1).to(values.device)


def _derived_seed(seed: int, m: int) -> int:
    return int(np.random.SeedSequence([seed, m, 0x5DD]).generate_state(1, dtype=np.uint64)[0]) & (2**63 - 1)


@torch.no_grad()
def svdd_sample(
    policy: Any,
    conditions: Sequence[Any],
    n_per_condition: int,
    seeds: Sequence[int],
    value: Value,
    num_candidates: int = 4,
    alpha: float = 0.0,
    counter: ComputeCounter | None = None,
    progress: bool = False,
    chunk: int = 1,
) -> Trajectory:
    """Guided samples, ``len(conditions) * n_per_condition`` rows (one seed per row); a
    decision every ``chunk`` steps. Stops early once every row has finished (``outputs`` set)."""
    if num_candidates < 1:
        raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    n_rows = len(conditions) * n_per_condition
    if len(seeds) != n_rows:
        raise ValueError(f"need one seed per output row ({n_rows}), got {len(seeds)}")
    t0 = time.perf_counter()
    m = num_candidates
    own = policy.row_generators(conditions, n_per_condition, [int(s) for s in seeds])  # the rollout's streams
    extra = [[torch.Generator().manual_seed(_derived_seed(int(s), j)) for j in range(1, m)] for s in seeds]
    select_gen = torch.Generator().manual_seed(_derived_seed(int(seeds[0]), 2**31))
    traj = policy.start(conditions, n_per_condition, own)
    horizon = traj.num_steps
    for first in progress_bar(range(0, horizon, chunk), desc="svdd steps", leave=False, disable=not progress):
        gens = [g for i in range(n_rows) for g in [own[i], *extra[i]]]  # row-major, candidate 0 = own
        cand = traj
        for step in range(first, min(first + chunk, horizon)):
            # the first step branches M candidates per row; the others continue each candidate
            cand = policy.step(cand, step, m if step == first else 1, gens)  # [B*M rows]; the last step decodes
            if counter is not None:
                counter.model_evals += int(cand.mask[:, step].sum())  # rows that took the step
                counter.decoder_calls += cand.batch_size if cand.outputs is not None else 0  # decoded once finished
            if cand.outputs is not None:
                break
        if m == 1:
            traj = cand
        else:
            values = value(cand, step + 1).view(n_rows, m)  # [B, M]
            choice = select_candidates(values, alpha, select_gen)  # [B]
            traj = cand[torch.arange(n_rows, device=choice.device) * m + choice]
        if traj.outputs is not None:
            break
    traj.group = torch.arange(len(conditions), device=traj.group.device).repeat_interleave(n_per_condition)
    if counter is not None:
        counter.wall_seconds += time.perf_counter() - t0
    return traj
