"""The text-to-video recipe's parts: inflation from the image pipeline and the per-attribute scoring."""

from __future__ import annotations

import numpy as np
import torch

from genalign.recipes.pretrain_video import (
    ClipStream,
    build_video_components,
    encode_clips,
    score_clips,
    summarise,
    trainable_unet,
)
from genalign.toyworld.moving import make_condition, parse_moving_prompt, render_clip


def test_inflated_unet_is_the_image_unet_frame_by_frame(tiny_sd_dir, tmp_path):
    """Spatial weights copied (1x1 convolutions as linear projections), temporal outputs zeroed:
    before training, the video UNet denoises each frame as the image UNet does. The first level's
    attention keeps the image UNet's head count; the deeper levels' attention has more, narrower
    heads (the 3-D UNet takes one head width), so the comparison splits those as the image UNet does."""
    from diffusers import StableDiffusionPipeline

    comps = build_video_components(tiny_sd_dir, tmp_path / "tok", seed=0, arch="unet3d")
    image = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    heads = image.unet.config.attention_head_dim  # the image UNet's head count
    spatial = {n: m for n, m in comps["unet"].named_modules() if n.endswith((".attn1", ".attn2")) and ".attentions." in n}
    assert all(m.heads == heads for n, m in spatial.items() if n.startswith(("down_blocks.0.", "up_blocks.1.")))
    for m in spatial.values():
        m.heads = heads
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 3, 8, 8, generator=gen)  # [B, C, F, h, w]
    text = torch.randn(2, 24, 32, generator=gen)
    t = torch.tensor([900, 100])
    with torch.no_grad():
        video = comps["unet"](x, t, encoder_hidden_states=text).sample
        frames = x.transpose(1, 2).flatten(0, 1)  # [B*F, C, h, w]
        per_frame = image.unet(frames, t.repeat_interleave(3), encoder_hidden_states=text.repeat_interleave(3, 0)).sample
    torch.testing.assert_close(video, per_frame.view(2, 3, 4, 8, 8).transpose(1, 2), atol=1e-4, rtol=1e-4)
    # shared words keep their embedding rows; the new motion words get one token each
    tok = comps["tokenizer"]
    assert all(len(tok(w, add_special_tokens=False).input_ids) == 1 for w in ("moving", "staying", "still", "up", "down"))
    assert comps["copied_token_rows"] > 0
    # clips encode frame by frame into the video latent layout
    clips = torch.rand(2, 3, 3, 64, 64) * 2 - 1
    z = encode_clips(comps["vae"], clips, sample=False)
    assert z.shape == (2, 4, 3, 8, 8)
    one = encode_clips(comps["vae"], clips[:, 1:2], sample=False)
    torch.testing.assert_close(one[:, :, 0], z[:, :, 1], atol=1e-5, rtol=0)


def test_motion_unet_is_the_image_unet_frame_by_frame(tiny_sd_dir, tmp_path):
    """AnimateDiff (--arch animatediff): the image UNet keeps every weight and its motion modules start as
    the identity, so before training the video UNet denoises each frame as the image UNet does,
    called with the prompt once per clip as the training loop and the probe call it."""
    from diffusers import StableDiffusionPipeline

    comps = build_video_components(tiny_sd_dir, tmp_path / "tok", seed=0, arch="animatediff")
    assert type(comps["unet"]).__name__ == "UNetMotionModel" and comps["adapter"] is not None
    image = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 3, 8, 8, generator=gen)  # [B, C, F, h, w]
    text = torch.randn(2, 24, 32, generator=gen)
    t = torch.tensor([900, 100])
    with torch.no_grad():
        video = trainable_unet(comps)(x, t, encoder_hidden_states=text).sample
        frames = x.transpose(1, 2).flatten(0, 1)  # [B*F, C, h, w]
        per_frame = image.unet(frames, t.repeat_interleave(3), encoder_hidden_states=text.repeat_interleave(3, 0)).sample
    torch.testing.assert_close(video, per_frame.view(2, 3, 4, 8, 8).transpose(1, 2), atol=1e-4, rtol=1e-4)
    # the frame positions make the motion modules order-aware once their outputs are not zero
    with torch.no_grad():
        for name, p in comps["unet"].named_parameters():
            if "motion_modules" in name and "proj_out" in name:
                p.normal_(0, 0.1, generator=gen)
        out = trainable_unet(comps)(x, t, encoder_hidden_states=text).sample
        swapped = trainable_unet(comps)(x.flip(2), t, encoder_hidden_states=text).sample.flip(2)
    assert not torch.allclose(out, swapped, atol=1e-3)


