"""DeepSpeed ZeRO-2 and ZeRO-3 through the shipped launch configs, on 2 CPU processes (gloo).

- The update is the single-process one: 2 processes × 4 rows with accumulation over 2
  minibatches of 2 give the weight change of 1 process × 8 rows in one minibatch, for DDPO,
  GRPO and D3PO (AdamW with lr = eps = 1000 makes the first step the gradient itself; see
  tests/test_invariance.py for the tolerance). A loss not scaled by processes / N_global, a
  boundary on every backward, or a normaliser of the last call only all move it by tens of
  percent.
- Resume is exact: 2 epochs equal 1 epoch, a new launch with --resume, and a second epoch
  (each process reloads its own optimizer shard), bit for bit.

Those two are slow (a DeepSpeed launch takes 20-40 s on 2 cores) and skipped without
deepspeed (`pip install -e '.[deepspeed]'`). The checkpoint guards below run everywhere.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_invariance import ALGORITHMS, GRADIENT_AS_STEP, SMOOTH_REWARD, assert_same_step, one_epoch

from genalign.algorithms import ALGORITHMS as REGISTRY
from genalign.configs import to_dict
from genalign.policies import StableDiffusionPolicy
from genalign.trainer import Trainer


def needs_deepspeed(test):
    """Slow, and skipped where deepspeed is not installed."""
    skip = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")
    return pytest.mark.slow(skip(test))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(stage: int, config, *args: str) -> subprocess.CompletedProcess:
    """``accelerate launch`` of the shipped zero<stage>.yaml on 2 CPU processes."""
    path = config.output_dir + ".yaml"
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(config), f)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           os.path.join(ROOT, "configs", "accelerate", f"zero{stage}.yaml"), "--num_processes", "2",
           "--mixed_precision", "no", "-m", "genalign.cli", "train", path, *args]
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def final_weights(out: str, epoch: int) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(out, "checkpoints", f"epoch_{epoch:05d}", "trainable.safetensors"))


@pytest.fixture
def config(sd_run_config):
    """2 prompts × 4 samples = 8 rows, one optimizer step per epoch (as tests/test_invariance.py)."""
    return lambda out, *extra: sd_run_config(
        out, "train.epochs=1", "train.prompts_per_epoch=2", "train.samples_per_prompt=4", "train.rollout_batch_size=8",
        "report.enabled=false", "eval.enabled=false", SMOOTH_REWARD, *GRADIENT_AS_STEP, *extra,
    )


@needs_deepspeed
@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_zero_gives_the_single_process_step(config, tmp_path, algorithm, stage):
    single, g_single = one_epoch(config, str(tmp_path / "single"), algorithm, "train.train_batch_size=8")
    cfg = config(str(tmp_path / "zero"), *ALGORITHMS[algorithm], "train.train_batch_size=2",
                 "train.gradient_accumulation_steps=2")
    initial = {k: v.clone() for k, v in Trainer(cfg).policy.trainable_state_dict().items()}
    launch(stage, cfg)
    row = json.loads((tmp_path / "zero" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["samples"] == 8 and row["optimizer_steps"] == 1
    assert row["reward_mean"] == pytest.approx(single["reward_mean"], rel=1e-4)  # batch shapes differ: float rounding
    final = final_weights(str(tmp_path / "zero"), 1)
    assert sorted(final) == sorted(initial)
    assert_same_step(g_single, torch.cat([(final[k] - initial[k]).flatten() for k in sorted(initial)]))
    # the saved policy holds the checkpoint's weights (ZeRO-3 gathers them for the save)
    saved = StableDiffusionPolicy.from_pretrained(str(tmp_path / "zero" / "final")).trainable_state_dict()
    assert sorted(saved) == sorted(final) and all(torch.equal(saved[k], final[k]) for k in final)


@needs_deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_resume_is_exact(sd_run_config, tmp_path, stage):
    common = ["train.epochs=2", "train.prompts_per_epoch=2", "train.samples_per_prompt=2", "train.rollout_batch_size=4",
              "train.train_batch_size=2", "report.enabled=false", "eval.enabled=false", "train.max_grad_norm=1.0"]
    launch(stage, sd_run_config(str(tmp_path / "whole"), *common))
    launch(stage, sd_run_config(str(tmp_path / "split"), *common, "train.epochs=1"))
    optim = sorted(n for n in os.listdir(tmp_path / "split" / "checkpoints" / "epoch_00001") if n.startswith("optimizer"))
    assert optim == ["optimizer.rank000.pt", "optimizer.rank001.pt"]
    launch(stage, sd_run_config(str(tmp_path / "split"), *common), "--resume")
    whole, split = final_weights(str(tmp_path / "whole"), 2), final_weights(str(tmp_path / "split"), 2)
    assert sorted(whole) == sorted(split)
    for k in whole:
        assert torch.equal(whole[k], split[k]), k
    assert not [n for n in os.listdir(tmp_path / "split" / "checkpoints") if n.startswith(".tmp")]


def test_checkpoints_name_the_launch_they_need(tmp_path):
    """A DeepSpeed checkpoint holds one optimizer shard per process: resuming it without DeepSpeed
    or with another number of processes is refused with a message, before any state is loaded."""
    from genalign import checkpoint
    from genalign.deepspeed_zero import load_optimizer, optimizer_file

    params = [torch.nn.Parameter(torch.zeros(3))]
    root = str(tmp_path / "ckpt")
    shards = tmp_path / "staging"
    shards.mkdir()
    for rank in range(2):
        torch.save({"rank": rank}, shards / optimizer_file(rank))
    path = checkpoint.write_checkpoint(root, 1, {"w": params[0].detach()}, None, {"samples": 0}, files=sorted(
        str(p) for p in shards.iterdir()))
    assert sorted(n for n in os.listdir(path) if n.startswith("optimizer")) == ["optimizer.rank000.pt", "optimizer.rank001.pt"]
    assert not list(shards.iterdir())  # moved in, not copied
    with pytest.raises(ValueError, match="written by a DeepSpeed run"):
        checkpoint.read_checkpoint(path, torch.optim.AdamW(params))
    with pytest.raises(ValueError, match=r"written by 2 DeepSpeed processes.*4 DeepSpeed"):
        load_optimizer(None, path, 0, 4)
    plain = checkpoint.write_checkpoint(str(tmp_path / "plain"), 1, {"w": params[0].detach()}, torch.optim.AdamW(params),
                                        {"samples": 0})
    with pytest.raises(ValueError, match=r"without DeepSpeed"):
        load_optimizer(None, plain, 0, 2)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_normaliser_is_a_count_not_a_function_of_log_probs(sd_run_config, tmp_path, monkeypatch, name):
    """The pre-count DeepSpeed relies on: on every loss call of a real run, the algorithm's
    normaliser with zero log-probs (and zero reference log-probs) equals the one it trains with."""
    cls = REGISTRY[name][1]
    calls = []
    real_loss = cls.loss

    def checked(self, batch, log_probs, ref=None):
        terms = real_loss(self, batch, log_probs, ref)
        zeros = torch.zeros_like(log_probs.detach())
        dry = real_loss(self, batch, zeros, None if ref is None else torch.zeros_like(ref))
        calls.append((float(terms.normaliser), float(dry.normaliser)))
        return terms

    monkeypatch.setattr(cls, "loss", checked)
    keep_all = ["algorithm.min_reward=-1e9"] if name == "rejection_sft" else []  # else the tiny model may keep none
    Trainer(sd_run_config(str(tmp_path / "run"), f"algorithm.name={name}", *keep_all, "train.epochs=2", "train.samples_per_prompt=4",
                          "train.rollout_batch_size=8", "train.train_batch_size=4", "report.enabled=false",
                          "eval.enabled=false", "prompts={source: shapes_world}")).train()
    assert calls, f"{name} made no loss call"
    assert all(real == dry for real, dry in calls), calls
