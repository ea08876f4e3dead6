"""The update does not depend on how the work is split: for DDPO, GRPO and D3PO, one epoch end
to end (rollout, reward, advantages, loss, optimizer step) gives the same weight change with
one minibatch of 8, two accumulated minibatches of 4, every denoising step in one model call,
and (slow) two processes of 4 rows each.

AdamW's first step changes an entry by ``-lr · g / (|g| + eps)`` (bias-corrected moments of
one step; weight decay off). With ``lr = eps = 1000`` this is ``-g · (1 - |g|/1000 + ...)``:
the weight change *is* the gradient to about ``|g|/1000`` relative, which both sides share, so
two runs' changes differ only by how their float32 sums were grouped (about 1e-5 relative for
sums of ~10^4 terms); 1e-3 relative leaves room for that and is far below what any error in
the bookkeeping gives (a per-minibatch mean instead of one normaliser per step, a dropped
minibatch, a doubled one: tens of percent).
"""

import json
import os
import shutil
import subprocess

import pytest
import torch
import yaml
from safetensors.torch import load_file

from genalign.configs import to_dict
from genalign.trainer import Trainer

CLIP = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "models", "shapes-clip")
# a smooth reward: rollouts batched differently differ in float rounding, which a JPEG size or a
# thresholded verdict can turn into a different reward; the Shapes World aesthetic head does not
SMOOTH_REWARD = ("reward.components=[{type: aesthetic, "
                 f"head: {CLIP}/aesthetic_head.safetensors, model: {CLIP}/open_clip_config.json, "
                 f"pretrained: {CLIP}/open_clip_model.safetensors}}]")
GRADIENT_AS_STEP = ["train.learning_rate=1000", "train.adam_eps=1000", "train.weight_decay=0", "train.max_grad_norm=0"]
ALGORITHMS = {
    "ddpo": ["algorithm.name=ddpo"],
    "grpo": ["algorithm.name=grpo"],
    "d3po": ["algorithm.name=d3po"],
}


def one_epoch(config, out, algorithm, *extra, step_chunk=1):
    trainer = Trainer(config(out, *ALGORITHMS[algorithm], *extra))
    trainer.policy.step_chunk = step_chunk
    before = {k: v.clone() for k, v in trainer.policy.trainable_state_dict().items()}
    history = trainer.train()
    after = trainer.policy.trainable_state_dict()
    change = torch.cat([(after[k] - before[k]).flatten() for k in sorted(before)])
    return history[0], change


def assert_same_step(a, b):
    assert float(a.norm()) > 0, "the step changed no weight"
    assert float((a - b).norm()) <= 1e-3 * float(a.norm()), float((a - b).norm() / a.norm())


@pytest.fixture
def config(sd_run_config):
    """2 prompts × 4 samples = 8 rows, one optimizer step per epoch."""
    return lambda out, *extra: sd_run_config(
        out, "train.epochs=1", "train.prompts_per_epoch=2", "train.samples_per_prompt=4", "train.rollout_batch_size=8",
        "report.enabled=false", "eval.enabled=false", SMOOTH_REWARD, *GRADIENT_AS_STEP, *extra,
    )


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_accumulation_and_step_chunks_give_the_same_step(config, tmp_path, algorithm):
    one, g_one = one_epoch(config, str(tmp_path / "8x1"), algorithm, "train.train_batch_size=8")
    acc, g_acc = one_epoch(config, str(tmp_path / "4x2"), algorithm, "train.train_batch_size=4",
                           "train.gradient_accumulation_steps=2")
    whole, g_whole = one_epoch(config, str(tmp_path / "all-steps"), algorithm, "train.train_batch_size=8", step_chunk=None)
    assert one["optimizer_steps"] == acc["optimizer_steps"] == 1
    assert_same_step(g_one, g_acc)
    assert_same_step(g_one, g_whole)
    for other in (acc, whole):
        assert other["reward_mean"] == one["reward_mean"]
        assert other["loss"] == pytest.approx(one["loss"], rel=1e-4, abs=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate CLI not on PATH")
@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_two_processes_give_the_single_process_step(config, tiny_sd_dir, tmp_path, algorithm):
    """2 processes × 4 rows (gloo DDP through the shipped launch config) = 1 process × 8 rows."""
    single, g_single = one_epoch(config, str(tmp_path / "single"), algorithm, "train.train_batch_size=8")
    cfg = config(str(tmp_path / "two"), *ALGORITHMS[algorithm], "train.train_batch_size=4")
    initial = {k: v.clone() for k, v in Trainer(cfg).policy.trainable_state_dict().items()}
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    launch = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "accelerate", "cpu_2proc.yaml")
    result = subprocess.run(["accelerate", "launch", "--config_file", launch, "-m", "genalign.cli", "train", str(path)],
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    row = json.loads((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["samples"] == 8 and row["optimizer_steps"] == 1
    assert row["reward_mean"] == pytest.approx(single["reward_mean"], rel=1e-4)  # batch shapes differ: float rounding
    final = load_file(str(tmp_path / "two" / "checkpoints" / "epoch_00001" / "trainable.safetensors"))
    assert sorted(final) == sorted(initial)
    assert_same_step(g_single, torch.cat([(final[k] - initial[k]).flatten() for k in sorted(initial)]))
