"""JPEG (in)compressibility, weighted sums, and input checks of the reward seam."""

import io

import pytest
import torch
from PIL import Image

from rewards import JpegCompressibility, JpegConfig, RewardModel, WeightedSum, images_to_tensor
from rewards.compose import NonFiniteRewardError, check_finite


def test_jpeg_size_matches_pil_and_ranks_noise_above_flat():
    flat = torch.full((1, 3, 32, 32), 0.5)
    noise = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    images = torch.cat([flat, noise])
    comp = JpegCompressibility()
    incomp = JpegCompressibility(JpegConfig(type="jpeg_incompressibility"))
    assert isinstance(comp, RewardModel) and not comp.differentiable
    out = comp(images, ["a", "b"])
    buf = io.BytesIO()
    Image.fromarray((noise[0].permute(1, 2, 0) * 255).round().byte().numpy()).save(buf, format="JPEG", quality=95)
    assert out.components["jpeg_kb"][1].item() == pytest.approx(buf.tell() / 1000)
    assert out.scores[0] > out.scores[1], "a flat image compresses better"
    torch.testing.assert_close(incomp(images, ["a", "b"]).scores, -out.scores)


def test_pil_and_tensor_inputs_agree():
    t = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    pils = [Image.fromarray((x.permute(1, 2, 0) * 255).round().byte().numpy()) for x in t]
    torch.testing.assert_close(images_to_tensor(pils), (t * 255).round() / 255, atol=1e-6, rtol=0)
    comp = JpegCompressibility()
    torch.testing.assert_close(comp(pils, ["a", "b"]).scores, comp(t, ["a", "b"]).scores)


def test_image_range_and_layout_errors():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        images_to_tensor(torch.full((1, 3, 4, 4), -1.0))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        images_to_tensor(torch.zeros(3, 4, 4))
    with pytest.raises(TypeError):
        images_to_tensor(["not an image"])


class _Const:
    def __init__(self, name, values):
        self.name, self.values, self.differentiable = name, torch.tensor(values), False

    def __call__(self, outputs, conditions):
        from rewards.base import RewardOutput

        return RewardOutput(self.values.clone(), {"raw": self.values * 10})


def test_weighted_sum_and_components():
    s = WeightedSum([_Const("a", [1.0, 2.0]), _Const("b", [3.0, -1.0])], [0.5, 2.0])
    out = s(None, ["x", "y"])
    torch.testing.assert_close(out.scores, torch.tensor([6.5, -1.0]))
    assert set(out.components) == {"a", "a/raw", "b", "b/raw"}
    with pytest.raises(ValueError, match="unique"):
        WeightedSum([_Const("a", [1.0]), _Const("a", [1.0])], [1, 1])


def test_check_finite_names_model_and_rows():
    check_finite("ok", torch.tensor([1.0, 2.0]), ["x", "y"])
    with pytest.raises(NonFiniteRewardError, match=r"'aesthetic'.*row 1 \('y'\)"):
        check_finite("aesthetic", torch.tensor([1.0, float("nan")]), ["x", "y"])


def test_color_coverage_is_won_by_a_flat_image():
    """The hackable rule: a render of the prompt covers a small fraction with its colour, a
    flat image of that colour scores 1, other colours and the background score 0."""
    import numpy as np

    from genalign.toyworld.render import render_scene
    from genalign.toyworld.spec import COLORS, parse_prompt
    from rewards.color_coverage import ColorCoverage

    reward = ColorCoverage()
    prompt = "two red circles"
    image, _ = render_scene(parse_prompt(prompt), seed=3, size=64)
    render = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float().unsqueeze(0) / 255
    flat = (torch.tensor(COLORS["red"]).float() / 255).view(1, 3, 1, 1).expand(1, 3, 64, 64)
    scores = reward(torch.cat([render, flat]), [prompt, prompt]).scores
    assert 0.01 < float(scores[0]) < 0.5 and float(scores[1]) == 1.0
    assert float(reward(flat, ["a blue square"]).scores[0]) == 0.0
    two = reward(torch.cat([render, render]), ["two red circles and a blue square", "a green triangle"]).scores
    assert float(two[0]) == float(scores[0]) and float(two[1]) == 0.0, "only the prompt's colours count"
