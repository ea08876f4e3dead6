"""SIGKILL a training process at random moments (loading, rollout, update, checkpoint write),
resume it each time, and end with exactly the uninterrupted run's weights."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from genalign import runfiles

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ALGORITHMS = {
    "ddpo": {"name": "ddpo", "timestep_fraction": 0.67},
    "grpo": {"name": "grpo", "noise_window": 1, "shared_noise": True},
    "d3po": {"name": "d3po"},
    "seppo": {"name": "seppo"},
    "b2diffurl": {"name": "b2diffurl"},
}


def write_config(path, tiny_sd_dir, out, algorithm):
    path.write_text(yaml.safe_dump({
        "seed": 0, "output_dir": str(out),
        "policy": {"type": "stable_diffusion", "pretrained": str(tiny_sd_dir), "num_steps": 3},
        "algorithm": algorithm,
        "prompts": {"source": "list", "prompts": ["a red circle", "a blue square", "a green triangle"]},
        "train": {"epochs": 4, "prompts_per_epoch": 2, "samples_per_prompt": 2, "rollout_batch_size": 4,
                  "train_batch_size": 2, "learning_rate": 1e-2, "keep_checkpoints": 1},
        "eval": {"enabled": False}, "report": {"enabled": False},
    }))


def launch(config, resume):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "genalign.cli", "train", *(["--resume"] if resume else []), str(config)]
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def final_weights(out):
    return load_file(os.path.join(out, "final", "pytorch_lora_weights.safetensors"))


def check_chain(out, ref_out, kills):
    epochs = [r["epoch"] for r in runfiles.read_jsonl(str(out / "metrics.jsonl"))]
    assert epochs == [1, 2, 3, 4], "each epoch logged once, in order"
    a, b = final_weights(ref_out), final_weights(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after {kills} kills"
    leftovers = [n for d in (out, out / "checkpoints") for n in os.listdir(d) if n.startswith(".tmp-")]
    assert not leftovers


def kill_loop(tmp_path, tiny_sd_dir, algorithm, kills, seed):
    """Kill chains of resumed runs until `kills` kills have landed in all.

    A kill is drawn at a random moment within the uninterrupted run's duration; a resumed run has
    less left to do, so it may finish first. Each chain therefore runs to the end and is checked
    against the uninterrupted weights, and a fresh chain starts until enough kills have landed.
    """
    ref_out = tmp_path / "uninterrupted"
    write_config(tmp_path / "ref.yaml", tiny_sd_dir, ref_out, algorithm)
    t0 = time.monotonic()
    proc = launch(tmp_path / "ref.yaml", resume=False)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()
    duration = time.monotonic() - t0
    rng = random.Random(seed)
    killed, chains = 0, 0
    while killed < kills:
        assert chains < kills + 3, f"only {killed} of {kills} kills landed in {chains} chains"
        out = tmp_path / f"killed-{chains}"
        write_config(tmp_path / "run.yaml", tiny_sd_dir, out, algorithm)
        in_chain = 0
        for _ in range(kills + 20):
            proc = launch(tmp_path / "run.yaml", resume=bool(runfiles.run_contents(str(out))))
            if killed < kills:
                try:
                    proc.wait(timeout=rng.uniform(0.2, 0.9) * duration)
                except subprocess.TimeoutExpired:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    killed += 1
                    in_chain += 1
                    continue
            rc = proc.wait(timeout=600)
            err = proc.stderr.read()
            assert rc == 0, err
            if os.path.isdir(out / "final"):
                break
        assert os.path.isdir(out / "final")
        check_chain(out, ref_out, in_chain)
        chains += 1


def test_kill_9_loop_resumes_to_the_same_weights(tmp_path, tiny_sd_dir):
    kill_loop(tmp_path, tiny_sd_dir, ALGORITHMS["ddpo"], kills=3, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_kill_9_loop_every_algorithm(tmp_path, tiny_sd_dir, name):
    kill_loop(tmp_path, tiny_sd_dir, ALGORITHMS[name], kills=6, seed=1)
