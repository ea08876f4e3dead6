"""The trainer: run-directory contract, exact resume, safe checkpoints, NaN rewards."""

import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file

from genalign import checkpoint
from genalign.trainer import Trainer, train
from rewards.base import RewardOutput
from rewards.compose import NonFiniteRewardError, WeightedSum


@pytest.fixture
def config(sd_run_config):
    """This file's tiny run: ``config(output_dir, *overrides)``."""
    return lambda out, *extra: sd_run_config(out, "train.epochs=2", "algorithm.timestep_fraction=0.67", "report.num_prompts=2",
                                               "report.seeds=[0, 1]", *extra)


def test_run_directory_contract(config, tmp_path):
    out = tmp_path / "run"
    history = train(config(str(out), "train.gradient_accumulation_steps=2"))
    assert len(history) == 2
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["set"], r["samples"]) for r in evals] == [(0, "eval", 2), (2, "eval", 2)]
    for name in ("config.yaml", "metrics.jsonl", "report.html", "samples_before.png", "samples_after.png", "reward_curve.png"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    for key in ("reward_mean", "reward_std", "loss", "samples", "reward_queries", "wall_seconds", "approx_kl", "clip_fraction"):
        assert all(key in r for r in rows), key
    assert rows[1]["samples"] == 8 and rows[1]["reward_queries"] == 8
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(out / "tensorboard"))
    assert checkpoint.latest_checkpoint(str(out / "checkpoints")).endswith("epoch_00002")
    assert (out / "final" / "pytorch_lora_weights.safetensors").is_file()
    html = (out / "report.html").read_text()
    assert not re.search(r"(src|href)=['\"]https?:", html), "the report must render offline"
    for src in re.findall(r"src='([^']+)'", html):
        assert (out / src).is_file(), src
    # an existing run is never overwritten without --resume
    with pytest.raises(FileExistsError, match="--resume"):
        train(config(str(out)))


