"""A weighted sum of reward models, with every component kept for logging.

total = Σ_k w_k · r_k. Component scores are logged as ``<name>`` and their own components
as ``<name>/<component>``. Non-finite scores pass through: the trainer decides whether to
drop those rows or stop, and :func:`check_finite` names the component and rows.
"""

from __future__ import annotations

import threading
import time
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


class RewardTimeout(TimeoutError):
    """A reward call did not return within its time limit."""


def call_with_timeout(fn: Any, timeout: float, *args: Any) -> Any:
    """``fn(*args)``, or :class:`RewardTimeout` after ``timeout`` seconds (0: no limit).

    The call runs in a daemon thread; one that hangs cannot be stopped from Python and is left
    running in the background (it holds no lock of the trainer, and its result is discarded)."""
    if timeout <= 0:
        return fn(*args)
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = fn(*args)
        except BaseException as e:  # handed to the caller's thread
            result["error"] = e

    worker = threading.Thread(target=target, name="genalign-reward", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise RewardTimeout(f"no answer within {timeout:g} s")
    if "error" in result:
        raise result["error"]
    return result["value"]


class Retrying:
    """A reward that survives a failing reward model: a call that raises, or that does not
    return within ``timeout`` seconds (0: no limit), is retried ``retries`` times, waiting
    ``wait`` seconds and doubling; if it still fails, every row is scored alone (same retries)
    and the rows that keep failing get a NaN score, which the trainer drops, counts and stops on
    past ``train.max_nonfinite_fraction``. ``failed_rows`` counts them.

    Errors that no retry can fix (a TypeError or ValueError from the inputs themselves, such as
    images of the wrong range) are raised at once.
    """

    def __init__(self, reward: Any, retries: int = 2, wait: float = 1.0, warn: Any = print, sleep: Any = None,
                 timeout: float = 0.0):
        self.reward, self.retries, self.wait, self.warn, self.timeout = reward, retries, wait, warn, timeout
        self.sleep = sleep or time.sleep
        self.name, self.differentiable = reward.name, getattr(reward, "differentiable", False)
        self.failed_rows = 0
        self._keys: list[str] = []  # component names of the last successful call

    def _attempt(self, outputs: Any, conditions: Sequence[Any], what: str) -> RewardOutput | Exception:
        error: Exception | None = None
        for attempt in range(self.retries + 1):
            try:
                out = call_with_timeout(self.reward, self.timeout, outputs, conditions)
                self._keys = list(out.components)
                return out
            except (TypeError, ValueError, NonFiniteRewardError):
                raise
            except Exception as e:  # a crashed server, a timeout, an out-of-memory: retry
                error = e
                if attempt < self.retries:
                    delay = self.wait * 2**attempt
                    self.warn(f"[genalign] reward {self.name!r} failed on {what} ({type(e).__name__}: {e}); "
                              f"retry {attempt + 1}/{self.retries} in {delay:g} s")
                    self.sleep(delay)
        assert error is not None
        return error

    def __call__(self, outputs: Any, conditions: Sequence[Any]) -> RewardOutput:
        conditions = list(conditions)
        result = self._attempt(outputs, conditions, f"a batch of {len(conditions)}")
        if isinstance(result, RewardOutput):
            return result
        if not isinstance(outputs, (torch.Tensor, list, tuple)):
            raise result
        self.warn(f"[genalign] reward {self.name!r} keeps failing on the batch ({type(result).__name__}: {result}); "
                  f"scoring its {len(conditions)} rows one at a time")
        rows = [self._attempt(outputs[i : i + 1], conditions[i : i + 1], f"row {i}") for i in range(len(conditions))]
        good = [r for r in rows if isinstance(r, RewardOutput)]
        keys = list(good[0].components) if good else (self._keys or [self.name])
        nan = torch.full((1,), float("nan"))
        scores, components = [], {k: [] for k in keys}
        for r in rows:
            ok = isinstance(r, RewardOutput)
            scores.append(r.scores.detach().float().cpu().view(-1) if ok else nan)
            for k in keys:
                components[k].append(r.components[k].detach().float().cpu().view(-1) if ok and k in r.components else nan)
        failed = len(rows) - len(good)
        self.failed_rows += failed
        if failed:
            self.warn(f"[genalign] reward {self.name!r}: {failed} of {len(rows)} rows failed after {self.retries} "
                      f"retries and are left out (NaN)")
        return RewardOutput(scores=torch.cat(scores), components={k: torch.cat(v) for k, v in components.items()})
