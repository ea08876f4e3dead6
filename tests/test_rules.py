"""Rule verifiers for text answers: each rule's formula, answer extraction, and the degenerate
answers a judge must never accept."""

import pytest

from genalign.configs import ConfigError, load_config
from genalign.train_config import TrainConfig
from rewards.registry import build_reward
from rewards.rules import RuleConfig, RuleVerifier, box_iou, parse_choice, parse_number

DEGENERATE = [":", ".", "Thought process:", "Solution", "Let's solve this problem step by step.", "", "   ",
              "<answer>", "The answer is <answer>"]


def score(rule, responses, answers, **kw):
    v = RuleVerifier(RuleConfig(rule=rule, **kw))
    return v(responses, [{"prompt": "q", "answer": a} for a in answers]).scores.tolist()


def test_exact_match_normalises_case_space_and_final_period():
    assert score("exact", ["<answer> Paris. </answer>", "<answer>paris</answer>", "<answer>Lyon</answer>"],
                 ["Paris"] * 3) == [1.0, 1.0, 0.0]


def test_last_answer_tag_counts():
    assert score("exact", ["<answer>Lyon</answer> wait, <answer>Paris</answer>"], ["Paris"]) == [1.0]


def test_numeric_match():
    assert parse_number("1,234.5") == 1234.5 and parse_number("-3/4") == -0.75 and parse_number("$12") == 12.0
    assert parse_number("3 or 4") is None  # two numbers: not an answer
    assert score("numeric", ["<answer>0.75</answer>", "<answer>3/4</answer>", "<answer>1,000</answer>", "<answer>0.7501</answer>"],
                 ["3/4", "0.75", "1000", "0.75"]) == [1.0, 1.0, 1.0, 0.0]
    assert score("numeric", ["<answer>0.7501</answer>"], ["0.75"], rel_tol=1e-3) == [1.0]


def test_choice_match_and_hedging():
    assert parse_choice("(B)") == "B" and parse_choice("Answer: C) blue") == "C" and parse_choice("A or B or C") is None
    assert score("choice", ["<answer>(B)</answer>", "<answer>B. a cat</answer>", "<answer>A or B</answer>"],
                 ["B", "B", "B"]) == [1.0, 1.0, 0.0]
    assert parse_choice("b") is None  # lowercase letters are words ("a"), not options
    assert parse_choice("I think it is D") == "D"


def test_box_iou_rule():
    """[0,0,2,2] vs [1,1,3,3]: intersection 1, union 7 -> IoU 1/7; [0,0,2,2] vs [0,0,2,1.5]: 0.75."""
    assert box_iou([0, 0, 2, 2], [1, 1, 3, 3]) == pytest.approx(1 / 7)
    r = ["<answer>[0, 0, 2, 1.5]</answer>", "<answer>(1,1),(3,3)</answer>", "<answer>[3, 3, 1, 1]</answer>"]
    assert score("iou", r, [[0, 0, 2, 2]] * 3) == [1.0, 0.0, 0.0]
    assert score("iou", r[:2], [[0, 0, 2, 2]] * 2, partial=True) == pytest.approx([0.75, 1 / 7])


def test_format_rule():
    pat = r"<think>.+</think>\s*<answer>.+</answer>"
    assert score("format", ["<think>x</think> <answer>4</answer>", "<answer>4</answer>"], ["4", "4"], format_pattern=pat) == [1.0, 0.0]


@pytest.mark.parametrize("rule", ["exact", "numeric", "choice", "iou"])
def test_degenerate_answers_never_pass(rule):
    answers = {"exact": "Solution", "numeric": "4", "choice": "A", "iou": [0, 0, 1, 1]}[rule]
    out = RuleVerifier(RuleConfig(rule=rule))(DEGENERATE, [{"answer": answers}] * len(DEGENERATE))
    assert out.scores.sum() == 0, [d for d, s in zip(DEGENERATE, out.scores) if s]
    assert out.components["format"].sum() == 0


def test_whole_response_mode_and_missing_reference():
    assert score("exact", ["Paris"], ["paris"], answer_pattern="") == [1.0]
    with pytest.raises(KeyError, match="no 'answer'"):
        RuleVerifier()(["<answer>x</answer>"], [{"prompt": "q"}])


def test_config_and_registry():
    with pytest.raises(ValueError, match="answer_pattern"):
        RuleVerifier(RuleConfig(answer_pattern="(unclosed"))
    base = ["policy.type=stable_diffusion", "policy.pretrained=assets/models/tiny-sd", "prompts.source=list",
            "prompts.prompts=[q]"]
    cfg = load_config(TrainConfig, None, [*base, "reward.components=[{type: rule, rule: numeric}]"])
    reward = build_reward(cfg.reward.components)
    assert reward(["<answer>2</answer>"], [{"answer": "2"}]).scores.tolist() == [1.0]
    with pytest.raises(ConfigError, match="rule"):
        load_config(TrainConfig, None, [*base, "reward.components=[{type: rule, rule: fuzzy}]"])


def test_judge_check_table_is_clean_for_shipped_rules(capsys):
    from genalign.cli import main
    from rewards.robustness import false_positive_table, shipped_text_rewards

    rows = false_positive_table(shipped_text_rewards())
    assert rows and all(r["false_positive_rate"] == 0 for r in rows), rows
    assert main(["judge-check"]) == 0
    assert "| rule numeric | 12 | 0.000 |" in capsys.readouterr().out


def test_judge_check_catches_a_lenient_judge():
    """A judge that accepts any non-empty text is caught."""
    import torch

    from rewards.base import RewardOutput
    from rewards.robustness import false_positive_table

    def lenient(responses, conditions):
        return RewardOutput(scores=torch.tensor([float(bool(r.strip())) for r in responses]))

    (row,) = false_positive_table({"lenient": (lenient, {"answer": "x"})})
    assert row["false_positive_rate"] == pytest.approx(10 / 12) and "colon" in row["accepted"]
