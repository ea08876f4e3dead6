"""Rule verifiers for text answers: exact match, numeric match, multiple choice, box IoU, format.

Used as rewards for LM/VLM policies (Curr-ReFT's stage rewards, GRPO on math/QA). A response
is scored against its condition's reference answer; the condition is a dict with an
``"answer"`` key (and any other fields, e.g. ``"prompt"``), or an object with an ``answer``
attribute. The answer is first extracted from the response with ``answer_pattern`` (the last
match of its first group; the whole response when the pattern is empty), so a response that
never states an answer in the required form scores 0 — degenerate outputs such as ":",
"Thought process:" or "Solution" never pass, and a hedged "A or B" is not a choice.

Scores are 0/1 per response (``iou`` may instead give the IoU itself with ``partial: true``);
``components`` hold ``correct`` and ``format`` (the pattern matched), ``details`` the
extracted answer per response.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Literal

import torch

from genalign.configs import opt
from rewards.base import RewardOutput

_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*[-+]?\d+(?:\.\d+)?)?|[-+]?\.\d+")


@dataclass
class RuleConfig:
    type: Literal["rule"] = opt("rule", "a rule verifier for text answers")
    weight: float = opt(1.0, "weight (> 0) of this component in the summed reward; every reward is maximised", gt=0)
    rule: Literal["exact", "numeric", "choice", "iou", "format"] = opt("exact", "how the extracted answer is checked")
    answer_pattern: str = opt(r"<answer>(.*?)</answer>", "regex whose last match's group 1 is the answer ('' = whole response)")
    format_pattern: str = opt("", "rule 'format': the whole response must match this regex")
    rel_tol: float = opt(1e-6, "numeric: relative tolerance")
    abs_tol: float = opt(1e-9, "numeric: absolute tolerance")
    iou_threshold: float = opt(0.5, "iou: a box counts as correct above this IoU")
    partial: bool = opt(False, "iou: score the IoU itself instead of 0/1")

    def validate(self) -> None:
        for name in ("answer_pattern", "format_pattern"):
            try:
                re.compile(getattr(self, name))
            except re.error as e:
                raise ValueError(f"'{name}' is not a valid regex: {e}") from None
        if self.rule == "format" and not self.format_pattern:
            raise ValueError("'format_pattern' is required for rule 'format'")


def reference_answer(condition: Any) -> Any:
    if isinstance(condition, dict):
        if "answer" not in condition:
            raise KeyError(f"condition has no 'answer' to verify against: {condition!r}")
        return condition["answer"]
    if hasattr(condition, "answer"):
        return condition.answer
    raise KeyError(f"condition {condition!r} carries no reference answer (use a dict with an 'answer' key)")


def extract_answer(text: str, pattern: str) -> str | None:
    """The last match's first group (or the whole match), stripped; None when nothing matches."""
    if not pattern:
        return text.strip() or None
    matches = list(re.finditer(pattern, text, flags=re.DOTALL))
    if not matches:
        return None
    m = matches[-1]
    value = (m.group(1) if m.groups() else m.group(0)).strip()
    return value or None


def normalize_text(s: str) -> str:
    s = re.sub(r"\s+", " ", str(s).strip().lower())
    return s.rstrip(".").strip()


def parse_number(text: str) -> float | None:
    """The single number in ``text`` ("1,234.5", "-3/4", "$12", "12%"); None for none or several."""
    found = _NUMBER.findall(str(text))
    if len(found) != 1:
        return None
    token = found[0].replace(",", "").replace(" ", "")
    try:
        return float(Fraction(token)) if "/" in token else float(token)
    except (ValueError, ZeroDivisionError):
        return None


def parse_choice(text: str) -> str | None:
    """One option letter A–H (upper case: "a" is a word; I is a pronoun) from "B", "(B)", "B.", "B) text",
    "Answer: B"; None when there is none or several ("A or B")."""
    letters = set(re.findall(r"(?<![A-Za-z])([A-H])(?![A-Za-z])", str(text)))
    return letters.pop() if len(letters) == 1 else None


def parse_box(text: Any) -> list[float] | None:
    """[x1, y1, x2, y2] from a list or from the first four numbers of a string."""
    if isinstance(text, (list, tuple)):
        vals = [float(v) for v in text]
    else:
        vals = [float(v.replace(",", "")) for v in re.findall(r"[-+]?\d+(?:\.\d+)?", str(text))]
    if len(vals) != 4 or vals[2] < vals[0] or vals[3] < vals[1]:
        return None
    return vals


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


class RuleVerifier:
    differentiable = False

    def __init__(self, config: RuleConfig | None = None):
        self.config = config or RuleConfig()
        self.config.validate()
        self.name = f"rule_{self.config.rule}"

    def score_one(self, response: str, condition: Any) -> tuple[float, bool, str | None]:
        c = self.config
        if c.rule == "format":
            ok = re.fullmatch(c.format_pattern, response, flags=re.DOTALL) is not None
            return float(ok), ok, None
        answer = extract_answer(response, c.answer_pattern)
        if answer is None:
            return 0.0, False, None
        ref = reference_answer(condition)
        if c.rule == "exact":
            return float(normalize_text(answer) == normalize_text(ref)), True, answer
        if c.rule == "numeric":
            got, want = parse_number(answer), parse_number(str(ref))
            ok = got is not None and want is not None and math.isclose(got, want, rel_tol=c.rel_tol, abs_tol=c.abs_tol)
            return float(ok), True, answer
        if c.rule == "choice":
            got, want = parse_choice(answer), parse_choice(str(ref))
            return float(got is not None and got == want), True, answer
        got, want = parse_box(answer), parse_box(ref)
        if got is None or want is None:
            return 0.0, True, answer
        iou = box_iou(got, want)
        return (iou if c.partial else float(iou > c.iou_threshold)), True, answer

    def __call__(self, outputs: Sequence[str], conditions: Sequence[Any]) -> RewardOutput:
        if len(outputs) != len(conditions):
            raise ValueError(f"{len(outputs)} responses but {len(conditions)} conditions")
        scored = [self.score_one(str(o), c) for o, c in zip(outputs, conditions)]
        scores = torch.tensor([s for s, _, _ in scored], dtype=torch.float32)
        fmt = torch.tensor([float(f) for _, f, _ in scored])
        return RewardOutput(scores=scores, components={"correct": scores.clone(), "format": fmt},
                            details=[{"extracted": a} for _, _, a in scored])
