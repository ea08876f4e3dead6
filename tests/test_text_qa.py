"""Shapes QA: the text world's scenes, questions, answers, split and prompt source."""

import re

import pytest
import torch

from genalign.recipes.pretrain_lm import build_tokenizer, encode_examples
from genalign.toyworld.prompts import HELDOUT_PAIRS
from genalign.toyworld.text_qa import (
    WORDS,
    QAObject,
    ShapesQAPrompts,
    describe_scene,
    questions,
    reserved_for_eval,
    sample_conditions,
    target_response,
)
from rewards.rules import RuleConfig, RuleVerifier

ROW = {"top": 0, "middle": 1, "bottom": 2}
COL = {"left": 0, "center": 1, "right": 2}


def parse_scene(prompt):
    """Objects (color, shape, x, y) read back from a prompt's words (x = column, y = row)."""
    scene = re.match(r"scene : (.*) \. question : ", prompt).group(1)
    out = []
    for part in scene.split(" , "):
        color, shape, row, col = part.split()
        out.append((color, shape, COL[col], ROW[row]))
    return out


def oracle(objects, question):
    """(answer, pairs the question is about), recomputed from the question's words alone."""
    def rel(a, r, b):
        return {"left of": a[2] < b[2], "right of": a[2] > b[2], "above": a[3] < b[3], "below": a[3] > b[3]}[r]

    def the(color, shape):
        (obj,) = [o for o in objects if o[:2] == (color, shape)]
        return obj

    if m := re.fullmatch(r"what color is the (\w+) \?", question):
        (obj,) = [o for o in objects if o[1] == m[1]]
        return obj[0], {obj[:2]}
    if m := re.fullmatch(r"where is the (\w+) (\w+) \?", question):
        obj = the(m[1], m[2])
        return f"{['top', 'middle', 'bottom'][obj[3]]} {['left', 'center', 'right'][obj[2]]}", {obj[:2]}
    if m := re.fullmatch(r"is the (\w+) (\w+) (left of|right of|above|below) the (\w+) (\w+) \?", question):
        a, b = the(m[1], m[2]), the(m[4], m[5])
        return ("yes" if rel(a, m[3], b) else "no"), {a[:2], b[:2]}
    if m := re.fullmatch(r"how many shapes are (left of|right of|above|below) the (\w+) (\w+) \?", question):
        anchor = the(m[2], m[3])
        group = [o for o in objects if o != anchor and rel(o, m[1], anchor)]
        return str(len(group)), {anchor[:2]} | {o[:2] for o in group}
    if m := re.fullmatch(r"how many (\w+) shapes \?", question):
        group = [o for o in objects if o[0] == m[1]]
        return str(len(group)), {o[:2] for o in group}
    if m := re.fullmatch(r"how many (\w+)s \?", question):
        group = [o for o in objects if o[1] == m[1]]
        return str(len(group)), {o[:2] for o in group}
    if m := re.fullmatch(r"how many (\w+) (\w+)s \?", question):
        return str(sum(o[:2] == (m[1], m[2]) for o in objects)), {(m[1], m[2])}
    raise AssertionError(f"unknown question {question!r}")


def test_hand_made_scene_answers():
    scene = [QAObject("red", "circle", 0, 0), QAObject("blue", "square", 1, 1), QAObject("red", "square", 2, 2)]
    assert describe_scene(scene) == ("scene : red circle top left , blue square middle center , "
                                     "red square bottom right .")
    got = {t: {q.text: q.answer for q in questions(scene, t)} for t in range(1, 6)}
    assert got[1] == {"what color is the circle ?": "red"}  # squares are not unique
    assert got[2]["where is the blue square ?"] == "middle center"
    assert got[2]["where is the red square ?"] == "bottom right"
    assert got[3]["how many squares ?"] == "2" and got[3]["how many red shapes ?"] == "2"
    assert got[3]["how many triangles ?"] == "0" and got[3]["how many white shapes ?"] == "0"
    assert got[4]["is the red circle left of the blue square ?"] == "yes"
    assert got[4]["is the red circle below the blue square ?"] == "no"
    assert got[4]["is the red square right of the red circle ?"] == "yes"
    assert got[4]["is the blue square above the red circle ?"] == "no"
    assert got[5]["how many shapes are left of the red square ?"] == "2"
    assert got[5]["how many shapes are above the red circle ?"] == "0"
    assert got[5]["how many red squares ?"] == "1" and got[5]["how many blue circles ?"] == "0"
    # every enumerated question agrees with the independent recomputation
    objs = [(o.color, o.shape, o.col, o.row) for o in scene]
    for t in range(1, 6):
        for q in questions(scene, t):
            assert oracle(objs, q.text) == (q.answer, set(q.pairs)), q


def test_same_row_and_column_are_not_related():
    scene = [QAObject("red", "circle", 1, 0), QAObject("green", "square", 1, 2), QAObject("white", "triangle", 0, 0)]
    got = {q.text: q.answer for q in questions(scene, 4)}
    assert got["is the red circle above the green square ?"] == "no"
    assert got["is the green square below the red circle ?"] == "no"
    assert got["is the white triangle left of the red circle ?"] == "no"
    assert got["is the white triangle above the red circle ?"] == "yes"


def test_scene_rejects_shared_cells_and_bad_words():
    with pytest.raises(ValueError, match="share a cell"):
        describe_scene([QAObject("red", "circle", 0, 0), QAObject("blue", "square", 0, 0)])
    with pytest.raises(ValueError, match="unknown colour 'pink'"):
        QAObject("pink", "circle", 0, 0)
    with pytest.raises(ValueError, match="unknown tier 6"):
        sample_conditions(6, 1)


