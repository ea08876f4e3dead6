"""ConsistencyPolicy (RLCM's MDP), the LCM step math, and latent consistency distillation."""

import json
import math

import pytest
import torch
from diffusers import LatentConsistencyModelPipeline, LCMScheduler, StableDiffusionPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from genalign.cli import main as cli
from genalign.configs import ConfigError, load_config
from genalign.evaluation import load_policy
from genalign.policies import ConsistencyPolicy, ConsistencyPolicyConfig, Policy
from genalign.policies.lcm import LCMConstants, consistency_function, consistency_step
from genalign.train_config import TrainConfig
from genalign.trainer import Trainer

PROMPTS = ["a red circle", "two blue squares"]


def gens(n, base=0):
    return [torch.Generator().manual_seed(base + i) for i in range(n)]


def make_policy(path, **kw):
    cfg = ConsistencyPolicyConfig(pretrained=path, num_steps=kw.pop("num_steps", 4), **kw)
    return ConsistencyPolicy.from_pretrained(path, cfg)


def perturb_lora(policy, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def lcm_lora_dir(tiny_sd_dir, tmp_path_factory):
    """Random non-zero LoRA weights for the tiny SD UNet, in diffusers' format: a stand-in LCM-LoRA."""
    unet = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None).unet
    torch.manual_seed(0)
    unet.add_adapter(
        LoraConfig(
            r=4,
            lora_alpha=4,
            init_lora_weights="gaussian",
            target_modules=["to_q", "to_v", "ff.net.2"],
        )
    )
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    d = tmp_path_factory.mktemp("lcm_lora")
    StableDiffusionPipeline.save_lora_weights(
        str(d), unet_lora_layers=get_peft_model_state_dict(unet), safe_serialization=True
    )
    return str(d)


def test_implements_protocol(tiny_lcm_dir):
    policy = make_policy(tiny_lcm_dir)
    assert isinstance(policy, Policy)
    assert (
        policy.embed_dim == 32 and policy.guidance_scale == 8.5
    )  # LatentConsistencyModelPipeline's default


def test_rollout_equals_plain_pipeline(tiny_lcm_dir):
    """Same seeds per row -> the same images as LatentConsistencyModelPipeline; T = N − 1 scored steps."""
    policy = make_policy(tiny_lcm_dir, guidance_scale=3.0)
    traj = policy.rollout(PROMPTS, 2, gens(4))
    assert traj.states.shape == (4, 3, 4, 8, 8) and traj.log_probs.shape == (4, 3)
    assert traj.timesteps[0].tolist() == policy.consts.timesteps[:3].tolist() == [999, 759, 499]
    pipe = LatentConsistencyModelPipeline.from_pretrained(
        tiny_lcm_dir, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        [p for p in PROMPTS for _ in range(2)],
        num_inference_steps=4,
        guidance_scale=3.0,
        generator=gens(4),
        output_type="pt",
        height=64,
        width=64,
    ).images
    torch.testing.assert_close(traj.outputs, images, rtol=0, atol=1e-5)
    assert traj.group.tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_step_matches_lcm_scheduler(prediction_type):
    """Against ``LCMScheduler.step`` on the same inputs and noise: x̂0 = its ``denoised``; the
    transition is x' = μ + σ z with μ = √ᾱ_τ(n+1) x̂0, σ = √(1 − ᾱ_τ(n+1)) and z the scheduler's own
    draw; the log-prob is the per-dim mean of log N(x'; μ, σ²); the last step returns x̂0 itself."""
    scheduler = LCMScheduler(
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        clip_sample=True,
        clip_sample_range=2.0,
    )
    consts = LCMConstants.from_scheduler(LCMScheduler.from_config(scheduler.config), 4)
    scheduler.set_timesteps(4)
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=g)
    model_output = torch.randn(2, 4, 8, 8, generator=g)
    for i, t in enumerate(scheduler.timesteps):
        scheduler._step_index = i
        prev, denoised = scheduler.step(
            model_output, t, sample, generator=torch.Generator().manual_seed(7), return_dict=False
        )
        tb = torch.full((2,), int(t))
        if i == 3:  # the final f_θ: no noise, no density
            torch.testing.assert_close(
                consistency_function(consts, model_output, tb, sample), prev, rtol=0, atol=1e-6
            )
            break
        t_next = torch.full((2,), int(scheduler.timesteps[i + 1]))
        ours = consistency_step(
            consts, model_output, tb, t_next, sample, generator=torch.Generator().manual_seed(7)
        )
        torch.testing.assert_close(ours.pred_original_sample, denoised, rtol=0, atol=1e-6)
        torch.testing.assert_close(ours.prev_sample, prev, rtol=0, atol=1e-6)
        a_next = scheduler.alphas_cumprod[int(scheduler.timesteps[i + 1])]
        torch.testing.assert_close(ours.mean, a_next.sqrt() * denoised, rtol=0, atol=1e-6)
        torch.testing.assert_close(ours.std, (1 - a_next).sqrt().expand(2), rtol=0, atol=1e-7)
        z = torch.randn(sample.shape, generator=torch.Generator().manual_seed(7))
        torch.testing.assert_close((prev - ours.mean) / (1 - a_next).sqrt(), z, rtol=0, atol=1e-5)
        expected = (
            torch.distributions.Normal(ours.mean, (1 - a_next).sqrt())
            .log_prob(prev)
            .flatten(1)
            .mean(1)
        )
        torch.testing.assert_close(ours.log_prob, expected, rtol=0, atol=1e-5)
        rescored = consistency_step(consts, model_output, tb, t_next, sample, prev_sample=prev)
        torch.testing.assert_close(rescored.log_prob, ours.log_prob)
        sample = prev


