"""Stored preference labels: one SQLite table, one row per comparison.

A labelling tool (a person comparing two samples) writes rows; D3PO's ``store`` preference
source reads them. The format is deliberately plain so any tool can fill it:

    CREATE TABLE comparisons (
        id        INTEGER PRIMARY KEY,
        prompt    TEXT NOT NULL,   -- the condition both samples were generated for
        sample_a  TEXT NOT NULL,   -- sample ids (see below)
        sample_b  TEXT NOT NULL,
        chosen    TEXT NOT NULL CHECK (chosen IN ('a', 'b', 'tie')),
        annotator TEXT NOT NULL,   -- who labelled it (a person or a tool name)
        time      TEXT NOT NULL    -- ISO 8601, UTC
    );

Sample ids written by the trainer are ``s{seed}-e{epoch}-r{row}``: the run seed, the
1-based epoch and the row index of that epoch's rollouts — with the run's config and its
checkpoint of the previous epoch, the sample can be regenerated bit-for-bit (rollouts are
seeded per row). When one pair has several labels, the most recent row wins.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone

SCHEMA = """
CREATE TABLE IF NOT EXISTS comparisons (
    id        INTEGER PRIMARY KEY,
    prompt    TEXT NOT NULL,
    sample_a  TEXT NOT NULL,
    sample_b  TEXT NOT NULL,
    chosen    TEXT NOT NULL CHECK (chosen IN ('a', 'b', 'tie')),
    annotator TEXT NOT NULL,
    time      TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS comparisons_pair ON comparisons (prompt, sample_a, sample_b);
"""


@dataclass(frozen=True)
class Comparison:
    prompt: str
    sample_a: str
    sample_b: str
    chosen: str  # 'a', 'b' or 'tie'
    annotator: str
    time: str = ""


class PreferenceStore:
    """Read and append comparisons in a SQLite file (created on first write)."""

    def __init__(self, path: str, create: bool = False):
        if not create and not os.path.isfile(path):
            raise FileNotFoundError(f"preference store not found: {path!r}")
        self.path = path
        self.conn = sqlite3.connect(path)
        self.conn.executescript(SCHEMA)

    def add(self, rows: Iterable[Comparison]) -> int:
        """Append comparisons; returns how many were written. Bad ``chosen`` values raise."""
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        values = []
        for r in rows:
            if r.chosen not in ("a", "b", "tie"):
                raise ValueError(f"'chosen' must be 'a', 'b' or 'tie', got {r.chosen!r} (prompt {r.prompt!r})")
            values.append((r.prompt, r.sample_a, r.sample_b, r.chosen, r.annotator, r.time or now))
        with self.conn:
            self.conn.executemany(
                "INSERT INTO comparisons (prompt, sample_a, sample_b, chosen, annotator, time) VALUES (?, ?, ?, ?, ?, ?)", values
            )
        return len(values)

    def label(self, prompt: str, sample_i: str, sample_j: str) -> int | None:
        """+1 if ``sample_i`` was chosen over ``sample_j``, −1 if the reverse, 0 for a tie,
        None when the pair was never labelled (in either order)."""
        row = self.conn.execute(
            "SELECT sample_a, chosen FROM comparisons WHERE prompt = ? AND "
            "((sample_a = ? AND sample_b = ?) OR (sample_a = ? AND sample_b = ?)) ORDER BY time DESC, id DESC LIMIT 1",
            (prompt, sample_i, sample_j, sample_j, sample_i),
        ).fetchone()
        if row is None:
            return None
        first, chosen = row
        if chosen == "tie":
            return 0
        winner = first if chosen == "a" else (sample_j if first == sample_i else sample_i)
        return 1 if winner == sample_i else -1

    def __len__(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM comparisons").fetchone()[0])

    def close(self) -> None:
        self.conn.close()