@pytest.mark.parametrize("tier", [1, 2, 3, 4, 5])
def test_sampled_conditions_are_correct_and_split(tier):
    for split in ("train", "heldout"):
        conds = sample_conditions(tier, 60, split, seed=3)
        assert conds == sample_conditions(tier, 60, split, seed=3)
        assert conds != sample_conditions(tier, 60, split, seed=4)
        assert len({c["key"] for c in conds}) == 60
        for c in conds:
            objects = parse_scene(c["prompt"])
            assert [tuple(o) for o in c["objects"]] == [
                (col, sh, ["top", "middle", "bottom"][y], ["left", "center", "right"][x]) for col, sh, x, y in objects]
            assert 1 <= len(objects) <= 4 and len({o[2:] for o in objects}) == len(objects)
            assert c["prompt"].endswith(f"question : {c['question']} answer :") and c["tier"] == tier
            answer, pairs = oracle(objects, c["question"])
            assert answer == c["answer"], c
            if split == "train":  # no held-out pair anywhere: scene or question
                assert not {o[:2] for o in objects} & HELDOUT_PAIRS, c
                assert not any(f"{a} {b}" in c["question"] for a, b in HELDOUT_PAIRS), c
            else:  # about a held-out pair
                assert pairs & HELDOUT_PAIRS, c


def test_answers_are_balanced_enough():
    yes = [c["answer"] for c in sample_conditions(4, 400, "train", seed=0)].count("yes")
    assert 160 <= yes <= 240  # drawn 50/50: 200 ± 4 standard deviations (10)


def test_gold_responses_score_one_and_others_zero():
    conds = [c for t in range(1, 6) for c in sample_conditions(t, 20, "heldout", seed=1)]
    gold = [target_response(c) for c in conds]
    assert gold[0] == f"<answer> {conds[0]['answer']} </answer>"
    assert RuleVerifier(RuleConfig(rule="exact"))(gold, conds).scores.tolist() == [1.0] * len(conds)
    wrong = [f"<answer> {c['answer']} x </answer>" for c in conds]
    assert RuleVerifier()(wrong, conds).scores.sum() == 0
    assert RuleVerifier()([c["answer"] for c in conds], conds).scores.sum() == 0  # no tags: no answer


def test_tokenizer_round_trips_every_word_and_prompt():
    tok = build_tokenizer()
    ids = tok(" ".join(WORDS), add_special_tokens=False)["input_ids"]
    assert len(ids) == len(WORDS) and tok.unk_token_id not in ids
    assert tok.decode(ids) == " ".join(WORDS)
    for c in sample_conditions(5, 10, "heldout", seed=0):
        text = f"{c['prompt']} {target_response(c)}"
        assert tok.decode(tok(text)["input_ids"]) == text  # adds no special tokens either
    chat = tok.apply_chat_template([{"role": "user", "content": "scene : red circle top left ."}],
                                   tokenize=False, add_generation_prompt=True)
    assert chat == "scene : red circle top left ."


def test_training_examples_label_only_the_response():
    tok = build_tokenizer()
    conds = sample_conditions(2, 3, "train", seed=0)
    ids, labels, mask = encode_examples(tok, conds)
    for i, c in enumerate(conds):
        n_prompt = len(c["prompt"].split())
        response = tok(target_response(c))["input_ids"] + [tok.eos_token_id]
        assert (labels[i, :n_prompt] == -100).all()
        assert labels[i, n_prompt:n_prompt + len(response)].tolist() == response
        assert (labels[i, n_prompt + len(response):] == -100).all()
        assert mask[i].sum() == n_prompt + len(response)
        assert torch.equal(ids[i, n_prompt:n_prompt + len(response)], torch.tensor(response))


def test_prompt_source():
    src = ShapesQAPrompts(tiers=[1, 4])
    src.validate()
    with pytest.raises(ValueError, match="'tiers'"):
        ShapesQAPrompts(tiers=[0]).validate()
    batch = src.sample(16, seed=5)
    assert batch == src.sample(16, seed=5) and batch != src.sample(16, seed=6)
    assert {c["tier"] for c in batch} == {1, 4}
    assert all(not {tuple(o[:2]) for o in c["objects"]} & HELDOUT_PAIRS for c in batch)
    sets = src.eval_sets(8)
    assert list(sets) == ["tier 1", "tier 4"] and all(len(v) == 8 for v in sets.values())
    assert sets["tier 1"] == sample_conditions(1, 8, "heldout", seed=12345, part="eval")
    # evaluation's conditions are reserved: fresh training draws never hit them
    reserved = {c["key"] for v in src.eval_sets(64).values() for c in v}
    assert all(reserved_for_eval(k) for k in reserved)
    drawn = {c["key"] for e in range(100) for c in ShapesQAPrompts(tiers=[1, 4], split="heldout").sample(16, e)}
    assert len(drawn) > 800 and not drawn & reserved
    assert [c["tier"] for c in src.evaluation(6)] == [1, 1, 1, 4, 4, 4]
    assert src.targets(batch[:2], seeds=[0, 1], like=None) == [target_response(c) for c in batch[:2]]
    pooled = ShapesQAPrompts(tiers=[2], pool_size=5, split="heldout")
    keys = {c["key"] for c in pooled.pool(2)}
    assert {c["key"] for c in pooled.sample(40, seed=0)} <= keys
    split_sets = pooled.eval_sets(40)
    assert set(split_sets) <= {"tier 2 (training pool)", "tier 2 (never trained)"}
    assert sum(map(len, split_sets.values())) == 40
