"""Shapes VQA: every question's gold answer checked against its scene by an independent oracle."""

from __future__ import annotations

import re

import numpy as np
import pytest

from genalign.toyworld.prompts import HELDOUT_PAIRS
from genalign.toyworld.spec import COLORS, SHAPES
from genalign.toyworld.text_qa import reserved_for_eval
from genalign.toyworld.vqa import (
    FORMATS,
    IMAGE_SIZE,
    QTYPES,
    VQA_WORDS,
    ShapesVQAPrompts,
    sample_vqa_conditions,
)

ROWS, COLS = ("top", "middle", "bottom"), ("left", "center", "right")
REL = {"left of": lambda a, b: a[3] < b[3], "right of": lambda a, b: a[3] > b[3],
       "above": lambda a, b: a[2] < b[2], "below": lambda a, b: a[2] > b[2]}


def _objects(cond):
    return [(c, s, ROWS.index(r), COLS.index(col)) for c, s, r, col in cond["objects"]]


def _one(objs, pred):
    found = [o for o in objs if pred(o)]
    assert len(found) == 1, f"the question's subject is not unique: {found}"
    return found[0]


def _value(qtype: str, question: str, objs) -> str:
    """The answer of the open question (options stripped), computed from the objects."""
    if qtype == "colour":
        shape = re.fullmatch(r"what color is the (\w+) \?", question)[1]
        return _one(objs, lambda o: o[1] == shape)[0]
    if qtype == "shape":
        color = re.fullmatch(r"what shape is the (\w+) object \?", question)[1]
        return _one(objs, lambda o: o[0] == color)[1]
    if qtype == "count":
        what = re.fullmatch(r"how many (.+) \?", question)[1].split()
        if len(what) == 1:
            return str(sum(o[1] + "s" == what[0] for o in objs))
        return str(sum(o[0] == what[0] for o in objs))
    if qtype == "position":
        c, s = re.fullmatch(r"where is the (\w+) (\w+) \?", question).groups()
        o = _one(objs, lambda o: o[:2] == (c, s))
        return f"{ROWS[o[2]]} {COLS[o[3]]}"
    rel, c, s = re.fullmatch(r"what is (left of|right of|above|below) the (\w+) (\w+) \?", question).groups()
    anchor = _one(objs, lambda o: o[:2] == (c, s))
    o = _one(objs, lambda o: o is not anchor and REL[rel](o, anchor))
    return f"{o[0]} {o[1]}"


def _yesno(qtype: str, question: str, objs) -> str:
    """yes/no from the objects, by turning the proposition back into the open question."""
    if qtype == "colour":
        shape, value = re.fullmatch(r"is the (\w+) (\w+) \?", question).groups()
        return "yes" if _value(qtype, f"what color is the {shape} ?", objs) == value else "no"
    if qtype == "shape":
        color, value = re.fullmatch(r"is the (\w+) object a (\w+) \?", question).groups()
        return "yes" if _value(qtype, f"what shape is the {color} object ?", objs) == value else "no"
    if qtype == "count":
        value, what = re.fullmatch(r"are there (\d) (.+) \?", question).groups()
        return "yes" if _value(qtype, f"how many {what} ?", objs) == value else "no"
    if qtype == "position":
        c, s, value = re.fullmatch(r"is the (\w+) (\w+) at (\w+ \w+) \?", question).groups()
        return "yes" if _value(qtype, f"where is the {c} {s} ?", objs) == value else "no"
    c, s, rel, bc, bs = re.fullmatch(r"is the (\w+) (\w+) (left of|right of|above|below) the (\w+) (\w+) \?", question).groups()
    anchor = _one(objs, lambda o: o[:2] == (bc, bs))
    return "yes" if any(o[:2] == (c, s) and REL[rel](o, anchor) for o in objs) else "no"


