"""The video diffusion policy: video latents through the shared latent-diffusion policy.

The protocol itself is checked by the contract suite; these tests pin what is particular to
video: clip layout, the pipeline's noise and frame layout, plain-diffusers loading of saved
adapters, and the chain stored once.
"""

from __future__ import annotations

import pytest
import torch

from genalign.policies import VideoDiffusionPolicy, VideoDiffusionPolicyConfig

PROMPTS = ["red circle moving right", "blue square staying still"]
FRAMES = 4


def make_policy(path, **kw) -> VideoDiffusionPolicy:
    cfg = VideoDiffusionPolicyConfig(pretrained=path, num_steps=3, guidance_scale=3.0, num_frames=FRAMES, **kw)
    return VideoDiffusionPolicy.from_pretrained(path, cfg)


@pytest.fixture(scope="module")
def policy(tiny_video_dir):
    return make_policy(tiny_video_dir)


def test_rollout_gives_clips_and_stores_the_chain_once(policy):
    traj = policy.rollout(PROMPTS, 2, [1, 2, 3, 4])
    assert traj.outputs.shape == (4, FRAMES, 3, 8, 8) and 0 <= traj.outputs.min() and traj.outputs.max() <= 1
    assert traj.states.shape == traj.actions.shape == (4, 3, 4, FRAMES, 4, 4)  # [B, T, C, F, h, w]
    assert traj.states.untyped_storage().data_ptr() == traj.actions.untyped_storage().data_ptr()
    assert torch.equal(traj.actions[:, :-1], traj.states[:, 1:])
    # frames differ: the clip is not one image repeated
    assert (traj.outputs[:, 0] - traj.outputs[:, -1]).abs().max() > 1e-3
    child = policy.continue_from(traj, torch.tensor([0, 1, 2, 0]), 1, [5, 6, 7, 8])
    assert child.states.untyped_storage().data_ptr() == child.actions.untyped_storage().data_ptr()


def test_initial_noise_and_step_match_the_diffusers_pipeline(policy):
    """x_T is the pipeline's own draw for the same generators, and a DDIM step on [B, C, F, h, w]
    latents equals DDIMScheduler.step on the pipeline's frame-major layout with the same noise."""
    pipe, n = policy.pipe, 2
    gens = [torch.Generator().manual_seed(s) for s in (7, 8)]
    part = policy.start(PROMPTS, 1, [7, 8])
    expected = pipe.prepare_latents(n, 4, FRAMES, 8, 8, torch.float32, "cpu", gens)  # [B, C, F, h, w]
    torch.testing.assert_close(part.states[:, 0], expected, rtol=0, atol=0)

    x_t = part.states[:, 0]
    t = part.timesteps[:, 0]
    embeds = {k: part.extras[k] for k in ("prompt_embeds", "negative_prompt_embeds")}
    out = policy._model_output(x_t, t, embeds)
    noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(0))
    ours = policy.kernel.step(out, t, part.step_ids[:, 0], x_t, noise=noise).prev_sample

    def frames_first(x):  # [B, C, F, h, w] -> [B*F, C, h, w], as the pipeline steps its latents
        return x.permute(0, 2, 1, 3, 4).reshape(n * FRAMES, *x.shape[1:2], *x.shape[3:])

    ref = policy.scheduler.step(frames_first(out), int(t[0]), frames_first(x_t), eta=policy.config.eta,
                                variance_noise=frames_first(noise)).prev_sample
    torch.testing.assert_close(frames_first(ours), ref, atol=1e-5, rtol=1e-5)


def test_decode_is_the_pipelines_and_encode_inverts_the_layout(policy):
    latents = torch.randn(2, 4, FRAMES, 4, 4, generator=torch.Generator().manual_seed(3))
    clips = policy.decode(latents)  # [B, F, 3, H, W]
    video = policy.pipe.decode_latents(latents)  # [B, 3, F, H, W] in [-1, 1]
    torch.testing.assert_close(clips, (video.permute(0, 2, 1, 3, 4) / 2 + 0.5).clamp(0, 1), atol=1e-5, rtol=0)  # 1/sf vs /sf: last bits
    z = policy.backbone.encode(clips)
    assert z.shape == latents.shape
    # frame k of the clip encodes to frame k of the latents
    one = policy.backbone.encode(clips[:, 2:3])
    torch.testing.assert_close(one[:, :, 0], z[:, :, 2], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"\[N, F, 3, H, W\]"):
        policy.backbone.encode(clips[:, 0])


