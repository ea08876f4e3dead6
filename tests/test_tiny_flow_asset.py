"""The shipped tiny rectified-flow pipeline (assets/models/tiny-flow)."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusion3Pipeline

ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "assets" / "models" / "tiny-flow"
IMAGE = ROOT / "assets" / "models" / "tiny-sd"


@pytest.fixture(scope="module")
def pipe():
    assert ASSET.is_dir(), f"{ASSET} missing; make it with genalign toyworld pretrain flow --out {ASSET}"
    pipe = StableDiffusion3Pipeline.from_pretrained(ASSET, text_encoder_3=None, tokenizer_3=None, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_asset_loads_in_plain_diffusers_and_samples(pipe):
    assert type(pipe.transformer).__name__ == "SD3Transformer2DModel" and pipe.transformer.dtype == torch.float32
    image = pipe("two green triangles", height=32, width=32, num_inference_steps=4, max_sequence_length=1,
                 generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert tuple(image.shape) == (1, 3, 32, 32) and torch.isfinite(image).all()


def test_asset_reuses_the_image_vae_and_text_encoder():
    """The VAE is tiny-sd's weight for weight (with SD3's shift 0); both CLIP encoders hold tiny-sd's
    text encoder under the projection model's names."""
    from safetensors.torch import load_file

    flow = load_file(str(ASSET / "vae" / "diffusion_pytorch_model.safetensors"))
    image = load_file(str(IMAGE / "vae" / "diffusion_pytorch_model.safetensors"))
    assert flow.keys() == image.keys() and all(torch.equal(flow[k], image[k]) for k in flow)
    assert json.loads((ASSET / "vae" / "config.json").read_text())["shift_factor"] == 0.0
    text = load_file(str(IMAGE / "text_encoder" / "model.safetensors"))
    for folder in ("text_encoder", "text_encoder_2"):
        enc = load_file(str(ASSET / folder / "model.safetensors"))
        assert all(torch.equal(enc[f"text_model.{k}"], v) for k, v in text.items())
        torch.testing.assert_close(enc["text_projection.weight"], torch.eye(enc["text_projection.weight"].shape[0]))


def test_training_log_matches_the_model_card():
    log = json.loads((ASSET / "training_log.json").read_text())
    card = (ASSET / "README.md").read_text()
    assert log["command"].startswith("genalign toyworld pretrain flow")
    assert f"{log['train']['steps']} steps" in card
    assert f"{log['parameters']['transformer']:,}" in card
