"""Where D3PO's pairwise labels come from: a reward's scalar, a Pareto comparison of several
reward components, or stored human labels. Each source maps a batch and its pairs to labels.

A label is +1 when the pair's first row is preferred, −1 when the second is, 0 for a tie
or a missing label (no loss). Sources read only the trajectory: ``rewards`` ``[B]``,
``extras['reward_components']`` ``[B, C]`` and ``extras['sample_id']`` (set by the trainer).
"""

from __future__ import annotations

from typing import Any

import torch

from genalign.conditions import condition_key
from genalign.preference_store import PreferenceStore, sample_digests
from genalign.trajectory import Trajectory


class RewardPreference:
    """Prefer the higher reward; |r_i − r_j| <= ``tie_tolerance`` is a tie."""

    def __init__(self, tie_tolerance: float = 0.0):
        self.tie_tolerance = tie_tolerance

    def __call__(self, batch: Trajectory, pairs: torch.Tensor) -> torch.Tensor:
        r = batch.rewards.float()  # [B]
        diff = r[pairs[:, 0]] - r[pairs[:, 1]]  # [P]
        labels = torch.sign(diff) * (diff.abs() > self.tie_tolerance)
        return torch.nan_to_num(labels, nan=0.0)


class ParetoPreference:
    """Prefer i over j when i is at least as good on every component and better on one
    (by more than ``tie_tolerance``); incomparable pairs are ties."""

    def __init__(self, tie_tolerance: float = 0.0):
        self.tie_tolerance = tie_tolerance

    def __call__(self, batch: Trajectory, pairs: torch.Tensor) -> torch.Tensor:
        if "reward_components" not in batch.extras:
            raise KeyError("Pareto preferences need extras['reward_components'] [B, C] (set by the trainer)")
        c = batch.extras["reward_components"].float()  # [B, C]
        d = c[pairs[:, 0]] - c[pairs[:, 1]]  # [P, C]
        tol = self.tie_tolerance
        i_wins = (d >= -tol).all(1) & (d > tol).any(1)
        j_wins = (d <= tol).all(1) & (d < -tol).any(1)
        labels = i_wins.float() - j_wins.float()
        return torch.where(torch.isfinite(d).all(1), labels, torch.zeros_like(labels))


class LabelledSampleMismatch(ValueError):
    """A rollout's output differs from the sample that was labelled under its id."""


class StoredPreference:
    """Labels looked up in a :class:`~genalign.preference_store.PreferenceStore` by
    (prompt, sample ids); unlabelled pairs count as ties and are reported as missing.

    For rows whose ids belong to a labelling round's samples, the batch's ``outputs`` must be
    the ones the annotators saw (their digests are compared once per id): otherwise the labels
    would train on other samples, and the run stops."""

    def __init__(self, path: str):
        self.store = PreferenceStore(path)
        self.missing = 0
        self.verified: set[str] = set()

    def __call__(self, batch: Trajectory, pairs: torch.Tensor) -> torch.Tensor:
        if "sample_id" not in batch.extras:
            raise KeyError("stored preferences need extras['sample_id'] (set by the trainer)")
        ids, prompts = list(batch.extras["sample_id"]), batch.conditions
        self._check_outputs(ids, batch.outputs)
        labels = []
        for i, j in pairs.tolist():
            label = self.store.label(condition_key(prompts[i]), ids[i], ids[j])
            self.missing += label is None
            labels.append(label or 0)
        return torch.tensor(labels, dtype=torch.float32)

    def _check_outputs(self, ids: list[str], outputs: Any) -> None:
        unchecked = [i for i in ids if i not in self.verified]
        stored = self.store.samples(unchecked) if unchecked and outputs is not None else {}
        if not stored:
            return
        digests = dict(zip(ids, sample_digests(outputs)))
        for sample_id, s in stored.items():
            if s.digest != digests[sample_id]:
                raise LabelledSampleMismatch(
                    f"sample {sample_id} differs from the one labelled in round {s.round} of {self.store.path}: the "
                    f"config, the base model or the run's weights changed since `genalign label new` sampled it, so "
                    f"its labels would train on other samples; sample a new round instead"
                )
            self.verified.add(sample_id)
