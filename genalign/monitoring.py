"""The reward-hacking alarm: the trained reward keeps rising while a held-out monitor falls.

A policy that learns to please its reward model rather than the task (a blank image that
compresses well, an answer format a judge over-rewards) shows it as a divergence between the
trained reward and a second, held-out reward it is never trained on (``reward.monitor``: the
Shapes World verifier, another reward model). Per epoch the alarm compares moving averages over
``window`` epochs: it fires when the monitor's average has dropped more than ``margin`` below its
best so far while the trained reward's average is at least what it was at that best epoch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Mean of the last ``window`` values at every index from ``window - 1`` on (shorter: [])."""
    return [sum(values[i - window + 1 : i + 1]) / window for i in range(window - 1, len(values))]


@dataclass(frozen=True)
class Alarm:
    epoch: int  # 1-based epoch at which it fired
    best_epoch: int  # 1-based epoch of the monitor's best moving average
    monitor_best: float
    monitor_now: float
    reward_best: float  # the trained reward's moving average at the monitor's best epoch
    reward_now: float

    def message(self, margin: float) -> str:
        return (
            f"reward-hacking alarm at epoch {self.epoch}: the monitor fell from {self.monitor_best:.4f} "
            f"(epoch {self.best_epoch}) to {self.monitor_now:.4f} (more than reward.alarm_margin = {margin:g}) "
            f"while the trained reward went from {self.reward_best:.4f} to {self.reward_now:.4f}"
        )


def best_epoch(monitor: Sequence[float], window: int) -> int | None:
    """1-based epoch whose moving average of the monitor is highest so far (None: too few epochs)."""
    ma = moving_average(monitor, window)
    if not ma:
        return None
    return max(range(len(ma)), key=lambda i: (ma[i], -i)) + window  # the earliest of equal bests


def check(rewards: Sequence[float], monitor: Sequence[float], window: int, margin: float) -> Alarm | None:
    """The alarm for the epochs so far (one value per epoch in each sequence), or None."""
    if len(rewards) != len(monitor):
        raise ValueError(f"{len(rewards)} rewards but {len(monitor)} monitor values")
    ma_m, ma_r = moving_average(monitor, window), moving_average(rewards, window)
    best = best_epoch(monitor, window)
    if best is None:
        return None
    b = best - window
    now = len(ma_m) - 1
    if ma_m[now] < ma_m[b] - margin and ma_r[now] >= ma_r[b]:
        return Alarm(len(monitor), best, ma_m[b], ma_m[now], ma_r[b], ma_r[now])
    return None
