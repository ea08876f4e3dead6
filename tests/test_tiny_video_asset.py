"""The shipped tiny Moving Shapes text-to-video pipeline (assets/models/tiny-video)."""

import json
import re
from pathlib import Path

import pytest
import torch
from diffusers import TextToVideoSDPipeline

ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "assets" / "models" / "tiny-video"
IMAGE = ROOT / "assets" / "models" / "tiny-sd"


@pytest.fixture(scope="module")
def pipe():
    assert ASSET.is_dir(), f"{ASSET} missing; make it with genalign toyworld pretrain video --out {ASSET}"
    pipe = TextToVideoSDPipeline.from_pretrained(ASSET, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_asset_loads_in_plain_diffusers_and_samples_clips(pipe):
    assert type(pipe.unet).__name__ == "UNet3DConditionModel" and pipe.unet.dtype == torch.float32
    frames = pipe("a red circle moving right", num_frames=8, height=32, width=32, num_inference_steps=4,
                  generator=torch.Generator().manual_seed(0), output_type="pt").frames
    assert tuple(frames.shape) == (1, 8, 3, 32, 32) and torch.isfinite(frames).all()


def test_asset_reuses_the_image_vae_and_scheduler():
    """The VAE is tiny-sd's, weight for weight; the scheduler config is tiny-sd's."""
    from safetensors.torch import load_file

    video = load_file(str(ASSET / "vae" / "diffusion_pytorch_model.safetensors"))
    image = load_file(str(IMAGE / "vae" / "diffusion_pytorch_model.safetensors"))
    assert video.keys() == image.keys() and all(torch.equal(video[k], image[k]) for k in video)
    strip = {"_class_name", "_diffusers_version"}
    cfg = {k: v for k, v in json.loads((ASSET / "scheduler" / "scheduler_config.json").read_text()).items() if k not in strip}
    ref = {k: v for k, v in json.loads((IMAGE / "scheduler" / "scheduler_config.json").read_text()).items() if k not in strip}
    assert cfg == ref


def test_asset_tokenizer_keeps_every_word_whole(pipe):
    from genalign.recipes.pretrain_video import MOTION_WORDS
    from genalign.toyworld import VOCAB

    tok = pipe.tokenizer
    for word in (*VOCAB, *MOTION_WORDS):
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    longest = "a yellow triangle staying still and a purple square moving down"
    assert len(tok(longest).input_ids) <= tok.model_max_length


def test_training_log_matches_the_model_card():
    log = json.loads((ASSET / "training_log.json").read_text())
    card = (ASSET / "README.md").read_text()
    assert log["command"].startswith("genalign toyworld pretrain video") or "pretrain_video" in log["command"]
    assert f"{log['train']['steps']} steps" in card
    heldout = log["eval"]["heldout/1"]
    assert f"{heldout['direction']:.3f}" in card and f"{heldout['color']:.3f}" in card
    # headroom on direction: the card's reason to exist
    assert heldout["direction"] < 0.9 and heldout["color"] > 0.5
    assert re.search(r"\| *direction *\|", card)
