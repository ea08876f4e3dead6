"""One normaliser per optimiser step: the update does not depend on how the data is cut.

The losses return sums (LossTerms); the trainer divides the accumulated gradient of an
accumulation window once by the window's number of active entries. Every test below feeds the
same fixed trajectory (a tiny Stable Diffusion policy, 3 steps, masks that differ between rows,
steps and minibatches) through ``Trainer._optimise`` under different memory settings.

Tolerances: both sides add the same float32 per-entry terms, only grouped differently (and
through convolutions of different batch shapes), so they agree to float32 rounding of sums of
~10^4 terms (about √n · 2^-24 ≈ 1e-5 relative); 1e-3 relative leaves room for that and is far
below the discrepancy of a per-call mean (tens of percent with these masks).
"""

import math

import pytest
import torch

from genalign.configs import load_config
from genalign.train_config import TrainConfig
from genalign.trainer import Trainer


def make_trainer(tiny_sd_dir, out, *extra):
    return Trainer(load_config(TrainConfig, None, [
        "policy.type=stable_diffusion", f"policy.pretrained={tiny_sd_dir}", "policy.num_steps=3",
        "prompts.source=list", "prompts.prompts=[a red circle, a blue square, a green triangle]",
        "train.epochs=1", "train.prompts_per_epoch=2", "train.samples_per_prompt=2", "train.rollout_batch_size=8",
        "train.max_grad_norm=0", "algorithm.clip_range=10.0", "report.enabled=false", "eval.enabled=false",
        f"output_dir={out}", *extra,
    ]))


def fixed_trajectory(trainer, prompts, n):
    torch.manual_seed(0)
    gens = [torch.Generator().manual_seed(i) for i in range(len(prompts) * n)]
    with torch.no_grad():
        traj = trainer.policy.rollout(prompts, n, gens)
    b = traj.batch_size
    traj.advantages = torch.linspace(-1.5, 1.5, b)
    mask = torch.ones(b, traj.num_steps, dtype=torch.bool)
    mask[::3, 0] = False  # uneven active entries across step chunks, rows and minibatches
    mask[1::4, 2] = False
    mask[2::5, 1] = False
    traj.mask = mask
    return traj


class GradientRecorder:
    """Stands in for the optimizer: keeps each step's gradient, changes no weight."""

    def __init__(self, params):
        self.params, self.grads = params, []

    def step(self):
        self.grads.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in self.params]).clone())

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


def step_gradients(trainer, traj, plan=None):
    from genalign.algorithms.base import SamplingPlan

    trainer.optimizer = GradientRecorder(trainer.params)
    out = trainer._optimise(traj, 0, plan or SamplingPlan())
    return trainer.optimizer.grads, out


def assert_same(ga, gb):
    assert len(ga) == len(gb)
    for a, b in zip(ga, gb):
        assert float(a.norm()) > 0
        assert float((a - b).norm()) <= 1e-3 * float(a.norm()), float((a - b).norm() / a.norm())


@pytest.fixture(scope="module")
def setup(tiny_sd_dir, tmp_path_factory):
    trainer = make_trainer(tiny_sd_dir, str(tmp_path_factory.mktemp("norm")))
    prompts = ["a red circle", "a blue square", "a green triangle", "a red square"] * 2
    return trainer, fixed_trajectory(trainer, prompts, 4)  # 32 rows


def test_step_chunk_one_vs_all_steps(setup):
    trainer, traj = setup
    trainer.config.train.train_batch_size, trainer.config.train.gradient_accumulation_steps = 32, 1
    trainer.policy.step_chunk = 1
    g1, m1 = step_gradients(trainer, traj)
    trainer.policy.step_chunk = None  # all steps in one call
    g_all, m_all = step_gradients(trainer, traj)
    del trainer.policy.step_chunk
    assert_same(g1, g_all)
    assert m1["loss"] == pytest.approx(m_all["loss"], rel=1e-4, abs=1e-6)
    assert m1["approx_kl"] == pytest.approx(m_all["approx_kl"], rel=1e-4, abs=1e-9)


def test_batch_16_times_accumulation_2_equals_32_times_1(setup):
    trainer, traj = setup
    trainer.config.train.train_batch_size, trainer.config.train.gradient_accumulation_steps = 16, 2
    g_acc, out = step_gradients(trainer, traj)
    trainer.config.train.train_batch_size, trainer.config.train.gradient_accumulation_steps = 32, 1
    g_one, _ = step_gradients(trainer, traj)
    assert out["optimizer_steps"] == 1
    assert_same(g_acc, g_one)


def test_untrained_rows_dropped_or_masked_give_the_same_gradient(setup):
    """Single process drops untrained rows, several processes mask them (every process keeps
    its shape): with 4-row minibatches and accumulation 2 the composition differs, the step not."""
    trainer, full = setup
    traj = full[torch.arange(8)]
    untrained = torch.tensor([1, 5])
    keep = torch.tensor([0, 2, 3, 4, 6, 7])
    masked = traj[torch.arange(8)]
    masked.mask = masked.mask.clone()
    masked.mask[untrained] = False
    trainer.config.train.train_batch_size, trainer.config.train.gradient_accumulation_steps = 4, 2
    g_masked, _ = step_gradients(trainer, masked)
    g_dropped, _ = step_gradients(trainer, traj[keep])
    assert_same(g_masked, g_dropped)


