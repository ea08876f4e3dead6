"""Motion verifier and temporal consistency on Moving Shapes renders and constructed clips."""

import pytest
import torch

from genalign.toyworld.moving import TRAVEL, render_clip, sample_moving_conditions
from rewards.motion import MotionConfig, MotionReward
from rewards.registry import REWARDS

BG = torch.tensor([18, 18, 26]) / 255.0
RED = torch.tensor([230, 40, 40]) / 255.0


def _square_clip(path: list[tuple[int, int]], size: int = 16) -> torch.Tensor:
    """A 4x4 red square whose top-left pixel is at (row, col) = path[t] in frame t: [F, 3, S, S]."""
    clip = BG.view(1, 3, 1, 1).repeat(len(path), 1, size, size)
    for t, (r, c) in enumerate(path):
        clip[t, :, r:r + 4, c:c + 4] = RED.view(3, 1, 1)
    return clip


@pytest.mark.parametrize("direction, path", [
    ("up", [(10 - t, 6) for t in range(8)]),  # row index falls: the square rises
    ("down", [(2 + t, 6) for t in range(8)]),
    ("left", [(6, 10 - t) for t in range(8)]),
    ("right", [(6, 2 + t) for t in range(8)]),
    ("still", [(6, 6)] * 8),
])
def test_constructed_clips_read_in_image_coordinates(direction, path):
    clip = _square_clip(path)[None]
    out = MotionReward()(clip, [f"a red circle {'staying still' if direction == 'still' else 'moving ' + direction}"])
    obj = out.details[0]["objects"][0]
    assert obj["detected"] == direction and out.scores.tolist() == [1.0]
    dx, dy = obj["displacement"]
    step = 7 / 16  # 7 frames of 1 px on a 16 px frame
    want = {"up": (0, -step), "down": (0, step), "left": (-step, 0), "right": (step, 0), "still": (0, 0)}[direction]
    assert (dx, dy) == pytest.approx(want, abs=1e-6)


def test_direction_is_right_on_200_renders_and_never_on_reversed_clips():
    conds = sample_moving_conditions(1, 100, "all", seed=7) + sample_moving_conditions(2, 100, "all", seed=7)
    clips = torch.stack([torch.from_numpy(render_clip(c["prompt"], seed).array()) for seed, c in enumerate(conds)])
    reward = MotionReward()
    out = reward(clips, conds)
    verdicts = [o["correct"] for d in out.details for o in d["objects"]]
    assert len(verdicts) == 300 and all(verdicts)  # 300 of 300 objects, 200 of 200 clips strict
    assert out.components["strict"].sum().item() == 200 and out.components["present"].min().item() == 1.0
    # played backwards every moving object moves the opposite way: never scored correct
    back = reward(clips.flip(1), conds)
    for cond, detail in zip(conds, back.details):
        for want, obj in zip(cond["objects"], detail["objects"]):
            assert obj["correct"] == (want["direction"] == "still")
    moving = [i for i, c in enumerate(conds) if any(o["direction"] != "still" for o in c["objects"])]
    assert back.components["strict"][moving].sum().item() == 0


def test_strict_partial_and_missing_objects():
    clip = torch.from_numpy(render_clip("a red circle moving right and a green square moving up", 0).array())
    clips = torch.stack([clip, clip])
    conds = [
        {"prompt": "x", "objects": [{"color": "red", "shape": "circle", "direction": "right", "speed": 0.03},
                                     {"color": "green", "shape": "square", "direction": "down", "speed": 0.03}]},
        "a red circle moving right and a blue square moving up",  # no blue in the clip
    ]
    out = MotionReward()(clips, conds)
    assert out.components["strict"].tolist() == [0.0, 0.0]
    assert out.components["partial"].tolist() == [0.5, 0.5]
    assert out.components["present"].tolist() == [1.0, 0.5]
    assert out.details[1]["objects"][1]["detected"] is None
    partial = REWARDS["motion"][1](MotionConfig(score="partial"))
    assert partial(clips, conds).scores.tolist() == [0.5, 0.5]


