"""Shapes QA: Shapes World scenes described in words, with questions that have exact answers.

The text twin of Shapes World, for language-model policies: a scene is 1-4 objects, each a
colour and shape of Shapes World (:data:`~genalign.toyworld.spec.COLORS`,
:data:`~genalign.toyworld.spec.SHAPES`) in its own cell of a 3x3 grid (rows top / middle /
bottom, columns left / center / right). The scene is written out in a fixed word format
and followed by one question and an answer cue::

    scene : red circle top left , blue square middle center . question : what color is the square ? answer :

The expected response is ``<answer> X </answer>`` then the end-of-sequence token, X the
answer words (``blue``); :func:`target_response` gives it. Every word and punctuation mark
is its own whitespace-separated token, so a word-level tokenizer covers the world
(:data:`WORDS`).

Questions by tier (difficulty grows):

1. colour lookup: "what color is the square ?" (the shape is unique in the scene) -> ``red``
2. position lookup: "where is the red circle ?" -> ``top left``
3. counting one attribute: "how many circles ?" / "how many red shapes ?" -> ``2``
4. relation, yes / no: "is the red circle left of the blue square ?" -> ``yes``
5. counting with a relation or two attributes: "how many shapes are left of the blue
   square ?" / "how many red circles ?" -> ``1``

Relations compare grid cells: "left of" means a smaller column, "right of" a larger one,
"above" a smaller row (nearer the top), "below" a larger row. An object a question names
by colour and shape is unique in its scene. Tiers 3-5 draw their answer value uniformly
among the values the scene allows (yes and no equally often), except that a count is 0
with probability :data:`ZERO_RATE` when the scene allows 0 and another count.

Held-out split: the colour x shape pairs of Shapes World's
:data:`~genalign.toyworld.prompts.HELDOUT_PAIRS` never appear in a train-split condition,
neither in the scene nor in the question. A held-out condition is *about* a held-out pair:
the question names one, or an object it asks about (the object it looks up, the objects
it counts, the anchor of a relation) is one. Held-out conditions may show other
held-out pairs in their scenes.

A condition is a dict: ``prompt`` (the text above), ``answer`` (the gold answer words),
``tier``, ``key`` (a stable id from the prompt: equal prompts share it), ``question`` and
``objects`` (``[[color, shape, row, col], ...]`` in description order, row/col words),
so a renderer can draw the same scene.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from genalign.configs import opt

from .prompts import HELDOUT_PAIRS
from .spec import COLORS, PLURALS, RELATIONS, SHAPES

ROWS: tuple[str, ...] = ("top", "middle", "bottom")
COLS: tuple[str, ...] = ("left", "center", "right")
QA_RELATIONS: tuple[str, ...] = tuple(RELATIONS)  # "left of", "right of", "above", "below"
MAX_QA_OBJECTS = 4
QA_TIERS: dict[int, str] = {
    1: "colour lookup: 'what color is the square ?'",
    2: "position lookup: 'where is the red circle ?'",
    3: "counting one attribute: 'how many circles ?' / 'how many red shapes ?'",
    4: "relation yes/no: 'is the red circle left of the blue square ?'",
    5: "counting with a relation or two attributes: 'how many shapes are left of the blue square ?'",
}
QA_SPLITS = ("train", "heldout")
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
PUNCTUATION: tuple[str, ...] = (":", ",", ".", "?")
_FRAME = ("scene", "question", "answer", "what", "color", "is", "the", "where", "how", "many", "shapes", "are")

WORDS: tuple[str, ...] = tuple(
    sorted(
        set(_FRAME)
        | set(PUNCTUATION)
        | set(COLORS)
        | set(SHAPES)
        | set(PLURALS.values())
        | set(ROWS)
        | set(COLS)
        | {w for rel in QA_RELATIONS for w in rel.split()}
        | {"yes", "no"}
        | {str(n) for n in range(MAX_QA_OBJECTS + 1)}
        | {ANSWER_OPEN, ANSWER_CLOSE}
    )
)
"""Every token a prompt or a gold response of the world uses."""


@dataclass(frozen=True)
class QAObject:
    """One object of a scene: colour, shape, and its grid cell (row 0 = top, col 0 = left)."""

    color: str
    shape: str
    row: int
    col: int

    def __post_init__(self) -> None:
        if self.color not in COLORS:
            raise ValueError(f"unknown colour {self.color!r}; colours: {', '.join(COLORS)}")
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; shapes: {', '.join(SHAPES)}")
        if not (0 <= self.row < 3 and 0 <= self.col < 3):
            raise ValueError(f"cell ({self.row}, {self.col}) is outside the 3x3 grid")

    @property
    def pair(self) -> tuple[str, str]:
        return (self.color, self.shape)

    @property
    def place(self) -> str:
        """The cell in words: 'top left', 'middle center'."""
        return f"{ROWS[self.row]} {COLS[self.col]}"

    @property
    def text(self) -> str:
        return f"{self.color} {self.shape} {self.place}"


@dataclass(frozen=True)
class Question:
    """A question about a scene: its words, its gold answer, and the colour x shape pairs it
    is about (those it names and those of the objects it asks about)."""

    text: str
    answer: str
    pairs: frozenset[tuple[str, str]]


def describe_scene(objects: Sequence[QAObject]) -> str:
    """'scene : red circle top left , blue square middle center .' (objects in list order)."""
    if not 1 <= len(objects) <= MAX_QA_OBJECTS:
        raise ValueError(f"a scene holds 1..{MAX_QA_OBJECTS} objects, got {len(objects)}")
    if len({(o.row, o.col) for o in objects}) != len(objects):
        raise ValueError(f"two objects share a cell: {[o.text for o in objects]}")
    return "scene : " + " , ".join(o.text for o in objects) + " ."


def relation_holds(a: QAObject, relation: str, b: QAObject) -> bool:
    """Whether ``a`` is ``relation`` ``b`` on the grid (strictly smaller/larger column or row)."""
    return {
        "left of": a.col < b.col,
        "right of": a.col > b.col,
        "above": a.row < b.row,
        "below": a.row > b.row,
    }[relation]


def unique_objects(objects: Sequence[QAObject], key) -> list[QAObject]:
    """Objects whose ``key`` value no other object of the scene shares."""
    values = [key(o) for o in objects]
    return [o for o, v in zip(objects, values) if values.count(v) == 1]


def questions(objects: Sequence[QAObject], tier: int) -> list[Question]:
    """Every question of ``tier`` the scene allows, with its answer, in a fixed order."""
    out: list[Question] = []
    if tier == 1:
        for o in unique_objects(objects, lambda o: o.shape):
            out.append(Question(f"what color is the {o.shape} ?", o.color, frozenset({o.pair})))
    elif tier == 2:
        for o in unique_objects(objects, lambda o: o.pair):
            out.append(Question(f"where is the {o.color} {o.shape} ?", o.place, frozenset({o.pair})))
    elif tier == 3:
        for shape in SHAPES:
            group = [o for o in objects if o.shape == shape]
            out.append(Question(f"how many {PLURALS[shape]} ?", str(len(group)), frozenset(o.pair for o in group)))
        for color in COLORS:
            group = [o for o in objects if o.color == color]
            out.append(Question(f"how many {color} shapes ?", str(len(group)), frozenset(o.pair for o in group)))
    elif tier == 4:
        named = unique_objects(objects, lambda o: o.pair)
        for a in named:
            for b in named:
                if a is b:
                    continue
                for rel in QA_RELATIONS:
                    answer = "yes" if relation_holds(a, rel, b) else "no"
                    text = f"is the {a.color} {a.shape} {rel} the {b.color} {b.shape} ?"
                    out.append(Question(text, answer, frozenset({a.pair, b.pair})))
    elif tier == 5:
        for anchor in unique_objects(objects, lambda o: o.pair):
            for rel in QA_RELATIONS:
                group = [o for o in objects if o is not anchor and relation_holds(o, rel, anchor)]
                text = f"how many shapes are {rel} the {anchor.color} {anchor.shape} ?"
                out.append(Question(text, str(len(group)), frozenset({anchor.pair, *(o.pair for o in group)})))
        for color in COLORS:
            for shape in SHAPES:
                group = [o for o in objects if o.pair == (color, shape)]
                out.append(Question(f"how many {color} {PLURALS[shape]} ?", str(len(group)), frozenset({(color, shape)})))
    else:
        raise ValueError(f"unknown tier {tier!r}; tiers: {', '.join(map(str, QA_TIERS))}")
    return out


def is_heldout_question(question: Question) -> bool:
    """Whether the question is about a held-out colour x shape pair."""
    return bool(question.pairs & HELDOUT_PAIRS)


def make_condition(objects: Sequence[QAObject], question: Question, tier: int) -> dict[str, Any]:
    """The condition dict of one scene and question (see the module docstring)."""
    prompt = f"{describe_scene(objects)} question : {question.text} answer :"
    digest = hashlib.sha1(prompt.encode()).hexdigest()[:12]
    return {
        "prompt": prompt,
        "answer": question.answer,
        "tier": tier,
        "key": f"shapes_qa/{tier}/{digest}",
        "question": question.text,
        "objects": [[o.color, o.shape, ROWS[o.row], COLS[o.col]] for o in objects],
    }


def target_response(condition: dict[str, Any]) -> str:
    """The gold response text ``'<answer> X </answer>'``; a policy ends it with its EOS token."""
    return f"{ANSWER_OPEN} {condition['answer']} {ANSWER_CLOSE}"


TRAIN_PAIRS = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in HELDOUT_PAIRS]
ALL_PAIRS = [(c, s) for c in COLORS for s in SHAPES]
_BALANCED_TIERS = (3, 4, 5)  # answer value drawn uniformly among the scene's values
ZERO_RATE = 0.2  # counting tiers: how often the answer is 0 when the scene allows it


def draw_grid_scene(rng: random.Random, min_objects: int, split: str) -> list[QAObject]:
    """``min_objects``..4 objects in distinct cells: train-split pairs only, or (``heldout``) at
    least one held-out pair; Shapes QA and Shapes VQA draw their scenes with it."""
    n = rng.randint(min_objects, MAX_QA_OBJECTS)
    cells = rng.sample(range(9), n)
    if split == "train":
        pairs = [rng.choice(TRAIN_PAIRS) for _ in range(n)]
    else:  # at least one held-out pair, so most draws have a held-out question
        pairs = [rng.choice(sorted(HELDOUT_PAIRS))] + [rng.choice(ALL_PAIRS) for _ in range(n - 1)]
        rng.shuffle(pairs)
    return [QAObject(c, s, cell // 3, cell % 3) for (c, s), cell in zip(pairs, cells)]


def draw_condition(rng: random.Random, tier: int, split: str) -> dict[str, Any]:
    """One condition of ``tier`` from ``split``, drawn with ``rng`` (see :func:`sample_conditions`)."""
    if split not in QA_SPLITS:
        raise ValueError(f"unknown split {split!r}; splits: {', '.join(QA_SPLITS)}")
    if tier not in QA_TIERS:
        raise ValueError(f"unknown tier {tier!r}; tiers: {', '.join(map(str, QA_TIERS))}")
    while True:
        objects = draw_grid_scene(rng, 2 if tier in (4, 5) else 1, split)
        candidates = [q for q in questions(objects, tier) if is_heldout_question(q) == (split == "heldout")]
        if not candidates:
            continue
        if tier in _BALANCED_TIERS:
            values = sorted({q.answer for q in candidates})
            nonzero = [v for v in values if v != "0"]
            zero = len(nonzero) < len(values)
            answer = "0" if zero and (not nonzero or rng.random() < ZERO_RATE) else rng.choice(nonzero)
            candidates = [q for q in candidates if q.answer == answer]
        return make_condition(objects, rng.choice(candidates), tier)


#: one condition in EVAL_SHARE is reserved for evaluation (by a hash of its key): the prompt
#: source's eval sets hold only reserved conditions and its fresh training draws never do, so
#: "never trained" holds by construction even when training and evaluation use one split
EVAL_SHARE = 4


def reserved_for_eval(key: str) -> bool:
    """Whether the condition with this ``key`` belongs to the evaluation part (1 in EVAL_SHARE)."""
    return int(hashlib.sha1(f"eval/{key}".encode()).hexdigest()[:8], 16) % EVAL_SHARE == 0


def sample_conditions(
    tier: int, n: int, split: str = "train", seed: int = 0, part: Literal["all", "eval", "train"] = "all"
) -> list[dict[str, Any]]:
    """``n`` distinct conditions (distinct prompts) of ``tier`` from ``split``, deterministic per seed;
    ``part``: every condition, only those reserved for evaluation, or only the others."""
    rng = random.Random(f"shapes-qa/{tier}/{split}/{seed}")
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    while len(out) < n:
        cond = draw_condition(rng, tier, split)
        if part != "all" and reserved_for_eval(cond["key"]) != (part == "eval"):
            continue
        if cond["key"] not in seen:
            seen.add(cond["key"])
            out.append(cond)
    return out


@dataclass
class ShapesQAPrompts:
    """Shapes QA conditions (dicts with the gold ``answer``) as a prompt source."""

    source: Literal["shapes_qa"] = opt("shapes_qa", "text questions about Shapes World scenes, with exact answers")
    tiers: list[int] = opt([1, 2, 3, 4, 5], "question tiers to draw from (1 colour lookup … 5 counting with a relation)")
    split: Literal["train", "heldout"] = opt("train", "conditions to train on")
    eval_split: Literal["train", "heldout"] = opt("heldout", "conditions for before/after comparisons and eval")
    pool_size: int = opt(0, "if > 0, train on a fixed pool of this many conditions per tier (else fresh draws)")

    def validate(self) -> None:
        bad = [t for t in self.tiers if t not in QA_TIERS]
        if bad or not self.tiers:
            raise ValueError(f"'tiers' must be a non-empty subset of 1..5, got {self.tiers}")
        if self.pool_size < 0:
            raise ValueError(f"'pool_size' must be >= 0, got {self.pool_size}")

    def pool(self, tier: int) -> list[dict[str, Any]]:
        """The fixed training conditions of ``tier`` when ``pool_size`` > 0 (else empty: fresh draws)."""
        return sample_conditions(tier, self.pool_size, self.split, seed=1000 + tier) if self.pool_size > 0 else []

    def sample(self, n: int, seed: int) -> list[dict[str, Any]]:
        rng = random.Random(seed)
        if self.pool_size > 0:
            pool = [c for t in self.tiers for c in self.pool(t)]
            return [rng.choice(pool) for _ in range(n)]
        draw = random.Random(f"shapes-qa/sample/{self.split}/{seed}")
        out = []
        for _ in range(n):
            tier = rng.choice(self.tiers)
            cond = draw_condition(draw, tier, self.split)
            while reserved_for_eval(cond["key"]):  # evaluation's conditions are never trained on
                cond = draw_condition(draw, tier, self.split)
            out.append(cond)
        return out

    def evaluation(self, n: int) -> list[dict[str, Any]]:
        per_tier = -(-n // len(self.tiers))
        conds = [c for t in self.tiers for c in sample_conditions(t, per_tier, self.eval_split, seed=12345, part="eval")]
        return conds[:n]

    def eval_sets(self, n: int) -> dict[str, list[dict[str, Any]]]:
        """``n`` fixed conditions of the eval split per trained tier, as ``"tier t"``: conditions
        reserved for evaluation (:func:`reserved_for_eval`), which fresh training draws skip.

        When the training pool is drawn from the eval split (``pool_size`` > 0 and
        ``split == eval_split``), a tier's ``n`` conditions are divided, in order, into
        ``"tier t (training pool)"`` and ``"tier t (never trained)"``.
        """
        sets: dict[str, list[dict[str, Any]]] = {}
        for t in self.tiers:
            if self.pool_size <= 0:
                sets[f"tier {t}"] = sample_conditions(t, n, self.eval_split, seed=12345, part="eval")
                continue
            conds = sample_conditions(t, n, self.eval_split, seed=12345)
            if self.split != self.eval_split:
                sets[f"tier {t}"] = conds
                continue
            pool = {c["key"] for c in self.pool(t)}
            for name, part in ((f"tier {t} (training pool)", [c for c in conds if c["key"] in pool]),
                               (f"tier {t} (never trained)", [c for c in conds if c["key"] not in pool])):
                if part:
                    sets[name] = part
        return sets

    def targets(self, conditions: Sequence[dict[str, Any]], seeds: Sequence[int] | None = None,
                like: Any = None) -> list[str]:
        """The gold responses (:func:`target_response`) of ``conditions``.

        ``seeds`` and ``like`` (the reference samples' outputs) are accepted for the prompt
        source protocol and unused: a text condition has exactly one gold response.
        """
        return [target_response(c) for c in conditions]
