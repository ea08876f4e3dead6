"""Evaluation, grids and report.html for a text policy: the same files as for images, with texts."""

from __future__ import annotations

import html
import json

import pytest
import yaml

from genalign.configs import load_config
from genalign.evaluation import (
    SampleConfig,
    load_policy,
    require_image_policy,
    run_sampling,
    sample_and_score,
)
from genalign.report import write_report
from genalign.run_report import grid_prompts, verdict
from genalign.train_config import TrainConfig
from genalign.trainer import train
from rewards.registry import build_reward

WORDS = [f"w{i:02d}" for i in range(32)] + ["<&>"]  # "<&>" checks that responses are HTML-escaped
CONDITIONS = [{"prompt": "w01 w02", "answer": "w03", "tier": 1, "key": "q1"},
              {"prompt": "w04 <&>", "answer": "w05", "tier": 2, "key": "q2"}]


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory, tiny_lm_builder):
    d = tmp_path_factory.mktemp("tiny_lm")
    tiny_lm_builder(d, WORDS)
    return str(d)


def text_config(lm_dir, tmp_path, *extra):
    path = tmp_path / "text.yaml"
    path.write_text(yaml.safe_dump({
        "policy": {"type": "text_lm", "pretrained": lm_dir, "max_new_tokens": 4},
        "prompts": {"source": "list", "prompts": CONDITIONS},
        "reward": {"components": [{"type": "rule", "rule": "exact", "answer_pattern": ""}]},
        "algorithm": {"name": "ddpo"},
        "train": {"epochs": 1, "prompts_per_epoch": 2, "samples_per_prompt": 2, "rollout_batch_size": 4,
                  "train_batch_size": 4, "learning_rate": 1e-2},
        "report": {"num_prompts": 2, "seeds": [0, 1]},
        "eval": {"prompts_per_set": 2, "samples_per_prompt": 2},
        "output_dir": str(tmp_path / "run"),
    }))
    return load_config(TrainConfig, str(path), list(extra))


def test_text_run_writes_eval_grids_and_report(lm_dir, tmp_path):
    train(text_config(lm_dir, tmp_path))
    out = tmp_path / "run"
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["set"], r["prompts"], r["samples"]) for r in evals] == [(0, "eval", 2, 4), (1, "eval", 2, 4)]
    for r in evals:  # the exact rule on the whole response: the reward is its "correct"; any text has the format
        assert r["reward"] == r["rule_exact/correct"] and r["rule_exact/format"] == 1.0 and r["tier"] == [1, 2]
    grids = json.loads((out / "grids.json").read_text())
    assert set(grids) == {"before", "after"}
    page = (out / "report.html").read_text()
    for g in grids.values():
        assert g["prompts"] == ["w01 w02", "w04 <&>"] and g["sets"] == ["eval", "eval"] and g["seeds"] == [1000, 1001]  # eval.seed + report.seeds
        assert "png" not in g and not list(out.glob("samples_*.png")) and not (out / "report_images").exists()
        for i, row in enumerate(g["cells"]):
            assert len(row) == 2
            for j, cell in enumerate(row):
                assert isinstance(cell["text"], str) and "image" not in cell
                assert cell["reward"] == g["rewards"][i][j]
                # the exact rule: reward 1 iff the whole response is the answer
                assert cell["correct"] == cell["reward"] == float(cell["text"].strip() == CONDITIONS[i]["answer"])
                assert html.escape(cell["text"]) in page
    assert html.escape("w04 <&>") in page and "w04 <&>" not in page
    assert "<img src='samples_" not in page and "report_images/" not in page
    # the grid shows the samples evaluation scored: the final policy with the eval seeds gives the "after" texts
    texts, scored = sample_and_score(load_policy(str(out)), CONDITIONS, 2, 1000, build_reward(text_config(lm_dir, tmp_path).reward.components))
    assert texts == [c["text"] for row in grids["after"]["cells"] for c in row]
    assert scored.scores.tolist() == [r for row in grids["after"]["rewards"] for r in row]
    # `genalign eval` scores images: a text policy is refused before it loads; `genalign sample` writes texts
    with pytest.raises(ValueError, match="is a text policy \\(type 'text_lm'\\): `genalign eval` draws and scores images"):
        require_image_policy(str(out), "eval")
    assert run_sampling(SampleConfig(policy=str(out), prompts=["w01"], n=2, reward="none", out=str(tmp_path / "samples"))) == 0
    rows = [json.loads(line) for line in (tmp_path / "samples" / "samples.jsonl").read_text().splitlines()]
    assert [r["output"] for r in rows] == load_policy(str(out)).rollout(["w01"], 2, [0, 1]).outputs


def test_report_renders_text_cells_with_marks(tmp_path):
    cells = [[{"text": "w03", "reward": 1.0, "correct": 1.0, "format": 1.0},
              {"text": "a <b>\nc", "reward": 0.0, "correct": 0.0, "format": 1.0}]]
    grids = {t: {"prompts": ["what <is> it?"], "sets": ["tier 2"], "seeds": [0, 1], "rewards": [[1.0, 0.0]], "cells": cells}
             for t in ("before", "after")}
    evals = [{"epoch": e, "set": "tier 2", "prompts": 1, "samples": 2, "tier": 2, "reward": 0.5, "reward_se": 0.5,
              "rule_exact": 0.5, "rule_exact_se": 0.5, "rule_exact/correct": 0.5 + e / 2, "rule_exact/correct_se": 0.5,
              "rule_exact/format": 1.0, "rule_exact/format_se": 0.0} for e in (0, 1)]
    page = open(write_report(str(tmp_path), "a: 1", [], grids, {}, evals)).read()
    assert page.count("<pre class='response'>w03</pre>") == 2 and page.count("<pre class='response'>a &lt;b&gt;\nc</pre>") == 2
    assert page.count("✓ correct") == 2 and page.count("✗ wrong") == 2 and "before: 1/2 correct" in page
    assert "<td>what &lt;is&gt; it?</td>" in page and "<td>tier 2</td>" in page
    # the headline leads with the rule's components; "tier" is a label, not a metric
    assert "<th>correct: before → after</th><th>format: before → after</th>" in page
    assert "0.500 ± 0.500 → 1.000 ± 0.500 <b>(+0.500)</b>" in page and "<th>tier</th>" not in page


def test_grid_prompts_dedupe_dict_conditions_by_key():
    a, b = {"prompt": "x", "key": "a"}, {"prompt": "y", "key": "b"}
    picks = grid_prompts({"tier 1": [a, dict(a), b], "tier 2": [b]}, 5)
    assert picks == [("tier 1", a), ("tier 2", b), ("tier 1", b)]


def test_verdict_labels_rule_components():
    assert verdict({"rule_exact": 1.0, "rule_exact/correct": 1.0, "rule_exact/format": 1.0}, 1.0) == {
        "reward": 1.0, "correct": 1.0, "format": 1.0}
    assert verdict({"shapes_verifier/strict": 0.0, "shapes_verifier/partial": 0.5}, 0.5) == {
        "reward": 0.5, "strict": 0.0, "partial": 0.5}
