"""Image rewards on clips: frame samplers, aggregation, the per_frame reward and its config."""

import math
from pathlib import Path

import pytest
import torch

from genalign.configs import ConfigError, from_dict
from genalign.toyworld import parse_prompt, render
from genalign.train_config import RewardSection
from rewards.base import RewardOutput, images_to_tensor
from rewards.jpeg import JpegCompressibility
from rewards.registry import build_reward
from rewards.shapes_verifier import ShapesVerifierReward
from rewards.video import (
    PerFrameConfig,
    PerFrameReward,
    aggregate,
    all_frames,
    centre_weights,
    clips_to_tensor,
    every_k,
    first_middle_last,
    segment_bounds,
    segmental,
)

ASSET = Path(__file__).resolve().parents[1] / "assets" / "models" / "shapes-verifier"


class MeanPixel:
    """A fake image reward: the mean pixel value of each image (NaN above ``nan_above``);
    it records the conditions it was called with."""

    name = "mean_pixel"
    differentiable = False

    def __init__(self, nan_above: float = math.inf):
        self.nan_above, self.seen = nan_above, []

    def __call__(self, images, conditions):
        x = images_to_tensor(images).mean((1, 2, 3))  # [N]
        self.seen.append(list(conditions))
        scores = torch.where(x > self.nan_above, torch.full_like(x, math.nan), x)
        return RewardOutput(scores=scores, components={"doubled": 2 * x})


def ramp_clips() -> torch.Tensor:
    """Two 8-frame clips of constant frames: clip 0 frame f is f/8, clip 1 frame f is 1 - f/8
    (multiples of 1/8, exact in float32). ``[2, 8, 3, 4, 4]``"""
    values = torch.arange(8, dtype=torch.float32) / 8  # [8]
    values = torch.stack([values, 1 - values])  # [2, 8]
    return values.view(2, 8, 1, 1, 1).expand(2, 8, 3, 4, 4).contiguous()


def per_frame(inner, **kwargs) -> PerFrameReward:
    return PerFrameReward(PerFrameConfig(**kwargs), inner)


# ---- frame samplers -----------------------------------------------------------------------


