"""StableDiffusionPolicy: rollouts equal plain diffusers, log-probs recompute exactly, LoRA I/O."""

import json
import logging
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from genalign.policies import Policy, StableDiffusionPolicy, StableDiffusionPolicyConfig

PROMPTS = ["a red circle", "two blue squares"]
TINY_SD = Path(__file__).resolve().parents[1] / "assets" / "models" / "tiny-sd"


def gens(n, base=0):
    return [torch.Generator().manual_seed(base + i) for i in range(n)]


def make_policy(path, **kw):
    cfg = StableDiffusionPolicyConfig(pretrained=path, num_steps=kw.pop("num_steps", 4), **kw)
    return StableDiffusionPolicy.from_pretrained(path, cfg)


def perturb_lora(policy, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def plain_pipeline(path, lora_dir=None):
    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    if lora_dir is not None:
        pipe.load_lora_weights(lora_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_implements_protocol(tiny_sd_dir):
    assert isinstance(make_policy(tiny_sd_dir), Policy)


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_log_prob_recomputation_equals_rollout(tiny_sd_dir, guidance_scale):
    """π_θ/π_old must be exactly 1 before any update, with and without CFG."""
    policy = make_policy(tiny_sd_dir, guidance_scale=guidance_scale)
    perturb_lora(policy)  # non-zero adapters so the check covers the LoRA path
    traj = policy.rollout(PROMPTS, 2, gens(4))
    assert traj.states.shape == (4, 4, 4, 8, 8) and traj.log_probs.shape == (4, 4)
    lp = policy.log_prob(traj, list(range(4)))
    torch.testing.assert_close(lp, traj.log_probs, rtol=0, atol=1e-5)
    assert lp.requires_grad
    per_row = policy.log_prob(traj, torch.tensor([[3], [2], [1], [0]]))
    torch.testing.assert_close(per_row[:, 0], traj.log_probs[torch.arange(4), torch.tensor([3, 2, 1, 0])], rtol=0, atol=1e-5)


def test_rollout_equals_plain_pipeline(tiny_sd_dir):
    """Same seeds per row -> the same images as StableDiffusionPipeline with DDIM, eta=1."""
    policy = make_policy(tiny_sd_dir, guidance_scale=3.0)
    traj = policy.rollout(PROMPTS, 2, gens(4))
    pipe = plain_pipeline(tiny_sd_dir)
    images = pipe([p for p in PROMPTS for _ in range(2)], num_inference_steps=4, guidance_scale=3.0, eta=1.0,
                  generator=gens(4), output_type="pt", height=64, width=64).images
    torch.testing.assert_close(traj.outputs, images, rtol=0, atol=1e-5)
    assert traj.group.tolist() == [0, 0, 1, 1]


def test_saved_lora_reproduces_in_plain_diffusers(tiny_sd_dir, tmp_path):
    policy = make_policy(tiny_sd_dir, guidance_scale=3.0, lora_rank=2, lora_alpha=4.0)
    perturb_lora(policy, scale=0.2)
    ours = policy.rollout(PROMPTS, 1, gens(2, 10)).outputs
    base = make_policy(tiny_sd_dir, guidance_scale=3.0).rollout(PROMPTS, 1, gens(2, 10)).outputs
    assert (ours - base).abs().max() > 1e-3, "perturbed adapters must change the samples"
    policy.save_pretrained(str(tmp_path / "lora"))
    pipe = plain_pipeline(tiny_sd_dir, str(tmp_path / "lora"))
    theirs = pipe(PROMPTS, num_inference_steps=4, guidance_scale=3.0, eta=1.0, generator=gens(2, 10), output_type="pt",
                  height=64, width=64).images
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)
    reloaded = StableDiffusionPolicy.from_pretrained(str(tmp_path / "lora"))
    torch.testing.assert_close(reloaded.rollout(PROMPTS, 1, gens(2, 10)).outputs, ours, rtol=0, atol=1e-5)


class ScaledInputDDIM(DDIMScheduler):
    """DDIM whose model input is not the identity: x / √(1 + (t/1000)²), the shape of Euler's
    scaling. Any UNet call that skips the scaling sees a different input."""

    def scale_model_input(self, sample, timestep=None):
        return sample / (1 + (float(timestep) / 1000) ** 2) ** 0.5


def test_log_prob_applies_the_rollouts_model_input_scaling(tiny_sd_dir):
    """Rollout, single steps and log-prob recomputation share one model-input scaling: with a
    non-identity scale_model_input, π_θ/π_old is still exactly 1 (same UNet inputs, so the
    same float operations up to batch shape), per step and per row."""
    policy = make_policy(tiny_sd_dir, guidance_scale=3.0)
    perturb_lora(policy)
    identity = policy.rollout(PROMPTS, 1, gens(2))
    policy.scheduler = ScaledInputDDIM.from_config(policy.scheduler.config)
    policy.scheduler.set_timesteps(4)
    traj = policy.rollout(PROMPTS, 1, gens(2))
    assert (traj.actions - identity.actions).abs().max() > 1e-3, "the scaling must reach the UNet"
    torch.testing.assert_close(policy.log_prob(traj, list(range(4))), traj.log_probs, rtol=0, atol=1e-5)
    per_row = policy.log_prob(traj, torch.tensor([[3], [1]]))  # rows at different timesteps
    torch.testing.assert_close(per_row[:, 0], traj.log_probs[[0, 1], [3, 1]], rtol=0, atol=1e-5)
    own = gens(2)
    stepped = policy.start(PROMPTS, 1, own)
    for k in range(4):
        stepped = policy.step(stepped, k, 1, own)
    torch.testing.assert_close(stepped.log_probs, traj.log_probs, rtol=0, atol=0)


def test_full_finetune_save_and_reference(tiny_sd_dir, tmp_path):
    policy = make_policy(tiny_sd_dir, finetune="full")
    traj = policy.rollout(PROMPTS, 1, gens(2))
    with torch.no_grad():
        for p in policy.trainable_parameters()[:4]:
            p.add_(0.1)
    moved = policy.log_prob(traj, [0, 1])
    with torch.no_grad(), policy.reference():
        ref = policy.log_prob(traj, [0, 1])
    torch.testing.assert_close(ref, traj.log_probs[:, :2], rtol=0, atol=1e-5)
    assert (moved - ref).abs().max() > 1e-4
    policy.save_pretrained(str(tmp_path / "full"))
    reloaded = StableDiffusionPolicy.from_pretrained(str(tmp_path / "full"))
    torch.testing.assert_close(reloaded.log_prob(traj, [0, 1]), moved, rtol=0, atol=1e-5)


def test_reference_disables_adapters(tiny_sd_dir):
    policy = make_policy(tiny_sd_dir)
    traj = policy.rollout(PROMPTS, 1, gens(2))  # adapters start at zero: rollout = reference
    perturb_lora(policy, scale=0.3)
    with torch.no_grad():
        moved = policy.log_prob(traj, [1])
        with policy.reference():
            ref = policy.log_prob(traj, [1])
        after = policy.log_prob(traj, [1])
    torch.testing.assert_close(ref, traj.log_probs[:, 1:2], rtol=0, atol=1e-5)
    torch.testing.assert_close(after, moved)
    assert (moved - ref).abs().max() > 1e-4


def test_continue_from_and_predict_final(tiny_sd_dir):
    policy = make_policy(tiny_sd_dir)
    traj = policy.rollout(PROMPTS, 1, gens(2))
    branches = policy.continue_from(traj, torch.tensor([2, 2]), 3, gens(6, 100))
    assert branches.batch_size == 6 and branches.num_steps == 4
    assert branches.group.tolist() == [0, 0, 0, 1, 1, 1]
    torch.testing.assert_close(branches.states[:3, :3], traj.states[0:1, :3].expand(3, -1, -1, -1, -1))
    torch.testing.assert_close(branches.log_probs[:3, :2], traj.log_probs[0:1, :2].expand(3, -1))
    assert (branches.actions[0, 2] - branches.actions[1, 2]).abs().max() > 1e-3, "continuations must differ"
    torch.testing.assert_close(policy.log_prob(branches, [2, 3]), branches.log_probs[:, 2:], rtol=0, atol=1e-5)
    # per-row branch points: row 0 branches before step 1, row 1 before step 3
    mixed = policy.continue_from(traj, torch.tensor([1, 3]), 2, gens(4, 200))
    assert mixed.extras["branch_step"].tolist() == [1, 1, 3, 3]
    torch.testing.assert_close(mixed.actions[:2, :1], traj.actions[0:1, :1].expand(2, -1, -1, -1, -1))
    torch.testing.assert_close(mixed.actions[2:, :3], traj.actions[1:2, :3].expand(2, -1, -1, -1, -1))
    assert (mixed.actions[0, 1] - traj.actions[0, 1]).abs().max() > 1e-3, "row 0 is resampled from step 1"
    torch.testing.assert_close(policy.log_prob(mixed, torch.arange(4)), mixed.log_probs, rtol=0, atol=1e-5)
    torch.testing.assert_close(policy.predict_final(traj, 4), traj.outputs)
    x0_images = policy.predict_final(traj, 3)
    assert x0_images.shape == traj.outputs.shape and 0 <= x0_images.min() and x0_images.max() <= 1


def test_clear_errors(tiny_sd_dir):
    with pytest.raises(FileNotFoundError, match="no model directory"):
        StableDiffusionPolicy.from_pretrained("./does/not/exist")
    with pytest.raises(ValueError, match="eta"):
        make_policy(tiny_sd_dir, eta=0.0)


def test_noise_window_rollout(tiny_sd_dir):
    """Noise only inside the window: with shared x_T the rows of a prompt agree up to the window,
    the window's steps are the only actions, and their log-probs recompute exactly."""
    from genalign.policies.window import NoiseWindow

    policy = make_policy(tiny_sd_dir, num_steps=6)
    perturb_lora(policy)
    window = NoiseWindow([0.0, 0.5], width=2)  # prompt 0: steps 0-1, prompt 1: steps 3-4
    traj = policy.rollout(PROMPTS, 3, gens(6), shared_noise=True, noise_window=window)
    expected = torch.tensor([[1, 1, 0, 0, 0, 0]] * 3 + [[0, 0, 0, 1, 1, 0]] * 3, dtype=torch.bool)
    assert torch.equal(traj.mask.cpu(), expected)
    # rows of prompt 1 share the chain until step 3, then differ
    torch.testing.assert_close(traj.states[3:, :4], traj.states[3:4, :4].expand(3, -1, -1, -1, -1))
    assert (traj.actions[3] - traj.actions[4]).abs()[3].max() > 1e-3
    assert (traj.states[0] - traj.states[1]).abs()[1].max() > 1e-3  # prompt 0 differs from step 1 on
    assert torch.all(traj.log_probs[~traj.mask] == 0)
    steps = torch.tensor([[0, 1]] * 3 + [[3, 4]] * 3)
    lp = policy.log_prob(traj, steps)
    torch.testing.assert_close(lp, traj.log_probs.gather(1, steps), rtol=0, atol=1e-5)
    # outside its window a row is the deterministic DDIM chain: a window on another row does not change it
    alone = policy.rollout(PROMPTS[:1], 3, gens(3), shared_noise=True, noise_window=NoiseWindow([0.0], 2))
    torch.testing.assert_close(alone.outputs, traj.outputs[:3], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="starts"):
        policy.rollout(PROMPTS, 1, gens(2), noise_window=NoiseWindow([0.0], 2))


def test_antithetic_rollout_mirrors_the_window_noise(tiny_sd_dir):
    """Antithetic pairs leave their shared state along +ε and -ε: the pair's first window actions
    are symmetric about the step mean, each row keeps its exact log-prob, and pairs differ."""
    from genalign.policies.ddim import ddim_step
    from genalign.policies.window import NoiseWindow, mirror_pairs

    policy = make_policy(tiny_sd_dir, num_steps=6)
    perturb_lora(policy)
    window = NoiseWindow([0.0, 0.5], width=2)  # prompt 0: steps 0-1, prompt 1: steps 3-4
    traj = policy.rollout(PROMPTS, 4, gens(8), shared_noise=True, noise_window=window, antithetic=True)
    for row, step in ((0, 0), (2, 0), (4, 3), (6, 3)):
        a, b = traj.actions[row, step], traj.actions[row + 1, step]
        torch.testing.assert_close(traj.states[row, step], traj.states[row + 1, step], rtol=0, atol=0)
        x_t = traj.states[row, step].unsqueeze(0)
        t = traj.timesteps[row, step].view(1)
        embeds = {k: v[row : row + 1] for k, v in traj.extras.items()}
        eps = policy._model_output(x_t, t, embeds)
        mean = ddim_step(policy.consts, eps, t, x_t, policy.config.eta, prev_sample=a.unsqueeze(0)).mean[0]
        torch.testing.assert_close((a + b) / 2, mean, rtol=0, atol=1e-4)  # mirrored about μ
        assert (a - b).abs().max() > 1e-2
    assert (traj.actions[0, 0] - traj.actions[2, 0]).abs().max() > 1e-2  # pairs draw independently
    steps = torch.tensor([[0, 1]] * 4 + [[3, 4]] * 4)
    torch.testing.assert_close(policy.log_prob(traj, steps), traj.log_probs.gather(1, steps), rtol=0, atol=1e-5)
    noise = torch.randn(8, 3)
    torch.testing.assert_close(mirror_pairs(noise)[1::2], -noise[0::2])
    torch.testing.assert_close(mirror_pairs(noise)[0::2], noise[0::2])
    with pytest.raises(ValueError, match="even"):
        policy.rollout(PROMPTS, 3, gens(6), shared_noise=True, antithetic=True)
    with pytest.raises(ValueError, match="shared_noise"):
        policy.rollout(PROMPTS, 2, gens(4), antithetic=True)


def test_noise_window_mask_fits_the_chain():
    from genalign.policies.window import NoiseWindow

    m = NoiseWindow([0.0, 0.95], width=3).mask(2, 10)
    assert m.shape == (4, 10) and m.sum(1).tolist() == [3, 3, 3, 3]
    assert m[2].nonzero().view(-1).tolist() == [7, 8, 9]  # moved back to fit
    with pytest.raises(ValueError, match="width"):
        NoiseWindow([0.0], 0)
    with pytest.raises(ValueError, match="starts"):
        NoiseWindow([1.0], 1)


def test_noise_window_draw_is_seeded_and_in_range():
    from genalign.policies.window import NoiseWindow

    a = NoiseWindow.draw(50, 2, (0.1, 0.4), torch.Generator().manual_seed(0))
    b = NoiseWindow.draw(50, 2, (0.1, 0.4), torch.Generator().manual_seed(0))
    assert a == b and a.width == 2 and len(a.starts) == 50
    assert all(0.1 <= s < 0.4 for s in a.starts) and max(a.starts) - min(a.starts) > 0.2


@pytest.mark.parametrize("kind", ["stable_diffusion", "consistency"])
def test_loading_emits_no_deprecation_warning(kind):
    """Loading the shipped tiny-sd / tiny-lcm uses diffusers' current arguments: no deprecation warning,
    neither as a Python warning (pyproject ignores those globally, so they are caught here)
    nor through the diffusers / transformers loggers (which do not propagate to the root)."""
    logged = []

    class Collect(logging.Handler):
        def emit(self, record):
            logged.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if kind == "stable_diffusion":
                make_policy(str(TINY_SD))
            else:
                from genalign.policies import ConsistencyPolicy

                ConsistencyPolicy.from_pretrained(str(TINY_SD.parent / "tiny-lcm"))
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    messages = [str(w.message) for w in caught] + logged
    assert not [m for m in messages if "deprecat" in m.lower()], messages


def test_saved_policy_records_its_base_relative_to_itself(tiny_sd_dir, tmp_path):
    """final/genalign_policy.json names a local base model relative to its own folder: moving
    the run together with its base model keeps it loadable; files with an absolute base (older
    runs) still load; a hub id is stored as is."""
    from genalign.policies.unet_tuning import POLICY_FILE, portable_location, resolve_location

    home = tmp_path / "a"
    shutil.copytree(tiny_sd_dir, home / "base")
    policy = make_policy(str(home / "base"), guidance_scale=3.0)
    perturb_lora(policy, scale=0.2)
    ours = policy.rollout(PROMPTS, 1, gens(2, 10)).outputs
    policy.save_pretrained(str(home / "run" / "final"))
    meta = json.loads((home / "run" / "final" / POLICY_FILE).read_text())
    assert meta["base"] == "../../base"
    shutil.move(str(home), str(tmp_path / "b"))  # the old location is gone
    final = tmp_path / "b" / "run" / "final"
    reloaded = StableDiffusionPolicy.from_pretrained(str(final))
    assert Path(reloaded.config.pretrained) == tmp_path / "b" / "base"
    torch.testing.assert_close(reloaded.rollout(PROMPTS, 1, gens(2, 10)).outputs, ours, rtol=0, atol=1e-5)
    meta["base"] = str(tmp_path / "b" / "base")  # as written before paths were relative
    (final / POLICY_FILE).write_text(json.dumps(meta))
    old = StableDiffusionPolicy.from_pretrained(str(final))
    torch.testing.assert_close(old.rollout(PROMPTS, 1, gens(2, 10)).outputs, ours, rtol=0, atol=1e-5)
    assert portable_location("org/model", str(final)) == "org/model"
    assert resolve_location("org/model", str(final)) == "org/model"
    (final / "sub").mkdir()
    assert portable_location(str(final / "sub"), str(final)) == "./sub"  # not mistaken for a hub id


def test_negative_prompt_encoded_once_equals_the_pipelines(tiny_sd_dir):
    """With CFG the negative prompt is encoded once and broadcast; the embeddings equal the
    pipeline's per-row encoding, and a changed negative prompt is encoded afresh."""
    policy = make_policy(tiny_sd_dir, guidance_scale=4.0)
    prompts = ["a red circle", "two blue squares", "a green triangle"]
    ours = policy.encode(prompts)
    cond, uncond = policy.pipe.encode_prompt(prompts, "cpu", 1, True, negative_prompt=[""] * 3)
    assert torch.allclose(ours["prompt_embeds"], cond, atol=1e-6)
    assert ours["negative_prompt_embeds"].shape == uncond.shape
    assert torch.allclose(ours["negative_prompt_embeds"], uncond, atol=1e-6)
    policy.negative_prompt = "a red circle"
    again = policy.encode(prompts)["negative_prompt_embeds"]
    assert torch.allclose(again[1], cond[0], atol=1e-6) and not torch.allclose(again[1], uncond[1], atol=1e-3)
