"""Shapes World grammar: vocabulary, scene specs, prompt parsing and scene checking.

A prompt describes one or two *object clauses* ("a small red circle", "three blue
squares", "a red circle on the left"), joined by "and" or by a relation ("a red circle
to the left of a blue square"). The spec is read GenEval style with **exclusion**:

* a clause asks for *exactly* ``count`` objects of its colour and shape ("a red circle"
  means exactly one red circle, "two red circles" exactly two);
* the scene holds exactly the mentioned objects: any object whose (colour, shape) no
  clause names is an extra object and fails the prompt.

Geometry is in normalised image coordinates: ``x`` grows to the right, ``y`` grows
downwards, both in ``[0, 1]``, so a checker works on any image size.

* absolute position: "on the left" means the centre lies in the left 40 % of the image
  (``x < 0.4``); right ``x > 0.6``; top ``y < 0.4``; bottom ``y > 0.6``.
* relation "A to the left of B": ``B.x - A.x >= 0.1`` and that offset exceeds the
  vertical offset ``|A.y - B.y|`` (the relation is the dominant direction, so a pair
  of objects satisfies at most one of the four relations). Same for right / above /
  below. With counts, every A must stand in the relation to every B.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Hues far apart (red 0°, yellow ~52°, green ~130°, blue ~222°, purple ~279°) plus white,
# so a tiny generator's hue drift and blur still leave the colours separable.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "yellow": (240, 215, 40),
    "green": (40, 200, 70),
    "blue": (50, 100, 255),
    "purple": (175, 70, 235),
    "white": (240, 240, 240),
}
SIZES: tuple[str, ...] = ("small", "large")
# Absolute position key -> its phrase in a prompt.
POSITIONS: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}
# Relation key -> its phrase in a prompt; "A <phrase> B" relates clause 0 to clause 1.
RELATIONS: dict[str, str] = {
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "above",
    "below": "below",
}
COUNT_WORDS: dict[int, str] = {1: "a", 2: "two", 3: "three", 4: "four"}
PLURALS: dict[str, str] = {shape: shape + "s" for shape in SHAPES}
MAX_OBJECTS = 4
TIERS: dict[int, str] = {
    1: "one object (optionally with a size): 'a small red circle'",
    2: "one object with an absolute position: 'a red circle on the left'",
    3: "two objects: 'a red circle and a blue square'",
    4: "two objects with a relation: 'a red circle to the left of a blue square'",
    5: "counting, 2-4 objects of one kind: 'three blue squares'",
}

# Thresholds of the checker (normalised coordinates); see the module docstring.
POSITION_BAND = 0.4
RELATION_MIN_OFFSET = 0.1

VOCAB: tuple[str, ...] = tuple(
    sorted(
        {"and"}
        | set(COUNT_WORDS.values())
        | set(SIZES)
        | set(COLORS)
        | set(SHAPES)
        | set(PLURALS.values())
        | {w for phrase in POSITIONS.values() for w in phrase.split()}
        | {w for phrase in RELATIONS.values() for w in phrase.split()}
    )
)


class PromptError(ValueError):
    """A prompt outside the Shapes World grammar; the message names the offending word."""


@dataclass(frozen=True)
class ObjectClause:
    """``count`` objects of one colour and shape, optionally of one size and at one place.

    shape: one of :data:`SHAPES`; color: a key of :data:`COLORS`; count: 1..4;
    size: one of :data:`SIZES` or None (any size); position: a key of :data:`POSITIONS`
    or None (anywhere).
    """

    shape: str
    color: str
    count: int = 1
    size: str | None = None
    position: str | None = None

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; shapes: {', '.join(SHAPES)}")
        if self.color not in COLORS:
            raise ValueError(f"unknown colour {self.color!r}; colours: {', '.join(COLORS)}")
        if self.count not in COUNT_WORDS:
            raise ValueError(f"count must be 1..{MAX_OBJECTS}, got {self.count}")
        if self.size is not None and self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; sizes: {', '.join(SIZES)}")
        if self.position is not None and self.position not in POSITIONS:
            raise ValueError(f"unknown position {self.position!r}; positions: {', '.join(POSITIONS)}")

    @property
    def noun(self) -> str:
        """Colour and shape, plural when count > 1: 'red circle' / 'red circles'."""
        return f"{self.color} {PLURALS[self.shape] if self.count > 1 else self.shape}"

    @property
    def text(self) -> str:
        """The clause as a prompt fragment: 'a small red circle on the left'."""
        words = [COUNT_WORDS[self.count]]
        if self.size is not None:
            words.append(self.size)
        words.append(self.noun)
        if self.position is not None:
            words.append(POSITIONS[self.position])
        return " ".join(words)


@dataclass(frozen=True)
class SceneSpec:
    """What an image must show: one or two clauses and an optional relation.

    ``relation`` (a key of :data:`RELATIONS`) relates clause 0 to clause 1:
    ``relation="left of"`` reads "clauses[0] to the left of clauses[1]". Two clauses
    must name different (colour, shape) pairs; the scene holds at most
    :data:`MAX_OBJECTS` objects.
    """

    clauses: tuple[ObjectClause, ...]
    relation: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "clauses", tuple(self.clauses))
        if not 1 <= len(self.clauses) <= 2:
            raise ValueError(f"a scene has one or two clauses, got {len(self.clauses)}")
        if self.relation is not None:
            if self.relation not in RELATIONS:
                raise ValueError(f"unknown relation {self.relation!r}; relations: {', '.join(RELATIONS)}")
            if len(self.clauses) != 2:
                raise ValueError("a relation needs two clauses")
        if len(self.clauses) == 2:
            a, b = self.clauses
            if (a.color, a.shape) == (b.color, b.shape):
                raise ValueError(
                    f"both clauses describe {PLURALS[a.shape]} of colour {a.color}; "
                    f"merge them into one count ('{COUNT_WORDS[2]} {a.color} {PLURALS[a.shape]}')"
                )
        total = sum(c.count for c in self.clauses)
        if total > MAX_OBJECTS:
            raise ValueError(f"a scene holds at most {MAX_OBJECTS} objects, this one asks for {total}")

    @property
    def prompt(self) -> str:
        """The canonical prompt text; ``parse_prompt(spec.prompt) == spec``."""
        if len(self.clauses) == 1:
            return self.clauses[0].text
        joint = "and" if self.relation is None else RELATIONS[self.relation]
        return f"{self.clauses[0].text} {joint} {self.clauses[1].text}"

    @property
    def tier(self) -> int:
        """Difficulty tier (see :data:`TIERS`): relation 4, two clauses 3, counting 5,
        position 2, else 1."""
        if self.relation is not None:
            return 4
        if len(self.clauses) == 2:
            return 3
        if self.clauses[0].count > 1:
            return 5
        if self.clauses[0].position is not None:
            return 2
        return 1


class _Parser:
    """Recursive descent over the words of one prompt; errors name word and position."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.words = text.lower().split()

    def fail(self, message: str) -> PromptError:
        return PromptError(f"{self.text!r}: {message}")

    def word(self, i: int, expected: str) -> str:
        if i >= len(self.words):
            after = f" after {self.words[-1]!r}" if self.words else ""
            raise self.fail(f"prompt ends{after}; expected {expected}")
        return self.words[i]

    def phrase(self, i: int, phrases: dict[str, str]) -> tuple[str | None, int]:
        for key, phrase in phrases.items():
            n = len(phrase.split())
            if self.words[i : i + n] == phrase.split():
                return key, i + n
        return None, i

    def clause(self, i: int) -> tuple[ObjectClause, int]:
        counts = {word: n for n, word in COUNT_WORDS.items()}
        det = self.word(i, "'a' or a count (two, three, four)")
        if det not in counts:
            raise self.fail(f"{det!r} (word {i + 1}) should be 'a' or a count (two, three, four)"
            )
        count, i = counts[det], i + 1
        size = None
        if self.word(i, "a size or a colour") in SIZES:
            size, i = self.words[i], i + 1
        color = self.word(i, "a colour")
        if color not in COLORS:
            if color in SHAPES or color in PLURALS.values():
                raise self.fail(f"missing colour before {color!r} (word {i + 1}); colours: {', '.join(COLORS)}")
            known = f"sizes: {', '.join(SIZES)}; colours: " if size is None else "colours: "
            kind = "size or colour" if size is None else "colour"
            raise self.fail(f"{color!r} (word {i + 1}) is not a known {kind}; {known}{', '.join(COLORS)}")
        i += 1
        noun = self.word(i, "a shape")
        singular = {plural: shape for shape, plural in PLURALS.items()}
        if noun in SHAPES and count > 1:
            raise self.fail(f"{noun!r} (word {i + 1}) should be plural after {det!r}: {PLURALS[noun]!r}")
        if noun in singular and count == 1:
            raise self.fail(f"{noun!r} (word {i + 1}) should be singular after 'a': {singular[noun]!r}")
        if noun not in SHAPES and noun not in singular:
            raise self.fail(f"{noun!r} (word {i + 1}) is not a known shape; shapes: {', '.join(SHAPES)}")
        shape, i = singular.get(noun, noun), i + 1
        position, i = self.phrase(i, POSITIONS)
        return ObjectClause(shape, color, count, size, position), i

    def scene(self) -> SceneSpec:
        if not self.words:
            raise PromptError("empty prompt; expected e.g. 'a red circle'")
        first, i = self.clause(0)
        clauses, relation = [first], None
        if i < len(self.words):
            if self.words[i] == "and":
                i += 1
            else:
                relation, i = self.phrase(i, RELATIONS)
                if relation is None:
                    raise self.fail(f"unexpected {self.words[i]!r} (word {i + 1}); expected 'and', a relation "
                        f"({', '.join(repr(p) for p in RELATIONS.values())}), a position "
                        f"({', '.join(repr(p) for p in POSITIONS.values())}) or the end",
                    )
            second, i = self.clause(i)
            clauses.append(second)
        if i < len(self.words):
            raise self.fail(f"unexpected {self.words[i]!r} (word {i + 1}); a prompt describes at most two clauses"
            )
        try:
            return SceneSpec(tuple(clauses), relation)
        except PromptError:
            raise
        except ValueError as e:
            raise PromptError(f"{self.text!r}: {e}") from None