def test_step_count_and_constants_errors(tiny_lcm_dir):
    with pytest.raises(ValueError, match="num_steps must be >= 2"):
        LCMConstants.from_scheduler(LCMScheduler(), 1)
    with pytest.raises(ValueError, match="thresholding"):
        LCMConstants.from_scheduler(LCMScheduler(thresholding=True), 4)
    consts = LCMConstants.from_scheduler(LCMScheduler(), 4)
    assert consts.num_transitions == 3
    with pytest.raises(IndexError, match="no successor"):
        consts.next_timesteps(torch.tensor([3]))


def test_log_prob_recomputation_embedded_guidance(tiny_lcm_dir):
    """π_θ/π_old is exactly 1 before any update (LoRA adapters non-zero)."""
    policy = make_policy(tiny_lcm_dir, guidance_scale=3.0)
    perturb_lora(policy)
    traj = policy.rollout(PROMPTS, 2, gens(4))
    lp = policy.log_prob(traj, [0, 1, 2])
    torch.testing.assert_close(lp, traj.log_probs, rtol=0, atol=1e-5)
    assert lp.requires_grad
    per_row = policy.log_prob(traj, torch.tensor([[2], [1], [0], [2]]))
    torch.testing.assert_close(
        per_row[:, 0],
        traj.log_probs[torch.arange(4), torch.tensor([2, 1, 0, 2])],
        rtol=0,
        atol=1e-5,
    )


class ScaledInputLCM(LCMScheduler):
    """LCM whose model input is not the identity: x / √(1 + (t/1000)²)."""

    def scale_model_input(self, sample, timestep=None):
        return sample / (1 + (float(timestep) / 1000) ** 2) ** 0.5


def test_every_unet_call_applies_the_model_input_scaling(tiny_lcm_dir):
    """Rollout and log-prob recomputation share the scheduler's model-input scaling: with a
    non-identity scale_model_input the rollout changes and π_θ/π_old stays exactly 1."""
    policy = make_policy(tiny_lcm_dir, guidance_scale=3.0)
    perturb_lora(policy)
    identity = policy.rollout(PROMPTS, 1, gens(2))
    policy.scheduler = ScaledInputLCM.from_config(policy.scheduler.config)
    traj = policy.rollout(PROMPTS, 1, gens(2))
    assert (traj.actions - identity.actions).abs().max() > 1e-3, "the scaling must reach the UNet"
    torch.testing.assert_close(policy.log_prob(traj, [0, 1, 2]), traj.log_probs, rtol=0, atol=1e-5)
    per_row = policy.log_prob(traj, torch.tensor([[2], [0]]))  # rows at different timesteps
    torch.testing.assert_close(per_row[:, 0], traj.log_probs[[0, 1], [2, 0]], rtol=0, atol=1e-5)


