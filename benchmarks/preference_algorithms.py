"""DDPO, D3PO, SePPO and B²-DiffuRL side by side on Shapes World, at the same sample budget.

Every algorithm runs from its config in configs/ with the same epochs, prompts per epoch and
samples per prompt, so each one draws the same number of samples (and, except SePPO, which
trains without a reward, makes the same number of reward queries). Per algorithm and seed it
records held-out strict accuracy per tier before and after (fixed prompts and sampling seeds),
the reward-vs-queries curve and the training wall time; runs go one after the other on the
same machine, and finished runs are reused when the script is started again.

    python benchmarks/preference_algorithms.py                           # 3 seeds, 20 epochs
    python benchmarks/preference_algorithms.py --seeds 0 --epochs 10     # a quick look

Prints a markdown table and writes summary.json and curves.png to --out (with
``--metric shapes_verifier/partial``: summary_partial.json, re-reading finished runs).
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

from genalign.configs import load_config  # noqa: E402
from genalign.runfiles import run_contents
from genalign.train_config import TrainConfig  # noqa: E402
from genalign.trainer import train  # noqa: E402

#: name -> (config, overrides that put it on the same prompts as the others)
ALGORITHMS = {
    "DDPO": ("configs/ddpo_every_step.yaml", ["prompts.split=heldout", "prompts.pool_size=0"]),
    "D3PO": ("configs/d3po.yaml", []),
    "SePPO": ("configs/seppo.yaml", []),
    "B²-DiffuRL": ("configs/b2diffurl.yaml", []),
}


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def run(name: str, seed: int, args) -> dict:
    config, own = ALGORITHMS[name]
    out = os.path.join(args.out, name.replace("²", "2").lower(), f"seed_{seed}")
    if not os.path.isfile(os.path.join(out, "final", "genalign_policy.json")):
        overrides = [*own, f"seed={seed}", f"output_dir={out}", f"train.epochs={args.epochs}", "report.enabled=false",
                     "eval.every=0", *args.overrides]
        cfg = load_config(TrainConfig, config, overrides)
        t0 = time.perf_counter()
        train(cfg, resume=bool(run_contents(out)))
        print(f"{name} seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
    evals = read_jsonl(os.path.join(out, "eval.jsonl"))
    metrics = read_jsonl(os.path.join(out, "metrics.jsonl"))
    last = max(e["epoch"] for e in evals)
    return {
        "before": {e["set"]: e[args.metric] for e in evals if e["epoch"] == 0},
        "after": {e["set"]: e[args.metric] for e in evals if e["epoch"] == last},
        "curve": [(m["samples"], m["reward_mean"]) for m in metrics],
        "wall_seconds": metrics[-1]["wall_seconds"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=list(ALGORITHMS))
    ap.add_argument("--metric", default="shapes_verifier/strict")
    ap.add_argument("--out", default="benchmarks/results/preference")
    ap.add_argument("overrides", nargs="*", help="key=value overrides applied to every algorithm's config")
    args = ap.parse_args(argv)

    results: dict[str, dict[int, dict]] = {name: {} for name in args.algorithms}
    for s in args.seeds:  # seed-major: a partial run already compares every algorithm
        for name in args.algorithms:
            results[name][s] = run(name, s, args)

    sets = list(next(iter(next(iter(results.values())).values()))["before"])
    table = []
    for name, per_seed in results.items():
        row = {"algorithm": name, "wall_seconds": mean_std([r["wall_seconds"] for r in per_seed.values()])}
        for s in sets:
            before = [r["before"][s] for r in per_seed.values()]
            after = [r["after"][s] for r in per_seed.values()]
            row[s] = {"before": mean_std(before), "after": mean_std(after), "delta": mean_std([a - b for a, b in zip(after, before)])}
        table.append(row)

    print(f"\nShapes World held-out {args.metric}, seeds {args.seeds}, {args.epochs} epochs each (mean ± std over seeds)")
    print("| algorithm | " + " | ".join(f"{s}: before → after (Δ)" for s in sets) + " | train wall s |")
    print("|---|" + "---|" * (len(sets) + 1))
    for row in table:
        cells = [f"{row[s]['before'][0]:.3f} → {row[s]['after'][0]:.3f} ({row[s]['delta'][0]:+.3f} ± {row[s]['delta'][1]:.3f})" for s in sets]
        print(f"| {row['algorithm']} | " + " | ".join(cells) + f" | {row['wall_seconds'][0]:.0f} ± {row['wall_seconds'][1]:.0f} |")

    os.makedirs(args.out, exist_ok=True)
    suffix = "" if args.metric == "shapes_verifier/strict" else "_" + args.metric.rsplit("/", 1)[-1]
    with open(os.path.join(args.out, f"summary{suffix}.json"), "w") as f:
        json.dump({"seeds": args.seeds, "epochs": args.epochs, "metric": args.metric, "overrides": args.overrides,
                   "table": table, "per_seed": {k: {str(s): v for s, v in d.items()} for k, d in results.items()}}, f, indent=2)
    fig, ax = plt.subplots(figsize=(6.5, 3.8), dpi=110)
    for name, per_seed in results.items():
        curves = list(per_seed.values())
        xs = [x for x, _ in curves[0]["curve"]]
        ys = [statistics.mean(c["curve"][i][1] for c in curves) for i in range(len(xs))]
        k = 5  # moving average over epochs: the epoch's prompt mix dominates single-epoch rewards
        smooth = [statistics.mean(ys[max(0, i - k + 1) : i + 1]) for i in range(len(ys))]
        ax.plot(xs, smooth, label=name)
    ax.set_xlabel("samples drawn (= reward queries; SePPO's are monitoring only)")
    ax.set_ylabel("training reward (5-epoch moving mean)")
    ax.set_title(f"Shapes World, mean over seeds {args.seeds}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, f"curves{suffix}.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