def parse_prompt(text: str) -> SceneSpec:
    """Parse a Shapes World prompt into its :class:`SceneSpec` (case-insensitive).

    Raises :class:`PromptError` naming the offending word and its position for text
    outside the grammar, e.g. ``'a red dog'`` -> "'dog' (word 3) is not a known shape".
    """
    return _Parser(text).scene()


class SceneObject(Protocol):
    """Anything :func:`check_scene` can judge: ground-truth or detected objects."""

    shape: str
    color: str
    size: str
    x: float
    y: float


@dataclass
class SceneCheck:
    """Verdict of one scene against one spec.

    strict: every clause holds. partial: fraction of clauses that hold.
    clauses: ``(description, holds)`` per checked clause, in spec order, ending with
    the exclusion clause "no other objects".
    """

    strict: bool
    partial: float
    clauses: list[tuple[str, bool]] = field(default_factory=list)


def satisfies_position(obj: SceneObject, position: str) -> bool:
    """Whether ``obj``'s centre lies in the band of an absolute position."""
    band = POSITION_BAND
    return {
        "left": obj.x < band,
        "right": obj.x > 1 - band,
        "top": obj.y < band,
        "bottom": obj.y > 1 - band,
    }[position]


def relation_offsets(a: SceneObject, relation: str, b: SceneObject) -> tuple[float, float]:
    """(offset along the relation's direction, offset across it) of ``a`` relative to ``b``.

    Positive ``along`` means ``a`` lies on the named side of ``b``.
    """
    dx, dy = b.x - a.x, b.y - a.y
    along = {"left of": dx, "right of": -dx, "above": dy, "below": -dy}[relation]
    across = abs(dy) if relation in ("left of", "right of") else abs(dx)
    return along, across


