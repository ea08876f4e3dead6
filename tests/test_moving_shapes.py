"""Moving Shapes: grammar, held-out split, renders that move as the prompt says, prompt source."""

import numpy as np
import pytest

from genalign.toyworld import HELDOUT_PAIRS, PromptError
from genalign.toyworld.moving import (
    EDGE,
    GAP,
    SPEED,
    TRAVEL,
    MovingShapesPrompts,
    all_moving_prompts,
    all_moving_specs,
    make_condition,
    parse_moving_prompt,
    render_clip,
)


@pytest.mark.parametrize("prompt", [
    "a red circle moving right",
    "a blue square staying still",
    "a red circle moving right and a green square moving up",
])
def test_prompts_round_trip(prompt):
    assert parse_moving_prompt(prompt).prompt == prompt


@pytest.mark.parametrize("prompt, bad", [
    ("a red circel moving right", "'circel'"),
    ("a red circle moving sideways", "'sideways'"),
    ("a red circle staying up", "'up'"),
    ("a red circle moving right or a blue square moving up", "'or'"),
    ("a red circle moving right and a red square moving up", "'red' appears twice"),
    ("a red circle moving", "ends early"),
    ("a red circle moving right and a blue square moving up and a green circle moving left", "'and'"),
])
def test_parse_error_names_the_bad_word(prompt, bad):
    with pytest.raises(PromptError, match=bad):
        parse_moving_prompt(prompt)


def test_prompt_counts_and_heldout_split():
    # 6 colours x 3 shapes x 5 directions; two objects: ordered pairs of distinct colours
    assert len(all_moving_prompts(1)) == 90 and len(all_moving_prompts(2)) == 90 * 75
    for k in (1, 2):
        train, held = all_moving_specs(k, "train"), all_moving_specs(k, "heldout")
        assert len(train) + len(held) == len(all_moving_specs(k))
        assert not any((o.color, o.shape) in HELDOUT_PAIRS for s in train for o in s.objects)
        assert all(any((o.color, o.shape) in HELDOUT_PAIRS for o in s.objects) for s in held)
    assert len(all_moving_prompts(1, "heldout")) == len(HELDOUT_PAIRS) * 5


@pytest.mark.parametrize("frames", [8, 16])
def test_renders_move_as_the_prompt_says_and_stay_inside(frames):
    speed = TRAVEL / (frames - 1)  # the world's default: the same path whatever the clip length
    steps = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}
    specs = all_moving_specs(2)[::337] + all_moving_specs(1)[::7]
    for seed, spec in enumerate(specs):
        clip = render_clip(spec, seed, frames=frames)
        assert len(clip.frames) == frames and clip.array().shape == (frames, 3, 32, 32)
        for obj, track in zip(spec.objects, clip.tracks):
            ux, uy = steps[obj.direction]
            for t, p in enumerate(track):  # constant speed, x right and y down ("up" lowers y)
                assert p.x == pytest.approx(track[0].x + ux * speed * t, abs=1e-12)
                assert p.y == pytest.approx(track[0].y + uy * speed * t, abs=1e-12)
                assert min(p.bbox) >= EDGE - 1e-12 and max(p.bbox) <= 1 - EDGE + 1e-12
        if len(clip.tracks) == 2:
            for a, b in zip(*clip.tracks):
                ax0, ay0, ax1, ay1 = a.bbox
                bx0, by0, bx1, by1 = b.bbox
                assert max(bx0 - ax1, ax0 - bx1, by0 - ay1, ay0 - by1) >= GAP - 1e-12


def test_pixels_move_up_when_the_prompt_says_up():
    """The rendered pixels, not only the ground truth, move the named way (rows grow downwards)."""
    clip = render_clip("a white square moving up and a red circle moving right", seed=3)
    arr = clip.array()  # [F, 3, H, W]
    white = (arr.min(axis=1) > 0.6)  # white: every channel bright
    rows = np.nonzero(white[0])[0].mean(), np.nonzero(white[-1])[0].mean()
    assert rows[1] - rows[0] == pytest.approx(-SPEED * 7 * 32, abs=1.0)  # 15.7 px up, within a pixel
    red = (arr[:, 0] > 0.6) & (arr[:, 1] < 0.4)
    cols = np.nonzero(red[0])[1].mean(), np.nonzero(red[-1])[1].mean()
    assert cols[1] - cols[0] == pytest.approx(SPEED * 7 * 32, abs=1.0)


