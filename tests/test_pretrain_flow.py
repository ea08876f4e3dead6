"""The rectified-flow recipe: components made from the image pipeline, training, loading back."""

from __future__ import annotations

import json

import torch
from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline

from genalign.policies import FlowMatchingPolicy, FlowMatchingPolicyConfig
from genalign.recipes.pretrain_flow import (
    build_flow_components,
    clip_with_projection,
    logit_normal,
    main,
)


def test_text_encoders_keep_the_image_encoders_states(tiny_sd_dir):
    """Identity projection: the pooled embedding is the image encoder's pooled state, and the
    penultimate hidden states (what SD3 reads) are the image encoder's."""
    image = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, requires_safety_checker=False)
    model = clip_with_projection(image.text_encoder)
    ids = image.tokenizer(["a red circle", "two squares"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        ours = model(ids, output_hidden_states=True)
        theirs = image.text_encoder(ids, output_hidden_states=True)
    torch.testing.assert_close(ours.text_embeds, theirs.pooler_output, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.hidden_states[-2], theirs.hidden_states[-2], rtol=0, atol=0)


def test_vae_is_the_image_vae_with_a_zero_shift(tiny_sd_dir, tmp_path):
    comps = build_flow_components(tiny_sd_dir, tmp_path / "tok", layers=1, width=16, heads=2, shift=1.0, seed=0)
    image = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, requires_safety_checker=False)
    assert comps["vae"].config.shift_factor == 0.0
    assert all(torch.equal(a, b) for a, b in zip(comps["vae"].state_dict().values(), image.vae.state_dict().values()))
    assert comps["transformer"].config.sample_size == image.unet.config.sample_size
    assert comps["transformer"].config.joint_attention_dim == 2 * image.text_encoder.config.hidden_size


def test_logit_normal_noise_levels_lie_in_the_open_interval():
    s = logit_normal(20_000, torch.Generator().manual_seed(0))
    assert 0 < s.min() and s.max() < 1
    assert abs(s.mean().item() - 0.5) < 0.01  # symmetric about 1/2


def test_recipe_trains_and_saves_a_pipeline_diffusers_and_the_policy_load(tiny_sd_dir, tmp_path):
    out = tmp_path / "flow"
    main(["--image-model", tiny_sd_dir, "--out", str(out), "--layers", "1", "--width", "16", "--heads", "2",
          "--batch-size", "4", "--steps", "3", "--minutes", "0", "--no-samples"])
    log = json.loads((out / "training_log.json").read_text())
    assert log["train"]["steps"] == 3 and log["parameters"]["transformer"] > 0
    pipe = StableDiffusion3Pipeline.from_pretrained(out, text_encoder_3=None, tokenizer_3=None)
    image = pipe("a red circle", num_inference_steps=2, max_sequence_length=1, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()
    policy = FlowMatchingPolicy.from_pretrained(str(out), FlowMatchingPolicyConfig(num_steps=2, max_sequence_length=1))
    traj = policy.rollout(["a red circle"], 2, [0, 1])
    assert traj.outputs.shape == (2, 3, 64, 64) and traj.log_probs.shape == (2, 2)