def test_recipe_builds_trains_and_saves_an_animatediff_pipeline(tiny_sd_dir, tmp_path):
    """The recipe with --arch animatediff from an image pipeline: two steps train the motion modules away from
    zero, the folder is an AnimateDiffPipeline whose motion adapter holds the trained modules, and
    the video policy samples clips from it."""
    import json

    from safetensors.torch import load_file

    from genalign.policies import VideoDiffusionPolicy, VideoDiffusionPolicyConfig
    from genalign.recipes.pretrain_video import main

    out = main(["--image-model", tiny_sd_dir, "--arch", "animatediff", "--out", str(tmp_path / "v"), "--steps", "2",
                "--minutes", "5", "--batch-size", "2", "--eval-prompts", "1", "--speed", "0.07", "--two-object-share", "0"])
    log = json.loads((out / "training_log.json").read_text())
    assert log["train"]["steps"] == 2 and log["args"]["arch"] == "animatediff" and log["args"]["speed"] == 0.07
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "AnimateDiffPipeline"
    unet = load_file(str(next((out / "unet").glob("*.safetensors"))))
    adapter = load_file(str(next((out / "motion_adapter").glob("*.safetensors"))))
    trained = {k: v for k, v in unet.items() if "motion_modules" in k}
    assert len(trained) == len(adapter) and all(torch.equal(trained[k], adapter[k]) for k in adapter)
    assert any(float(v.abs().max()) > 0 for k, v in trained.items() if "proj_out.weight" in k)
    policy = VideoDiffusionPolicy.from_pretrained(str(out), VideoDiffusionPolicyConfig(num_steps=2, num_frames=8))
    size = policy.rollout(["a red circle moving right"], 1, [0]).outputs.shape
    assert size[:3] == (1, 8, 3)


def test_clip_stream_draws_train_prompts_in_range():
    x, prompts = ClipStream(seed=0, frames=8).batch(6)
    assert x.shape == (6, 8, 3, 32, 32) and -1 <= x.min() and x.max() <= 1
    assert all(not parse_moving_prompt(p).heldout for p in prompts)
    # its speed reaches the renders: at speed 0 every frame is the first; one-object share 1
    still, prompts = ClipStream(seed=0, frames=8, two_object_share=0.0, speed=0.0).batch(4)
    assert all(len(parse_moving_prompt(p).objects) == 1 for p in prompts)
    assert torch.equal(still, still[:, :1].expand_as(still)) and not torch.equal(x, x[:, :1].expand_as(x))


def test_score_clips_reads_renders_and_catches_reversed_motion():
    from rewards.shapes_verifier import ShapesVerifierReward

    verifier = ShapesVerifierReward.from_pretrained("assets/models/shapes-verifier")
    prompts = ["a red circle moving right", "a blue square moving up", "a green triangle staying still",
               "a yellow circle moving down and a purple square moving left"]
    conds = [make_condition(parse_moving_prompt(p)) for p in prompts]
    clips = torch.from_numpy(np.stack([render_clip(p, seed=i).array() for i, p in enumerate(prompts)]))
    rows = score_clips(clips, conds, verifier)
    assert len(rows) == 5 and all(r["color"] and r["direction"] for r in rows)
    assert sum(r["shape"] for r in rows) >= 4
    summary = summarise(rows)
    assert summary["direction"] == 1.0 and summary["direction_by_wanted"]["still"] == 1.0 and summary["clip_strict"] == 1.0
    backwards = score_clips(clips.flip(1), conds, verifier)  # frames reversed: every moving object goes the other way
    assert [r["direction"] for r in backwards] == [r["wanted"] == "still" for r in backwards]
    assert summarise(backwards)["clip_strict"] == 0.25  # only the still clip, of 4, is right