def test_render_is_deterministic_per_seed_and_still_objects_do_not_move():
    a = render_clip("a blue square staying still and a yellow triangle moving left", seed=5).array()
    b = render_clip("a blue square staying still and a yellow triangle moving left", seed=5).array()
    c = render_clip("a blue square staying still and a yellow triangle moving left", seed=6).array()
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    still = render_clip("a green circle staying still", seed=1).array()
    assert np.array_equal(still[0], still[-1])


def test_render_rejects_bad_frames_and_a_path_out_of_the_frame():
    with pytest.raises(ValueError, match="'frames'"):
        render_clip("a red circle moving right", 0, frames=4)
    with pytest.raises(ValueError, match="leaves the frame"):
        render_clip("a red circle moving right", 0, frames=16, speed=0.1)


def test_prompt_source_draws_conditions_of_its_split():
    source = MovingShapesPrompts(objects=[1, 2], split="train", eval_split="heldout", frames=12)
    source.validate()
    drawn = source.sample(40, seed=0)
    assert drawn == source.sample(40, seed=0) and drawn != source.sample(40, seed=1)
    assert {len(c["objects"]) for c in drawn} == {1, 2}
    assert all(c["split"] == "train" and c["frames"] == 12 for c in drawn)
    assert drawn[0] == make_condition(parse_moving_prompt(drawn[0]["prompt"]), frames=12)
    sets = source.eval_sets(6)
    assert list(sets) == ["1 object", "2 objects"] and all(len(v) == 6 for v in sets.values())
    assert all(c["split"] == "heldout" for v in sets.values() for c in v)
    ev = source.evaluation(5)
    assert [len(c["objects"]) for c in ev] == [1, 2, 1, 2, 1]
    cond = make_condition(parse_moving_prompt("a blue circle staying still and a red square moving down"))
    assert cond["key"] == "moving_shapes/a blue circle staying still and a red square moving down"
    assert cond["split"] == "heldout"  # blue circle is a held-out pair
    assert cond["objects"] == [{"color": "blue", "shape": "circle", "direction": "still", "speed": 0.0},
                               {"color": "red", "shape": "square", "direction": "down", "speed": SPEED}]
    assert cond["scene"] == "a blue circle and a red square"
    with pytest.raises(ValueError, match="'objects'"):
        MovingShapesPrompts(objects=[3]).validate()
    with pytest.raises(ValueError, match="'frames'"):
        MovingShapesPrompts(frames=20).validate()


def test_training_pool_names_each_direction_and_splits_the_eval_set():
    source = MovingShapesPrompts(objects=[1], split="heldout", eval_split="heldout", pool_size=5)
    pool = source.pool(1)
    assert [c["objects"][0]["direction"] for c in pool] == ["left", "right", "up", "down", "still"]
    assert all(c["split"] == "heldout" for c in pool) and pool == source.pool(1)
    drawn = source.sample(30, seed=3)
    assert {c["prompt"] for c in drawn} <= {c["prompt"] for c in pool}
    sets = source.eval_sets(20)
    assert list(sets) == ["1 object (training pool)", "1 object (never trained)"]
    assert {c["prompt"] for c in sets["1 object (training pool)"]} == {c["prompt"] for c in pool}
    assert len(sets["1 object (never trained)"]) == 15
    with pytest.raises(ValueError, match="'pool_size'"):
        MovingShapesPrompts(pool_size=-1).validate()
    with pytest.raises(ValueError, match="pool_size"):
        MovingShapesPrompts(objects=[1], split="heldout", pool_size=30).pool(1)


def test_prompt_source_is_registered():
    from genalign.prompts import PROMPT_SOURCES

    assert PROMPT_SOURCES["moving_shapes"] is MovingShapesPrompts