def test_resume_equals_uninterrupted(config, tmp_path):
    full = train(config(str(tmp_path / "a"), "train.epochs=3", "report.enabled=false"))
    train(config(str(tmp_path / "b"), "train.epochs=1", "report.enabled=false"))
    resumed = train(config(str(tmp_path / "b"), "train.epochs=3", "report.enabled=false"), resume=True)
    assert [r["epoch"] for r in resumed] == [1, 2, 3]
    for a, b in zip(full, resumed):
        for key in ("reward_mean", "loss", "approx_kl", "samples"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["epoch"], key)
    wa = load_file(str(tmp_path / "a" / "final" / "pytorch_lora_weights.safetensors"))
    wb = load_file(str(tmp_path / "b" / "final" / "pytorch_lora_weights.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="no run"):
        train(config(str(tmp_path / "c")), resume=True)


def test_failed_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    root = str(tmp_path / "ckpt")
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    checkpoint.write_checkpoint(root, 1, {"w": torch.ones(2)}, opt, {"x": 1})

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.write_checkpoint(root, 2, {"w": torch.zeros(2)}, opt, {"x": 2})
    latest = checkpoint.latest_checkpoint(root)
    assert latest.endswith("epoch_00001")
    assert sorted(os.listdir(root)) == ["epoch_00001", "latest"], "no half-written folder may remain"
    trainable, state = checkpoint.read_checkpoint(latest, opt)
    torch.testing.assert_close(trainable["w"], torch.ones(2))
    assert state["x"] == 1 and state["epoch"] == 1


class _NaNEvery2nd:
    name = "flaky"
    differentiable = False

    def __call__(self, outputs, conditions):
        scores = outputs.mean(dim=(1, 2, 3)).float()
        scores[::2] = float("nan")
        return RewardOutput(scores=scores)


def test_nonfinite_rewards_dropped_or_reported(config, tmp_path):
    trainer = Trainer(config(str(tmp_path / "d"), "train.epochs=1", "report.enabled=false"))
    trainer.reward = WeightedSum([_NaNEvery2nd()], [1.0])
    before = {k: v.clone() for k, v in trainer.policy.trainable_state_dict().items()}
    history = trainer.train()
    assert history[0]["nonfinite_rewards"] == 2
    assert history[0]["reward_mean"] == history[0]["reward_mean"], "mean over finite rewards only"
    after = trainer.policy.trainable_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "finite rows still train"

    strict = Trainer(config(str(tmp_path / "e"), "train.epochs=1", "report.enabled=false", "train.on_nonfinite_reward=error"))
    strict.reward = WeightedSum([_NaNEvery2nd()], [1.0])
    with pytest.raises(NonFiniteRewardError, match="flaky"):
        strict.train()


@pytest.fixture
def seppo_config(sd_run_config):
    """A tiny SePPO run: ``seppo_config(output_dir, *overrides)``."""
    return lambda out, *extra: sd_run_config(
        out, "algorithm.name=seppo", "algorithm.steps_per_sample=2", "algorithm.targets=shapes_world",
        "reward.components=[{type: jpeg_compressibility}]", "train.epochs=3", "train.train_batch_size=4",
        "report.enabled=false", "eval.enabled=false", *extra,
    )


def test_seppo_forward_noise_is_not_the_rollout_noise(seppo_config, tmp_path, monkeypatch):
    """The forward process of an off-policy pair draws its own noise: seeding it with the
    reference sample's rollout seeds made its first draw that rollout's x_T."""
    from genalign.policies.stable_diffusion import StableDiffusionPolicy

    seen = {"rollout": [], "forward": []}
    rollout, forward = StableDiffusionPolicy.rollout, StableDiffusionPolicy.forward_process

    def record_rollout(self, prompts, n, seeds=None, **kw):
        seen["rollout"] += list(seeds)
        return rollout(self, prompts, n, seeds, **kw)

    def record_forward(self, conditions, outputs, seeds=None):
        seen["forward"] += list(seeds)
        return forward(self, conditions, outputs, seeds)

    monkeypatch.setattr(StableDiffusionPolicy, "rollout", record_rollout)
    monkeypatch.setattr(StableDiffusionPolicy, "forward_process", record_forward)
    train(seppo_config(str(tmp_path / "run"), "train.epochs=1"))
    assert len(seen["rollout"]) == 4 and len(seen["forward"]) == 8  # 4 pairs: winner and reference
    assert seen["forward"][:4] == seen["forward"][4:], "a pair shares its forward noise"
    assert not set(seen["forward"]) & set(seen["rollout"])


def _global_rng():
    import random

    import numpy as np

    return torch.get_rng_state().clone(), random.getstate(), np.random.get_state()[1].copy()


def test_seppo_resume_equals_uninterrupted_with_global_rng(seppo_config, tmp_path, monkeypatch):
    """SePPO draws references from weight snapshots: they travel in the checkpoint, so a resumed
    run ends bit-exact on CPU. The global RNG states are restored too: the test consumes them at
    every checkpoint, and the state right after resume equals the uninterrupted run's there."""
    import random

    import numpy as np

    at_checkpoint, after_resume = {}, []
    write, resume = Trainer._checkpoint, Trainer._resume

    def checkpoint_(self, root, epoch, wall):
        torch.rand(3), random.random(), np.random.rand(2)  # global randomness an epoch may consume
        write(self, root, epoch, wall)
        at_checkpoint[(self.out, epoch)] = _global_rng()

    def resume_(self, root):
        resume(self, root)
        after_resume.append(_global_rng())

    monkeypatch.setattr(Trainer, "_checkpoint", checkpoint_)
    monkeypatch.setattr(Trainer, "_resume", resume_)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    full = train(seppo_config(a))
    train(seppo_config(b, "train.epochs=1"))
    resumed = train(seppo_config(b), resume=True)
    assert [r["reference_snapshot"] for r in full] == [r["reference_snapshot"] for r in resumed]
    pool = checkpoint.read_tensors(checkpoint.latest_checkpoint(os.path.join(b, "checkpoints")), "snapshots")
    assert {k.split("/")[0] for k in pool} == {"0", "1", "2"}, "the pool: the weights at the start of each epoch"
    wa = load_file(os.path.join(a, "final", "pytorch_lora_weights.safetensors"))
    wb = load_file(os.path.join(b, "final", "pytorch_lora_weights.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    t, py, npy = at_checkpoint[(a, 1)]
    t2, py2, npy2 = after_resume[0]
    assert torch.equal(t, t2) and py == py2 and np.array_equal(npy, npy2)
