"""Shapes VQA: questions about Shapes World images, in three formats of growing difficulty.

The visual twin of Shapes QA (:mod:`genalign.toyworld.text_qa`): the same scenes (1-4
objects, each a Shapes World colour and shape in its own cell of a 3x3 grid) drawn as a
48x48 image instead of written out, and the same scene logic (objects, cells, relations,
held-out colour x shape pairs, the evaluation reserve). A question has a *type* (what it is
about) and a *format* (how it is answered):

===========  ===========================================  ========================
type         open question                                 gold answer
===========  ===========================================  ========================
colour       "what color is the square ?"                 ``red``
shape        "what shape is the red object ?"             ``circle``
count        "how many circles ?" / "how many red shapes ?"  ``2``
position     "where is the red circle ?"                  ``top left``
relation     "what is left of the blue square ?"          ``red circle``
===========  ===========================================  ========================

Formats (Curr-ReFT's difficulty levels):

* ``yesno``: the question proposes a value ("is the square red ?", "are there 2 circles ?",
  "is the red circle at top left ?", "is the red circle left of the blue square ?"); the answer
  is ``yes`` or ``no``, each half of the time.
* ``choice``: the open question followed by three options ("... ? options : red , blue ,
  green ."); the answer is one of them.
* ``open``: the open question; the answer is free words.

The subject of a colour question is a shape the scene holds once, of a shape question a colour
it holds once, of a position question a colour x shape pair it holds once; a relation question
has exactly one object in the named relation to a unique anchor. Counting answers are drawn
uniformly among the values the scene allows (0 with probability :data:`ZERO_RATE` when the scene
allows 0), like Shapes QA's counting tiers.

Splits: ``train`` (in-domain) conditions never name, show or offer a held-out colour x shape pair
(:data:`~genalign.toyworld.prompts.HELDOUT_PAIRS`, not even as a distractor option or a proposed
value); ``heldout`` (out-of-domain) conditions are *about* one: an object the question looks up,
counts or relates is one. A condition is a dict (see :func:`make_vqa_condition`) whose ``image`` is
rendered from its objects with a seed taken from its key, so equal questions about equal scenes
are equal conditions, pixel for pixel.

The expected response is ``<answer> X </answer>`` then the end-of-sequence token, as in Shapes QA.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from PIL import Image

from genalign.configs import opt

from .prompts import HELDOUT_PAIRS
from .render import BACKGROUND, PlacedObject, draw_objects
from .spec import COLORS, PLURALS, SHAPES
from .text_qa import (
    ALL_PAIRS,
    COLS,
    MAX_QA_OBJECTS,
    QA_RELATIONS,
    ROWS,
    TRAIN_PAIRS,
    WORDS,
    ZERO_RATE,
    QAObject,
    draw_grid_scene,
    relation_holds,
    reserved_for_eval,
    target_response,
    unique_objects,
)

FORMATS: tuple[str, ...] = ("yesno", "choice", "open")
QTYPES: tuple[str, ...] = ("colour", "shape", "count", "position", "relation")
VQA_SPLITS = ("train", "heldout")
IMAGE_SIZE = 48  # 3x3 cells of 16 px: with 16-px patches, one image token per cell
NUM_OPTIONS = 3

VQA_WORDS: tuple[str, ...] = tuple(sorted(set(WORDS) | {"shape", "object", "a", "there", "at", "options"}))
"""Every token a Shapes VQA question or gold response uses (Shapes QA's words and a few more)."""

CELLS: tuple[str, ...] = tuple(f"{r} {c}" for r in ROWS for c in COLS)


@dataclass(frozen=True)
class Fact:
    """One answerable fact of a scene: the open question, its gold answer, the values a
    distractor or a proposed value may take, and the colour x shape pairs it is about
    (``pairs``: real objects it looks up, counts or relates)."""

    qtype: str
    subject: str
    answer: str
    domain: tuple[str, ...]
    pairs: frozenset[tuple[str, str]]


def _pair_text(pair: tuple[str, str]) -> str:
    return f"{pair[0]} {pair[1]}"


def _text_pair(text: str) -> tuple[str, str] | None:
    words = text.split()
    return (words[0], words[1]) if len(words) == 2 and words[0] in COLORS and words[1] in SHAPES else None


def facts(objects: Sequence[QAObject], qtype: str) -> list[Fact]:
    """Every fact of type ``qtype`` the scene allows, in a fixed order."""
    out: list[Fact] = []
    if qtype == "colour":
        for o in unique_objects(objects, lambda o: o.shape):
            out.append(Fact(qtype, o.shape, o.color, tuple(COLORS), frozenset({o.pair})))
    elif qtype == "shape":
        for o in unique_objects(objects, lambda o: o.color):
            out.append(Fact(qtype, o.color, o.shape, SHAPES, frozenset({o.pair})))
    elif qtype == "count":
        domain = tuple(str(n) for n in range(MAX_QA_OBJECTS + 1))
        for shape in SHAPES:
            group = [o for o in objects if o.shape == shape]
            out.append(Fact(qtype, PLURALS[shape], str(len(group)), domain, frozenset(o.pair for o in group)))
        for color in COLORS:
            group = [o for o in objects if o.color == color]
            out.append(Fact(qtype, f"{color} shapes", str(len(group)), domain, frozenset(o.pair for o in group)))
    elif qtype == "position":
        for o in unique_objects(objects, lambda o: o.pair):
            out.append(Fact(qtype, _pair_text(o.pair), o.place, CELLS, frozenset({o.pair})))
    elif qtype == "relation":
        for anchor in unique_objects(objects, lambda o: o.pair):
            for rel in QA_RELATIONS:
                group = [o for o in objects if o is not anchor and relation_holds(o, rel, anchor)]
                if len(group) != 1:
                    continue
                domain = tuple(_pair_text(p) for p in ALL_PAIRS if p != anchor.pair)
                out.append(Fact(qtype, f"{rel} the {_pair_text(anchor.pair)}", _pair_text(group[0].pair), domain,
                                frozenset({anchor.pair, group[0].pair})))
    else:
        raise ValueError(f"unknown question type {qtype!r}; types: {', '.join(QTYPES)}")
    return out


def open_question(fact: Fact) -> str:
    return {
        "colour": f"what color is the {fact.subject} ?",
        "shape": f"what shape is the {fact.subject} object ?",
        "count": f"how many {fact.subject} ?",
        "position": f"where is the {fact.subject} ?",
        "relation": f"what is {fact.subject} ?",
    }[fact.qtype]


def yesno_question(fact: Fact, value: str) -> str:
    """The yes/no question proposing ``value`` for the fact's answer."""
    return {
        "colour": f"is the {fact.subject} {value} ?",
        "shape": f"is the {fact.subject} object a {value} ?",
        "count": f"are there {value} {fact.subject} ?",
        "position": f"is the {fact.subject} at {value} ?",
        "relation": f"is the {value} {fact.subject} ?",
    }[fact.qtype]


@dataclass(frozen=True)
class VQAQuestion:
    """A question in one format: its words, gold answer, options (choice), and pairs: ``about``
    (real objects it asks about) and ``named`` (every pair it names, proposes or offers)."""

    text: str
    answer: str
    options: tuple[str, ...]
    about: frozenset[tuple[str, str]]
    named: frozenset[tuple[str, str]]


def _named(fact: Fact, values: Sequence[str]) -> frozenset[tuple[str, str]]:
    """Pairs a question names: its fact's pairs and any pair a proposed value or option makes
    with the subject (a colour proposed for a shape, a shape for a colour, an object named)."""
    named = set(fact.pairs)
    for v in values:
        if fact.qtype == "colour":
            named.add((v, fact.subject))
        elif fact.qtype == "shape":
            named.add((fact.subject, v))
        elif (pair := _text_pair(v)) is not None:
            named.add(pair)
    return frozenset(named)


def pose(fact: Fact, fmt: str, rng: random.Random, allowed: Sequence[str] | None = None) -> VQAQuestion:
    """The fact asked in format ``fmt``; distractors and proposed values come from the fact's
    domain (restricted to ``allowed`` when given), drawn with ``rng``."""
    pool = [v for v in fact.domain if v != fact.answer and (allowed is None or v in allowed)]
    if fmt == "open":
        return VQAQuestion(open_question(fact), fact.answer, (), fact.pairs, _named(fact, [fact.answer]))
    if fmt == "choice":
        options = [fact.answer, *rng.sample(pool, min(NUM_OPTIONS - 1, len(pool)))]
        rng.shuffle(options)
        text = f"{open_question(fact)} options : {' , '.join(options)} ."
        return VQAQuestion(text, fact.answer, tuple(options), fact.pairs, _named(fact, options))
    if fmt == "yesno":
        value = fact.answer if (rng.random() < 0.5 or not pool) else rng.choice(pool)
        answer = "yes" if value == fact.answer else "no"
        return VQAQuestion(yesno_question(fact, value), answer, (), fact.pairs, _named(fact, [fact.answer, value]))
    raise ValueError(f"unknown format {fmt!r}; formats: {', '.join(FORMATS)}")


def render_grid_scene(objects: Sequence[QAObject], seed: int, size: int = IMAGE_SIZE) -> Image.Image:
    """Draw a grid scene: each object near the centre of its cell (small jitter in place, size,
    angle and colour), on a dark background; the same seed gives the same pixels."""
    rng = random.Random(seed)
    placed = []
    for o in objects:
        radius = rng.uniform(0.095, 0.12)
        x = (o.col + 0.5) / 3 + rng.uniform(-0.025, 0.025)
        y = (o.row + 0.5) / 3 + rng.uniform(-0.025, 0.025)
        angle = rng.uniform(-8.0, 8.0) if o.shape != "circle" else 0.0
        rgb = tuple(min(255, max(0, c + rng.randint(-12, 12))) for c in COLORS[o.color])
        bbox = (x - radius, y - radius, x + radius, y + radius)
        placed.append(PlacedObject(o.shape, o.color, "small", x, y, bbox, radius, angle, rgb))
    background = tuple(c + rng.randint(-4, 4) for c in BACKGROUND)
    return draw_objects(placed, size, background)


def make_vqa_condition(objects: Sequence[QAObject], question: VQAQuestion, fmt: str, qtype: str, split: str,
                       image_size: int = IMAGE_SIZE) -> dict[str, Any]:
    """The condition dict: ``prompt`` (the question), ``image``, ``answer``, ``format``, ``qtype``,
    ``options``, ``split``, ``key`` and ``objects`` (``[[color, shape, row, col], ...]``, words)."""
    scene = " , ".join(o.text for o in objects)
    digest = hashlib.sha1(f"{scene} | {question.text}".encode()).hexdigest()[:12]
    key = f"shapes_vqa/{fmt}/{qtype}/{digest}"
    seed = int(hashlib.sha1(f"image/{scene}".encode()).hexdigest()[:8], 16)
    return {
        "prompt": question.text,
        "image": render_grid_scene(objects, seed, image_size),
        "answer": question.answer,
        "format": fmt,
        "qtype": qtype,
        "options": list(question.options),
        "split": split,
        "key": key,
        "objects": [[o.color, o.shape, ROWS[o.row], COLS[o.col]] for o in objects],
    }


def in_split(question: VQAQuestion, split: str) -> bool:
    """Train: names no held-out pair at all; heldout: asks about a held-out pair."""
    if split == "train":
        return not question.named & HELDOUT_PAIRS
    return bool(question.about & HELDOUT_PAIRS)


def draw_vqa_condition(rng: random.Random, fmt: str, qtype: str, split: str, image_size: int = IMAGE_SIZE) -> dict[str, Any]:
    """One condition of format ``fmt`` and type ``qtype`` from ``split``, drawn with ``rng``."""
    if split not in VQA_SPLITS:
        raise ValueError(f"unknown split {split!r}; splits: {', '.join(VQA_SPLITS)}")
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; formats: {', '.join(FORMATS)}")
    if qtype not in QTYPES:
        raise ValueError(f"unknown question type {qtype!r}; types: {', '.join(QTYPES)}")
    allowed = None
    if split == "train":  # distractors and proposed values never name a held-out pair
        allowed = [v for v in (*COLORS, *SHAPES, *CELLS, *map(str, range(MAX_QA_OBJECTS + 1)),
                               *(_pair_text(p) for p in TRAIN_PAIRS))]
    while True:
        objects = draw_grid_scene(rng, 2 if qtype == "relation" else 1, split)
        candidates = facts(objects, qtype)
        if qtype == "count" and candidates:  # balance the answer values like Shapes QA
            values = sorted({f.answer for f in candidates})
            nonzero = [v for v in values if v != "0"]
            answer = "0" if "0" in values and (not nonzero or rng.random() < ZERO_RATE) else rng.choice(nonzero)
            candidates = [f for f in candidates if f.answer == answer]
        rng.shuffle(candidates)
        for fact in candidates:
            question = pose(fact, fmt, rng, allowed)
            if in_split(question, split) and (fmt != "choice" or len(question.options) == NUM_OPTIONS):
                return make_vqa_condition(objects, question, fmt, qtype, split, image_size)


def sample_vqa_conditions(fmt: str, qtype: str, n: int, split: str = "train", seed: int = 0,
                          part: Literal["all", "eval", "train"] = "all", image_size: int = IMAGE_SIZE) -> list[dict[str, Any]]:
    """``n`` distinct conditions of one format and type, deterministic per seed; ``part``: every
    condition, only those reserved for evaluation, or only the others (as in Shapes QA)."""
    rng = random.Random(f"shapes-vqa/{fmt}/{qtype}/{split}/{seed}")
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    while len(out) < n:
        cond = draw_vqa_condition(rng, fmt, qtype, split, image_size)
        if part != "all" and reserved_for_eval(cond["key"]) != (part == "eval"):
            continue
        if cond["key"] not in seen:
            seen.add(cond["key"])
            out.append(cond)
    return out


EVAL_SEED = 12345


@dataclass
class ShapesVQAPrompts:
    """Shapes VQA conditions (dicts with an ``image`` and the gold ``answer``) as a prompt source."""

    source: Literal["shapes_vqa"] = opt("shapes_vqa", "questions about Shapes World images, with exact answers")
    formats: list[str] = opt(list(FORMATS), "answer formats to draw from: yesno, choice, open")
    qtypes: list[str] = opt(list(QTYPES), "question types to draw from: colour, shape, count, position, relation")
    split: Literal["train", "heldout"] = opt("train", "conditions to train on (heldout: about held-out colour x shape pairs)")
    eval_split: Literal["train", "heldout"] = opt("heldout", "conditions for before/after comparisons and eval")
    eval_by: Literal["format", "qtype"] = opt("format", "eval sets: one per answer format, or one per question type")

    def validate(self) -> None:
        bad = [f for f in self.formats if f not in FORMATS]
        if bad or not self.formats:
            raise ValueError(f"'formats' must be a non-empty subset of {list(FORMATS)}, got {self.formats}")
        bad = [q for q in self.qtypes if q not in QTYPES]
        if bad or not self.qtypes:
            raise ValueError(f"'qtypes' must be a non-empty subset of {list(QTYPES)}, got {self.qtypes}")

    def sample(self, n: int, seed: int) -> list[dict[str, Any]]:
        """``n`` fresh conditions (format and type uniform), never one reserved for evaluation."""
        rng = random.Random(seed)
        draw = random.Random(f"shapes-vqa/sample/{self.split}/{seed}")
        out = []
        for _ in range(n):
            fmt, qtype = rng.choice(self.formats), rng.choice(self.qtypes)
            cond = draw_vqa_condition(draw, fmt, qtype, self.split)
            while reserved_for_eval(cond["key"]):
                cond = draw_vqa_condition(draw, fmt, qtype, self.split)
            out.append(cond)
        return out

    def _cells(self, n: int) -> dict[tuple[str, str], list[dict[str, Any]]]:
        cells = [(f, q) for f in self.formats for q in self.qtypes]
        per = -(-n // len(cells))
        return {(f, q): sample_vqa_conditions(f, q, per, self.eval_split, EVAL_SEED, part="eval") for f, q in cells}

    def evaluation(self, n: int) -> list[dict[str, Any]]:
        conds = [c for part in self._cells(n).values() for c in part]
        return random.Random(EVAL_SEED).sample(conds, n) if len(conds) > n else conds

    def eval_sets(self, n: int) -> dict[str, list[dict[str, Any]]]:
        """About ``n`` fixed eval-split conditions per answer format (or question type), spread
        evenly over the other axis; all reserved for evaluation, which training never draws."""
        axis = self.formats if self.eval_by == "format" else self.qtypes
        cells = self._cells(n * len(axis))  # ceil(n / cells of a set) per format x type
        parts: dict[str, list[list[dict[str, Any]]]] = {}
        for (f, q), conds in cells.items():
            parts.setdefault(f if self.eval_by == "format" else q, []).append(conds)
        # interleave the cells of a set (one of each in turn), then keep exactly n
        return {name: [c for group in zip(*lists) for c in group][:n] for name, lists in parts.items()}

    def targets(self, conditions: Sequence[dict[str, Any]], seeds: Sequence[int] | None = None,
                like: Any = None) -> list[str]:
        """The gold responses (``<answer> X </answer>``); ``seeds`` and ``like`` are unused."""
        return [target_response(c) for c in conditions]
