"""Inference-time selection on a token policy at equal samples: plain sampling, reward best-of-N,
self-certainty best-of-N, Borda voting (p = 0.5 and p = 0, a majority vote) and chunked SVDD-PM.

Default: the tiny causal LM (assets/models/tiny-lm) on held-out Shapes QA questions (tiers 1-5),
scored by the exact-answer rule (the text between <answer> tags equals the gold answer). Every
selection method sees the same N sampled responses per condition (one rollout per seed, shared):

- plain: the mean accuracy of those N samples (the expected accuracy of one sample);
- reward best-of-N: the verifier picks (an oracle: it is the scoring rule, so this is pass@N);
- self-certainty best-of-N and Borda: no reward; one extra teacher-forced scoring pass per sample;
- SVDD-PM: M candidates per chunk of k tokens, valued by the verifier on their greedy completions.

Compute is counted in decoded tokens per condition (sampled tokens, exactly; for SVDD-PM plus
the greedy completions, counted as at most T − step tokens per running candidate), with reward
calls and scoring passes beside it. SVDD-PM's defaults (M = 3, k = 2 against N = 8) put its
token count in the range of the N samples'; the table prints the measured counts side by side.

    python benchmarks/token_guidance.py                               # 64 conditions, N = 8, 3 seeds
    python benchmarks/token_guidance.py --conditions 4 --seeds 0 --n 4 --out /tmp/tg   # smoke
    python benchmarks/token_guidance.py --policy-config configs/sample/text_self_certainty.yaml

``--policy-config`` takes a `genalign sample` YAML config: its policy, policy_type,
policy_options and prompt_source are used (so a VLM config with a Shapes VQA source plugs in
unchanged). Prints a table and writes summary.json to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from genalign.evaluation import SampleConfig, load_policy
from genalign.guidance import ComputeCounter, PMValue, svdd_sample
from genalign.guidance.self_certainty import (
    borda_select,
    most_certain,
    self_certainty,
    tagged_answer,
)
from genalign.toyworld.text_qa import ShapesQAPrompts
from rewards.rules import RuleConfig, RuleVerifier

METHODS = ("plain", "reward best-of-N", "self-certainty best-of-N", "Borda p=0.5", "Borda p=0 (majority)", "SVDD-PM")


def group_of(cond: dict) -> str:
    """The breakdown a condition belongs to: its format (VQA) or tier (QA)."""
    if "format" in cond:
        return f"{cond['format']}/{cond.get('split', '')}".rstrip("/")
    return f"tier {cond.get('tier', '?')}"


def run_seed(policy, conds, seed, args, reward, answer_fn) -> dict:
    n, per_call = args.n, max(1, args.batch // args.n)
    correct, certainty, answers, tokens = [], [], [], 0
    t0 = time.perf_counter()
    for i in range(0, len(conds), per_call):
        chunk = conds[i : i + per_call]
        seeds = [seed * 1_000_003 + (i + c) * n + j for c in range(len(chunk)) for j in range(n)]
        traj = policy.rollout(chunk, n, seeds)
        tokens += int(traj.mask.sum())
        correct.append(reward(traj.outputs, traj.conditions).scores.view(len(chunk), n))
        certainty.append(self_certainty(policy, traj).view(len(chunk), n))
        answers += [[answer_fn(str(traj.outputs[c * n + j])) for j in range(n)] for c in range(len(chunk))]
    sample_s = time.perf_counter() - t0
    correct_t, sc = torch.cat(correct), torch.cat(certainty)  # [C, N]
    rows = torch.arange(len(conds))
    picks = {
        "plain": correct_t.mean(1),
        "reward best-of-N": correct_t.max(1).values,
        "self-certainty best-of-N": correct_t[rows, most_certain(sc)],
        "Borda p=0.5": correct_t[rows, borda_select(sc, answers, 0.5)[0]],
        "Borda p=0 (majority)": correct_t[rows, borda_select(sc, answers, 0.0)[0]],
    }
    c_n = len(conds)
    compute = {m: {"tokens": tokens / c_n, "reward_calls": 0.0, "scoring_passes": float(n)} for m in picks}
    compute["plain"] = {"tokens": tokens / c_n / n, "reward_calls": 0.0, "scoring_passes": 0.0}
    compute["reward best-of-N"] = {"tokens": tokens / c_n, "reward_calls": float(n), "scoring_passes": 0.0}
    counter = ComputeCounter()
    svdd_ok = []
    for i in range(0, len(conds), max(1, args.batch // args.svdd_candidates)):
        chunk = conds[i : i + max(1, args.batch // args.svdd_candidates)]
        out = svdd_sample(policy, chunk, 1, [seed * 1_000_003 + 999_983 + i + c for c in range(len(chunk))],
                          PMValue(policy, reward, counter), args.svdd_candidates, 0.0, counter, chunk=args.chunk)
        svdd_ok.append(reward(out.outputs, out.conditions).scores)
    picks["SVDD-PM"] = torch.cat(svdd_ok)
    compute["SVDD-PM"] = {"tokens": counter.model_evals / c_n, "reward_calls": counter.reward_calls / c_n, "scoring_passes": 0.0}
    groups = sorted({group_of(c) for c in conds})
    result = {}
    for m, ok in picks.items():
        by_group = {g: float(ok[[i for i, c in enumerate(conds) if group_of(c) == g]].mean()) for g in groups}
        result[m] = {"accuracy": float(ok.float().mean()), "groups": by_group, **compute[m]}
    result["_seconds"] = {"sampling": sample_s, "total": time.perf_counter() - t0}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--policy-config", default="", help="a `genalign sample` YAML config: its policy, policy_type, policy_options and prompt_source")
    ap.add_argument("--policy", default="assets/models/tiny-lm", help="policy location (without --policy-config)")
    ap.add_argument("--policy-type", default="text_lm", help="policy type of a bare model folder")
    ap.add_argument("--max-new-tokens", type=int, default=8, help="response horizon T (without --policy-config)")
    ap.add_argument("--conditions", type=int, default=64, help="held-out conditions (spread over the source's tiers)")
    ap.add_argument("--n", type=int, default=8, help="N sampled responses per condition for the best-of-N family")
    ap.add_argument("--svdd-candidates", type=int, default=3, help="SVDD-PM: M candidates per decision")
    ap.add_argument("--chunk", type=int, default=2, help="SVDD-PM: tokens per decision")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--batch", type=int, default=64, help="rows per rollout call")
    ap.add_argument("--out", default="benchmarks/results/token_guidance")
    args = ap.parse_args()

    if args.policy_config:
        from genalign.configs import load_config

        cfg = load_config(SampleConfig, args.policy_config)
        policy = load_policy(cfg.policy, policy_type=cfg.policy_type, options=cfg.policy_options)
        args.policy, args.policy_type = cfg.policy, cfg.policy_type  # recorded in summary.json as used
        args.max_new_tokens = cfg.policy_options.get("max_new_tokens", args.max_new_tokens)
        source = cfg.prompt_source or ShapesQAPrompts(eval_split="heldout")
        answer_fn = tagged_answer(cfg.answer_pattern)
    else:
        policy = load_policy(args.policy, policy_type=args.policy_type, options={"max_new_tokens": args.max_new_tokens})
        source, answer_fn = ShapesQAPrompts(eval_split="heldout"), tagged_answer()
    if getattr(policy, "log_prob_unit", None) != "token":
        raise SystemExit("token_guidance needs a token policy (log_prob_unit 'token')")
    conds = list(source.evaluation(args.conditions))
    reward = RuleVerifier(RuleConfig(rule="exact"))
    per_seed = {}
    for seed in args.seeds:
        per_seed[seed] = run_seed(policy, conds, seed, args, reward, answer_fn)
        print(f"seed {seed}: " + ", ".join(f"{m} {per_seed[seed][m]['accuracy']:.3f}" for m in METHODS), flush=True)
    table = []
    for m in METHODS:
        accs = [per_seed[s][m]["accuracy"] for s in args.seeds]
        table.append({"method": m, "accuracy": statistics.mean(accs), "sd": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                      **{k: statistics.mean(per_seed[s][m][k] for s in args.seeds) for k in ("tokens", "reward_calls", "scoring_passes")}})
    print(f"\n{len(conds)} conditions, N = {args.n}, SVDD-PM M = {args.svdd_candidates}, chunk = {args.chunk}, seeds {args.seeds}")
    print("| method | accuracy | ± sd (seeds) | tokens / cond. | reward calls / cond. | scoring passes / cond. |")
    print("|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['method']} | {r['accuracy']:.3f} | {r['sd']:.3f} | {r['tokens']:.1f} | {r['reward_calls']:.1f} | {r['scoring_passes']:.1f} |")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump({"args": vars(args), "conditions": len(conds), "table": table,
                   "per_seed": {str(s): v for s, v in per_seed.items()}}, f, indent=2)
    print(f"wrote {os.path.join(args.out, 'summary.json')}")


if __name__ == "__main__":
    main()
