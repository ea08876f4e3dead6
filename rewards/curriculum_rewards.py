"""Difficulty-aware rewards for question answering (Curr-ReFT's stage rewards), in one reward type.

Paper: Deng et al., "Boosting the Generalization and Reasoning of Vision Language Models with
Curriculum Reinforcement Learning" (Curr-ReFT, 2025): yes/no questions are scored by exact
match, multiple choice by option-set match, open answers by task rewards, each plus a format
reward. The reward reads each condition's ``"format"`` and dispatches, so one config serves
every stage of a curriculum:

- ``"yesno"``: 1 if the extracted answer is exactly the gold answer (case and spaces ignored).
- ``"choice"``: the set of the condition's ``"options"`` named in the extracted answer (as whole
  words; an option inside a longer named option does not count) must equal the set {gold}: 1,
  else 0. Naming two options ("red or blue") scores 0.
- ``"open"`` (also when ``"format"`` is missing, as in Shapes QA text conditions), by ``"qtype"``:
  ``colour``, ``shape``, ``count`` (and a missing qtype): exact match; ``position``: the Jaccard
  index of the row/column words (top, middle, bottom, left, center, right) of answer and gold
  ("top center" for "top left": 1/3); ``relation``: the Jaccard index of the two word sets
  ("red square" for "red circle": 1/3).

The answer is the text of the last ``<answer> … </answer>`` in the response; a response with
none scores 0. The format reward is 1 when the whole response (surrounding spaces aside) is
exactly one ``<answer> words </answer>`` with at least one word and no other markup.

    score = correct + format_weight · format

``components``: ``correct`` (in [0, 1]) and ``format`` (0/1); ``details`` hold the extracted
answer and the format dispatched on.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from genalign.configs import opt
from rewards.base import RewardOutput
from rewards.rules import extract_answer, normalize_text, reference_answer

ANSWER = r"<answer>(.*?)</answer>"
_FORMAT = re.compile(r"<answer>\s*[^<>\s][^<>]*</answer>", flags=re.DOTALL)
POSITION_WORDS = frozenset({"top", "middle", "bottom", "left", "center", "right"})
EXACT_QTYPES = ("colour", "shape", "count")


@dataclass
class CurriculumRewardConfig:
    type: Literal["curr_reft"] = opt("curr_reft", "difficulty-aware QA reward: dispatches on the condition's format and qtype")
    weight: float = opt(1.0, "weight (> 0) of this component in the summed reward; every reward is maximised", gt=0)
    format_weight: float = opt(1.0, "weight of the format reward added to the correctness reward (0: correctness only)")


def words(text: str) -> list[str]:
    return normalize_text(text).split()


def jaccard(a: set[str], b: set[str]) -> float:
    """|a ∩ b| / |a ∪ b|; two empty sets score 0 (nothing was answered)."""
    union = a | b
    return len(a & b) / len(union) if union else 0.0


def named_options(answer: str, options: Sequence[str]) -> set[str]:
    """The options whose words occur as a contiguous run of ``answer``'s words, without those that
    only occur inside a longer named option ("red" is not named by "red circle" when both are options)."""
    said = words(answer)
    spans: dict[str, list[tuple[int, int]]] = {}
    for option in options:
        w = words(option)
        hits = [(i, i + len(w)) for i in range(len(said) - len(w) + 1) if w and said[i : i + len(w)] == w]
        if hits:
            spans[option] = hits
    named = set()
    for option, hits in spans.items():
        for lo, hi in hits:
            inside = any(
                other != option and len(words(other)) > len(words(option)) and olo <= lo and hi <= ohi
                for other, ohits in spans.items()
                for olo, ohi in ohits
            )
            if not inside:
                named.add(option)
    return named


def is_formatted(response: str) -> bool:
    """The whole response is one ``<answer> words </answer>`` (surrounding whitespace aside)."""
    return _FORMAT.fullmatch(response.strip()) is not None


def correctness(answer: str | None, condition: Any) -> float:
    """The correctness reward of an extracted answer (None: no answer) for ``condition``."""
    if answer is None:
        return 0.0
    gold = str(reference_answer(condition))
    fields = condition if isinstance(condition, dict) else {}
    kind = fields.get("format", "open")
    if kind == "choice":
        if "options" not in fields or not fields["options"]:
            raise KeyError(f"a multiple-choice condition has no 'options': {fields.get('key', condition)!r}")
        return float(named_options(answer, fields["options"]) == {gold})
    if kind == "yesno":
        return float(normalize_text(answer) == normalize_text(gold))
    if kind != "open":
        raise ValueError(f"unknown question format {kind!r} (yesno, choice or open): {fields.get('key', condition)!r}")
    qtype = fields.get("qtype")
    if qtype is None or qtype in EXACT_QTYPES:
        return float(normalize_text(answer) == normalize_text(gold))
    if qtype == "position":
        return jaccard(set(words(answer)) & POSITION_WORDS, set(words(gold)) & POSITION_WORDS)
    if qtype == "relation":
        return jaccard(set(words(answer)), set(words(gold)))
    raise ValueError(f"unknown question type {qtype!r} (colour, shape, count, position, relation): {fields.get('key', condition)!r}")


class CurriculumReward:
    differentiable = False

    def __init__(self, config: CurriculumRewardConfig | None = None):
        self.config = config or CurriculumRewardConfig()
        self.name = "curr_reft"

    def __call__(self, outputs: Sequence[str], conditions: Sequence[Any]) -> RewardOutput:
        if len(outputs) != len(conditions):
            raise ValueError(f"{len(outputs)} responses but {len(conditions)} conditions")
        answers = [extract_answer(str(o), ANSWER) for o in outputs]
        correct = torch.tensor([correctness(a, c) for a, c in zip(answers, conditions)], dtype=torch.float32)
        fmt = torch.tensor([float(is_formatted(str(o))) for o in outputs], dtype=torch.float32)
        details = [
            {"extracted": a, "format": c.get("format", "open") if isinstance(c, dict) else "open"}
            for a, c in zip(answers, conditions)
        ]
        scores = correct + self.config.format_weight * fmt
        return RewardOutput(scores=scores, components={"correct": correct, "format": fmt}, details=details)
