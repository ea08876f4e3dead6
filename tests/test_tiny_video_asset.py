"""The shipped tiny Moving Shapes text-to-video pipeline (assets/models/tiny-video)."""

import json
import re
from pathlib import Path

import pytest
import torch
from diffusers import AnimateDiffPipeline

ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "assets" / "models" / "tiny-video"
IMAGE = ROOT / "assets" / "models" / "tiny-sd"


@pytest.fixture(scope="module")
def pipe():
    assert ASSET.is_dir(), f"{ASSET} missing; make it with genalign toyworld pretrain video --out {ASSET}"
    pipe = AnimateDiffPipeline.from_pretrained(ASSET, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_asset_loads_in_plain_diffusers_and_samples_clips(pipe):
    assert type(pipe.unet).__name__ == "UNetMotionModel" and pipe.unet.dtype == torch.float32
    frames = pipe("a red circle moving right", num_frames=8, height=32, width=32, num_inference_steps=4,
                  generator=torch.Generator().manual_seed(0), output_type="pt").frames
    assert tuple(frames.shape) == (1, 8, 3, 32, 32) and torch.isfinite(frames).all()


def test_motion_modules_are_trained_and_carry_frame_positions(pipe):
    """The motion modules' output projections start at zero (the video UNet is then the image UNet
    per frame); trained, they are not zero, and the UNet's output depends on the frames' order."""
    outs = [p for name, p in pipe.unet.named_parameters() if "motion_modules" in name and "proj_out.weight" in name]
    assert outs and all(p.abs().max() > 0 for p in outs)
    assert pipe.motion_adapter.config.use_motion_mid_block and pipe.motion_adapter.config.motion_max_seq_length >= 16
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, 8, generator=g)  # [B, C, F, h, w]
    ids = pipe.tokenizer(["a red circle moving right"], return_tensors="pt").input_ids
    text = pipe.text_encoder(ids)[0].repeat_interleave(8, dim=0)  # [F, L, D]: the prompt once per frame
    with torch.no_grad():
        out = pipe.unet(x, 500, encoder_hidden_states=text).sample
        flipped = pipe.unet(x.flip(2), 500, encoder_hidden_states=text).sample.flip(2)
    assert (out - flipped).abs().max() > 1e-3 * out.abs().max()


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
