"""Continuing a pretrained pipeline (`pretrain_sd --init`) with another prompt mix."""

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from genalign.recipes.common import ShapesStream
from genalign.recipes.pretrain_sd import main, parse_tier_weights
from genalign.toyworld import parse_prompt


def test_tier_weights_parse_and_name_bad_entries():
    assert parse_tier_weights("1:0.3,2:0.7") == {1: 0.3, 2: 0.7}
    for bad in ("2:x", "6:1", "1:0.5,1:0.5", "1-0.5", "3:-1"):
        with pytest.raises(argparse.ArgumentTypeError, match="--tier-weights: bad entry"):
            parse_tier_weights(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="every tier weight 0"):
        parse_tier_weights("1:0,2:0")


def test_stream_draws_only_weighted_tiers():
    prompts = ShapesStream(0, tier_weights={2: 1.0, 5: 0.0}).prompts(40)
    assert all(parse_prompt(p).clauses[0].position is not None for p in prompts)


def _weights(folder: Path, part: str) -> dict[str, torch.Tensor]:
    return load_file(str(next((folder / part).glob("*.safetensors"))))


def test_init_continues_unet_and_keeps_vae(tiny_sd_dir, tmp_path):
    out = tmp_path / "continued"
    main(["--init", tiny_sd_dir, "--out", str(out), "--unet-steps", "2", "--unet-minutes", "0",
          "--batch-size", "2", "--tier-weights", "2:1", "--no-samples"])
    src = Path(tiny_sd_dir)
    vae_a, vae_b = _weights(src, "vae"), _weights(out, "vae")
    assert vae_a.keys() == vae_b.keys() and all(torch.equal(vae_a[k], vae_b[k]) for k in vae_a)
    unet_a, unet_b = _weights(src, "unet"), _weights(out, "unet")
    assert any(not torch.equal(unet_a[k], unet_b[k]) for k in unet_a)
    log = json.loads((out / "training_log.json").read_text())
    assert log["init"] == tiny_sd_dir and log["unet"]["steps"] == 2 and "vae" not in log
    assert {int(k): v for k, v in log["tier_weights"].items()} == {2: 1.0}
    assert (out / "tokenizer" / "vocab.json").is_file()


def test_init_names_a_folder_that_is_no_pipeline(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a StableDiffusionPipeline folder"):
        main(["--init", str(tmp_path), "--out", str(tmp_path / "x"), "--no-samples"])
    assert not (tmp_path / "x").exists()


def test_multires_noise_has_unit_std_and_more_coarse_power():
    from genalign.recipes.sd_training import multires_noise

    gen = torch.Generator().manual_seed(0)
    noise = multires_noise((256, 4, 8, 8), gen, 0.8)  # [B, C, H, W]
    assert noise.shape == (256, 4, 8, 8)
    torch.testing.assert_close(noise.std(dim=(1, 2, 3)), torch.ones(256), atol=1e-5, rtol=0)
    white = torch.randn((256, 4, 8, 8), generator=gen)
    # the per-channel image mean (the coarsest frequency) carries far more of the power
    assert noise.mean(dim=(2, 3)).std() > 2 * white.mean(dim=(2, 3)).std()


def test_freeze_text_encoder_keeps_its_weights(tiny_sd_dir, tmp_path):
    out = tmp_path / "unet_only"
    main(["--init", tiny_sd_dir, "--out", str(out), "--unet-steps", "2", "--unet-minutes", "0",
          "--batch-size", "2", "--freeze-text-encoder", "--multires-noise", "0.5", "--no-samples"])
    src = Path(tiny_sd_dir)
    text_a, text_b = _weights(src, "text_encoder"), _weights(out, "text_encoder")
    assert all(torch.equal(text_a[k], text_b[k]) for k in text_a)
    unet_a, unet_b = _weights(src, "unet"), _weights(out, "unet")
    assert any(not torch.equal(unet_a[k], unet_b[k]) for k in unet_a)


def test_v_zero_snr_writes_a_v_prediction_pipeline_with_zero_terminal_snr(tmp_path):
    from diffusers import DDIMScheduler

    out = tmp_path / "vz"
    main(["--out", str(out), "--vae-steps", "1", "--unet-steps", "1", "--vae-minutes", "0", "--unet-minutes", "0",
          "--batch-size", "2", "--vae-batch-size", "2", "--v-zero-snr", "--snr-gamma", "0", "--no-samples"])
    scheduler = DDIMScheduler.from_pretrained(out, subfolder="scheduler")
    assert scheduler.config.prediction_type == "v_prediction" and scheduler.config.timestep_spacing == "trailing"
    assert scheduler.alphas_cumprod[-1] == 0  # x_T holds no trace of the image
    log = json.loads((out / "training_log.json").read_text())
    assert log["unet"]["steps"] == 1 and log["args"]["v_zero_snr"] is True


def test_v_zero_snr_refuses_min_snr_weighting(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "x"), "--snr-gamma", "5", "--no-samples"])  # v/zero-SNR is the default
    assert "--v-zero-snr needs --snr-gamma 0" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_schedule_defaults_follow_the_shipped_recipe():
    from genalign.recipes.common import TIER_WEIGHTS
    from genalign.recipes.pretrain_sd import parse_args

    new = parse_args(["--out", "x"])
    assert new.v_zero_snr is True and new.snr_gamma == 0.0 and new.tier_weights == TIER_WEIGHTS
    sd = parse_args(["--out", "x", "--no-v-zero-snr"])
    assert sd.v_zero_snr is False and sd.snr_gamma == 5.0  # SD v1's epsilon schedule with min-SNR-5
    cont = parse_args(["--out", "x", "--init", "some/pipeline"])
    assert cont.v_zero_snr is None and cont.snr_gamma is None  # both come from the continued pipeline