def test_recipe_continues_a_pipeline_and_logs_its_evaluation(tiny_video_dir, tmp_path):
    """The command end to end on a tiny pipeline: --init, a step, the per-attribute evaluation, a
    loadable pipeline with its log and frame strip."""
    import json

    from diffusers import TextToVideoSDPipeline

    from genalign.recipes.pretrain_video import main

    out = main(["--init", tiny_video_dir, "--out", str(tmp_path / "v"), "--steps", "1", "--minutes", "0",
                "--batch-size", "2", "--eval-prompts", "2"])
    log = json.loads((out / "training_log.json").read_text())
    assert log["train"]["steps"] == 1 and log["init"] == tiny_video_dir
    assert set(log["eval"]) == {"train/1", "train/2", "heldout/1", "heldout/2"}
    assert log["eval"]["heldout/2"]["objects"] == 4 and 0 <= log["eval"]["heldout/1"]["direction"] <= 1
    assert (out / "samples.png").is_file()
    pipe = TextToVideoSDPipeline.from_pretrained(out)
    assert pipe.tokenizer.get_vocab() == TextToVideoSDPipeline.from_pretrained(tiny_video_dir).tokenizer.get_vocab()


def test_direction_separation_penalises_alike_directions_and_trains_them_apart(tiny_video_dir):
    """The term is the mean excess of the direction variants' cosine over the margin: positive on
    an encoder that maps the directions alike, 0 at margin 1 (no cosine exceeds 1) and for
    captions that were all dropped; its gradient reaches the text encoder, and a few steps on it
    alone lower it."""
    from diffusers import TextToVideoSDPipeline

    from genalign.recipes.pretrain_video import direction_separation

    pipe = TextToVideoSDPipeline.from_pretrained(tiny_video_dir)
    tok, text = pipe.tokenizer, pipe.text_encoder

    def ids(prompts):
        return tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids

    prompts = ["a red circle moving left", "a blue square staying still", "",
               "a green triangle moving up and a yellow circle moving down"]
    with torch.no_grad():
        assert float(direction_separation(text, margin=1.0)(prompts, ids)) == 0.0
        assert float(direction_separation(text)(["", ""], ids)) == 0.0
    loss_fn = direction_separation(text, margin=-1.0)  # every pair counts: 1 + mean cosine
    opt = torch.optim.Adam(text.parameters(), lr=1e-2)
    first = float(loss_fn(prompts, ids).detach())
    assert 0 < first <= 2
    for _ in range(5):
        opt.zero_grad()
        loss = loss_fn(prompts, ids)
        loss.backward()
        opt.step()
    assert float(loss_fn(prompts, ids).detach()) < first - 0.05


def test_recipe_passes_the_text_term(tiny_video_dir, tmp_path, monkeypatch):
    """--text-separation reaches training as a term of weight W on the direction separation."""
    import json

    import genalign.recipes.pretrain_video as recipe

    calls = []

    def fake_separation(text_encoder, margin=0.5):
        def loss(prompts, token_ids):
            calls.append(list(prompts))
            return text_encoder(token_ids(list(prompts)))[0].sum() * 0 + 1.0
        return loss

    monkeypatch.setattr(recipe, "direction_separation", fake_separation)
    out = recipe.main(["--init", tiny_video_dir, "--out", str(tmp_path / "v"), "--steps", "2", "--minutes", "0",
                       "--batch-size", "2", "--eval-prompts", "1", "--text-separation", "0.25",
                       "--two-object-share", "0"])
    log = json.loads((out / "training_log.json").read_text())
    assert log["args"]["text_separation"] == 0.25 and len(calls) == 2 and all(len(c) == 2 for c in calls)
