"""The shipped Shapes World verifier agrees with ground truth and follows the reward protocol."""

import random
from pathlib import Path

import pytest
import torch

from genalign.recipes.common import augment
from genalign.recipes.train_verifier import draw_with_junk, main, near_misses
from genalign.toyworld import (
    TIERS,
    all_prompts,
    check_scene,
    parse_prompt,
    render,
    render_scene,
    sample_prompts,
)
from rewards.base import RewardModel, images_to_tensor
from rewards.shapes_verifier import ShapesVerifierReward

ASSET = Path(__file__).resolve().parents[1] / "assets" / "models" / "shapes-verifier"


@pytest.fixture(scope="module")
def verifier():
    return ShapesVerifierReward.from_pretrained(ASSET)


@pytest.fixture(scope="module")
def heldout_cases():
    """8 held-out prompts per tier, each with its own render (label 1) and a render of
    another held-out prompt of the tier (label from the true objects, almost always 0)."""
    rng = random.Random(0)
    prompts, images, labels, positive = [], [], [], []
    for tier in TIERS:
        pool = all_prompts(tier, "heldout")
        for k, prompt in enumerate(sample_prompts(tier, 8, "heldout", seed=123)):
            other = rng.choice([p for p in pool if p != prompt])
            for shown, is_positive in ((prompt, True), (other, False)):
                image, objects = render_scene(parse_prompt(shown), seed=900_000 + 100 * tier + 2 * k + is_positive)
                prompts.append(prompt)
                images.append(image)
                labels.append(check_scene(parse_prompt(prompt), objects).strict)
                positive.append(is_positive)
    return prompts, images, torch.tensor(labels), torch.tensor(positive)


def agreement(verdicts, labels, mask):
    return float((verdicts[mask] == labels[mask]).float().mean())


def test_agrees_with_ground_truth_on_heldout_renders(verifier, heldout_cases):
    prompts, images, labels, positive = heldout_cases
    assert len(prompts) == 80 and labels[positive].all() and labels[~positive].float().mean() < 0.2
    verdicts = verifier(images, prompts).scores.bool()
    assert agreement(verdicts, labels, positive) >= 0.95
    assert agreement(verdicts, labels, ~positive) >= 0.95


def test_agrees_on_augmented_heldout_renders(verifier, heldout_cases):
    prompts, images, labels, positive = heldout_cases
    blurry = augment(images_to_tensor(images), torch.Generator().manual_seed(0))
    verdicts = verifier(blurry, prompts).scores.bool()
    assert agreement(verdicts, labels, positive) >= 0.95
    assert agreement(verdicts, labels, ~positive) >= 0.95


def test_pil_and_tensor_inputs_agree(verifier, heldout_cases):
    prompts, images, _, _ = heldout_cases
    from_pil, from_tensor = verifier(images[:16], prompts[:16]), verifier(images_to_tensor(images[:16]), prompts[:16])
    assert torch.equal(from_pil.scores, from_tensor.scores)
    assert from_pil.details == from_tensor.details


def test_reads_64px_images(verifier):
    prompts = ["a small green triangle", "three purple triangles", "a blue circle above a white square"]
    images = [render(parse_prompt(p), seed=i, size=64) for i, p in enumerate(prompts)]
    assert verifier(images, prompts).scores.tolist() == [1.0, 1.0, 1.0]


def test_detect_finds_the_true_objects(verifier):
    image, truth = render_scene(parse_prompt("a yellow square to the left of a purple circle"), seed=3)
    (found,) = verifier.detect([image])
    assert sorted((d.shape, d.color, d.size) for d in found) == sorted((o.shape, o.color, o.size) for o in truth)
    for o in truth:
        nearest = min(found, key=lambda d: (d.x - o.x) ** 2 + (d.y - o.y) ** 2)
        assert abs(nearest.x - o.x) < 0.06 and abs(nearest.y - o.y) < 0.06
        assert 0.5 < nearest.score <= 1.0


