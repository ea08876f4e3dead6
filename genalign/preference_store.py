"""Stored preference labels in one SQLite file: the comparisons people made, and the labelling
rounds that queued them.

A labelling tool (a person comparing two samples) writes rows; D3PO's ``store`` preference
source reads them. The comparisons table is deliberately plain so any tool can fill it:

    CREATE TABLE comparisons (
        id        INTEGER PRIMARY KEY,
        prompt    TEXT NOT NULL,   -- the condition's key (genalign.conditions.condition_key)
        sample_a  TEXT NOT NULL,   -- sample ids (see below)
        sample_b  TEXT NOT NULL,
        chosen    TEXT NOT NULL CHECK (chosen IN ('a', 'b', 'tie')),
        annotator TEXT NOT NULL,   -- who labelled it (a person or a tool name)
        time      TEXT NOT NULL,   -- ISO 8601, UTC
        queue_id  INTEGER          -- the queued comparison it answers (NULL when written directly)
    );

Sample ids written by the trainer are ``s{seed}-e{epoch}-r{row}``: the run seed, the
1-based epoch and the row index of that epoch's rollouts — with the run's config and its
checkpoint of the previous epoch, the sample can be regenerated bit-for-bit (rollouts are
seeded per row). A pair's label averages its annotators: each annotator's most recent label
counts +1, −1 or 0 (a tie), and the sign of the mean decides (0: a tie, no loss).

The labelling rounds (``genalign label``, :mod:`genalign.labelling`) add four tables:
``rounds`` (round number, the epoch it samples), ``samples`` (one row per sampled output: its
file or text and a digest of the output, so training can check that it regenerated the very
samples that were labelled), ``queue`` (the pairs to compare) and ``journal`` (every answer,
skips included, in order, so an annotator's last answer can be undone).

Writes run in ``BEGIN IMMEDIATE`` transactions and every reader/writer may hold its own
connection: several annotators labelling at once never lose a label.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS comparisons (
    id        INTEGER PRIMARY KEY,
    prompt    TEXT NOT NULL,
    sample_a  TEXT NOT NULL,
    sample_b  TEXT NOT NULL,
    chosen    TEXT NOT NULL CHECK (chosen IN ('a', 'b', 'tie')),
    annotator TEXT NOT NULL,
    time      TEXT NOT NULL,
    queue_id  INTEGER
);
CREATE INDEX IF NOT EXISTS comparisons_pair ON comparisons (prompt, sample_a, sample_b);
CREATE TABLE IF NOT EXISTS rounds (
    round     INTEGER PRIMARY KEY,
    epoch     INTEGER NOT NULL,
    created   TEXT NOT NULL,
    info      TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS samples (
    id        TEXT PRIMARY KEY,
    round     INTEGER NOT NULL,
    prompt    TEXT NOT NULL,
    display   TEXT NOT NULL,
    kind      TEXT NOT NULL CHECK (kind IN ('image', 'video', 'text')),
    file      TEXT,
    text      TEXT,
    digest    TEXT NOT NULL,
    condition_file TEXT,
    condition TEXT
);
CREATE TABLE IF NOT EXISTS queue (
    id        INTEGER PRIMARY KEY,
    round     INTEGER NOT NULL,
    prompt    TEXT NOT NULL,
    sample_a  TEXT NOT NULL,
    sample_b  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS journal (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    annotator TEXT NOT NULL,
    queue_id  INTEGER NOT NULL,
    action    TEXT NOT NULL CHECK (action IN ('a', 'b', 'tie', 'skip')),
    comparison_id INTEGER,
    time      TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS journal_annotator ON journal (annotator, queue_id);
"""

# Columns added after a table first shipped: (table, column definition).
ADDED_COLUMNS = (("comparisons", "queue_id INTEGER"), ("samples", "condition TEXT"))
CHOICES = ("a", "b", "tie")
ACTIONS = CHOICES + ("skip",)


@dataclass(frozen=True)
class Comparison:
    prompt: str
    sample_a: str
    sample_b: str
    chosen: str  # 'a', 'b' or 'tie'
    annotator: str
    time: str = ""


@dataclass(frozen=True)
class Sample:
    """One sampled output of a labelling round (``file`` relative to the store's folder)."""

    id: str
    round: int
    prompt: str  # condition key
    display: str  # the text shown to annotators
    kind: str  # 'image', 'video' or 'text'
    digest: str
    file: str | None = None
    text: str | None = None
    condition_file: str | None = None
    condition: str | None = None  # a dict condition's JSON-serialisable fields (prompt, answer, ...)


