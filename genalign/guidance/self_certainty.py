"""Self-certainty: pick among an LM's own samples by how confident it was, with no reward model.

Paper: Kang, Zhao, Song et al., "Scalable Best-of-N Selection for Large Language Models via
Self-Certainty" (2025). Symbols: ``V`` vocabulary size, ``n`` active response tokens,
``p_ij`` the policy's probability of vocabulary entry j at response step i.

- Self-certainty of a response: the mean over its tokens of KL(Uniform ‖ p(·|x, y_<i)),

      SC(y|x) = −(1/(n·V)) Σ_i Σ_j log(V · p_ij)  ≥ 0,

  0 for a uniform distribution at every step, large for peaked ones. It needs the full
  next-token distribution: the policy's ``token_logits(traj) -> [B, T, V]`` (log-probs with the
  sampling temperature applied).
- Self-certainty best-of-N: the most certain of N samples.
- Borda voting: rank a condition's N samples by SC (rank r = 1 most certain); the sample of
  rank r casts (N − r + 1)^p votes for its answer; the answer with the most votes wins. p = 0 is
  a plain majority vote; large p approaches self-certainty best-of-N. Samples whose answer
  cannot be read cast no vote.

Works on any policy with ``log_prob_unit == "token"`` that implements ``token_logits``.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from genalign.guidance.svdd import ComputeCounter
from genalign.trajectory import Trajectory

#: output text -> its answer (equal answers vote together), or None when it states none
AnswerFn = Callable[[str], "str | None"]


def certainty_from_log_probs(log_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SC per row from full-vocabulary log-probs ``[B, T, V]`` and the active steps ``[B, T]``
    -> ``[B]`` float32 (−inf entries are tokens outside the action set: V counts the others). Inactive steps are ignored whatever they hold; a row without an active
    step gets −inf (never preferred)."""
    if log_probs.ndim != 3 or mask.shape != log_probs.shape[:2]:
        raise ValueError(f"need log_probs [B, T, V] and mask [B, T], got {tuple(log_probs.shape)} and {tuple(mask.shape)}")
    active = mask.to(log_probs.device).bool()
    # the uniform distribution is over the action set: tokens a policy never samples (−inf, e.g.
    # a VLM's image placeholders) are outside it and do not count in V
    allowed = torch.isfinite(log_probs)
    vocab = allowed.sum(-1).clamp(min=1).float()  # [B, T]
    mean_lp = torch.where(allowed, log_probs.float(), torch.zeros_like(log_probs, dtype=torch.float32)).sum(-1) / vocab
    kl = -(mean_lp + vocab.log())  # KL(U ‖ p) per step: [B, T]
    kl = torch.where(active, kl, torch.zeros_like(kl))
    n = active.sum(1)  # [B]
    sc = kl.sum(1) / n.clamp(min=1)
    return torch.where(n > 0, sc, torch.full_like(sc, -torch.inf))


@torch.no_grad()
def self_certainty(policy: Any, traj: Trajectory) -> torch.Tensor:
    """SC(y|x) of every row of ``traj`` under ``policy`` ``[B]`` (one teacher-forced forward)."""
    if getattr(policy, "log_prob_unit", None) != "token" or not hasattr(policy, "token_logits"):
        raise TypeError(f"self-certainty needs a token policy with token_logits; {type(policy).__name__} has none")
    return certainty_from_log_probs(policy.token_logits(traj), traj.mask).cpu()


def most_certain(certainty: torch.Tensor) -> torch.Tensor:
    """``[C, N]`` certainties -> index of each condition's most certain sample ``[C]`` (the
    first on ties; non-finite values only when a condition has nothing else)."""
    c = torch.where(torch.isnan(certainty), torch.full_like(certainty, -torch.inf), certainty)
    return c.argmax(1)


