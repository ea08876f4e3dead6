"""Flow-GRPO on the tiny flow model against DDPO on tiny-sd, at equal reward queries.

Two jobs, three seeds each, both trained on the same Shapes World prompts with the same
verifier reward and evaluated on the same held-out prompts with the same sampling seeds:

- **Flow-GRPO**: ``configs/flow_grpo.yaml`` as shipped (the GRPO algorithm on the flow policy's
  SDE kernel, ``assets/models/tiny-flow``);
- **DDPO**: ``configs/quickstart.yaml`` (noise windows on tiny-sd, its own optimiser settings)
  with the flow config's ``prompts``, ``reward`` and ``eval`` sections and its epochs, prompts and
  samples per epoch, so the two jobs draw the same conditions and make the same number of reward
  queries.

Each run's ``eval.jsonl`` gives strict (and partial) accuracy per evaluation set before training
(epoch 0, the base model) and after. Every run is a subprocess, so its wall time and peak resident
memory are its own. Prints a markdown table (mean ± std over seeds) and writes results.json and
accuracy.png; finished runs in --out are read, not repeated.

    python benchmarks/flow_grpo.py                                  # seeds 0 1 2
    python benchmarks/flow_grpo.py --seeds 0 --epochs 2 --out /tmp/flow_bench   # smoke
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import matplotlib
import yaml

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from worker_runs import mean_std, peak_rss_mb, run_cells, train_once  # noqa: E402

FLOW_CONFIG = "configs/flow_grpo.yaml"
DDPO_CONFIG = "configs/quickstart.yaml"
METHODS = ("Flow-GRPO", "DDPO")
SHARED = ("prompts", "reward", "eval")  # sections the DDPO job takes from the flow config
QUERIES = ("epochs", "prompts_per_epoch", "samples_per_prompt", "rollout_batch_size")  # and these train keys


def run_config(method: str, seed: int, epochs: int | None, run_dir: str) -> dict:
    with open(FLOW_CONFIG) as f:
        flow = yaml.safe_load(f)
    if method == "Flow-GRPO":
        cfg = copy.deepcopy(flow)
    else:
        with open(DDPO_CONFIG) as f:
            cfg = yaml.safe_load(f)
        cfg.update({k: copy.deepcopy(flow[k]) for k in SHARED})
        cfg["train"].update({k: flow["train"][k] for k in QUERIES})
    cfg.update(seed=seed, output_dir=run_dir)
    cfg["report"] = {"enabled": False}
    cfg["train"]["checkpoint_every"] = 0
    if epochs:
        cfg["train"]["epochs"] = epochs
    return cfg


def read_eval(run_dir: str) -> dict[str, dict[str, dict]]:
    """{set: {"before": row, "after": row}} from a run's eval.jsonl."""
    with open(os.path.join(run_dir, "eval.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    last = max(r["epoch"] for r in rows)
    out: dict[str, dict[str, dict]] = {}
    for r in rows:
        if r["epoch"] in (0, last):
            out.setdefault(r["set"], {})["before" if r["epoch"] == 0 else "after"] = r
    return out


def one_run(method: str, seed: int, epochs: int | None, out: str) -> dict:
    run_dir = os.path.join(out, "runs", f"{method.lower()}_seed{seed}")
    t0 = time.monotonic()
    history = train_once(run_config(method, seed, epochs, run_dir), run_dir)
    return {"method": method, "seed": seed, "eval": read_eval(run_dir), "total_s": round(time.monotonic() - t0, 1),
            "train_s": round(history[-1].get("train_seconds", 0.0), 1),
            "reward_queries": max(h.get("reward_queries", 0) for h in history), "peak_rss_mb": peak_rss_mb(),
            "reward_curve": [h.get("reward_mean") for h in history]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=None, help="training epochs per run (default: the flow config's)")
    ap.add_argument("--methods", nargs="*", default=list(METHODS), help="subset of " + ", ".join(METHODS))
    ap.add_argument("--metric", default="shapes_verifier/strict", help="eval.jsonl column of the table")
    ap.add_argument("--out", default="benchmarks/results/flow_grpo")
    ap.add_argument("--one", nargs=2, metavar=("METHOD", "SEED"), help=argparse.SUPPRESS)  # a worker run
    args = ap.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(one_run(args.one[0], int(args.one[1]), args.epochs, args.out)))
        return 0
    os.makedirs(args.out, exist_ok=True)

    def worker(method: str, seed: int) -> list[str]:
        cmd = [sys.executable, __file__, "--one", method, str(seed), "--out", args.out]
        return cmd + (["--epochs", str(args.epochs)] if args.epochs else [])

    results = run_cells(os.path.join(args.out, "results.json"), args.methods, args.seeds, worker, vars(args),
                        lambda r: f"{r['total_s']:.0f} s")
    runs = [r for r in results["runs"].values() if r["method"] in args.methods and r["seed"] in args.seeds]
    sets = list(runs[0]["eval"])
    m = args.metric
    lines = [f"\n{m} on the evaluation sets, before → after (mean ± std over seeds {args.seeds})\n",
             "| method | " + " | ".join(sets) + " | reward queries | train wall s | peak RSS MB |",
             "|---" * (len(sets) + 4) + "|"]
    for method in args.methods:
        rs = [r for r in runs if r["method"] == method]
        cells = [f"{mean_std([r['eval'][s]['before'][m] for r in rs])} → **{mean_std([r['eval'][s]['after'][m] for r in rs])}**"
                 for s in sets]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {rs[0]['reward_queries']} | "
                     f"{statistics.mean(r['train_s'] for r in rs):.0f} | {max(r['peak_rss_mb'] for r in rs):.0f} |")
    lines += ["\nGain (after − before) per seed\n", "| method | " + " | ".join(sets) + " |", "|---" * (len(sets) + 1) + "|"]
    for method in args.methods:
        rs = [r for r in runs if r["method"] == method]
        lines.append(f"| {method} | " + " | ".join(
            mean_std([r["eval"][s]["after"][m] - r["eval"][s]["before"][m] for r in rs]) for s in sets) + " |")
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(args.out, "tables.md"), "w") as f:
        f.write(table + "\n")

    fig, ax = plt.subplots(figsize=(7, 3.4))
    width = 0.2
    for i, method in enumerate(args.methods):
        rs = [r for r in runs if r["method"] == method]
        for j, when in enumerate(("before", "after")):
            ys = [statistics.mean(r["eval"][s][when][m] for r in rs) for s in sets]
            es = [statistics.stdev(r["eval"][s][when][m] for r in rs) if len(rs) > 1 else 0.0 for s in sets]
            ax.bar([k + (2 * i + j) * width for k in range(len(sets))], ys, width, yerr=es, capsize=2,
                   label=f"{method} {when}", alpha=0.55 if when == "before" else 1.0)
    ax.set_xticks([k + 1.5 * width for k in range(len(sets))], sets, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel(m)
    ax.set_title("Flow-GRPO (tiny-flow) vs DDPO (tiny-sd), equal reward queries")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "accuracy.png"), dpi=110)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
