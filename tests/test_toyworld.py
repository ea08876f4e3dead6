"""Shapes World: rendering, grammar, scene checking and the train / held-out split."""

from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image

from genalign.toyworld import (
    COLORS,
    HELDOUT_PAIRS,
    HELDOUT_RELATIONS,
    RELATIONS,
    SHAPES,
    TIERS,
    VOCAB,
    ObjectClause,
    PromptError,
    SceneSpec,
    all_prompts,
    check_scene,
    is_heldout,
    parse_prompt,
    render,
    render_objects,
    render_scene,
    sample_prompts,
)


@dataclass
class Obj:
    """A hand-made object in normalised coordinates."""

    shape: str
    color: str
    x: float
    y: float
    size: str = "large"


def verdicts(prompt, objects):
    return dict(check_scene(parse_prompt(prompt), objects).clauses)


# ---- rendering -------------------------------------------------------------------------


def test_render_is_deterministic_per_seed():
    spec = parse_prompt("a red circle to the left of a blue square")
    a, b, c = (np.asarray(render(spec, seed)) for seed in (3, 3, 4))
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_render_sizes_share_the_layout():
    spec = parse_prompt("three yellow triangles")
    small, objects_32 = render_scene(spec, seed=7)
    big, objects_64 = render_scene(spec, seed=7, size=64)
    assert small.size == (32, 32) and big.size == (64, 64)
    assert objects_32 == objects_64
    # The 64 px render box-filtered to 32 px is close to the 32 px render.
    down = np.asarray(big.resize((32, 32), Image.Resampling.BOX), dtype=np.float32)
    assert np.abs(down - np.asarray(small, dtype=np.float32)).mean() < 4


def test_rendered_objects_have_the_colour_drawn_at_their_centre():
    image, objects = render_scene(parse_prompt("a large green square and a large purple circle"), seed=1, size=64)
    pixels = np.asarray(image, dtype=np.int32)
    for o in objects:
        centre = pixels[int(o.y * 64), int(o.x * 64)]
        assert np.abs(centre - np.array(COLORS[o.color])).max() <= 16


@pytest.mark.parametrize("tier", sorted(TIERS))
def test_ground_truth_satisfies_its_own_spec(tier):
    for i, prompt in enumerate(all_prompts(tier)):
        spec = parse_prompt(prompt)
        for seed in (i, i + 100_000):
            _, objects = render_scene(spec, seed)
            check = check_scene(spec, objects)
            assert check.strict and check.partial == 1.0, (prompt, seed, check)
            assert len(objects) == sum(c.count for c in spec.clauses)
            for o in objects:
                x0, y0, x1, y1 = o.bbox
                assert 0 <= x0 < o.x < x1 <= 1 and 0 <= y0 < o.y < y1 <= 1


def test_render_objects_draws_free_lists():
    image, objects = render_objects([("circle", "red", "small"), ("square", "blue", None), ("triangle", "white", "large")],
                                    seed=5)
    assert image.size == (32, 32)
    assert [(o.shape, o.color) for o in objects] == [("circle", "red"), ("square", "blue"), ("triangle", "white")]
    assert objects[0].size == "small" and objects[2].size == "large"
    with pytest.raises(ValueError, match="1 to 4 objects"):
        render_objects([("circle", "red", None)] * 5, seed=0)


# ---- grammar ---------------------------------------------------------------------------


@pytest.mark.parametrize("tier", sorted(TIERS))
def test_parse_round_trips_every_prompt(tier):
    prompts = all_prompts(tier)
    assert len(prompts) == len(set(prompts)) > 0
    for prompt in prompts:
        spec = parse_prompt(prompt)
        assert spec.prompt == prompt
        assert spec.tier == tier
        assert set(prompt.split()) <= set(VOCAB)


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("a red circle", SceneSpec((ObjectClause("circle", "red"),))),
        ("a small white triangle", SceneSpec((ObjectClause("triangle", "white", size="small"),))),
        ("a blue square at the bottom", SceneSpec((ObjectClause("square", "blue", position="bottom"),))),
        ("a red circle and a red square", SceneSpec((ObjectClause("circle", "red"), ObjectClause("square", "red")))),
        (
            "a green triangle to the right of a yellow circle",
            SceneSpec((ObjectClause("triangle", "green"), ObjectClause("circle", "yellow")), "right of"),
        ),
        ("a purple circle below a red square",
         SceneSpec((ObjectClause("circle", "purple"), ObjectClause("square", "red")), "below")),
        ("four blue squares", SceneSpec((ObjectClause("square", "blue", count=4),))),
        ("Three  Yellow Circles", SceneSpec((ObjectClause("circle", "yellow", count=3),))),
    ],
)
def test_parse_builds_the_right_spec(prompt, expected):
    assert parse_prompt(prompt) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("a red dog", r"'dog' \(word 3\) is not a known shape; shapes: circle, square, triangle"),
        ("a pink circle", r"'pink' \(word 2\) is not a known size or colour; sizes: small, large; colours: red"),
        ("a small pink circle", r"'pink' \(word 3\) is not a known colour"),
        ("red circle", r"'red' \(word 1\) should be 'a' or a count"),
        ("a circle", r"missing colour before 'circle' \(word 2\)"),
        ("two red circle", r"'circle' \(word 3\) should be plural after 'two': 'circles'"),
        ("a red circles", r"'circles' \(word 3\) should be singular"),
        ("a red circle in the middle", r"unexpected 'in' \(word 4\); expected 'and', a relation"),
        ("a red circle and a blue square and a red triangle", r"unexpected 'and' \(word 8\); a prompt describes at most two"),
        ("a red circle and", r"prompt ends after 'and'"),
        ("a red circle and a red circle", r"merge them into one count \('two red circles'\)"),
        ("four red circles and a blue square", r"at most 4 objects, this one asks for 5"),
        ("", r"empty prompt"),
    ],
)
def test_parse_rejects_junk_with_a_clear_message(text, message):
    with pytest.raises(PromptError, match=message):
        parse_prompt(text)
    assert issubclass(PromptError, ValueError)