@pytest.mark.parametrize("split", ["train", "heldout"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("qtype", QTYPES)
def test_gold_answers_follow_from_the_scene(split, fmt, qtype):
    conds = sample_vqa_conditions(fmt, qtype, 30, split, seed=3)
    answers = []
    for c in conds:
        objs = _objects(c)
        assert (c["format"], c["qtype"], c["split"]) == (fmt, qtype, split)
        assert set(c["prompt"].split()) <= set(VQA_WORDS) and set(c["answer"].split()) <= set(VQA_WORDS)
        if fmt == "yesno":
            assert _yesno(qtype, c["prompt"], objs) == c["answer"], c
        else:
            question = c["prompt"].split(" options :")[0]
            assert _value(qtype, question, objs) == c["answer"], c
        if fmt == "choice":
            listed = re.fullmatch(r".* \? options : (.*) \.", c["prompt"])[1].split(" , ")
            assert listed == c["options"] and len(set(listed)) == 3 and c["answer"] in listed
        else:
            assert c["options"] == []
        pairs = {(o[0], o[1]) for o in objs}
        if split == "train":  # nothing in an in-domain condition names or shows a held-out pair
            words = c["prompt"].split()
            assert not pairs & HELDOUT_PAIRS
            assert not any(f"{a} {b}" in c["prompt"] for a, b in HELDOUT_PAIRS)
            if qtype == "colour":  # a proposed or offered colour with the subject shape
                shape = next(w for w in words if w in SHAPES)
                assert not {(w, shape) for w in words if w in COLORS} & HELDOUT_PAIRS
            if qtype == "shape":
                color = next(w for w in words if w in COLORS)
                assert not {(color, w) for w in words if w in SHAPES} & HELDOUT_PAIRS
        else:
            assert pairs & HELDOUT_PAIRS
        answers.append(c["answer"])
    if fmt == "yesno":  # both answers are common (each is drawn half of the time)
        assert 6 <= answers.count("yes") <= 24


def test_conditions_are_deterministic_and_images_show_the_objects():
    a = sample_vqa_conditions("open", "position", 5, "train", seed=7)
    b = sample_vqa_conditions("open", "position", 5, "train", seed=7)
    assert [c["key"] for c in a] == [c["key"] for c in b]
    for x, y in zip(a, b):
        assert np.array_equal(np.asarray(x["image"]), np.asarray(y["image"]))
    for c in a:
        pixels = np.asarray(c["image"]).astype(int)
        assert pixels.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
        cell = IMAGE_SIZE // 3
        for color, _shape, row, col in c["objects"]:  # the cell's centre pixel has the object's colour
            y, x = ROWS.index(row) * cell + cell // 2, COLS.index(col) * cell + cell // 2
            assert np.abs(pixels[y, x] - np.array(COLORS[color])).max() <= 16 + 1, (color, pixels[y, x])


def test_prompt_source_keeps_evaluation_out_of_training_and_checks_its_fields():
    src = ShapesVQAPrompts(formats=["yesno", "open"], qtypes=["colour", "count"], split="heldout")
    src.validate()
    train = src.sample(64, seed=1)
    assert {c["format"] for c in train} == {"yesno", "open"} and {c["qtype"] for c in train} == {"colour", "count"}
    assert not any(reserved_for_eval(c["key"]) for c in train)
    sets = src.eval_sets(10)
    assert sorted(sets) == ["open", "yesno"] and all(len(v) == 10 for v in sets.values())
    assert all(reserved_for_eval(c["key"]) for v in sets.values() for c in v)
    assert src.targets(train[:2]) == [f"<answer> {c['answer']} </answer>" for c in train[:2]]
    by_type = ShapesVQAPrompts(eval_by="qtype").eval_sets(2)  # exactly n per set, even below one per cell
    assert sorted(by_type) == sorted(QTYPES) and all(len(v) == 2 for v in by_type.values())
    assert [c["format"] for c in by_type["colour"]] == ["yesno", "choice"]
    for bad in (dict(formats=["essay"]), dict(qtypes=[])):
        with pytest.raises(ValueError, match="formats|qtypes"):
            ShapesVQAPrompts(**bad).validate()
