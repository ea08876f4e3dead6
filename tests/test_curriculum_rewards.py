"""The difficulty-aware QA reward: exact values per format and question type, and the format reward."""

import pytest
import torch

from genalign.configs import from_dict
from genalign.train_config import RewardSection
from rewards.curriculum_rewards import CurriculumReward, CurriculumRewardConfig, named_options
from rewards.registry import build_reward

THIRD = torch.tensor(1 / 3, dtype=torch.float32).item()  # the float32 value of 1/3 the reward returns
TWO_THIRDS = torch.tensor(2 / 3, dtype=torch.float32).item()


def score(responses, condition, **config):
    out = CurriculumReward(CurriculumRewardConfig(**config))(responses, [condition] * len(responses))
    return out.components["correct"].tolist(), out.components["format"].tolist(), out.scores.tolist()


def a(text):
    return f"<answer> {text} </answer>"


def test_yesno_is_exact_match():
    cond = {"prompt": "is the red circle left of the blue square ?", "answer": "yes", "format": "yesno", "qtype": "relation"}
    correct, fmt, total = score([a("yes"), a("Yes"), a("no"), a("yes no"), "yes", "<answer>yes</answer>"], cond)
    assert correct == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    assert fmt == [1.0, 1.0, 1.0, 1.0, 0.0, 1.0]
    assert total == [2.0, 2.0, 1.0, 1.0, 0.0, 2.0]


def test_choice_is_option_set_match():
    cond = {"answer": "red", "format": "choice", "qtype": "colour", "options": ["red", "blue", "green"]}
    correct, _, _ = score([a("red"), a("red or blue"), a("the red one"), a("purple"), a("blue"), a("reddish")], cond)
    assert correct == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    # multi-word options: naming a word of an option is not naming it
    rel = {"answer": "red circle", "format": "choice", "qtype": "relation", "options": ["red circle", "red square", "blue circle"]}
    assert score([a("red circle"), a("red"), a("circle red"), a("red circle red square")], rel)[0] == [1.0, 0.0, 0.0, 0.0]
    # an option inside a longer named option is not named on its own
    assert named_options("red circle", ["red", "red circle"]) == {"red circle"}
    assert named_options("red or red circle", ["red", "red circle"]) == {"red", "red circle"}
    nested = {"answer": "red", "format": "choice", "options": ["red", "red circle"]}
    assert score([a("red"), a("red circle")], nested)[0] == [1.0, 0.0]
    with pytest.raises(KeyError, match="options"):
        score([a("red")], {"answer": "red", "format": "choice", "key": "shapes_vqa/choice/colour/x"})


def test_open_answers_by_question_type():
    exact = {"colour": ("red", "blue"), "shape": ("circle", "square"), "count": ("2", "3")}
    for qtype, (gold, wrong) in exact.items():
        cond = {"answer": gold, "format": "open", "qtype": qtype}
        assert score([a(gold), a(wrong), a(f"{gold} {gold}")], cond)[0] == [1.0, 0.0, 0.0], qtype
    # position: Jaccard of the row/column words; other words do not count
    pos = {"answer": "top left", "format": "open", "qtype": "position"}
    assert score([a("top left"), a("left top"), a("the top left"), a("top center"), a("middle center"), a("top")], pos)[0] == [
        1.0, 1.0, 1.0, THIRD, 0.0, 0.5]
    # relation answers: Jaccard of the word sets
    rel = {"answer": "red circle", "format": "open", "qtype": "relation"}
    assert score([a("red circle"), a("circle red"), a("red square"), a("blue square"), a("a red circle")], rel)[0] == [
        1.0, 1.0, THIRD, 0.0, TWO_THIRDS]


def test_a_condition_without_format_is_open_with_exact_match():
    """Shapes QA text conditions carry no format or qtype: exact match of the answer words."""
    cond = {"prompt": "scene : ... where is the red circle ? answer :", "answer": "top left", "tier": 2}
    assert score([a("top left"), a("top center"), "top left"], cond)[0] == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="format 'essay'"):
        score([a("x")], {"answer": "x", "format": "essay"})
    with pytest.raises(ValueError, match="question type 'size'"):
        score([a("x")], {"answer": "x", "format": "open", "qtype": "size"})


def test_format_reward_is_exactly_one_answer_span():
    cond = {"answer": "red", "format": "open", "qtype": "colour"}
    responses = [
        "  <answer> red </answer> ",  # surrounding spaces aside: formatted
        "<answer> red </answer> because",  # text after: not formatted, still correct
        "I think <answer> red </answer>",
        "<answer></answer>", "<answer>   </answer>",
        "<answer> blue </answer><answer> red </answer>",  # two spans: the last counts, the format fails
        "<answer> <red> </answer>",
        ":", "Thought process:", "Solution", "",  # degenerate answers never score
    ]
    correct, fmt, total = score(responses, cond, format_weight=0.5)
    assert correct == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert fmt == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert total == [1.5, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_registered_and_components_reported():
    section = from_dict(RewardSection, {"components": [{"type": "curr_reft", "format_weight": 0.0}]})
    reward = build_reward(section.components)
    out = reward([a("top center"), "top left"], [{"answer": "top left", "format": "open", "qtype": "position"}] * 2)
    assert out.scores.tolist() == [THIRD, 0.0]
    assert set(out.components) == {"curr_reft", "curr_reft/correct", "curr_reft/format"}
    assert out.components["curr_reft/format"].tolist() == [1.0, 0.0]
    assert out.details[0]["curr_reft"] == {"extracted": "top center", "format": "open"}