def borda_select(certainty: torch.Tensor, answers: Sequence[Sequence[str | None]], power: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Borda voting over ``[C, N]`` certainties and each sample's answer (``answers[c][i]``).

    Returns the chosen sample per condition ``[C]`` (the most certain sample of the winning
    answer; the most certain sample overall when no sample states an answer) and the winner's
    share of the votes ``[C]`` (0 when nobody voted). Ties between answers go to the one whose
    best sample is more certain; equal certainties rank by sample order.
    """
    if power < 0:
        raise ValueError(f"Borda power p must be >= 0, got {power}")
    n_cond, n = certainty.shape
    if len(answers) != n_cond or any(len(a) != n for a in answers):
        raise ValueError(f"need {n} answers for each of {n_cond} conditions")
    chosen, share = [], []
    for c in range(n_cond):
        order = sorted(range(n), key=lambda i: (-_finite(float(certainty[c, i])), i))  # rank 1 first
        votes: dict[str, float] = {}
        best: dict[str, int] = {}  # answer -> its most certain sample
        for rank, i in enumerate(order, start=1):
            a = answers[c][i]
            if a is None:
                continue
            votes[a] = votes.get(a, 0.0) + float(n - rank + 1) ** power
            best.setdefault(a, i)
        if not votes:
            chosen.append(order[0])
            share.append(0.0)
            continue
        position = {i: r for r, i in enumerate(order)}
        winner = max(votes, key=lambda a: (votes[a], -position[best[a]]))
        chosen.append(best[winner])
        share.append(votes[winner] / sum(votes.values()))
    return torch.tensor(chosen, dtype=torch.long), torch.tensor(share, dtype=torch.float32)


def _finite(x: float) -> float:
    return x if math.isfinite(x) or x == math.inf else -math.inf


def tagged_answer(pattern: str = r"<answer>(.*?)</answer>") -> AnswerFn:
    """An answer function: the last match of ``pattern``'s group 1, lower-cased with spaces
    collapsed and a final full stop dropped; None when the text has no match (or an empty one)."""
    compiled = re.compile(pattern, flags=re.DOTALL)

    def answer(text: str) -> str | None:
        matches = list(compiled.finditer(text))
        if not matches:
            return None
        m = matches[-1]
        value = re.sub(r"\s+", " ", (m.group(1) if m.groups() else m.group(0)).strip().lower()).rstrip(".").strip()
        return value or None

    return answer


def _sample_and_score(policy: Any, conditions: Sequence[Any], n: int, seeds: Sequence[int],
                      counter: ComputeCounter | None) -> tuple[Trajectory, torch.Tensor]:
    if len(seeds) != len(conditions) * n:
        raise ValueError(f"need {len(conditions) * n} seeds (n per condition), got {len(seeds)}")
    t0 = time.perf_counter()
    traj = policy.rollout(list(conditions), n, [int(s) for s in seeds])
    certainty = self_certainty(policy, traj).view(len(conditions), n)  # [C, N]
    if counter is not None:
        counter.model_evals += traj.batch_size * traj.num_steps
        counter.decoder_calls += traj.batch_size
        counter.extra["scoring_passes"] = counter.extra.get("scoring_passes", 0) + traj.batch_size
        counter.wall_seconds += time.perf_counter() - t0
    return traj, certainty


def _pick(traj: Trajectory, index: torch.Tensor, n: int) -> Trajectory:
    chosen = traj[torch.arange(len(index)) * n + index]
    chosen.group = torch.arange(len(index), device=chosen.group.device)
    return chosen


@torch.no_grad()
def self_certainty_best_of_n(
    policy: Any, conditions: Sequence[Any], n: int, seeds: Sequence[int], counter: ComputeCounter | None = None
) -> tuple[Trajectory, torch.Tensor]:
    """One output per condition: the most self-certain of ``n`` samples (``seeds``: one per
    sample, condition-major). Returns the chosen rows and their certainty ``[len(conditions)]``.
    Compute: the N samples' decoding steps, plus one teacher-forced scoring pass per sample
    (``counter.extra['scoring_passes']``); no reward call."""
    traj, certainty = _sample_and_score(policy, conditions, n, seeds, counter)
    best = most_certain(certainty)
    return _pick(traj, best, n), certainty.gather(1, best.view(-1, 1)).view(-1)


@torch.no_grad()
def borda_vote(
    policy: Any,
    conditions: Sequence[Any],
    n: int,
    seeds: Sequence[int],
    answer_fn: AnswerFn,
    power: float = 0.5,
    counter: ComputeCounter | None = None,
) -> tuple[Trajectory, torch.Tensor]:
    """One output per condition by Borda voting over ``n`` samples (see :func:`borda_select`):
    the most certain sample of the winning answer. ``answer_fn`` maps an output text to its
    answer (e.g. :func:`tagged_answer`); ``power`` p = 0 is a majority vote. Returns the chosen
    rows and the winning answer's vote share ``[len(conditions)]``."""
    traj, certainty = _sample_and_score(policy, conditions, n, seeds, counter)
    answers = [[answer_fn(str(traj.outputs[c * n + i])) for i in range(n)] for c in range(len(conditions))]
    index, share = borda_select(certainty, answers, power)
    return _pick(traj, index, n), share
