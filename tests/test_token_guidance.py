"""Guidance on token policies: chunked SVDD-PM, and `genalign sample` writing texts."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import yaml

from genalign.cli import main
from genalign.guidance import ComputeCounter, PMValue, svdd_sample
from genalign.guidance.self_certainty import borda_vote, self_certainty_best_of_n, tagged_answer
from genalign.guidance.svdd import _derived_seed
from genalign.policies import StableDiffusionPolicy, StableDiffusionPolicyConfig
from genalign.policies.text_lm import TextLMPolicy, TextLMPolicyConfig
from rewards.base import RewardOutput

CONDS = ["w01 w02", "w05"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Words:
    """Hand-built text reward: the number of words (differs between most responses)."""

    def __call__(self, outputs, conditions):
        s = torch.tensor([float(len(str(o).split())) for o in outputs])
        return RewardOutput(scores=s, components={"words": s})


@pytest.fixture(scope="module")
def policy(tiny_lm_dir):
    return TextLMPolicy.from_pretrained(tiny_lm_dir, TextLMPolicyConfig(max_new_tokens=6))


@pytest.mark.parametrize("chunk", [1, 4])
def test_one_candidate_is_plain_sampling_and_counts_tokens(policy, chunk):
    """M = 1: any chunk gives the rollout of the same seeds, and the model evaluations are exactly
    the tokens sampled (a finished row decodes nothing)."""
    seeds = [0, 1, 2, 3]
    counter = ComputeCounter()
    out = svdd_sample(policy, CONDS, 2, seeds, PMValue(policy, Words(), counter), num_candidates=1, counter=counter, chunk=chunk)
    plain = policy.rollout(CONDS, 2, seeds)
    assert out.outputs == plain.outputs
    assert counter.model_evals == int(plain.mask.sum()) and counter.reward_calls == 0


def test_chunk_over_the_whole_response_is_best_of_m(policy):
    """chunk = T: one decision among M finished responses, valued by their own reward: the
    chosen response is the argmax (first on ties) over candidate 0 (the row's own stream) and
    candidates 1..M-1 (streams derived from the row's seed), with no greedy completion spent."""
    m, seeds = 3, [5, 6]
    counter = ComputeCounter()
    out = svdd_sample(policy, CONDS, 1, seeds, PMValue(policy, Words(), counter), m, counter=counter, chunk=6)
    cands = [policy.rollout(CONDS, 1, seeds)] + [
        policy.rollout(CONDS, 1, [torch.Generator().manual_seed(_derived_seed(s, j)) for s in seeds]) for j in range(1, m)
    ]
    for b in range(2):
        texts = [c.outputs[b] for c in cands]
        scores = [len(t.split()) for t in texts]
        assert out.outputs[b] == texts[scores.index(max(scores))]
    assert counter.reward_calls == 2 * m and counter.decoder_calls == 2 * m


def test_chunks_value_greedy_completions(policy):
    """chunk = 2 of T = 6: at most 3 decisions, each valuing B * M candidates by the reward of
    their greedy completion (predict_final), never worse than the row's own candidate's value."""
    m, seeds = 3, [7, 8]
    counter = ComputeCounter()
    calls = []

    class Spy(PMValue):
        def __call__(self, traj, step):
            v = super().__call__(traj, step)
            calls.append((step, v.view(-1, m)))
            return v

    out = svdd_sample(policy, CONDS, 1, seeds, Spy(policy, Words(), counter), m, counter=counter, chunk=2)
    assert [s for s, _ in calls] == [2, 4, 6][: len(calls)] and counter.reward_calls == 2 * m * len(calls)
    final = Words()(out.outputs, CONDS).scores
    last = calls[-1][1]  # the last decision's values are the chosen rows' rewards (greedy = sample by then) or better
    assert bool((last.max(1).values >= last[:, 0]).all())
    assert final.shape == (2,) and out.group.tolist() == [0, 1]


def test_chunked_svdd_on_diffusion_values_every_k_steps(tiny_sd_dir):
    """The chunk is protocol-general: M = 1 reproduces the rollout; M = 2, chunk = 2 of 4 steps
    values 2 times per row and candidate."""
    policy = StableDiffusionPolicy.from_pretrained(tiny_sd_dir, StableDiffusionPolicyConfig(pretrained=tiny_sd_dir, num_steps=4))

    class Brightness:
        def __call__(self, outputs, conditions):
            s = outputs.float().flatten(1).mean(1)
            return RewardOutput(scores=s, components={})

    plain = policy.rollout(["a red circle"], 1, [torch.Generator().manual_seed(3)])
    one = svdd_sample(policy, ["a red circle"], 1, [3], PMValue(policy, Brightness()), num_candidates=1, chunk=2)
    torch.testing.assert_close(one.outputs, plain.outputs, rtol=0, atol=0)
    counter = ComputeCounter()
    svdd_sample(policy, ["a red circle"], 1, [3], PMValue(policy, Brightness(), counter), num_candidates=2, counter=counter, chunk=2)
    assert counter.reward_calls == 2 * 2 and counter.model_evals == 2 * 4 + 2  # 4 steps of 2 candidates + one x̂0
    with pytest.raises(ValueError, match="chunk"):
        svdd_sample(policy, ["a red circle"], 1, [3], PMValue(policy, Brightness()), chunk=0)


def test_sample_command_writes_texts(tiny_lm_dir, policy, tmp_path, capsys):
    """`genalign sample` on a bare causal LM folder: self-certainty best-of-N output j is the most
    certain of the N responses seeded (seed + j) * N + i, written with its scores as JSONL."""
    out = tmp_path / "sc"
    assert main(["sample", tiny_lm_dir, "--policy-type", "text_lm", "--prompt", "w01 w02", "--n", "2", "--seed", "4",
                 "--method", "self_certainty", "--candidates", "3", "--reward", "none", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    loaded = TextLMPolicy.from_pretrained(tiny_lm_dir)  # the command's policy: default max_new_tokens
    chosen, sc = self_certainty_best_of_n(loaded, ["w01 w02"] * 2, 3, [s * 3 + i for s in (4, 5) for i in range(3)])
    assert [r["output"] for r in rows] == chosen.outputs
    assert [r["self_certainty"] for r in rows] == pytest.approx(sc.tolist(), abs=1e-5)
    assert [(r["key"], r["prompt"], r["seed"], r["method"]) for r in rows] == [("w01 w02", "w01 w02", s, "self_certainty") for s in (4, 5)]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"] == 2 and summary["reward_calls"] == 0 and summary["scoring_passes"] == 6
    # a bare model folder needs its type; methods that guide need a reward
    capsys.readouterr()
    assert main(["sample", tiny_lm_dir, "--prompt", "w01", "--reward", "none", "--out", str(tmp_path / "o")]) == 2
    assert "policy type" in capsys.readouterr().err
    assert main(["sample", tiny_lm_dir, "--policy-type", "text_lm", "--prompt", "w01", "--method", "svdd_pm",
                 "--out", str(tmp_path / "o")]) == 2  # auto: plain prompts carry no answer -> no reward
    assert "needs a reward" in capsys.readouterr().err


def test_sample_config_with_answers_borda_and_svdd(tiny_lm_dir, tmp_path):
    """Conditions with answers from a prompt source: the exact rule scores the outputs; Borda
    writes the winner's vote share; chunked SVDD-PM runs with the same reward."""
    conds = [{"prompt": "w01 w02", "answer": "w03", "key": "q1"}, {"prompt": "w05", "answer": "w06", "key": "q2"}]
    base = {"policy": tiny_lm_dir, "policy_type": "text_lm", "policy_options": {"max_new_tokens": 4},
            "prompt_source": {"source": "list", "prompts": conds}, "num_prompts": 2, "n": 1, "candidates": 3,
            "answer_pattern": "(w\\d\\d)", "reward": "auto"}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({**base, "method": "borda", "borda_power": 0.0, "out": str(tmp_path / "borda")}))
    assert main(["sample", str(path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "borda" / "samples.jsonl").read_text().splitlines()]
    p = TextLMPolicy.from_pretrained(tiny_lm_dir, TextLMPolicyConfig(max_new_tokens=4))
    for c, row in zip(conds, rows):
        chosen, share = borda_vote(p, [c], 3, [0, 1, 2], tagged_answer("(w\\d\\d)"), power=0.0)
        assert row["output"] == chosen.outputs[0] and row["vote_share"] == pytest.approx(float(share[0]))
        # the exact rule reads <answer> tags, which this vocabulary has none of: format 0, reward 0
        assert row["answer"] == c["answer"] and row["reward"] == 0.0 and row["components"]["format"] == 0.0
    assert main(["sample", str(path), "method=svdd_pm", "chunk=2", f"out={tmp_path / 'svdd'}"]) == 0
    summary = json.loads((tmp_path / "svdd" / "summary.json").read_text())
    assert summary["method"] == "svdd_pm" and summary["chunk"] == 2 and summary["reward_calls"] > 0


def test_shipped_text_config_runs(tmp_path):
    """configs/sample/text_self_certainty.yaml (tiny-lm, Shapes QA held-out), shrunk."""
    cfg = os.path.join(ROOT, "configs", "sample", "text_self_certainty.yaml")
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        assert main(["sample", cfg, "num_prompts=2", "candidates=2", f"out={tmp_path / 'o'}"]) == 0
    finally:
        os.chdir(cwd)
    rows = [json.loads(line) for line in (tmp_path / "o" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["key"].startswith("shapes_qa/") and r["answer"] and "reward" in r for r in rows)


@pytest.mark.parametrize("method", ["self_certainty", "borda", "svdd_pm"])
def test_shipped_vlm_config_runs(tmp_path, monkeypatch, method):
    """configs/sample/vlm_self_certainty.yaml (tiny-vlm, Shapes VQA out-of-domain), shrunk: the
    sample command drives the VLM through the same token-policy path as the text LM."""
    monkeypatch.chdir(ROOT)
    cfg = os.path.join(ROOT, "configs", "sample", "vlm_self_certainty.yaml")
    assert main(["sample", cfg, "num_prompts=3", "candidates=2", f"method={method}", f"out={tmp_path / 'o'}"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "o" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["key"].startswith("shapes_vqa/") and r["method"] == method for r in rows)
    assert all(r["output"].startswith("<answer>") for r in rows)  # tiny-vlm keeps the answer format
    if method != "svdd_pm":
        assert all(math.isfinite(r["self_certainty"]) and r["self_certainty"] > 0 for r in rows)