def test_sd_with_lcm_lora_and_cfg(tiny_sd_dir, lcm_lora_dir):
    """SD folder + LCMScheduler + fused LCM-LoRA with classifier-free guidance equals diffusers' own recipe;
    log-probs recompute; the reference is the fused LCM-LoRA model."""
    policy = make_policy(tiny_sd_dir, scheduler="lcm", lcm_lora=lcm_lora_dir, guidance_scale=2.0)
    assert policy.embed_dim is None and policy.cfg
    traj = policy.rollout(PROMPTS, 2, gens(4))
    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_sd_dir, safety_checker=None, requires_safety_checker=False
    )
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(lcm_lora_dir)
    pipe.fuse_lora()
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        [p for p in PROMPTS for _ in range(2)],
        num_inference_steps=4,
        guidance_scale=2.0,
        generator=gens(4),
        output_type="pt",
        height=64,
        width=64,
    ).images
    torch.testing.assert_close(traj.outputs, images, rtol=0, atol=1e-5)
    plain = (
        make_policy(tiny_sd_dir, scheduler="lcm", guidance_scale=2.0)
        .rollout(PROMPTS, 2, gens(4))
        .outputs
    )
    assert (plain - traj.outputs).abs().max() > 1e-3, "the LCM-LoRA must change the model"

    perturb_lora(policy, scale=0.3)
    with torch.no_grad():
        moved = policy.log_prob(traj, [0, 1, 2])
        with policy.reference():
            ref = policy.log_prob(traj, [0, 1, 2])
    torch.testing.assert_close(ref, traj.log_probs, rtol=0, atol=1e-5)
    assert (moved - ref).abs().max() > 1e-4
    traj2 = policy.rollout(PROMPTS, 1, gens(2, 5))
    torch.testing.assert_close(
        policy.log_prob(traj2, [0, 1, 2]), traj2.log_probs, rtol=0, atol=1e-5
    )


def test_start_step_continue_predict_and_forward_process(tiny_lcm_dir):
    policy = make_policy(tiny_lcm_dir, guidance_scale=3.0)
    traj = policy.rollout(PROMPTS, 1, gens(2))
    own = gens(2, 40)  # start + T steps with the rollout's generators reproduce the rollout
    partial = policy.start(PROMPTS, 1, own)
    for j in range(partial.num_steps):
        assert partial.outputs is None
        partial = policy.step(partial, j, 1, own)
    reference = policy.rollout(PROMPTS, 1, gens(2, 40))
    torch.testing.assert_close(partial.outputs, reference.outputs, rtol=0, atol=1e-6)
    torch.testing.assert_close(partial.log_probs, reference.log_probs, rtol=0, atol=1e-6)
    assert bool(partial.mask.all())

    torch.testing.assert_close(policy.predict_final(traj, 3), traj.outputs, rtol=0, atol=1e-6)
    one_step = policy.predict_final(traj, 1)  # f_θ of x_τ1: a consistency model's one-step sample
    assert one_step.shape == traj.outputs.shape and 0 <= one_step.min() and one_step.max() <= 1

    branches = policy.continue_from(traj, torch.tensor([1, 1]), 3, gens(6, 100))
    assert (
        branches.batch_size == 6
        and branches.num_steps == 3
        and branches.group.tolist() == [0, 0, 0, 1, 1, 1]
    )
    torch.testing.assert_close(
        branches.states[:3, :2], traj.states[0:1, :2].expand(3, -1, -1, -1, -1)
    )
    assert (branches.actions[0, 1] - branches.actions[1, 1]).abs().max() > 1e-3, (
        "continuations must differ"
    )
    torch.testing.assert_close(
        policy.log_prob(branches, [1, 2]), branches.log_probs[:, 1:], rtol=0, atol=1e-5
    )

    shared = policy.rollout(PROMPTS, 2, gens(4), shared_noise=True)
    torch.testing.assert_close(shared.states[0, 0], shared.states[1, 0])
    assert (shared.actions[0, 0] - shared.actions[1, 0]).abs().max() > 1e-3

    fwd = policy.forward_process(PROMPTS, traj.outputs, gens(2, 9))  # every transition of the chain
    assert fwd.states.shape == (2, 3, 4, 8, 8) and fwd.timesteps.tolist() == [[999, 759, 499]] * 2
    assert torch.isfinite(fwd.log_probs).all() and fwd.step_ids.tolist() == [[0, 1, 2]] * 2
    lp = policy.log_prob(fwd, torch.tensor([[0, 2], [1, 2]]))
    assert lp.shape == (2, 2) and lp.requires_grad and torch.isfinite(lp).all()


