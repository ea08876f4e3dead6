"""What a new user meets first: config overrides and prompt checks, progress output, `genalign list`,
the Python entry, the report, `genalign eval` / `sample` on run folders, and finished runs."""

import io
import json
import os
import re

import pytest
import yaml

from genalign.cli import main
from genalign.configs import ConfigError, load_config
from genalign.train_config import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIST_BASE = {
    "policy": {"type": "stable_diffusion", "pretrained": "org/model"},
    "prompts": {"source": "list", "prompts": ["a red circle", "a blue square"]},
}


def _write(tmp_path, data, name="c.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_prompt_source_switches_by_override(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load_config(TrainConfig, "configs/quickstart.yaml", ["prompts.source=list", "prompts.prompts=[a red circle]"])
    assert cfg.prompts.source == "list" and cfg.prompts.prompts == ["a red circle"]
    cfg = load_config(TrainConfig, _write(tmp_path, LIST_BASE), ["prompts.source=shapes_world", "prompts.tiers=[3,5]"])
    assert cfg.prompts.source == "shapes_world" and cfg.prompts.tiers == [3, 5]
    with pytest.raises(ConfigError, match=r"unknown key 'prompts\.tierz'"):  # a wrong key still names itself
        load_config(TrainConfig, _write(tmp_path, LIST_BASE), ["prompts.source=shapes_world", "prompts.tierz=[3]"])
    with pytest.raises(ConfigError, match=r"unknown key 'prompts\.tiers'"):  # no switch: the list source has no tiers
        load_config(TrainConfig, _write(tmp_path, LIST_BASE), ["prompts.tiers=[3]"])


def test_prompt_outside_the_grammar_fails_with_the_config(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError, match=r"'prompts\.prompts\.1' is not a Shapes World prompt.*'a red dog'.*'dog'"):
        load_config(TrainConfig, "configs/quickstart.yaml", ["prompts.source=list", "prompts.prompts=[a red circle, a red dog]"])
    out = tmp_path / "run"
    assert main(["train", "configs/quickstart.yaml", "prompts.source=list", "prompts.prompts=[a red dog]",
                 f"output_dir={out}", "--dry-run"]) == 2
    assert not out.exists()
    # rewards that do not read prompts as scenes accept any prompt
    load_config(TrainConfig, _write(tmp_path, {**LIST_BASE, "prompts": {"source": "list", "prompts": ["a red dog"]}}))


def test_progress_off_a_terminal_prints_plain_lines():
    from genalign.progress import progress

    stream = io.StringIO()  # not a TTY
    bar = progress(range(100), desc="epochs", file=stream)
    for i in bar:
        bar.set_postfix(reward=f"{i / 100:.2f}")
    text = stream.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert len(lines) == 10  # every 10%
    assert lines[-1].startswith("epochs: 100/100 (100%)") and lines[-1].endswith("reward=0.99")
    quiet = io.StringIO()
    assert list(progress(range(5), desc="inner", leave=False, file=quiet)) == list(range(5))
    assert quiet.getvalue() == ""


def test_list_prints_every_registered_name(capsys):
    from genalign.algorithms import ALGORITHMS
    from genalign.policies import POLICIES
    from rewards.registry import REWARDS

    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name in [*POLICIES, *ALGORITHMS, *REWARDS, "best_of_n", "svdd_pm", "svdd_mc"]:
        line = next(line for line in lines if line.split()[:1] == [name])
        assert len(line.split(maxsplit=1)[1]) > 10, line  # a help text, not just the name
    assert "DDPO" in next(line for line in lines if line.split()[:1] == ["ddpo"])


def test_quickstart_eval_separates_training_pool_from_never_trained(monkeypatch):
    from genalign.toyworld import all_prompts

    monkeypatch.chdir(ROOT)
    p = load_config(TrainConfig, "configs/quickstart.yaml").prompts
    sets = p.eval_sets(48)
    assert list(sets) == ["tier 5 (training pool)", "tier 5 (never trained)"]
    pool = set(p.pool(5))
    trained = {q for seed in range(50) for q in p.sample(8, seed)}  # what training actually draws
    assert trained == pool and len(pool) == 8
    assert set(sets["tier 5 (training pool)"]) == pool
    assert set(sets["tier 5 (never trained)"]) == set(all_prompts(5, "heldout")) - pool
    assert (len(sets["tier 5 (training pool)"]), len(sets["tier 5 (never trained)"])) == (32, 16)  # 256 + 128 samples
    # a pool drawn from another split, or fresh draws, leave the tier whole
    assert list(load_config(TrainConfig, "configs/quickstart.yaml", ["prompts.split=train"]).prompts.eval_sets(4)) == ["tier 5"]
    assert list(load_config(TrainConfig, "configs/quickstart.yaml", ["prompts.pool_size=0"]).prompts.eval_sets(4)) == ["tier 5"]


def test_eval_and_sample_refuse_folders_that_hold_no_policy(tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    assert main(["eval", str(tmp_path / "notes")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "neither a policy" in err and "notes" in err
    assert main(["sample", str(tmp_path / "notes"), "--prompt", "a red circle", "--reward", "none",
                 "--out", str(tmp_path / "s")]) == 2
    assert "neither a policy" in capsys.readouterr().err


def test_sample_refuses_to_overwrite_and_says_where_it_wrote(tiny_sd_dir, tmp_path, capsys):
    out = tmp_path / "s"
    args = ["sample", tiny_sd_dir, "--prompt", "a red circle", "--n", "1", "--steps", "2", "--reward", "none", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"wrote 1 samples to {out}/" in printed and "2 steps" in printed
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--overwrite" in err
    assert main([*args, "--overwrite"]) == 0


def _small_run(tiny_sd_dir, tmp_path):
    data = {
        "output_dir": str(tmp_path / "run"),
        "policy": {"type": "stable_diffusion", "pretrained": tiny_sd_dir, "num_steps": 2},
        "algorithm": {"name": "ddpo"},
        "reward": {"components": [{"type": "shapes_verifier", "path": os.path.join(ROOT, "assets/models/shapes-verifier"),
                                   "score": "partial"}]},
        "prompts": {"source": "list", "prompts": ["a red circle", "two blue squares", "a green triangle"]},
        "train": {"epochs": 3, "prompts_per_epoch": 2, "samples_per_prompt": 2, "rollout_batch_size": 4, "train_batch_size": 4},
        "eval": {"prompts_per_set": 3, "samples_per_prompt": 2},
        "report": {"num_prompts": 2, "seeds": [0, 1]},
    }
    return _write(tmp_path, data)


def test_python_entry_report_eval_and_finished_resume(tiny_sd_dir, tmp_path, capsys):
    import genalign

    path = _small_run(tiny_sd_dir, tmp_path)
    run = tmp_path / "run"
    history = genalign.train(path, overrides=["train.epochs=1"], resume=False)  # a YAML path with overrides
    assert [h["epoch"] for h in history] == [1]
    printed = capsys.readouterr().out
    assert re.search(r"eval before training: eval: reward \d\.\d{3}, strict \d\.\d{3}, partial \d\.\d{3}", printed)

    # the report leads with the named eval metrics; its grid is the eval prompts at their eval seeds, labelled
    page = (run / "report.html").read_text()
    evals = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    before, after = evals[0], evals[-1]
    assert page.index("strict: before → after") < page.index("Samples before and after") < page.index("<details>")
    assert f"{before['shapes_verifier/strict']:.3f} ± {before['shapes_verifier/strict_se']:.3f} → " \
           f"{after['shapes_verifier/strict']:.3f}" in page
    assert re.search(r"<details><summary>Metrics per epoch.*</details>\s*<details><summary>Config", page, re.S)
    grids = json.loads((run / "grids.json").read_text())
    assert grids["before"]["prompts"] == ["a red circle", "two blue squares"] and grids["before"]["seeds"] == [1000, 1001]
    cells = [c for row in grids["after"]["cells"] for c in row]
    assert all(c["strict"] in (0.0, 1.0) and 0.0 <= c["partial"] <= 1.0 for c in cells)
    assert page.count("✓ pass") + page.count("✗ fail") == 2 * len(cells)
    # the grid shows the evaluated samples: its mean equals the eval of the same prompts and seeds
    from genalign.evaluation import load_policy, sample_and_score
    from rewards.shapes_verifier import ShapesVerifierReward

    verifier = ShapesVerifierReward.from_pretrained(os.path.join(ROOT, "assets/models/shapes-verifier"), score="partial")
    _, out = sample_and_score(load_policy(str(run)), grids["after"]["prompts"], 2, 1000, verifier)
    assert out.components["strict"].tolist() == [c["strict"] for c in cells]

    # continuing needs resume=True, and the error says so in Python's words
    with pytest.raises(FileExistsError, match=r"resume=True"):
        genalign.train(path, overrides=["train.epochs=1"])
    # resuming a finished run changes nothing
    stamp = {name: (run / name).stat().st_mtime_ns for name in ("report.html", "final/genalign_policy.json")}
    capsys.readouterr()
    assert [h["epoch"] for h in genalign.train(path, overrides=["train.epochs=1"], resume=True)] == [1]
    assert "is finished" in capsys.readouterr().out
    assert stamp == {name: (run / name).stat().st_mtime_ns for name in stamp}

    # `genalign eval` takes the run directory (its final/) and prints the sampler settings it uses
    assert main(["eval", str(run), "--tiers", "1", "--prompts-per-tier", "1", "--n", "1", "--verifier",
                 os.path.join(ROOT, "assets/models/shapes-verifier")]) == 0
    printed = capsys.readouterr().out
    assert f"{run / 'final'}: 2 steps, guidance 5.0, eta 1.0; seed 0 per prompt" in printed


def test_reward_band_stays_within_the_reward_range(tmp_path, monkeypatch):
    import matplotlib.axes
    import numpy as np

    from genalign.report import plot_curves
    from genalign.run_report import reward_bounds
    from rewards.registry import ShapesVerifierConfig

    bands = []
    monkeypatch.setattr(matplotlib.axes.Axes, "fill_between", lambda self, x, lo, hi, **kw: bands.append((lo, hi)))
    history = [{"reward_queries": 8 * i, "reward_mean": m, "reward_std": 0.3} for i, m in enumerate([0.1, 0.5, 0.9])]
    bounds = reward_bounds([ShapesVerifierConfig(path=".", weight=2.0)])
    assert bounds == (0.0, 2.0)
    plot_curves(history, str(tmp_path / "c.png"), bounds=(0.0, 1.0))
    lo, hi = bands[-1]
    np.testing.assert_allclose(lo, [0.0, 0.2, 0.6], atol=1e-12)
    np.testing.assert_allclose(hi, [0.4, 0.8, 1.0], atol=1e-12)
