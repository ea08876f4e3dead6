"""The update phase's bookkeeping: minibatches, one normaliser per optimiser step, epoch metrics.

An algorithm's loss returns sums (:class:`~genalign.algorithms.base.LossTerms`). The trainer
back-propagates every ``total`` of an accumulation window, then :func:`scale_gradients`
multiplies the accumulated gradient once so that the step follows

    ∇ (Σ total) / (Σ normaliser),     both sums over the window's calls and all processes.

With DDP (and FSDP), gradients are already averaged over the P processes when they reach the
optimiser, i.e. (1/P) Σ_p ∇ total_p, so the factor is P / N_global. The count N_global is
all-reduced once per optimiser step.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch

from genalign.algorithms.base import LossTerms


def minibatches(batch_size: int, group: torch.Tensor, size: int, g: torch.Generator, whole_groups: bool) -> list[torch.Tensor]:
    """Row indices of each minibatch of one pass: a random permutation cut into ``size`` rows;
    with ``whole_groups`` whole groups (``group`` ``[B]``) are kept together (a minibatch closes
    once it reaches ``size`` rows)."""
    if not whole_groups:
        perm = torch.randperm(batch_size, generator=g)
        return [perm[i : i + size] for i in range(0, batch_size, size)]
    group = group.cpu()
    uniq = group.unique()
    batches, current = [], []
    for gi in uniq[torch.randperm(len(uniq), generator=g)]:
        current.extend((group == gi).nonzero().view(-1).tolist())
        if len(current) >= size:
            batches.append(torch.tensor(current))
            current = []
    if current:
        batches.append(torch.tensor(current))
    return batches


def global_count(local: float, accelerator) -> float:
    """Σ over processes of a per-process count (one all-reduce; none on a single process)."""
    if accelerator.num_processes == 1:
        return float(local)
    return float(accelerator.reduce(torch.tensor([float(local)], dtype=torch.float64, device=accelerator.device), "sum"))


def scale_gradients(modules: Iterable[torch.nn.Module], params: Iterable[torch.nn.Parameter], factor: float) -> None:
    """Multiply every accumulated gradient by ``factor`` (each tensor once)."""
    seen: set[int] = set()
    for p in [q for m in modules for q in m.parameters()] + list(params):
        if p.grad is not None and id(p) not in seen:
            seen.add(id(p))
            p.grad.mul_(factor)


class EpochSums:
    """Loss, metrics and counts of one update phase, reduced over processes at the end.

    ``loss`` and every metric are reported as Σ / Σ normaliser over all calls of the phase;
    counts (per-row totals) are summed over the calls that see each row once (``first_pass``).
    """

    def __init__(self) -> None:
        self.total = 0.0
        self.normaliser = 0.0
        self.metrics: dict[str, float] = defaultdict(float)
        self.counts: dict[str, float] = defaultdict(float)
        self.grad_norms: list[float] = []
        self.steps = 0

    def add(self, terms: LossTerms, first_pass: bool) -> None:
        self.total += float(terms.total.detach())
        self.normaliser += float(terms.normaliser)
        for k, v in terms.metrics.items():
            self.metrics[k] += float(v)
        if first_pass:
            for k, v in terms.counts.items():
                self.counts[k] += float(v)

    def reduce(self, accelerator) -> dict[str, float]:
        """The phase's metrics, identical on every process."""
        from accelerate.utils import gather_object

        metric_keys, count_keys = sorted(self.metrics), sorted(self.counts)
        if accelerator.num_processes > 1:  # a process may have seen no call that reports a key
            metric_keys = sorted(set(gather_object(metric_keys)))
            count_keys = sorted(set(gather_object(count_keys)))
        values = [self.total, self.normaliser] + [self.metrics.get(k, 0.0) for k in metric_keys]
        values += [self.counts.get(k, 0.0) for k in count_keys]
        values.append(sum(self.grad_norms))
        t = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
        if accelerator.num_processes > 1:
            t = accelerator.reduce(t, "sum") / torch.tensor(
                [1.0] * (len(values) - 1) + [accelerator.num_processes], dtype=torch.float64, device=t.device
            )
        v = t.tolist()
        norm = v[1]
        out = {"loss": v[0] / norm if norm > 0 else 0.0}
        out.update({k: v[2 + i] / norm if norm > 0 else 0.0 for i, k in enumerate(metric_keys)})
        out.update({k: v[2 + len(metric_keys) + i] for i, k in enumerate(count_keys)})
        out["optimizer_steps"] = float(self.steps)
        if self.grad_norms:
            out["grad_norm"] = v[-1] / len(self.grad_norms)
        return out