def test_init_refuses_min_snr_on_a_zero_snr_pipeline(tmp_path):
    from diffusers import DDIMScheduler

    src = tmp_path / "vz"
    main(["--out", str(src), "--vae-steps", "1", "--unet-steps", "1", "--vae-minutes", "0", "--unet-minutes", "0",
          "--batch-size", "2", "--vae-batch-size", "2", "--no-samples"])
    with pytest.raises(ValueError, match="zero-terminal-SNR schedule: min-SNR weighting"):
        main(["--init", str(src), "--out", str(tmp_path / "x"), "--snr-gamma", "5", "--no-samples"])
    assert not (tmp_path / "x").exists()
    out = tmp_path / "cont"
    main(["--init", str(src), "--out", str(out), "--unet-steps", "1", "--unet-minutes", "0", "--batch-size", "2",
          "--no-samples"])
    assert json.loads((out / "training_log.json").read_text())["args"]["snr_gamma"] == 0.0
    assert DDIMScheduler.from_pretrained(out, subfolder="scheduler").config.prediction_type == "v_prediction"


def test_init_refuses_options_the_pipeline_fixes(tiny_sd_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--init", tiny_sd_dir, "--out", str(tmp_path / "x"), "--unet-channels", "32", "64", "--no-samples"])
    assert "--unet-channels cannot be combined with --init" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_training_target_is_noise_or_velocity():
    from diffusers import DDIMScheduler

    from genalign.recipes.sd_pipeline import SD_SCHEDULER_CONFIG
    from genalign.recipes.sd_training import training_target

    gen = torch.Generator().manual_seed(0)
    latents, noise = torch.randn((3, 4, 8, 8), generator=gen), torch.randn((3, 4, 8, 8), generator=gen)
    t = torch.tensor([0, 500, 999])
    eps = DDIMScheduler(**SD_SCHEDULER_CONFIG)
    assert torch.equal(training_target(eps, latents, noise, t), noise)
    v = DDIMScheduler(**{**SD_SCHEDULER_CONFIG, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True})
    a = v.alphas_cumprod[t].view(3, 1, 1, 1)
    torch.testing.assert_close(training_target(v, latents, noise, t), a.sqrt() * noise - (1 - a).sqrt() * latents)
    torch.testing.assert_close(training_target(v, latents, noise, t)[2], -latents[2])  # zero SNR: v = -x0
    with pytest.raises(ValueError, match="prediction_type='sample'"):
        training_target(DDIMScheduler(**{**SD_SCHEDULER_CONFIG, "prediction_type": "sample"}), latents, noise, t)


def test_text_encoder_learning_rate_is_its_own(tiny_sd_dir):
    """``text_lr`` is the text encoder's peak rate, the UNet keeps ``unet_lr``: after one AdamW step
    (warm-up 1, so the peak itself) every weight moves by about its group's rate (Adam's first
    step is lr × sign(grad)), so the largest moves stand in the rates' ratio."""
    from diffusers import StableDiffusionPipeline

    from genalign.recipes.sd_training import train_unet

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, requires_safety_checker=False)
    before = {name: {k: v.clone() for k, v in getattr(pipe, name).state_dict().items()} for name in ("unet", "text_encoder")}
    args = argparse.Namespace(seed=0, batch_size=2, unet_steps=1, unet_minutes=0, unet_lr=1e-4, text_lr=1e-3,
                              caption_dropout=0.0, ema_decay=0.0, warmup=1, snr_gamma=0.0, multires_noise=0.0,
                              freeze_text_encoder=False)
    train_unet(pipe.unet, pipe.text_encoder, pipe.vae, pipe.tokenizer, pipe.scheduler, ShapesStream(0, size=64), args)
    moved = {name: max(float((getattr(pipe, name).state_dict()[k] - v).abs().max()) for k, v in before[name].items())
             for name in before}
    # 1e-2 weight decay adds at most lr × 1e-2 × |w| on top of lr
    assert 1e-4 * 0.99 < moved["unet"] < 1e-4 * 1.05, moved
    assert 1e-3 * 0.99 < moved["text_encoder"] < 1e-3 * 1.05, moved


def test_text_loss_is_added_to_every_step(tiny_sd_dir):
    """``text_loss(prompts, token_ids)`` is added to the step's loss (the curve's ``loss`` is its
    ``mse`` plus the logged ``text``), with the step's prompts."""
    from diffusers import StableDiffusionPipeline

    from genalign.recipes.sd_training import train_unet

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, requires_safety_checker=False)
    seen = []

    def text_loss(prompts, token_ids):
        seen.append(len(prompts))
        return pipe.text_encoder(token_ids(list(prompts)))[0].pow(2).mean()

    args = argparse.Namespace(seed=0, batch_size=2, unet_steps=2, unet_minutes=0, unet_lr=1e-4, caption_dropout=0.0,
                              ema_decay=0.0, warmup=1, snr_gamma=0.0, multires_noise=0.0, freeze_text_encoder=False)
    log = train_unet(pipe.unet, pipe.text_encoder, pipe.vae, pipe.tokenizer, pipe.scheduler, ShapesStream(0, size=64),
                     args, log_every=1, text_loss=text_loss)
    assert seen == [2, 2] and len(log["curve"]) == 2
    for point in log["curve"]:
        assert point["text"] > 0 and abs(point["loss"] - (point["mse"] + point["text"])) <= 1e-6 * point["loss"]