def test_optimiser_steps_partial_window_and_cleared_gradients(setup):
    """6 rows, minibatches of 2, accumulation 2: windows {mb0, mb1} and the partial {mb2}, so
    two optimiser steps. With SGD (an update linear in the gradient) the result must equal a
    hand-run reference: per window, one loss call on its rows, divided by its active entries."""
    from genalign.seeds import Stream, generator

    trainer, full = setup
    traj = full[torch.arange(6)]
    trainer.config.train.train_batch_size, trainer.config.train.gradient_accumulation_steps = 2, 2
    start = {k: v.clone() for k, v in trainer.policy.trainable_state_dict().items()}
    lr = 0.5
    trainer.optimizer = torch.optim.SGD(trainer.params, lr=lr)
    from genalign.algorithms.base import SamplingPlan

    out = trainer._optimise(traj, 0, SamplingPlan())
    trained = {k: v.clone() for k, v in trainer.policy.trainable_state_dict().items()}
    assert out["optimizer_steps"] == 2
    assert all(p.grad is None for p in trainer.params), "gradients are cleared after the last step"

    # reference, by hand
    trainer.policy.load_trainable_state_dict(start)
    batches = trainer._minibatches(traj, generator(trainer.config.seed, Stream.SHUFFLE, 0, 0), False)
    assert [len(b) for b in batches] == [2, 2, 2]
    steps = torch.arange(traj.num_steps)
    for window in ([batches[0], batches[1]], [batches[2]]):
        rows = traj[torch.cat(window)]
        m = rows.mask.float()
        ratio = torch.exp(trainer.policy.log_prob(rows, steps) - rows.log_probs)
        loss = (-rows.advantages.unsqueeze(1) * ratio * m).sum() / m.sum()  # no clipping at ε = 10
        grads = torch.autograd.grad(loss, trainer.params)
        with torch.no_grad():
            for p, g in zip(trainer.params, grads):
                p -= lr * g
    reference = trainer.policy.trainable_state_dict()
    change = math.sqrt(sum(float(((reference[k] - start[k]) ** 2).sum()) for k in start))
    error = math.sqrt(sum(float(((reference[k] - trained[k]) ** 2).sum()) for k in start))
    assert change > 0 and error <= 1e-3 * change, error / change
    trainer.policy.load_trainable_state_dict(start)


@pytest.mark.slow
@pytest.mark.skipif(__import__("shutil").which("accelerate") is None, reason="accelerate CLI not on PATH")
def test_two_processes_of_b_equal_one_process_of_2b(tiny_sd_dir, tmp_path):
    """2 CPU processes (gloo DDP) × 4 rows vs 1 process × 8 rows, one optimiser step, the same
    samples (every row has its own seed stream). Adam with ε = 1 makes the step ≈ −lr·g for these
    small gradients, so a wrong normaliser would show in the weights (DDP averages gradients over
    processes; the trainer multiplies by P / N_global)."""
    import json
    import os
    import subprocess

    import yaml
    from safetensors.torch import load_file

    def cfg(out, batch):
        return {
            "algorithm": {"name": "ddpo"},
            "output_dir": str(out), "seed": 3,
            "policy": {"type": "stable_diffusion", "pretrained": tiny_sd_dir, "num_steps": 3},
            "prompts": {"source": "list", "prompts": ["a red circle", "a blue square", "a green triangle", "a red square"]},
            "reward": {"components": [{"type": "jpeg_compressibility"}]},
            "train": {"epochs": 1, "prompts_per_epoch": 4, "samples_per_prompt": 2, "rollout_batch_size": 4,
                      "train_batch_size": batch, "adam_eps": 1.0, "weight_decay": 0.0, "max_grad_norm": 0.0,
                      "learning_rate": 1e-2},
            "eval": {"enabled": False}, "report": {"enabled": False},
        }

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name, procs, batch in (("one", 1, 8), ("two", 2, 4)):  # both launched alike
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg(tmp_path / name, batch)))
        launch = ["--multi_gpu"] if procs > 1 else ["--cpu"]
        cmd = ["accelerate", "launch", *launch, "--num_processes", str(procs), "-m", "genalign.cli", "train", str(path)]
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        row = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])
        assert row["optimizer_steps"] == 1
    wa = load_file(str(tmp_path / "one" / "final" / "pytorch_lora_weights.safetensors"))
    wb = load_file(str(tmp_path / "two" / "final" / "pytorch_lora_weights.safetensors"))
    assert wa.keys() == wb.keys()
    change = math.sqrt(sum(float((v**2).sum()) for k, v in wa.items() if "lora_B" in k))  # LoRA B starts at 0
    error = math.sqrt(sum(float(((wa[k] - wb[k]) ** 2).sum()) for k in wa))
    assert change > 0 and error <= 1e-3 * change, error / change