def test_progress_gives_graded_credit_along_the_named_direction():
    """Progress = displacement along the named direction over the full path (speed · (F − 1), the
    world's TRAVEL = 0.49 widths at its default speed); the square moves 21 px right on a 32 px
    frame: 0.66 widths, beyond a full path, so the scores clip."""
    clip = _square_clip([(6, 2 + 3 * t) for t in range(8)], size=32)[None].repeat(5, 1, 1, 1, 1)
    wants = ["moving right", "moving left", "moving up", "staying still", "moving right"]
    conds = [f"a red circle {w}" for w in wants[:4]] + ["a blue circle moving right"]  # no blue: absent
    out = REWARDS["motion"][1](MotionConfig(score="progress"))(clip, conds)
    assert out.scores.tolist() == pytest.approx([1.0, -1.0, 0.0, -1.0, -1.0], abs=1e-6)  # clipped to [-1, 1]
    in_place = _square_clip([(6, 6)] * 8)
    still = MotionReward(MotionConfig(score="progress"))(in_place[None], ["a red circle staying still"])
    assert still.scores.item() == pytest.approx(1.0)
    slow = _square_clip([(6, 4 + 2 * (t // 4)) for t in range(8)], size=32)[None]  # a 2 px step: fitted 8/3 px
    got = MotionReward(MotionConfig(score="progress"))(slow, ["a red circle moving right"])
    dx = got.details[0]["objects"][0]["displacement"][0]
    assert dx == pytest.approx(8 / 3 / 32, abs=1e-6)  # least-squares slope 16/42 px a frame, times 7
    assert got.scores.item() == pytest.approx(dx / TRAVEL, abs=1e-6) and 0 < got.scores.item() < 1
    # a condition's own speed sets the unit instead
    own = {"prompt": "x", "objects": [{"color": "red", "shape": "circle", "direction": "right", "speed": 0.02}]}
    assert MotionReward(MotionConfig(score="progress"))(slow, [own]).scores.item() == pytest.approx(dx / 0.14, abs=1e-6)
    assert out.components["progress"].tolist() == out.scores.tolist()


def test_pil_clips_match_tensors_and_bad_layouts_are_named():
    rendered = render_clip("a purple triangle moving left", 2)
    reward = MotionReward()
    as_pil = reward([rendered.frames], ["a purple triangle moving left"])
    as_tensor = reward(torch.from_numpy(rendered.array())[None], ["a purple triangle moving left"])
    assert as_pil.scores.tolist() == as_tensor.scores.tolist() == [1.0]
    with pytest.raises(ValueError, match=r"\[B, F, 3, H, W\]"):
        reward(torch.zeros(1, 3, 8, 8), ["a red circle moving up"])
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        reward(torch.full((1, 2, 3, 8, 8), 2.0), ["a red circle moving up"])


def test_temporal_consistency_exact_values():
    tc = REWARDS["temporal_consistency"][1](REWARDS["temporal_consistency"][0]())
    static = torch.full((1, 5, 3, 4, 4), 0.3)
    flicker = torch.stack([torch.zeros(3, 4, 4), torch.ones(3, 4, 4)] * 2)[None]  # 0, 1, 0, 1
    ramp = torch.stack([torch.full((3, 4, 4), v) for v in (0.0, 0.5, 0.5)])[None]  # changes 0.5, then 0
    half = torch.zeros(1, 2, 3, 4, 4)
    half[0, 1, :, :, :2] = 1.0  # half the pixels flip: mean change 0.5
    out = tc(torch.cat([static[:, :2], flicker[:, :2], ramp[:, :2], half]), [""] * 4)
    assert out.scores.tolist() == [1.0, 0.0, 0.5, 0.5]
    assert tc(ramp, [""]).scores.tolist() == [0.75]
    assert tc(flicker, [""]).scores.tolist() == [0.0] and tc(static, [""]).scores.tolist() == [1.0]
    with pytest.raises(ValueError, match="at least 2 frames"):
        tc(static[:, :1], [""])