def test_follows_the_reward_protocol(verifier):
    prompts = ["a red circle", "two red circles", "a red circle on the left"]
    images = [render(parse_prompt("a red circle on the left"), seed=0)] * 3
    out = verifier(images, prompts)
    assert isinstance(verifier, RewardModel)
    assert verifier.name == "shapes_verifier" and verifier.differentiable is False
    assert out.scores.shape == (3,) and out.scores.dtype == torch.float32
    assert out.scores.tolist() == [1.0, 0.0, 1.0]
    assert set(out.components) == {"strict", "partial"}
    assert out.components["partial"][1] == pytest.approx(0.5)  # count wrong, nothing extra
    assert out.details[1]["clauses"] == [["exactly two red circles", False], ["no other objects", True]]
    assert [d["color"] for d in out.details[0]["detected"]] == ["red"]


def test_partial_score_and_spec_conditions():
    partial = ShapesVerifierReward.from_pretrained(ASSET, score="partial")
    spec = parse_prompt("a red circle and a blue square")
    image = render(parse_prompt("a red circle"), seed=1)
    out = partial([image], [spec])
    assert out.scores.tolist() == pytest.approx([2 / 3])  # the blue square is missing
    assert torch.equal(out.scores, out.components["partial"])
    assert out.components["strict"].tolist() == [0.0]
    with pytest.raises(ValueError, match="score must be 'strict' or 'partial'"):
        ShapesVerifierReward.from_pretrained(ASSET, score="best")


def test_rejects_junk_in_place_of_a_shape(verifier):
    """A smudge where the prompt's object should be must not pass for that object."""
    prompts = [p for tier in (1, 3, 5) for p in sample_prompts(tier, 6, "heldout", seed=7)]
    images = []
    for k, prompt in enumerate(prompts):
        rng = random.Random(k)
        _, objects = render_scene(parse_prompt(prompt), seed=k)
        images.append(draw_with_junk(objects, rng.randrange(len(objects)), 32, rng)[0])
    out = verifier(images, prompts)
    assert out.scores.mean() <= 0.1
    assert sum(d["shape"] == "other" for det in out.details for d in det["detected"]) >= 0.8 * len(prompts)


def test_near_misses_change_one_field():
    pool = all_prompts(4)
    near = near_misses("a red circle above a blue square", pool)
    assert "a red circle below a blue square" in near and "a red square above a blue square" in near
    assert "a blue square below a red circle" not in near
    assert sorted(near_misses("two red circles", all_prompts(5))) == sorted(
        ["two red squares", "two red triangles", "three red circles", "four red circles"]
        + [f"two {color} circles" for color in ("yellow", "green", "blue", "purple", "white")]
    )


def test_training_script_runs_end_to_end(tmp_path):
    main(["--out", str(tmp_path), "--steps", "2", "--scenes", "64", "--batch-size", "16", "--eval-per-tier", "2"])
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "model.safetensors", "README.md", "eval.json"}
    assert "| tier | split | pos clean |" in (tmp_path / "README.md").read_text()
    assert ShapesVerifierReward.from_pretrained(tmp_path).detect(torch.zeros(1, 3, 32, 32)) is not None


def test_missing_weights_name_the_path(tmp_path):
    missing = tmp_path / "no-such-verifier"
    with pytest.raises(FileNotFoundError, match="no Shapes verifier at .*no-such-verifier"):
        ShapesVerifierReward.from_pretrained(missing)


def test_rejects_bad_batches(verifier):
    image = render(parse_prompt("a red circle"), seed=0)
    with pytest.raises(ValueError, match="got 1 images but 2 prompts"):
        verifier([image], ["a red circle", "a blue square"])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        verifier(torch.full((1, 3, 32, 32), 2.0), ["a red circle"])
    with pytest.raises(ValueError, match="'dog'"):
        verifier([image], ["a red dog"])