def test_samplers_pick_documented_frames_of_an_8_frame_clip():
    assert all_frames(8) == ([0, 1, 2, 3, 4, 5, 6, 7], [1 / 8] * 8)
    assert first_middle_last(8) == ([0, 3, 7], [1 / 3] * 3)  # lower middle (F - 1) // 2
    assert first_middle_last(9).indices == [0, 4, 8]
    assert first_middle_last(2) == ([0, 1], [0.5, 0.5])  # repeats dropped
    assert first_middle_last(1) == ([0], [1.0])
    assert every_k(8, 3) == ([0, 3, 6], [1 / 3] * 3)
    assert every_k(8, 2).indices == [0, 2, 4, 6]
    assert every_k(9, 4).indices == [0, 4, 8]
    assert every_k(8, 1).indices == list(range(8))
    assert every_k(8, 20).indices == [0]
    assert segment_bounds(8, 4) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert segment_bounds(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert segmental(8, 4).indices == [0, 2, 4, 6]  # each segment's lower middle
    assert segmental(10, 3).indices == [1, 4, 7]
    assert segmental(8, 8).indices == list(range(8))


def test_segmental_weights_are_normalised_gaussian_peaked_at_the_centre():
    """w_s ∝ exp(-(s - c)^2 / (2 σ^2)), c = (S - 1) / 2: for S = 4, σ = 1 the distances are
    1.5, 0.5, 0.5, 1.5, so w = (e^-1.125, e^-0.125, e^-0.125, e^-1.125) / Z, Z their sum."""
    w = segmental(8, 4, sigma=1.0).weights
    z = 2 * math.exp(-1.125) + 2 * math.exp(-0.125)
    assert w == pytest.approx([math.exp(-1.125) / z, math.exp(-0.125) / z, math.exp(-0.125) / z, math.exp(-1.125) / z],
                              rel=1e-12)
    for s, sigma in ((4, 1.0), (5, 0.7), (7, 3.0), (1, 1.0)):
        w = centre_weights(s, sigma)
        assert sum(w) == pytest.approx(1.0, abs=1e-12)
        centre = (s - 1) // 2
        assert max(w) == w[centre] == w[s - 1 - centre]  # peak at the centre, symmetric
        assert all(w[i] <= w[i + 1] for i in range(centre))  # rising to the centre
    w5 = centre_weights(5, 1.0)
    assert w5[2] > w5[1] > w5[0]
    assert centre_weights(4, 1e6) == pytest.approx([0.25] * 4, abs=1e-9)  # wide sigma: uniform


def test_segmental_random_pick_is_seeded_and_stays_in_its_segment():
    a, b = segmental(16, 4, pick="random", seed=3), segmental(16, 4, pick="random", seed=3)
    assert a == b
    assert all(lo <= i < hi for i, (lo, hi) in zip(a.indices, segment_bounds(16, 4)))
    draws = {tuple(segmental(16, 4, pick="random", seed=s).indices) for s in range(20)}
    assert len(draws) > 1
    assert a.weights == segmental(16, 4).weights


def test_sampler_errors_name_the_problem():
    with pytest.raises(ValueError, match="segments <= frames.*5 segments of a 4-frame clip"):
        segmental(4, 5)
    with pytest.raises(ValueError, match="k >= 1"):
        every_k(8, 0)
    with pytest.raises(ValueError, match="sigma must be > 0"):
        centre_weights(4, 0.0)
    with pytest.raises(ValueError, match="pick must be"):
        segmental(8, 4, pick="first")
    with pytest.raises(ValueError, match="at least one frame"):
        all_frames(0)


# ---- aggregation and the per_frame reward on a fake inner reward -------------------------


def test_aggregate_exact_on_hand_written_scores():
    scores = torch.tensor([[1.0, 2.0, 4.0], [0.5, math.nan, 1.0]])  # [B=2, K=3]
    w = torch.tensor([0.25, 0.5, 0.25])
    assert aggregate(scores, w, "mean")[0] == 0.25 + 1.0 + 1.0
    assert aggregate(scores, w, "min")[0] == 1.0
    assert aggregate(scores, w, "max")[0] == 4.0
    for how in ("mean", "min", "max"):
        assert aggregate(scores, w, how)[1].isnan()


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        # clip 0 frame f scores f/8; clip 1 scores 1 - f/8
        ({"frames": "all"}, (28 / 64, 1 - 28 / 64)),  # mean of 0..7 over 8
        ({"frames": "first_middle_last"}, (10 / 24, 1 - 10 / 24)),  # frames 0, 3, 7
        ({"frames": "every_k", "k": 3}, (9 / 24, 1 - 9 / 24)),  # frames 0, 3, 6
        ({"frames": "segmental", "segments": 4}, (3 / 8, 5 / 8)),  # symmetric weights on 0, 2, 4, 6: (0+6)/2/8 ...
        ({"frames": "all", "aggregate": "min"}, (0.0, 1 / 8)),
        ({"frames": "all", "aggregate": "max"}, (7 / 8, 1.0)),
        ({"frames": "every_k", "k": 2, "aggregate": "max"}, (6 / 8, 1.0)),
    ],
)
def test_per_frame_on_ramp_clips_gives_hand_computed_scores(kwargs, expected):
    out = per_frame(MeanPixel(), **kwargs)(ramp_clips(), ["a", "b"])
    # float32 sums of at most 8 exact multiples of 1/8 times weights: error a few ulp of 1
    assert out.scores.tolist() == pytest.approx(list(expected), abs=1e-6)
    assert out.components["doubled"].tolist() == pytest.approx([2 * e for e in expected], abs=2e-6)


def test_segmental_centre_weight_reaches_the_clip_score():
    """Only frame 4 (segment 2 of 4, a centre segment) is bright: the score is its weight
    e^-0.125 / (2 e^-0.125 + 2 e^-1.125) = 1 / (2 + 2 e^-1); frame 0 (an edge segment) alone
    gives 1 / (2 + 2 e)."""
    clip = torch.zeros(2, 8, 3, 2, 2)
    clip[0, 4], clip[1, 0] = 1.0, 1.0
    out = per_frame(MeanPixel(), frames="segmental", segments=4)(clip, ["a", "b"])
    assert out.scores.tolist() == pytest.approx([1 / (2 + 2 * math.exp(-1)), 1 / (2 + 2 * math.e)], abs=1e-6)
    assert out.details[0]["frames"] == [0, 2, 4, 6]
    assert out.details[0]["frame_scores"] == [0.0, 0.0, 1.0, 0.0]


def test_conditions_repeat_per_scored_frame_and_condition_field_picks_an_entry():
    inner = MeanPixel()
    per_frame(inner, frames="first_middle_last")(ramp_clips(), ["a", "b"])
    assert inner.seen == [["a", "a", "a", "b", "b", "b"]]
    inner = MeanPixel()
    conditions = [{"prompt": "p0", "key": "0"}, {"prompt": "p1", "key": "1"}]
    per_frame(inner, frames="every_k", k=4, condition_field="prompt")(ramp_clips(), conditions)
    assert inner.seen == [["p0", "p0", "p1", "p1"]]
    with pytest.raises(KeyError, match="'condition_field' is 'scene'.*key.*prompt"):
        per_frame(MeanPixel(), condition_field="scene")(ramp_clips(), conditions)


