"""Judge robustness: how often a text reward accepts answers that say nothing.

LLM judges and loose verifiers are known to reward degenerate responses — a bare ":",
"Thought process:", "Solution", an empty string, truncated reasoning, repeated answer tags or
a hedge listing every option. :func:`false_positive_table` scores such responses against
references they do not answer and reports the false-positive rate per reward; a trustworthy
reward has 0 everywhere. ``genalign judge-check`` prints it for the shipped text rewards.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

#: (name, response) pairs; the response is wrapped in the answer format where that matters
DEGENERATE: list[tuple[str, str]] = [
    ("colon", ":"),
    ("period", "."),
    ("thought process", "Thought process:"),
    ("solution", "Solution"),
    ("step by step", "Let's solve this problem step by step."),
    ("empty", ""),
    ("whitespace", "   \n "),
    ("truncated reasoning", "First, we compute the sum of the two numbers, which gives"),
    ("empty answer tag", "<answer></answer>"),
    ("repeated tags", "<answer><answer><answer>"),
    ("hedged choice", "<answer>A or B or C</answer>"),
    ("all options", "<answer>A, B, C, D</answer>"),
]


def false_positive_table(
    rewards: dict[str, tuple[Callable[[Sequence[str], Sequence[Any]], Any], Any]],
) -> list[dict[str, Any]]:
    """``rewards``: name -> (reward, the condition to score against). Returns one row per
    reward: false-positive rate over :data:`DEGENERATE` and the cases it accepted."""
    rows = []
    for name, (reward, condition) in rewards.items():
        responses = [r for _, r in DEGENERATE]
        scores = reward(responses, [condition] * len(responses)).scores
        accepted = [case for (case, _), s in zip(DEGENERATE, scores.tolist()) if s > 0]
        rows.append({"reward": name, "cases": len(responses), "false_positive_rate": len(accepted) / len(responses),
                     "accepted": accepted})
    return rows


def shipped_text_rewards() -> dict[str, tuple[Any, Any]]:
    from rewards.rules import RuleConfig, RuleVerifier

    return {
        "rule exact": (RuleVerifier(RuleConfig(rule="exact")), {"answer": "Solution"}),
        "rule numeric": (RuleVerifier(RuleConfig(rule="numeric")), {"answer": "42"}),
        "rule choice": (RuleVerifier(RuleConfig(rule="choice")), {"answer": "B"}),
        "rule iou": (RuleVerifier(RuleConfig(rule="iou")), {"answer": [0, 0, 10, 10]}),
        "rule exact (whole response)": (RuleVerifier(RuleConfig(rule="exact", answer_pattern="")), {"answer": "Paris"}),
    }


def main() -> int:
    rows = false_positive_table(shipped_text_rewards())
    print("| reward | degenerate responses | false-positive rate | accepted |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['reward']} | {r['cases']} | {r['false_positive_rate']:.3f} | {', '.join(r['accepted']) or '—'} |")
    return 0