def test_vocab_is_exactly_the_words_of_the_grammar():
    used = {w for tier in TIERS for p in all_prompts(tier) for w in p.split()}
    assert used == set(VOCAB)
    assert list(VOCAB) == sorted(VOCAB)


def test_spec_validates_its_fields():
    with pytest.raises(ValueError, match="unknown shape 'dog'"):
        ObjectClause("dog", "red")
    with pytest.raises(ValueError, match="needs two clauses"):
        SceneSpec((ObjectClause("circle", "red"),), "above")


# ---- scene checking --------------------------------------------------------------------


def test_counts_are_exact():
    two = [Obj("circle", "red", 0.25, 0.25), Obj("circle", "red", 0.75, 0.75)]
    assert check_scene(parse_prompt("two red circles"), two).strict
    three = two + [Obj("circle", "red", 0.25, 0.75)]
    check = check_scene(parse_prompt("two red circles"), three)
    assert not check.strict
    assert dict(check.clauses) == {"exactly two red circles": False, "no other objects": True}
    assert check.partial == 0.5
    assert not check_scene(parse_prompt("a red circle"), two).strict
    assert not check_scene(parse_prompt("two red circles"), two[:1]).strict
    assert not check_scene(parse_prompt("a red circle"), []).strict


def test_extra_objects_are_excluded():
    scene = [Obj("circle", "red", 0.3, 0.5), Obj("square", "blue", 0.7, 0.5)]
    assert verdicts("a red circle", scene) == {"exactly one red circle": True, "no other objects": False}
    assert check_scene(parse_prompt("a red circle and a blue square"), scene).strict
    # Colour and shape both count: a red square is not a red circle.
    assert not check_scene(parse_prompt("a red circle"), [Obj("square", "red", 0.5, 0.5)]).strict
    assert not check_scene(parse_prompt("a red circle"), [Obj("circle", "blue", 0.5, 0.5)]).strict


def test_sizes():
    assert check_scene(parse_prompt("a small red circle"), [Obj("circle", "red", 0.5, 0.5, "small")]).strict
    assert verdicts("a small red circle", [Obj("circle", "red", 0.5, 0.5, "large")]) == {
        "exactly one red circle": True, "red circle is small": False, "no other objects": True,
    }
    assert check_scene(parse_prompt("a red circle"), [Obj("circle", "red", 0.5, 0.5, "small")]).strict


@pytest.mark.parametrize(
    "position, holds_at, fails_at",
    [
        ("on the left", (0.2, 0.5), (0.5, 0.5)),
        ("on the right", (0.8, 0.5), (0.3, 0.5)),
        ("at the top", (0.5, 0.15), (0.5, 0.5)),
        ("at the bottom", (0.5, 0.9), (0.5, 0.2)),
    ],
)
def test_absolute_positions(position, holds_at, fails_at):
    prompt = f"a red circle {position}"
    assert check_scene(parse_prompt(prompt), [Obj("circle", "red", *holds_at)]).strict
    assert verdicts(prompt, [Obj("circle", "red", *fails_at)])[f"red circle {position}"] is False


@pytest.mark.parametrize(
    "relation, a_at, b_at",
    [
        ("to the left of", (0.2, 0.5), (0.8, 0.5)),
        ("to the right of", (0.8, 0.4), (0.2, 0.6)),
        ("above", (0.5, 0.2), (0.6, 0.8)),
        ("below", (0.4, 0.8), (0.5, 0.2)),
    ],
)
def test_each_relation_both_ways(relation, a_at, b_at):
    prompt = f"a red circle {relation} a blue square"
    a, b = Obj("circle", "red", *a_at), Obj("square", "blue", *b_at)
    assert check_scene(parse_prompt(prompt), [a, b]).strict
    swapped = [Obj("circle", "red", *b_at), Obj("square", "blue", *a_at)]
    check = check_scene(parse_prompt(prompt), swapped)
    assert not check.strict and dict(check.clauses)[f"red circle {relation} blue square"] is False
    # Only the named relation holds: the other three fail on the same layout.
    for other in RELATIONS.values():
        if other != relation:
            assert not check_scene(parse_prompt(f"a red circle {other} a blue square"), [a, b]).strict


