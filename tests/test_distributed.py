"""Two CPU processes (gloo DDP through `accelerate launch`) train with no code change."""

import json
import os
import shutil
import subprocess

import pytest
import yaml


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate CLI not on PATH")
@pytest.mark.parametrize(
    "algorithm",
    [{"name": "ddpo"}, {"name": "d3po"}, {"name": "seppo", "steps_per_sample": 2, "targets": "shapes_world"},
     {"name": "b2diffurl", "stages": 2, "epochs_per_stage": 1, "select_threshold": 0.0}],
    ids=lambda a: a["name"],
)
def test_two_process_ddp_training(tiny_sd_dir, tmp_path, algorithm):
    """Every sampling plan (plain, shared-noise pairs, off-policy pairs with snapshots,
    branches with row selection) runs under DDP without hanging; NaN-advantage rows are
    masked, not dropped, so every process keeps the same number of backward passes."""
    cfg = {
        "algorithm": algorithm,
        "output_dir": str(tmp_path / "run"),
        "policy": {"type": "stable_diffusion", "pretrained": tiny_sd_dir, "num_steps": 3},
        "prompts": {"source": "list", "prompts": ["a red circle", "a blue square"]},
        "reward": {"components": [{"type": "jpeg_compressibility"}]},
        "train": {"epochs": 2, "prompts_per_epoch": 4, "samples_per_prompt": 2, "rollout_batch_size": 4, "train_batch_size": 2},
        "eval": {"prompts_per_set": 2, "samples_per_prompt": 1},
        "report": {"num_prompts": 2, "seeds": [0]},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "accelerate", "cpu_2proc.yaml")
    cmd = ["accelerate", "launch", "--config_file", launch, "-m", "genalign.cli", "train", str(path)]  # the shipped config
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[-1]["samples"] == 16, "both processes' samples are counted"
    assert (tmp_path / "run" / "final" / "pytorch_lora_weights.safetensors").is_file()
