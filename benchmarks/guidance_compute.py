"""Reward-guided sampling at equal compute: plain sampling, best-of-N and SVDD-PM on Shapes World.

For held-out Shapes World prompts, each method produces one output per prompt per seed; we
record the verifier's reward (partial credit, which also guides) and strict accuracy of those
outputs, and the compute spent: policy model evaluations (rows × steps, plus the x̂0
predictions of SVDD-PM), reward calls, decoder calls and wall time. Best-of-N guides with the
same reward it is scored by, as does SVDD-PM — the question is which spends compute better.

    python benchmarks/guidance_compute.py                          # 3 seeds, defaults below
    python benchmarks/guidance_compute.py --seeds 0 --prompts 8    # a quick look

Prints a table and writes summary.json and compute.png to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from genalign.evaluation import load_policy  # noqa: E402
from genalign.guidance import ComputeCounter, PMValue, best_of_n, svdd_sample  # noqa: E402
from genalign.guidance.value_model import MCValue, ValueNet  # noqa: E402
from genalign.toyworld import sample_prompts  # noqa: E402
from rewards.shapes_verifier import ShapesVerifierReward  # noqa: E402


def run_method(policy, guide, verifier, prompts, seed, method, k, value_net=None) -> dict:
    counter = ComputeCounter()
    t0 = time.perf_counter()
    base = [seed * 1_000_003 + i * 1009 for i in range(len(prompts))]
    if method == "best_of_n":
        chosen, _ = best_of_n(policy, prompts, k, [b * 64 + j for b in base for j in range(k)], guide, counter)
        outputs, conds = chosen.outputs, chosen.conditions
    else:
        value = MCValue(value_net, counter) if method == "svdd_mc" else PMValue(policy, guide, counter)
        traj = svdd_sample(policy, prompts, 1, base, value, num_candidates=k, counter=counter)
        outputs, conds = traj.outputs, traj.conditions
    wall = time.perf_counter() - t0
    scored = verifier(outputs, conds)
    return {"method": method, "k": k, "seed": seed, "reward": float(scored.components["partial"].mean()),
            "strict": float(scored.components["strict"].mean()), "model_evals": counter.model_evals / len(prompts),
            "reward_calls": counter.reward_calls / len(prompts), "decoder_calls": counter.decoder_calls / len(prompts),
            "wall_seconds": wall / len(prompts)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", default="assets/models/tiny-sd")
    ap.add_argument("--verifier", default="assets/models/shapes-verifier")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--tiers", type=int, nargs="+", default=[3, 4, 5])
    ap.add_argument("--prompts", type=int, default=8, help="held-out prompts per tier")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--best-of", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--svdd-m", type=int, nargs="+", default=[2, 4, 8, 12, 20])
    ap.add_argument("--value-model", default="", help="a `genalign value` directory: adds SVDD-MC with the same M values")
    ap.add_argument("--out", default="benchmarks/results/guidance")
    args = ap.parse_args(argv)

    torch.set_grad_enabled(False)
    policy = load_policy(args.policy, args.steps)
    verifier = ShapesVerifierReward.from_pretrained(args.verifier, score="partial")
    value_net = ValueNet.load(args.value_model) if args.value_model else None
    prompts = [p for t in args.tiers for p in sample_prompts(t, args.prompts, "heldout", seed=777)]
    rows = []
    for seed in args.seeds:
        for n in args.best_of:
            rows.append(run_method(policy, verifier, verifier, prompts, seed, "best_of_n", n))
            print(json.dumps(rows[-1]), flush=True)
        for m in args.svdd_m:
            rows.append(run_method(policy, verifier, verifier, prompts, seed, "svdd_pm", m))
            print(json.dumps(rows[-1]), flush=True)
            if value_net is not None:
                rows.append(run_method(policy, verifier, verifier, prompts, seed, "svdd_mc", m, value_net))
                print(json.dumps(rows[-1]), flush=True)

    table = []
    methods = [("best_of_n", args.best_of), ("svdd_pm", args.svdd_m)] + ([("svdd_mc", args.svdd_m)] if value_net else [])
    for method, ks in methods:
        for k in ks:
            sel = [r for r in rows if r["method"] == method and r["k"] == k]
            agg = {"method": "plain" if method == "best_of_n" and k == 1 else method, "k": k}
            for key in ("reward", "strict", "model_evals", "reward_calls", "decoder_calls", "wall_seconds"):
                xs = [r[key] for r in sel]
                agg[key] = (statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)
            table.append(agg)

    print(f"\n{len(prompts)} held-out prompts (tiers {args.tiers}), {args.steps} steps, seeds {args.seeds}; per output image")
    print("| method | N or M | model evals | reward calls | wall s | reward (partial) | strict |")
    print("|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['method']} | {r['k']} | {r['model_evals'][0]:.0f} | {r['reward_calls'][0]:.0f} | {r['wall_seconds'][0]:.4f} | "
              f"{r['reward'][0]:.3f} ± {r['reward'][1]:.3f} | {r['strict'][0]:.3f} ± {r['strict'][1]:.3f} |")

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump({"args": vars(args), "prompts": prompts, "table": table, "rows": rows}, f, indent=2)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    for ax, xkey, xlabel in ((axes[0], "model_evals", "policy model evaluations per image"), (axes[1], "wall_seconds", "wall seconds per image")):
        for method, label in (("best_of_n", "best-of-N (N=1: plain)"), ("svdd_pm", "SVDD-PM"), ("svdd_mc", "SVDD-MC")):
            sel = [r for r in table if r["method"] == method or (method == "best_of_n" and r["method"] == "plain")]
            if not sel:
                continue
            ax.errorbar([r[xkey][0] for r in sel], [r["strict"][0] for r in sel], yerr=[r["strict"][1] for r in sel],
                        marker="o", capsize=3, label=label)
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("strict accuracy (held-out)")
        ax.legend(fontsize=8)
    fig.suptitle(f"Shapes World held-out, mean ± std over seeds {args.seeds}", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "compute.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
