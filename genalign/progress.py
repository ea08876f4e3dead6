"""Progress reporting that suits where the output goes.

On a terminal, :func:`progress` is a tqdm bar. When the stream is not a terminal (output
redirected to a file, a CI log, a job scheduler), it prints plain lines instead, at most
about every 10% of the work or every ``interval`` seconds, with no carriage returns:

    epochs: 15/150 (10%) 00:42 elapsed, reward=0.412
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO


def _is_tty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class LineProgress:
    """Iterate ``iterable`` and print a plain progress line now and then (no ``\\r``)."""

    def __init__(self, iterable: Iterable[Any] | None, desc: str = "", total: int | None = None, initial: int = 0,
                 disable: bool = False, interval: float = 30.0, file: TextIO | None = None):
        self.iterable = iterable
        self.desc = desc
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except TypeError:
                total = None
        self.total = total
        self.n = initial
        self.disable = disable
        self.interval = interval
        self.file = file
        self.postfix = ""
        self.last_printed = initial
        self.start = time.monotonic()
        self.last_time = self.start
        self.last_fraction = initial / total if total else 0.0

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable or ():
            yield item
            self.update(1)

    def __len__(self) -> int:
        return self.total or 0

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.disable:
            return
        now = time.monotonic()
        fraction = self.n / self.total if self.total else 0.0
        done = self.total is not None and self.n >= self.total
        if done or fraction - self.last_fraction >= 0.1 - 1e-9 or now - self.last_time >= self.interval:
            self.last_time, self.last_fraction = now, fraction
            self._print()

    def _print(self) -> None:
        self.last_printed = self.n
        count = f"{self.n}/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else f"{self.n}"
        line = f"{self.desc}: {count} {_clock(time.monotonic() - self.start)} elapsed"
        if self.postfix:
            line += f", {self.postfix}"
        print(line, file=self.file or sys.stderr, flush=True)

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def close(self) -> None:
        """A last line when the loop ended between two progress lines (stopped early, no total)."""
        if not self.disable and self.n != self.last_printed:
            self._print()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress(iterable: Iterable[Any] | None = None, desc: str = "", total: int | None = None, *, leave: bool = True,
             disable: bool = False, initial: int = 0, interval: float = 30.0, file: TextIO | None = None) -> Any:
    """A tqdm bar on a terminal; plain occasional lines (every ~10% or ``interval`` s) otherwise.

    Both support iteration, ``update(n)``, ``set_postfix(**values)`` and ``close()``.
    ``leave=False`` (transient inner loops) prints nothing at all when not on a terminal.
    """
    stream = file or sys.stderr
    if _is_tty(stream):
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, total=total, leave=leave, disable=disable, initial=initial, file=file)
    return LineProgress(iterable, desc=desc, total=total, initial=initial, disable=disable or not leave,
                        interval=interval, file=file)


def write(message: str, file: TextIO | None = None) -> None:
    """Print a line (to stdout by default) without breaking a progress bar that is on the terminal."""
    if _is_tty(sys.stderr):
        from tqdm.auto import tqdm

        tqdm.write(message, file=file)
    else:
        print(message, file=file or sys.stdout, flush=True)


def quiet_library_bars() -> None:
    """Off a terminal, turn off diffusers' and transformers' own bars ("Loading pipeline
    components", weight loading), which redraw with carriage returns. On a terminal: no-op."""
    if _is_tty(sys.stderr):
        return
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
