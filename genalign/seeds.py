"""Every random stream of a training run, named in one place.

A seed is derived from exactly four integers, ``(seed, stream, epoch, index)``, through
numpy's ``SeedSequence``. Two streams never share a seed by construction: their ``stream``
ids differ, and the tuple always has four entries (so no tuple is a zero-padded prefix of
another, which ``SeedSequence`` would not tell apart). No index depends on a batch size:
rows and prompts are numbered within the epoch, passes within the update phase.

=================  ===============================  =======================================
stream             index                            draws
=================  ===============================  =======================================
``PROMPTS``        0                                the epoch's prompts
``PLAN``           0                                the algorithm's plan (SePPO's reference)
``ROLLOUT``        row ``p·n + j``                  the row's initial and step noise
``BRANCH_PREFIX``  prompt ``p``                     a branched prompt's shared prefix
``NOISE_WINDOW``   prompt ``p``                     where the prompt's noise window starts
``FORWARD``        pair ``p·n + j``                 forward-process noise (off-policy pairs)
``TARGETS``        pair ``p·n + j``                 the off-policy target's draw (render, file)
``SHUFFLE``        pass ``i`` over the data         the minibatch permutation of the pass
``TRAIN_STEPS``    pass ``i`` over the data         ``Algorithm.train_steps`` of the pass
=================  ===============================  =======================================

(p: the prompt's position among the epoch's prompts, n: samples per prompt, j < n.)

Evaluation and report grids use the plain integer seeds of the config (``eval.seed + j``), so
that ``genalign eval`` reproduces them by hand; derived seeds always lie in [2^62, 2^63), so
no training draw can coincide with one of those (``DERIVED_MIN``).
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np
import torch

#: every derived seed is at least this; plain user seeds stay below it
DERIVED_MIN = 2**62


class Stream(IntEnum):
    PROMPTS = 1
    PLAN = 2
    ROLLOUT = 3
    BRANCH_PREFIX = 4
    NOISE_WINDOW = 5
    FORWARD = 6
    TARGETS = 7
    SHUFFLE = 9
    TRAIN_STEPS = 10


def derive_seed(seed: int, stream: Stream, epoch: int, index: int = 0) -> int:
    """A 63-bit seed for draw ``index`` of ``stream`` in ``epoch``, stable across runs and platforms."""
    parts = [int(seed), int(stream), int(epoch), int(index)]
    if any(p < 0 for p in parts):
        raise ValueError(f"seed parts must be >= 0, got {parts}")
    # bit 62 set: derived seeds lie in [2^62, 2^63), apart from the plain seeds users give
    # (evaluation, report grids, `genalign sample`), which are small integers
    return (int(np.random.SeedSequence(parts).generate_state(1, dtype=np.uint64)[0]) & (2**62 - 1)) | 2**62


def generator(seed: int, stream: Stream, epoch: int, index: int = 0) -> torch.Generator:
    """A CPU generator seeded with :func:`derive_seed`."""
    return torch.Generator().manual_seed(derive_seed(seed, stream, epoch, index))


def generators(seed: int, stream: Stream, epoch: int, indices: list[int]) -> list[torch.Generator]:
    """One generator per index (per-row noise)."""
    return [generator(seed, stream, epoch, i) for i in indices]