def test_a_nan_frame_makes_its_clip_nan_and_leaves_the_others():
    # clip 0 frame 7 (7/8) is NaN; clip 1's frames above 0.8 are frames 0 and 1
    for how in ("mean", "min", "max"):
        out = per_frame(MeanPixel(nan_above=0.8), frames="every_k", k=7, aggregate=how)(ramp_clips(), ["a", "b"])
        assert out.scores[0].isnan() and out.scores[1].isnan()
        out = per_frame(MeanPixel(nan_above=0.8), frames="every_k", k=3, aggregate=how)(ramp_clips(), ["a", "b"])
        assert out.scores[0].isfinite() and out.scores[1].isnan()  # clip 0 frames 0, 3, 6: all below 0.8


def test_pil_clips_and_tensor_clips_score_the_same():
    clips = ramp_clips()
    pil = [[_to_pil(frame) for frame in clip] for clip in clips]
    quantised = torch.round(clips * 255) / 255  # what 8-bit PIL frames hold
    assert torch.equal(clips_to_tensor(pil), quantised)
    a = per_frame(MeanPixel(), frames="segmental")(quantised, ["a", "b"])
    b = per_frame(MeanPixel(), frames="segmental")(pil, ["a", "b"])
    assert torch.equal(a.scores, b.scores) and a.details == b.details


def _to_pil(frame: torch.Tensor):
    from PIL import Image

    arr = (frame.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr)


# ---- real inner rewards on rendered frames -----------------------------------------------


def rendered_clips(prompts: list[str], frames: int = 4) -> list[list]:
    """Clips of independent renders (seeds 0.. per clip) of each prompt: a stand-in for
    generated frames, each of which a Shapes World reward can read."""
    return [[render(parse_prompt(p), seed=10 * i + f) for f in range(frames)] for i, p in enumerate(prompts)]


def test_jpeg_per_frame_matches_the_image_reward_on_each_frame():
    clips = rendered_clips(["a red circle", "two blue squares"])
    jpeg = JpegCompressibility()
    out = per_frame(jpeg, frames="all")(clips, ["a red circle", "two blue squares"])
    for i, clip in enumerate(clips):
        direct = jpeg(clip, ["x"] * len(clip))
        assert out.details[i]["frame_scores"] == direct.scores.tolist()
        assert out.scores[i].item() == pytest.approx(direct.scores.mean().item(), rel=1e-6)
        assert out.components["jpeg_kb"][i].item() == pytest.approx(direct.components["jpeg_kb"].mean().item(), rel=1e-6)


@pytest.fixture(scope="module")
def verifier():
    return ShapesVerifierReward.from_pretrained(ASSET)


def test_shapes_verifier_per_frame_built_from_config_matches_direct_calls(verifier):
    prompts = ["a red circle", "a green triangle above a white square"]
    clips = rendered_clips(prompts, frames=5)
    clips[1][3] = render(parse_prompt("a purple square"), seed=7)  # one wrong frame in clip 1
    section = from_dict(RewardSection, {"components": [{
        "type": "per_frame", "frames": "all", "aggregate": "min", "inner": {"type": "shapes_verifier", "path": str(ASSET)},
    }]}, "reward")
    reward = build_reward(section.components)
    out = reward(clips, prompts)
    assert reward.name == "per_frame_shapes_verifier"
    rows = out.details
    for i, (clip, prompt) in enumerate(zip(clips, prompts)):
        direct = verifier(clip, [prompt] * len(clip))
        assert rows[i]["per_frame_shapes_verifier"]["frame_scores"] == direct.scores.tolist()
        assert rows[i]["per_frame_shapes_verifier"]["inner"] == direct.details
    assert rows[0]["per_frame_shapes_verifier"]["frame_scores"] == [1.0] * 5  # renders of the prompt pass
    assert rows[1]["per_frame_shapes_verifier"]["frame_scores"][3] == 0.0
    assert out.scores.tolist() == [1.0, 0.0]  # min: one failing frame fails the clip
    assert set(out.components) == {"per_frame_shapes_verifier", "per_frame_shapes_verifier/strict",
                                   "per_frame_shapes_verifier/partial"}
    mean = PerFrameReward(PerFrameConfig(inner=section.components[0].inner), verifier)(clips, prompts)
    assert mean.scores.tolist() == pytest.approx([1.0, 0.8], abs=1e-6)