def test_saved_lora_loads_in_plain_diffusers(tiny_video_dir, tmp_path):
    from diffusers import TextToVideoSDPipeline

    policy = make_policy(tiny_video_dir)
    with torch.no_grad():
        for name, p in policy.denoiser.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    policy.save_pretrained(str(tmp_path / "lora"))
    pipe = TextToVideoSDPipeline.from_pretrained(tiny_video_dir)
    x = torch.randn(1, 4, FRAMES, 4, 4, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500])
    text = torch.randn(1, 24, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        base = pipe.unet(x, t, encoder_hidden_states=text).sample
        tuned = policy.denoiser(x, t, encoder_hidden_states=text).sample
        loaded = VideoDiffusionPolicy.from_pretrained(str(tmp_path / "lora"), VideoDiffusionPolicyConfig(num_frames=FRAMES))
        again = loaded.denoiser(x, t, encoder_hidden_states=text).sample
    assert (tuned - base).abs().max() > 1e-4  # the adapters matter
    torch.testing.assert_close(again, tuned, rtol=0, atol=0)
    state = TextToVideoSDPipeline.lora_state_dict(str(tmp_path / "lora"))[0]
    assert any(".temp_attentions." in k for k in state) and all(k.startswith("unet.") for k in state)


def test_video_policy_is_found_from_a_bare_pipeline_folder(tiny_video_dir):
    from genalign.evaluation import load_policy

    policy = load_policy(tiny_video_dir, steps=2, options={"num_frames": FRAMES})
    assert isinstance(policy, VideoDiffusionPolicy)
    assert policy.rollout(PROMPTS[:1], 1, [0]).outputs.shape == (1, FRAMES, 3, 8, 8)


def test_config_frames_must_match_the_policy(tiny_video_dir, tmp_path):
    from genalign.configs import ConfigError
    from genalign.train_config import resolve_config

    path = tmp_path / "video.yaml"
    path.write_text(
        f"policy: {{type: video_diffusion, pretrained: {tiny_video_dir}, num_frames: 8}}\n"
        "algorithm: {name: ddpo}\nreward: {components: [{type: motion}]}\n"
        "prompts: {source: moving_shapes, frames: 12}\n"
    )
    with pytest.raises(ConfigError, match=r"'prompts.frames' \(12\) and 'policy.num_frames' \(8\)"):
        resolve_config(str(path), [])
    assert resolve_config(str(path), ["prompts.frames=8"]).policy.num_frames == 8


def test_video_run_report_shows_clips_as_gifs_and_frame_strips(tiny_video_dir, tmp_path):
    import re

    from PIL import Image

    from genalign.configs import load_config
    from genalign.train_config import TrainConfig
    from genalign.trainer import train

    out = tmp_path / "run"
    cfg = load_config(TrainConfig, None, [
        "policy.type=video_diffusion", f"policy.pretrained={tiny_video_dir}", "policy.num_steps=2", "policy.num_frames=8",
        "prompts.source=moving_shapes", "prompts.objects=[1]", "prompts.frames=8", "reward.components=[{type: temporal_consistency}]",
        "train.epochs=1", "train.prompts_per_epoch=2", "train.samples_per_prompt=2", "train.rollout_batch_size=4",
        "train.train_batch_size=2", "report.num_prompts=2", "report.seeds=[0, 1]", "eval.prompts_per_set=2",
        "eval.samples_per_prompt=1", f"output_dir={out}",
    ])
    train(cfg)
    strip = Image.open(out / "samples_after.png")
    assert strip.width > 8 * strip.height // 2  # rows of frame strips: much wider than tall per row
    html = (out / "report.html").read_text()
    gifs = re.findall(r"src='(report_images/[^']+\.gif)'", html)
    assert len(gifs) == 2 * 2 * 2  # before and after, 2 prompts x 2 seeds
    gif = Image.open(out / gifs[0])
    assert gif.is_animated and gif.n_frames == 8


def test_animatediff_unet_is_called_as_the_pipeline_calls_it(tiny_animatediff_dir, tmp_path):
    """An AnimateDiffPipeline folder loads as the video policy: its guided model output is the
    pipeline's (prompt embeddings repeated per frame, the CFG batch), and its saved LoRA (motion
    modules included) loads back bit for bit and in plain diffusers."""
    from diffusers import AnimateDiffPipeline

    from genalign.evaluation import load_policy

    policy = make_policy(tiny_animatediff_dir)
    assert isinstance(load_policy(tiny_animatediff_dir, steps=2, options={"num_frames": FRAMES}), VideoDiffusionPolicy)
    part = policy.start(PROMPTS, 1, [7, 8])
    x_t, t = part.states[:, 0], part.timesteps[:, 0]
    embeds = {k: part.extras[k] for k in ("prompt_embeds", "negative_prompt_embeds")}
    with torch.no_grad():
        ours = policy._model_output(x_t, t, embeds)
        pipe = AnimateDiffPipeline.from_pretrained(tiny_animatediff_dir)
        cond, uncond = pipe.encode_prompt(PROMPTS, "cpu", 1, True, negative_prompt=[""] * 2)
        text = torch.cat([uncond, cond]).repeat_interleave(FRAMES, dim=0)  # [2B*F, L, D], as the pipeline does
        both = pipe.unet(torch.cat([x_t] * 2), torch.cat([t] * 2), encoder_hidden_states=text).sample
        u, c = both.chunk(2)
    torch.testing.assert_close(ours, u + policy.config.guidance_scale * (c - u), atol=1e-5, rtol=1e-5)
    assert (ours[:, :, 0] - ours[:, :, -1]).abs().max() > 1e-4  # frames differ: positions reach the output

    with torch.no_grad():
        for name, p in policy.denoiser.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    policy.save_pretrained(str(tmp_path / "lora"))
    state = AnimateDiffPipeline.lora_state_dict(str(tmp_path / "lora"))[0]
    assert any("motion_modules" in k for k in state) and all(k.startswith("unet.") for k in state)
    loaded = VideoDiffusionPolicy.from_pretrained(str(tmp_path / "lora"), VideoDiffusionPolicyConfig(num_frames=FRAMES))
    with torch.no_grad():
        torch.testing.assert_close(loaded._model_output(x_t, t, embeds), policy._model_output(x_t, t, embeds), rtol=0, atol=0)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    with torch.no_grad():
        both = pipe.unet(torch.cat([x_t] * 2), torch.cat([t] * 2), encoder_hidden_states=text).sample
    u, c = both.chunk(2)
    torch.testing.assert_close(u + policy.config.guidance_scale * (c - u), policy._model_output(x_t, t, embeds),
                               atol=1e-5, rtol=1e-5)


def test_video_policy_refuses_other_pipelines(tiny_sd_dir):
    with pytest.raises(ValueError, match="StableDiffusionPipeline; the video policy loads TextToVideoSDPipeline or AnimateDiffPipeline"):
        make_policy(tiny_sd_dir)