def test_rlcm_training_changes_every_trainable_tensor(tiny_lcm_dir, tmp_path):
    """DDPO (PPO-clip) on the consistency policy, with the existing Trainer: every LoRA tensor moves."""
    cfg = load_config(
        TrainConfig,
        None,
        [
            "policy.type=consistency",
            f"policy.pretrained={tiny_lcm_dir}",
            "policy.num_steps=3",
            "policy.guidance_scale=3.0",
            "policy.lora_rank=2",
            "prompts.source=list",
            "prompts.prompts=[a red circle, a blue square]",
            "train.epochs=2",
            "train.prompts_per_epoch=2",
            "train.samples_per_prompt=4",
            "train.rollout_batch_size=8",
            "train.train_batch_size=4",
            "train.learning_rate=1e-2",
            "algorithm.clip_range=0.1",
            "reward.components=[{type: jpeg_compressibility}]",
            "eval.enabled=false",
            "report.enabled=false",
            f"output_dir={tmp_path / 'rlcm'}",
        ],
    )
    trainer = Trainer(cfg)
    before = {k: v.clone() for k, v in trainer.policy.trainable_state_dict().items()}
    history = trainer.train()
    after = trainer.policy.trainable_state_dict()
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, (
        f"{len(unchanged)} of {len(before)} trainable tensors did not change, e.g. {unchanged[:3]}"
    )
    assert all(math.isfinite(h["loss"]) and "approx_kl" in h for h in history)
    reloaded = load_policy(str(tmp_path / "rlcm" / "final"))
    assert isinstance(reloaded, ConsistencyPolicy) and reloaded.consts.num_transitions == 2
    for k, v in after.items():
        torch.testing.assert_close(reloaded.trainable_state_dict()[k], v)


def test_save_load_round_trip(tiny_lcm_dir, tmp_path):
    policy = make_policy(tiny_lcm_dir, guidance_scale=3.0, lora_rank=2, lora_alpha=4.0)
    perturb_lora(policy, scale=0.2)
    ours = policy.rollout(PROMPTS, 1, gens(2, 10)).outputs
    base = make_policy(tiny_lcm_dir, guidance_scale=3.0).rollout(PROMPTS, 1, gens(2, 10)).outputs
    assert (ours - base).abs().max() > 1e-3, "perturbed adapters must change the samples"
    policy.save_pretrained(str(tmp_path / "lora"))
    reloaded = ConsistencyPolicy.from_pretrained(str(tmp_path / "lora"))
    assert reloaded.config.guidance_scale == 3.0 and reloaded.config.lora_alpha == 4.0
    torch.testing.assert_close(
        reloaded.rollout(PROMPTS, 1, gens(2, 10)).outputs, ours, rtol=0, atol=1e-5
    )
    pipe = LatentConsistencyModelPipeline.from_pretrained(
        tiny_lcm_dir, safety_checker=None, requires_safety_checker=False
    )
    pipe.load_lora_weights(str(tmp_path / "lora"))
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(
        PROMPTS,
        num_inference_steps=4,
        guidance_scale=3.0,
        generator=gens(2, 10),
        output_type="pt",
        height=64,
        width=64,
    ).images
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)
    assert isinstance(load_policy(tiny_lcm_dir), ConsistencyPolicy), (
        "a bare LCM pipeline folder is a consistency policy"
    )

    full = make_policy(tiny_lcm_dir, finetune="full", guidance_scale=3.0)
    traj = full.rollout(PROMPTS, 1, gens(2))
    with torch.no_grad():
        for p in full.trainable_parameters()[:6]:
            p.add_(0.05)
        moved = full.log_prob(traj, [0, 1, 2])
        with full.reference():
            ref = full.log_prob(traj, [0, 1, 2])
    torch.testing.assert_close(ref, traj.log_probs, rtol=0, atol=1e-5)
    assert (moved - ref).abs().max() > 1e-4
    full.save_pretrained(str(tmp_path / "full"))
    assert (
        json.loads((tmp_path / "full" / "model_index.json").read_text())["_class_name"]
        == "LatentConsistencyModelPipeline"
    )
    reloaded_full = ConsistencyPolicy.from_pretrained(str(tmp_path / "full"))
    torch.testing.assert_close(reloaded_full.log_prob(traj, [0, 1, 2]), moved, rtol=0, atol=1e-5)