def test_relations_need_a_clear_offset_along_their_direction():
    red, blue = "a red circle to the left of a blue square", Obj("square", "blue", 0.5, 0.5)
    assert not check_scene(parse_prompt(red), [Obj("circle", "red", 0.45, 0.5), blue]).strict  # 0.05 apart
    assert not check_scene(parse_prompt(red), [Obj("circle", "red", 0.3, 0.1), blue]).strict  # mostly above
    assert check_scene(parse_prompt("a red circle above a blue square"), [Obj("circle", "red", 0.3, 0.1), blue]).strict


def test_relation_fails_when_an_object_is_missing():
    check = check_scene(parse_prompt("a red circle above a blue square"), [Obj("circle", "red", 0.5, 0.2)])
    assert not check.strict
    assert dict(check.clauses)["red circle above blue square"] is False


@pytest.mark.parametrize("counts", [("two", "a"), ("a", "two")])
def test_relation_with_counts_needs_every_pair(counts):
    """'two red circles to the left of a blue square': every red circle must be left of every
    blue square (and with two squares, the circle left of both); one of two is not enough."""
    a_word, b_word = counts
    a_noun = "red circles" if a_word == "two" else "red circle"
    b_noun = "blue squares" if b_word == "two" else "blue square"
    spec = parse_prompt(f"{a_word} {a_noun} to the left of {b_word} {b_noun}")
    label = f"{a_noun} to the left of {b_noun}"
    if a_word == "two":
        good = [Obj("circle", "red", 0.2, 0.3), Obj("circle", "red", 0.2, 0.7), Obj("square", "blue", 0.8, 0.5)]
        one_off = [Obj("circle", "red", 0.2, 0.5), Obj("circle", "red", 0.9, 0.2), Obj("square", "blue", 0.6, 0.5)]
    else:
        good = [Obj("circle", "red", 0.2, 0.5), Obj("square", "blue", 0.8, 0.3), Obj("square", "blue", 0.8, 0.7)]
        one_off = [Obj("circle", "red", 0.5, 0.5), Obj("square", "blue", 0.8, 0.5), Obj("square", "blue", 0.1, 0.5)]
    assert check_scene(spec, good).strict
    check = check_scene(spec, one_off)
    assert dict(check.clauses)[label] is False and not check.strict
    assert check.partial == 3 / 4  # both counts right, no extra objects; only the relation fails


def test_rendered_scene_fails_near_miss_prompts():
    _, objects = render_scene(parse_prompt("two red circles"), seed=0)
    assert not check_scene(parse_prompt("three red circles"), objects).strict
    _, objects = render_scene(parse_prompt("a red circle above a blue square"), seed=0)
    assert not check_scene(parse_prompt("a red circle below a blue square"), objects).strict
    assert not check_scene(parse_prompt("a blue square above a red circle"), objects).strict


# ---- prompts and splits ----------------------------------------------------------------


@pytest.mark.parametrize("tier", sorted(TIERS))
def test_train_and_heldout_are_disjoint(tier):
    train, heldout = set(all_prompts(tier, "train")), set(all_prompts(tier, "heldout"))
    assert train and heldout and not train & heldout
    assert train | heldout == set(all_prompts(tier))
    for prompt in sample_prompts(tier, 300, "train", seed=1):
        spec = parse_prompt(prompt)
        assert not is_heldout(spec)
        assert not {(c.color, c.shape) for c in spec.clauses} & HELDOUT_PAIRS
    for prompt in sample_prompts(tier, 100, "heldout", seed=1):
        assert prompt in heldout and is_heldout(parse_prompt(prompt))


def test_heldout_compositions():
    tier1 = set(all_prompts(1, "heldout"))
    for color, shape in HELDOUT_PAIRS:
        assert shape in SHAPES and color in COLORS and f"a {color} {shape}" in tier1
    for a, relation, b in HELDOUT_RELATIONS:
        assert parse_prompt(f"a red {a} {RELATIONS[relation]} a white {b}") is not None
        assert is_heldout(parse_prompt(f"a red {a} {RELATIONS[relation]} a white {b}"))
    # Held out in either phrasing: "circle above square" == "square below circle".
    assert is_heldout(parse_prompt("a red square below a white circle"))
    assert not is_heldout(parse_prompt("a red square above a white circle"))


def test_sample_prompts_is_deterministic_and_balanced():
    assert sample_prompts(3, 50, seed=2) == sample_prompts(3, 50, seed=2)
    assert sample_prompts(3, 50, seed=2) != sample_prompts(3, 50, seed=3)
    pool = all_prompts(1, "train")
    drawn = sample_prompts(1, 2 * len(pool), "train", seed=0)
    assert sorted(drawn) == sorted(pool * 2)  # every prompt once before any repeats
    with pytest.raises(ValueError, match="unknown split"):
        sample_prompts(1, 3, split="test")
    with pytest.raises(ValueError, match="unknown tier"):
        sample_prompts(6, 3)
