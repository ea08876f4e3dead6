"""D3PO, SePPO and B²-DiffuRL on a tiny seeded Stable Diffusion: the sampling each one asks
for (shared noise, branches, forward-process pairs), and short training runs."""

import json
import math

import pytest
import torch

from genalign.algorithms import D3PO, D3POConfig
from genalign.configs import load_config
from genalign.policies import StableDiffusionPolicy, StableDiffusionPolicyConfig
from genalign.train_config import TrainConfig
from genalign.trainer import Trainer


def gens(n, base=0):
    return [torch.Generator().manual_seed(base + i) for i in range(n)]


def make_policy(path, **kw):
    cfg = StableDiffusionPolicyConfig(pretrained=path, num_steps=kw.pop("num_steps", 4), **kw)
    return StableDiffusionPolicy.from_pretrained(path, cfg)


def test_shared_noise_rollout(tiny_sd_dir):
    policy = make_policy(tiny_sd_dir)
    traj = policy.rollout(["a red circle", "a blue square"], 3, gens(6), shared_noise=True)
    x_t = traj.states[:, 0]  # [6, C, h, w]
    assert torch.equal(x_t[0], x_t[1]) and torch.equal(x_t[0], x_t[2])
    assert not torch.equal(x_t[0], x_t[3])
    assert not torch.equal(traj.actions[0, -1], traj.actions[1, -1])  # step noise still differs
    # reproducible and equal to the unshared rollout's first row of each group
    plain = policy.rollout(["a red circle", "a blue square"], 3, gens(6))
    torch.testing.assert_close(x_t[3], plain.states[3, 0])


def test_forward_process_follows_the_noising_process(tiny_sd_dir):
    """At the last chain step the action is √ᾱ_0 x_0 plus noise of std √(1−ᾱ_0) (ᾱ_0 = the
    scheduler's final ᾱ); at the first step the state is nearly pure noise (std ≈ 1)."""
    policy = make_policy(tiny_sd_dir, num_steps=10)
    images = torch.rand(2, 3, 64, 64)
    vae = policy.pipe.vae
    x0 = vae.encode(images * 2 - 1).latent_dist.mean * vae.config.scaling_factor
    traj = policy.forward_process(["a red circle", "a blue square"], images, gens(2))
    assert traj.states.shape == (2, 10, *x0.shape[1:])  # every chain step
    a0 = float(policy.scheduler.final_alpha_cumprod)
    last_err = float((traj.actions[:, 9] - a0**0.5 * x0).pow(2).mean().sqrt())
    assert last_err == pytest.approx((1 - a0) ** 0.5, rel=0.2)
    assert 0.8 < float(traj.states[:, 0].std()) < 1.3
    lp = policy.log_prob(traj, torch.tensor([0, 9]))
    assert lp.shape == (2, 2) and torch.isfinite(lp).all() and torch.isfinite(traj.log_probs).all()


def test_d3po_optimisation_separates_preferred_from_rejected(tiny_sd_dir):
    """On one fixed batch of shared-noise pairs, a few steps of the D3PO loss lower it below
    log 2 (its value at π_θ = π_ref) and order most (pair, step) implicit rewards correctly."""
    torch.manual_seed(0)
    policy = make_policy(tiny_sd_dir, lora_rank=4)
    traj = policy.rollout(["a red circle", "a blue square"], 3, gens(6), shared_noise=True)
    traj.rewards = torch.tensor([1.0, 0.0, 0.5, 0.2, 0.9, 0.4])
    algo = D3PO(D3POConfig(beta=10.0, clip_eps=0.5))
    opt = torch.optim.Adam(policy.trainable_parameters(), lr=1e-2)
    steps = torch.arange(traj.num_steps)
    with torch.no_grad(), policy.reference():
        ref = policy.log_prob(traj, steps)
    first = None
    for _ in range(15):
        terms = algo.loss(traj, policy.log_prob(traj, steps), ref)
        loss = terms.mean
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first == pytest.approx(math.log(2), abs=1e-4)
    assert loss.item() < first - 0.05
    assert terms.metric("pair_accuracy") >= 0.75 and terms.counts["pairs"] == 6  # 6 of the 3·2 pairs: no ties


def base_config(tiny_sd_dir, out, *extra):
    return load_config(TrainConfig, None, [
        "policy.type=stable_diffusion", f"policy.pretrained={tiny_sd_dir}", "policy.num_steps=4",
        "prompts.source=list", "prompts.prompts=[a red circle, a blue square, a green triangle]",
        "train.epochs=3", "train.prompts_per_epoch=2", "train.samples_per_prompt=3", "train.rollout_batch_size=6",
        "train.train_batch_size=3", "train.learning_rate=1e-2", "reward.components=[{type: jpeg_compressibility}]",
        "report.enabled=false", "eval.prompts_per_set=2", "eval.samples_per_prompt=1", f"output_dir={out}", *extra,
    ])


@pytest.mark.parametrize(
    "overrides, expect",
    [
        (["algorithm.name=d3po"], "pairs"),
        (["algorithm.name=b2diffurl", "algorithm.stages=3", "algorithm.epochs_per_stage=1", "algorithm.select_threshold=0.1"], "branch_step"),
        # stat_min_count=1: z against the prompt's own rewards, so each group has a best above and a worst below
        (["algorithm.name=b2diffurl", "algorithm.loss=dpo", "algorithm.stages=3", "algorithm.epochs_per_stage=1",
          "algorithm.select_threshold=0.1", "algorithm.stat_min_count=1"], "branch_step"),
        (["algorithm.name=seppo", "algorithm.steps_per_sample=2", "algorithm.targets=shapes_world"], "reference_snapshot"),
    ],
    ids=["d3po", "b2-ppo", "b2-dpo", "seppo"],
)
def test_training_runs_change_every_parameter(tiny_sd_dir, tmp_path, overrides, expect):
    trainer = Trainer(base_config(tiny_sd_dir, tmp_path / "run", *overrides))
    before = {k: v.clone() for k, v in trainer.policy.trainable_state_dict().items()}
    history = trainer.train()
    after = trainer.policy.trainable_state_dict()
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, f"{len(unchanged)} of {len(before)} trainable tensors did not change"
    assert all(expect in h for h in history)
    assert all(math.isfinite(h["loss"]) for h in history)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["samples"] for r in rows] == [6, 12, 18]
    if expect == "branch_step":  # backward progressive: the branch point moves toward the first step
        steps = [h["branch_step"] for h in history]
        assert steps == sorted(steps, reverse=True) and steps[0] > steps[-1] == 0


def test_seppo_uses_previous_checkpoints_as_reference(tiny_sd_dir, tmp_path):
    trainer = Trainer(base_config(tiny_sd_dir, tmp_path / "run", "algorithm.name=seppo", "algorithm.targets=shapes_world", "train.epochs=4"))
    history = trainer.train()
    assert len(trainer.snapshots) == 4
    assert all(0 <= h["reference_snapshot"] <= h["epoch"] - 1 for h in history)


def test_whole_group_minibatches_keep_pairs_together(tiny_sd_dir, tmp_path):
    trainer = Trainer(base_config(tiny_sd_dir, tmp_path / "run", "algorithm.name=d3po", "train.train_batch_size=4"))
    group = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])

    class Rows:
        def __init__(self, g):
            self.group, self.batch_size = g, len(g)

    batches = trainer._minibatches(Rows(group), torch.Generator().manual_seed(0), whole_groups=True)
    assert sorted(torch.cat(batches).tolist()) == list(range(9))
    for b in batches:  # every group in a minibatch is complete
        for g in group[b].unique():
            assert int((group[b] == g).sum()) == 3