def test_lora_on_lcm_lora_base_round_trip(tiny_sd_dir, lcm_lora_dir, tmp_path):
    """The saved policy names its base and LCM-LoRA relative to its own folder, so the run moved
    together with them still loads and samples the same images."""
    import shutil

    from genalign.policies.unet_tuning import POLICY_FILE

    home = tmp_path / "a"
    shutil.copytree(tiny_sd_dir, home / "base")
    shutil.copytree(lcm_lora_dir, home / "lcm_lora")
    policy = make_policy(str(home / "base"), scheduler="lcm", lcm_lora=str(home / "lcm_lora"), guidance_scale=2.0)
    perturb_lora(policy, scale=0.2)
    ours = policy.rollout(PROMPTS, 1, gens(2, 3)).outputs
    policy.save_pretrained(str(home / "run" / "lora"))
    meta = json.loads((home / "run" / "lora" / POLICY_FILE).read_text())
    assert (meta["base"], meta["config"]["lcm_lora"]) == ("../../base", "../../lcm_lora")
    shutil.move(str(home), str(tmp_path / "b"))
    reloaded = ConsistencyPolicy.from_pretrained(str(tmp_path / "b" / "run" / "lora"))
    assert reloaded.config.lcm_lora == str(tmp_path / "b" / "lcm_lora") and reloaded.config.scheduler == "lcm"
    torch.testing.assert_close(
        reloaded.rollout(PROMPTS, 1, gens(2, 3)).outputs, ours, rtol=0, atol=1e-5
    )


def test_distilled_tiny_pipeline_loads_offline_and_generates(tiny_sd_dir, tmp_path):
    """A few distillation steps from a tiny random teacher write a plain diffusers LCM pipeline."""
    out = tmp_path / "tiny-lcm"
    assert (
        cli(
            [
                "toyworld",
                "distill",
                "lcm",
                "--teacher",
                tiny_sd_dir,
                "--out",
                str(out),
                "--steps",
                "3",
                "--batch-size",
                "2",
                "--log-every",
                "1",
                "--guidance-dim",
                "16",
                "--no-samples",
            ]
        )
        == 0
    )
    log = json.loads((out / "training_log.json").read_text())
    d = log["distillation"]
    assert d["steps"] == 3 and d["stopped_on"] == "steps" and len(d["curve"]) == 3
    assert all(math.isfinite(row["loss"]) for row in d["curve"])
    assert {"python", "torch", "diffusers", "transformers"} <= set(log["versions"]) and log["args"][
        "steps"
    ] == 3
    assert not list(out.rglob("*.bin")), "safetensors only"
    from safetensors.torch import load_file

    unet_file = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    assert {v.dtype for v in unet_file.values()} == {torch.float16}  # --unet-dtype default
    vae_file = load_file(str(out / "vae" / "diffusion_pytorch_model.safetensors"))
    assert {v.dtype for v in vae_file.values()} == {torch.float32}  # the teacher's, unchanged
    pipe = LatentConsistencyModelPipeline.from_pretrained(str(out), local_files_only=True)
    assert pipe.unet.dtype == torch.float32
    assert (
        pipe.unet.config.time_cond_proj_dim == 16
        and pipe.scheduler.config.original_inference_steps == 50
    )
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        ["a red circle"],
        num_inference_steps=2,
        guidance_scale=4.0,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()
    policy = load_policy(str(out))
    assert isinstance(policy, ConsistencyPolicy) and policy.embed_dim == 16


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"num_step": 4}, r"unknown key 'policy\.num_step' \(did you mean 'num_steps'\?\)"),
        ({"num_steps": 1}, r"'num_steps' must be >= 2"),
        ({"scheduler": "ddim"}, r"'policy\.scheduler' must be one of \['pretrained', 'lcm'\]"),
        ({"pretrained": "./missing/dir"}, r"'pretrained'.*no model directory"),
        ({"lcm_lora": "./missing/lora"}, r"'lcm_lora'.*no model directory"),
        ({"guidance_scale": "high"}, r"'policy\.guidance_scale'"),
    ],
)
def test_bad_config_names_the_key(tiny_lcm_dir, tmp_path, patch, message):
    import yaml

    data = {
        "policy": {"type": "consistency", "pretrained": tiny_lcm_dir, **patch},
        "prompts": {"source": "list", "prompts": ["a"]},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=message):
        load_config(TrainConfig, str(path))