def satisfies_relation(a: SceneObject, relation: str, b: SceneObject) -> bool:
    """Whether ``a`` is ``relation`` ``b``: at least 0.1 apart that way, and more than across."""
    along, across = relation_offsets(a, relation, b)
    return along >= RELATION_MIN_OFFSET and along > across


def check_scene(spec: SceneSpec, objects: Sequence[SceneObject]) -> SceneCheck:
    """Judge a list of objects (ground truth or detected) against ``spec``.

    Checked clauses: for each object clause, exact count of its colour and shape; size
    and absolute position of every matching object when the clause gives one; the
    relation between every pair of matching objects; finally that no object outside
    the clauses' (colour, shape) pairs is present.
    """
    verdicts: list[tuple[str, bool]] = []
    matched = [[o for o in objects if (o.shape, o.color) == (c.shape, c.color)] for c in spec.clauses]
    for clause, group in zip(spec.clauses, matched):
        n_word = "one" if clause.count == 1 else COUNT_WORDS[clause.count]
        verdicts.append((f"exactly {n_word} {clause.noun}", len(group) == clause.count))
        if clause.size is not None:
            verdicts.append(
                (f"{clause.noun} {'are' if clause.count > 1 else 'is'} {clause.size}",
                 bool(group) and all(o.size == clause.size for o in group))
            )
        if clause.position is not None:
            verdicts.append(
                (f"{clause.noun} {POSITIONS[clause.position]}",
                 bool(group) and all(satisfies_position(o, clause.position) for o in group))
            )
    if spec.relation is not None:
        (a, b), (group_a, group_b) = spec.clauses, matched
        holds = bool(group_a) and bool(group_b) and all(
            satisfies_relation(oa, spec.relation, ob) for oa in group_a for ob in group_b
        )
        verdicts.append((f"{a.noun} {RELATIONS[spec.relation]} {b.noun}", holds))
    named = {(c.shape, c.color) for c in spec.clauses}
    extra = [o for o in objects if (o.shape, o.color) not in named]
    verdicts.append(("no other objects", not extra))
    passed = sum(ok for _, ok in verdicts)
    return SceneCheck(strict=passed == len(verdicts), partial=passed / len(verdicts), clauses=verdicts)