def test_shapes_verifier_reads_a_moving_shapes_condition_through_its_scene(verifier):
    """A Moving Shapes condition names its still scene; ``condition_field: scene`` hands it to
    the Shapes World verifier on every frame: renders of the prompt pass in every frame, and the
    same clip judged against another prompt's condition fails."""
    from genalign.toyworld.moving import make_condition, parse_moving_prompt, render_clip

    prompts = ["a red circle moving right", "a blue square staying still and a green triangle moving up"]
    conditions = [make_condition(parse_moving_prompt(p)) for p in prompts]
    clips = [render_clip(p, seed=3).frames for p in prompts]
    reward = build_reward(from_dict(RewardSection, {"components": [{
        "type": "per_frame", "frames": "all", "aggregate": "min", "condition_field": "scene",
        "inner": {"type": "shapes_verifier", "path": str(ASSET)},
    }]}, "reward").components)
    assert reward(clips, conditions).scores.tolist() == [1.0, 1.0]
    swapped = reward(clips, conditions[::-1])
    assert swapped.scores.tolist() == [0.0, 0.0]


# ---- errors -------------------------------------------------------------------------------


def test_clips_to_tensor_errors_name_the_layout_or_range():
    with pytest.raises(ValueError, match=r"\[B, F, 3, H, W\], got \(2, 3, 4, 4\) \(a batch of images"):
        clips_to_tensor(torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"got \(2, 8, 4, 4, 3\)"):
        clips_to_tensor(torch.zeros(2, 8, 4, 4, 3))
    with pytest.raises(ValueError, match=r"in \[0, 1\], got values in \[-1.000, 1.000\].*\(x \+ 1\) / 2"):
        clips_to_tensor(torch.linspace(-1, 1, 2 * 2 * 3 * 4 * 4).view(2, 2, 3, 4, 4))
    with pytest.raises(ValueError, match="float clips.*uint8"):
        clips_to_tensor(torch.zeros(1, 2, 3, 4, 4, dtype=torch.uint8))
    frames = rendered_clips(["a red circle"], frames=2)[0]
    with pytest.raises(TypeError, match=r"flat list of PIL images \(one clip\? wrap it"):
        clips_to_tensor(frames)
    with pytest.raises(ValueError, match="clip 1 has 1 frames of 32x32 px, clip 0 2 frames"):
        clips_to_tensor([frames, frames[:1]])
    with pytest.raises(TypeError, match="clip 0: expected PIL images as frames, got str"):
        clips_to_tensor([["a", "b"]])
    with pytest.raises(TypeError, match="cannot score outputs of type int"):
        clips_to_tensor(3)
    assert clips_to_tensor([frames]).shape == (1, 2, 3, 32, 32)


def test_per_frame_call_errors():
    with pytest.raises(ValueError, match="got 2 clips but 1 conditions"):
        per_frame(MeanPixel())(ramp_clips(), ["a"])
    with pytest.raises(ValueError, match="5 segments of a 4-frame clip"):
        per_frame(MeanPixel(), frames="segmental", segments=5)(ramp_clips()[:, :4], ["a", "b"])


@pytest.mark.parametrize(
    "component, message",
    [
        ({"inner": {"type": "shapes_verifier", "scroe": "strict"}},
         r"unknown key 'reward\.components\.0\.inner\.scroe' \(did you mean 'score'\?\)"),
        ({"inner": {"type": "jpeg_compressibility", "quality": "high"}},
         r"'reward\.components\.0\.inner\.quality' must be an integer"),
        ({"inner": {"type": "per_frame"}}, r"'reward\.components\.0\.inner\.type': unknown type 'per_frame'"),
        ({"inner": {"quality": 90}}, r"'reward\.components\.0\.inner' needs a 'type' key"),
        ({}, r"'reward\.components\.0': 'inner' is missing"),
        ({"inner": {"type": "jpeg_compressibility", "weight": 2.0}}, r"'inner\.weight' is 2\.0: weight the per_frame"),
        ({"inner": {"type": "jpeg_compressibility"}, "frames": "every_3"}, r"'reward\.components\.0\.frames' must be one of"),
        ({"inner": {"type": "jpeg_compressibility"}, "sigma": 0}, r"'sigma' must be > 0"),
        ({"inner": {"type": "jpeg_compressibility"}, "segmnets": 4}, r"'reward\.components\.0\.segmnets' \(did you mean 'segments'"),
    ],
)
def test_config_errors_name_the_key(component, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(RewardSection, {"components": [{"type": "per_frame", **component}]}, "reward")


def test_config_builds_through_the_registry():
    section = from_dict(RewardSection, {"components": [
        {"type": "per_frame", "weight": 0.5, "frames": "segmental", "segments": 2,
         "inner": {"type": "jpeg_incompressibility", "quality": 80}},
    ]}, "reward")
    cfg = section.components[0]
    assert isinstance(cfg, PerFrameConfig) and cfg.inner.quality == 80
    reward = build_reward(section.components)
    assert reward.weights == [0.5] and reward.models[0].inner.sign == 1.0
    assert reward.models[0].config.select(8).indices == [1, 5]
