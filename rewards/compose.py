"""A weighted sum of reward models, with every component kept for logging.

total = Σ_k w_k · r_k. Component scores are logged as ``<name>`` and their own components
as ``<name>/<component>``. Non-finite scores pass through: the trainer decides whether to
drop those rows or stop, and :func:`check_finite` names the component and rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from rewards.base import RewardModel, RewardOutput


class NonFiniteRewardError(RuntimeError):
    """A reward model returned NaN or inf; the message names the model and rows."""


def check_finite(name: str, scores: torch.Tensor, conditions: Sequence[Any]) -> None:
    bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
    if bad:
        shown = ", ".join(f"row {i} ({conditions[i]!r})" for i in bad[:3])
        raise NonFiniteRewardError(f"reward '{name}' returned non-finite values for {len(bad)} samples: {shown}")


class WeightedSum:
    def __init__(self, models: Sequence[RewardModel], weights: Sequence[float]):
        if len(models) != len(weights) or not models:
            raise ValueError("WeightedSum needs one weight per reward model and at least one model")
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            raise ValueError(f"reward names must be unique, got {names}")
        self.models = list(models)
        self.weights = [float(w) for w in weights]
        self.name = "+".join(names) if len(names) > 1 else names[0]
        self.differentiable = all(m.differentiable for m in models)

    def __call__(self, outputs: Any, conditions: Sequence[Any]) -> RewardOutput:
        total = None
        components: dict[str, torch.Tensor] = {}
        details: list[dict[str, Any]] | None = None
        for model, weight in zip(self.models, self.weights):
            out = model(outputs, conditions)
            scores = out.scores.float()
            total = weight * scores if total is None else total + weight * scores.to(total.device)
            components[model.name] = scores.detach()
            for key, value in out.components.items():
                components[f"{model.name}/{key}"] = value.detach()
            if out.details is not None:
                details = details or [{} for _ in range(len(scores))]
                for row, d in zip(details, out.details):
                    row[model.name] = d
        return RewardOutput(scores=total, components=components, details=details)