def test_clear_errors(tiny_sd_dir, tiny_lcm_dir):
    with pytest.raises(ConfigError, match=r"DDIMScheduler.*set scheduler: lcm"):
        load_config(
            TrainConfig,
            None,
            [
                "policy.type=consistency",
                f"policy.pretrained={tiny_sd_dir}",
                "prompts.source=list",
                "prompts.prompts=[a]",
            ],
        )
    with pytest.raises(ValueError, match="needs an LCMScheduler"):
        ConsistencyPolicy.from_pretrained(tiny_sd_dir)
    with pytest.raises(FileNotFoundError, match="no model directory"):
        ConsistencyPolicy.from_pretrained("./does/not/exist")
    with pytest.raises(ValueError, match="negative_prompt.*guidance embedding"):
        make_policy(tiny_lcm_dir, negative_prompt="blurry")
    with pytest.raises(ValueError, match="negative_prompt.*guidance_scale is 1"):
        make_policy(tiny_sd_dir, scheduler="lcm", negative_prompt="blurry")


def test_rlcm_raises_reward(tiny_lcm_dir, tmp_path):
    """RLCM = DDPO on the consistency policy: same eval prompts and seeds, the paired reward goes up."""
    out = tmp_path / "rlcm_learns"
    cfg = load_config(
        TrainConfig,
        None,
        [
            "policy.type=consistency", f"policy.pretrained={tiny_lcm_dir}", "policy.num_steps=3",
            "policy.guidance_scale=3.0", "policy.finetune=full",
            "prompts.source=list", "prompts.prompts=[a red circle, a blue square]",
            "train.epochs=6", "train.prompts_per_epoch=4", "train.samples_per_prompt=8",
            "train.rollout_batch_size=32", "train.train_batch_size=16", "train.inner_epochs=2",
            "train.learning_rate=1e-3", "algorithm.clip_range=0.05",
            "reward.components=[{type: jpeg_compressibility}]",
            "eval.prompts_per_set=2", "eval.samples_per_prompt=16", "report.enabled=false", f"output_dir={out}",
        ],
    )
    Trainer(cfg).train()
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in evals] == [0, 6]
    assert evals[1]["reward"] > evals[0]["reward"] + 0.005, evals


def test_consistency_policy_refuses_noise_windows(tiny_lcm_dir):
    from genalign.policies.window import NoiseWindow

    policy = make_policy(tiny_lcm_dir)
    assert "noise_window" not in policy.capabilities and "antithetic" not in policy.capabilities
    with pytest.raises(ValueError, match="noise_window"):
        policy.rollout(["a red circle"], 2, noise_window=NoiseWindow([0.0], 1))