class UnknownComparisonError(KeyError):
    """A queue id that is not in the store."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def sample_digests(outputs: Any) -> list[str]:
    """A digest per output, of what an annotator sees: images ``[B, C, H, W]`` and clips
    ``[B, F, C, H, W]`` in [0, 1] quantised to 8 bits (as their saved files), texts as UTF-8."""
    import torch

    if isinstance(outputs, torch.Tensor):
        q = (outputs.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
        return [hashlib.sha256(str(tuple(x.shape)).encode() + x.contiguous().numpy().tobytes()).hexdigest()[:32] for x in q]
    return [hashlib.sha256(str(o).encode("utf-8")).hexdigest()[:32] for o in outputs]


class PreferenceStore:
    """Read and append comparisons and labelling rounds in a SQLite file (created on first
    write with ``create=True``). Each instance holds one connection: give each thread its own."""

    def __init__(self, path: str, create: bool = False):
        if not create and not os.path.isfile(path):
            raise FileNotFoundError(f"preference store not found: {path!r}")
        self.path = path
        self.conn = sqlite3.connect(path, timeout=60, isolation_level=None)
        try:
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.executescript(SCHEMA)  # each statement is idempotent
            for table, column in ADDED_COLUMNS:  # a store written by an earlier release
                name = column.split()[0]
                if name not in self._columns(table):
                    with self._write() as c:
                        if name not in self._columns(table):
                            c.execute(f"ALTER TABLE {table} ADD COLUMN {column}")
        except sqlite3.DatabaseError as e:
            self.conn.close()
            raise ValueError(f"{path} is not a preference store ({e})") from e

    def _columns(self, table: str) -> list[str]:
        return [r[1] for r in self.conn.execute(f"PRAGMA table_info({table})")]

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken before reading what it depends on (no lost updates)."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # -- comparisons -------------------------------------------------------------------------
    def add(self, rows: Iterable[Comparison]) -> int:
        """Append comparisons; returns how many were written. Bad ``chosen`` values raise."""
        now = _now()
        values = []
        for r in rows:
            if r.chosen not in CHOICES:
                raise ValueError(f"'chosen' must be 'a', 'b' or 'tie', got {r.chosen!r} (prompt {r.prompt!r})")
            values.append((r.prompt, r.sample_a, r.sample_b, r.chosen, r.annotator, r.time or now))
        with self._write() as c:
            c.executemany(
                "INSERT INTO comparisons (prompt, sample_a, sample_b, chosen, annotator, time) VALUES (?, ?, ?, ?, ?, ?)", values
            )
        return len(values)

    def _votes(self, prompt: str, sample_i: str, sample_j: str) -> dict[str, int]:
        """Each annotator's most recent label of the pair: +1 if ``sample_i`` won, −1, 0 (tie)."""
        rows = self.conn.execute(
            "SELECT annotator, sample_a, chosen FROM comparisons WHERE prompt = ? AND "
            "((sample_a = ? AND sample_b = ?) OR (sample_a = ? AND sample_b = ?)) ORDER BY time, id",
            (prompt, sample_i, sample_j, sample_j, sample_i),
        ).fetchall()
        votes: dict[str, int] = {}
        for annotator, first, chosen in rows:  # later rows replace earlier ones
            if chosen == "tie":
                votes[annotator] = 0
            else:
                winner_is_first = chosen == "a"
                votes[annotator] = 1 if winner_is_first == (first == sample_i) else -1
        return votes

    def label(self, prompt: str, sample_i: str, sample_j: str) -> int | None:
        """+1 if ``sample_i`` is preferred over ``sample_j``, −1 if the reverse, 0 for a tie
        (the annotators' mean vote is 0), None when the pair was never labelled (in either order)."""
        votes = self._votes(prompt, sample_i, sample_j)
        if not votes:
            return None
        total = sum(votes.values())
        return _sign(total)

    def __len__(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM comparisons").fetchone()[0])

    def close(self) -> None:
        self.conn.close()

    # -- labelling rounds --------------------------------------------------------------------
    def add_round(self, epoch: int, samples: Sequence[Sample], pairs: Sequence[tuple[str, str, str]],
                  info: dict[str, Any] | None = None) -> int:
        """Record a new round (the next number): its samples and the ``(prompt, a, b)`` pairs
        to compare, in one transaction. Returns the round number."""
        with self._write() as c:
            number = int(c.execute("SELECT COALESCE(MAX(round), 0) + 1 FROM rounds").fetchone()[0])
            c.execute("INSERT INTO rounds (round, epoch, created, info) VALUES (?, ?, ?, ?)",
                      (number, epoch, _now(), json.dumps(info or {}, sort_keys=True)))
            c.executemany(
                "INSERT INTO samples (id, round, prompt, display, kind, file, text, digest, condition_file, condition) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(s.id, number, s.prompt, s.display, s.kind, s.file, s.text, s.digest, s.condition_file, s.condition)
                 for s in samples],
            )
            c.executemany("INSERT INTO queue (round, prompt, sample_a, sample_b) VALUES (?, ?, ?, ?)",
                          [(number, p, a, b) for p, a, b in pairs])
        return number

    def rounds(self) -> list[dict[str, Any]]:
        """Every round, oldest first: number, epoch, creation time, info, comparisons queued."""
        rows = self.conn.execute(
            "SELECT r.round, r.epoch, r.created, r.info, (SELECT COUNT(*) FROM queue q WHERE q.round = r.round) "
            "FROM rounds r ORDER BY r.round"
        ).fetchall()
        return [{"round": r, "epoch": e, "created": t, "info": json.loads(i), "comparisons": n} for r, e, t, i, n in rows]

    def latest_round(self) -> int | None:
        row = self.conn.execute("SELECT MAX(round) FROM rounds").fetchone()
        return None if row[0] is None else int(row[0])

    def samples(self, ids: Sequence[str] | None = None) -> dict[str, Sample]:
        """Samples by id (all of them, or those of ``ids`` that exist)."""
        cols = "id, round, prompt, display, kind, digest, file, text, condition_file, condition"
        if ids is None:
            rows = self.conn.execute(f"SELECT {cols} FROM samples").fetchall()
        else:
            rows = []
            ids = list(ids)
            for i in range(0, len(ids), 500):
                part = ids[i : i + 500]
                rows += self.conn.execute(f"SELECT {cols} FROM samples WHERE id IN ({','.join('?' * len(part))})", part).fetchall()
        return {r[0]: Sample(*r) for r in rows}

    def comparison(self, queue_id: int) -> dict[str, Any]:
        row = self.conn.execute("SELECT id, round, prompt, sample_a, sample_b FROM queue WHERE id = ?", (queue_id,)).fetchone()
        if row is None:
            raise UnknownComparisonError(f"no comparison {queue_id} in {self.path}")
        return dict(zip(("id", "round", "prompt", "sample_a", "sample_b"), row))

    def next_comparison(self, annotator: str, round: int | None = None) -> dict[str, Any] | None:
        """The first comparison of ``round`` (default: the latest) that ``annotator`` has not
        answered (labelled or skipped), or None when they are done."""
        round = self.latest_round() if round is None else round
        row = self.conn.execute(
            "SELECT q.id FROM queue q WHERE q.round = ? AND NOT EXISTS "
            "(SELECT 1 FROM journal j WHERE j.queue_id = q.id AND j.annotator = ?) ORDER BY q.id LIMIT 1",
            (round, annotator),
        ).fetchone()
        return None if row is None else self.comparison(int(row[0]))

    def progress(self, annotator: str, round: int | None = None) -> tuple[int, int]:
        """(comparisons ``annotator`` has answered, comparisons queued) in ``round`` (default: latest)."""
        round = self.latest_round() if round is None else round
        total = int(self.conn.execute("SELECT COUNT(*) FROM queue WHERE round = ?", (round,)).fetchone()[0])
        done = int(self.conn.execute(
            "SELECT COUNT(DISTINCT j.queue_id) FROM journal j JOIN queue q ON q.id = j.queue_id "
            "WHERE q.round = ? AND j.annotator = ?", (round, annotator)).fetchone()[0])
        return done, total

    def record(self, queue_id: int, annotator: str, action: str) -> bool:
        """``annotator``'s answer to a queued comparison: 'a', 'b', 'tie' or 'skip'. Returns False
        (and writes nothing) when they had already answered it (a repeated request)."""
        if action not in ACTIONS:
            raise ValueError(f"an answer is one of {', '.join(ACTIONS)}, got {action!r}")
        with self._write() as c:
            q = self.comparison(queue_id)
            if c.execute("SELECT 1 FROM journal WHERE queue_id = ? AND annotator = ?", (queue_id, annotator)).fetchone():
                return False
            now, comparison_id = _now(), None
            if action != "skip":
                cur = c.execute(
                    "INSERT INTO comparisons (prompt, sample_a, sample_b, chosen, annotator, time, queue_id) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)", (q["prompt"], q["sample_a"], q["sample_b"], action, annotator, now, queue_id))
                comparison_id = cur.lastrowid
            c.execute("INSERT INTO journal (annotator, queue_id, action, comparison_id, time) VALUES (?, ?, ?, ?, ?)",
                      (annotator, queue_id, action, comparison_id, now))
        return True

    def undo(self, annotator: str) -> dict[str, Any] | None:
        """Take back ``annotator``'s most recent answer (its label too); returns what was undone."""
        with self._write() as c:
            row = c.execute("SELECT id, queue_id, action, comparison_id FROM journal WHERE annotator = ? "
                            "ORDER BY id DESC LIMIT 1", (annotator,)).fetchone()
            if row is None:
                return None
            journal_id, queue_id, action, comparison_id = row
            if comparison_id is not None:
                c.execute("DELETE FROM comparisons WHERE id = ?", (comparison_id,))
            c.execute("DELETE FROM journal WHERE id = ?", (journal_id,))
        return {"id": queue_id, "action": action}

    def annotators(self, round: int | None = None) -> dict[str, int]:
        """Labels (not skips) per annotator, in ``round`` or in all rounds."""
        sql = "SELECT c.annotator, COUNT(*) FROM comparisons c"
        args: tuple[Any, ...] = ()
        if round is not None:
            sql += " JOIN queue q ON q.id = c.queue_id WHERE q.round = ?"
            args = (round,)
        return dict(self.conn.execute(sql + " GROUP BY c.annotator ORDER BY c.annotator", args).fetchall())

    def queued_labels(self, round: int | None = None) -> list[dict[str, Any]]:
        """Each queued comparison (of ``round``, or all) with its annotators' votes
        (+1: a preferred, −1: b, 0: tie) and the averaged label (None: unlabelled)."""
        sql, args = "SELECT id, round, prompt, sample_a, sample_b FROM queue", ()
        if round is not None:
            sql, args = sql + " WHERE round = ?", (round,)
        out = []
        for qid, rnd, prompt, a, b in self.conn.execute(sql + " ORDER BY id", args).fetchall():
            votes = self._votes(prompt, a, b)
            total = sum(votes.values())
            out.append({"id": qid, "round": rnd, "prompt": prompt, "sample_a": a, "sample_b": b, "votes": votes,
                        "label": None if not votes else _sign(total)})
        return out

    def agreement(self, round: int | None = None) -> dict[str, Any]:
        """:func:`agreement` over the queued comparisons of ``round`` (or all)."""
        return agreement(self.queued_labels(round))

    def export_rows(self, round: int | None = None) -> list[dict[str, Any]]:
        """The decided comparisons (ties and unlabelled left out) as preference records: prompt,
        chosen and rejected (file paths relative to the store's folder, or texts), with ids,
        round and votes."""
        samples = self.samples()
        rows = []
        for q in self.queued_labels(round):
            if not q["label"]:
                continue
            win, lose = (q["sample_a"], q["sample_b"]) if q["label"] > 0 else (q["sample_b"], q["sample_a"])
            sw, sl = samples[win], samples[lose]
            votes = defaultdict(int)
            for v in q["votes"].values():
                votes[{1: "a", -1: "b", 0: "tie"}[v]] += 1
            rows.append({
                "prompt": sw.display, "chosen": sw.file if sw.kind != "text" else sw.text,
                "rejected": sl.file if sl.kind != "text" else sl.text, "kind": sw.kind,
                "chosen_id": win, "rejected_id": lose, "condition_key": q["prompt"], "round": q["round"],
                "votes": dict(votes), **({"condition_image": sw.condition_file} if sw.condition_file else {}),
            })
        return rows


def _sign(total: int) -> int:
    return (total > 0) - (total < 0)


def agreement(queued: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Inter-annotator agreement over the comparisons (``PreferenceStore.queued_labels`` rows)
    two or more annotators labelled: the fraction of annotator pairs giving the same answer (a,
    b or tie), and Fleiss' κ (chance-corrected; items may have different numbers of annotators)."""
    items = [list(q["votes"].values()) for q in queued if len(q["votes"]) >= 2]
    if not items:
        return {"items": 0, "agreement": None, "fleiss_kappa": None}
    p_items, totals = [], Counter()  # per item: the fraction of its annotator pairs that agree
    for votes in items:
        n, counts = len(votes), Counter(votes)
        p_items.append(sum(c * (c - 1) for c in counts.values()) / (n * (n - 1)))
        totals.update(votes)
    p_bar = sum(p_items) / len(p_items)
    n_all = sum(totals.values())
    p_e = sum((c / n_all) ** 2 for c in totals.values())
    kappa = None if p_e == 1 else (p_bar - p_e) / (1 - p_e)
    return {"items": len(items), "agreement": p_bar, "fleiss_kappa": kappa}
