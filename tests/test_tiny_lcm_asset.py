"""The shipped tiny latent consistency model (assets/models/tiny-lcm)."""

from pathlib import Path

import pytest
import torch
from diffusers import LatentConsistencyModelPipeline, LCMScheduler
from safetensors.torch import load_file

from genalign.evaluation import load_policy
from genalign.policies import ConsistencyPolicy
from rewards.shapes_verifier import ShapesVerifierReward

ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "assets" / "models" / "tiny-lcm"


@pytest.fixture(scope="module")
def pipe():
    assert ASSET.is_dir(), f"{ASSET} missing; make it with genalign toyworld distill lcm --out {ASSET}"
    pipe = LatentConsistencyModelPipeline.from_pretrained(ASSET, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_asset_is_a_guidance_embedded_lcm_of_the_teacher(pipe):
    assert isinstance(pipe.scheduler, LCMScheduler)
    assert pipe.scheduler.config.original_inference_steps == 50
    assert pipe.unet.config.time_cond_proj_dim == 256
    assert pipe.unet.config.sample_size == 8 and pipe.vae_scale_factor == 4
    teacher = ROOT / "assets" / "models" / "tiny-sd"
    for part in ("vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        mine, theirs = load_file(ASSET / part), load_file(teacher / part)
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), part


def test_asset_draws_what_one_object_prompts_ask_for(pipe):
    """4 consistency steps, guidance 4: most one-object train prompts pass the verifier."""
    prompts = ["a red circle", "a blue square", "a green circle", "a white triangle"] * 4
    gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    images = pipe(prompts, num_inference_steps=4, guidance_scale=4.0, generator=gens, height=32, width=32,
                  output_type="pt").images
    assert images.shape == (16, 3, 32, 32) and torch.isfinite(images).all()
    verifier = ShapesVerifierReward.from_pretrained(ROOT / "assets" / "models" / "shapes-verifier")
    strict = verifier(images, prompts).scores
    assert strict.mean() >= 0.5, strict  # the model card measures 0.83 on tier-1 train prompts


def test_policy_loads_the_asset_and_matches_the_pipeline(pipe):
    policy = load_policy(str(ASSET), steps=4, guidance_scale=4.0)
    assert isinstance(policy, ConsistencyPolicy)
    traj = policy.rollout(["a red circle"], 2, [torch.Generator().manual_seed(s) for s in (0, 1)])
    assert traj.num_steps == 3  # 4 sampling steps = 3 stochastic transitions + the final f_θ
    images = pipe(["a red circle"] * 2, num_inference_steps=4, guidance_scale=4.0,
                  generator=[torch.Generator().manual_seed(s) for s in (0, 1)], height=32, width=32,
                  output_type="pt").images
    torch.testing.assert_close(traj.outputs.float().cpu(), images.float(), atol=1e-4, rtol=0)
