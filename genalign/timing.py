"""Where a run's time goes: wall seconds per named phase.

Phases nest, and each is charged only for its own time: the VAE decode inside a rollout
counts as ``decode``, the rest of the rollout as ``rollout``, so the phases of an epoch add up
to its wall time. A phase marked ``whole`` (evaluation, report samples) keeps everything inside
it, so a decode during evaluation counts as evaluation, not as training-time decode.

The trainer reads the seconds each epoch (``metrics.jsonl`` keys ``time/<phase>``); code deep
in a policy marks its phases on the module clock :data:`CLOCK` without knowing who reads it.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator

# The phases a training epoch reports, in the order the report draws them.
PHASES = ("rollout", "decode", "reward", "probe", "reference", "train", "evaluation", "checkpoint", "report")
# The phases that do the training work (samples per second counts these).
TRAINING_PHASES = ("rollout", "decode", "reward", "probe", "reference", "train")


class PhaseClock:
    """Exclusive wall seconds per phase since the last :meth:`take`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._inner: list[float] = []  # per open phase: seconds its nested phases took
        self._whole = 0  # open phases that keep their nested time

    @contextlib.contextmanager
    def phase(self, name: str, whole: bool = False) -> Iterator[None]:
        if self._whole:  # inside a whole phase: charged to it
            yield
            return
        start = time.perf_counter()
        self._inner.append(0.0)
        self._whole += int(whole)
        try:
            yield
        finally:
            self._whole -= int(whole)
            elapsed = time.perf_counter() - start
            self.seconds[name] += elapsed - self._inner.pop()
            if self._inner:
                self._inner[-1] += elapsed

    def take(self) -> dict[str, float]:
        """The seconds per phase since the last take (every phase of :data:`PHASES`, 0 when
        unused), and start counting afresh."""
        out = {name: float(self.seconds.get(name, 0.0)) for name in PHASES}
        out.update({k: float(v) for k, v in self.seconds.items() if k not in out})
        self.seconds.clear()
        return out


CLOCK = PhaseClock()


def phase(name: str, whole: bool = False) -> contextlib.AbstractContextManager[None]:
    """Mark a phase on the module clock: ``with timing.phase("decode"): ...``."""
    return CLOCK.phase(name, whole)
