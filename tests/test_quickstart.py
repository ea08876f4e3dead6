"""The README's main job runs end to end (shortened), and `genalign eval` tabulates a policy."""

import json
import os

from genalign.cli import main
from genalign.configs import load_config
from genalign.train_config import TrainConfig
from genalign.trainer import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_short_quickstart_writes_run_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "qs"
    cfg = load_config(TrainConfig, "configs/quickstart.yaml", [
        f"output_dir={out}", "train.epochs=1", "train.prompts_per_epoch=2", "train.samples_per_prompt=2",
        "train.rollout_batch_size=4", "train.train_batch_size=2", "policy.num_steps=2", "eval.prompts_per_set=2",
        "eval.samples_per_prompt=1", "report.num_prompts=2", "report.seeds=[0]",
    ])
    history = train(cfg)
    assert history[0]["samples"] == 4
    assert 0.0 <= history[0]["reward/shapes_verifier/strict"] <= 1.0
    for name in ("config.yaml", "metrics.jsonl", "eval.jsonl", "report.html", "samples_before.png", "samples_after.png"):
        assert (out / name).is_file(), name
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    sets = list(cfg.prompts.eval_sets(cfg.eval.prompts_per_set))  # the training pool and the never-trained prompts
    if len(sets) > 1:
        sets.append(sets[0].rsplit(" (", 1)[0] + " (all)")
    assert {(e["epoch"], e["set"]) for e in evals} == {(t, s) for t in (0, 1) for s in sets}
    assert all(0.0 <= e["shapes_verifier/strict"] <= e["shapes_verifier/partial"] + 1e-9 <= 1.0 + 1e-9 for e in evals)
    assert (out / "final" / "genalign_policy.json").is_file()


def test_eval_command_prints_and_writes_table(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    path = tmp_path / "eval.json"
    code = main(["eval", "assets/models/tiny-sd", "--tiers", "1", "5", "--prompts-per-tier", "2", "--n", "2",
                 "--steps", "4", "--json", str(path)])
    assert code == 0
    assert "| 1 | heldout | 4 |" in capsys.readouterr().out
    table = json.loads(path.read_text())["table"]
    assert [(r["tier"], r["samples"]) for r in table] == [(1, 4), (5, 4)]
    assert all(0.0 <= r["strict"] <= 1.0 and 0.0 <= r["partial"] <= 1.0 for r in table)
