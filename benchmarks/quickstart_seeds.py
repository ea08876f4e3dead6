"""The quickstart over several seeds: held-out strict accuracy per tier before and after.

Runs ``genalign train CONFIG seed=S output_dir=OUT/seed_S`` for each seed (one after the
other, same machine), reads each run's eval.jsonl (fixed held-out prompts and sampling
seeds; epoch 0 = before training) and reports mean ± std over seeds.

    python benchmarks/quickstart_seeds.py                      # configs/quickstart.yaml, seeds 0 1 2
    python benchmarks/quickstart_seeds.py --seeds 0 1 2 --config configs/quickstart.yaml

Prints a markdown table and writes JSON and a PNG to --out.
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


def read_eval(run_dir: str) -> dict[int, dict[str, dict]]:
    with open(os.path.join(run_dir, "eval.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    out: dict[int, dict[str, dict]] = {}
    for r in rows:
        out.setdefault(r["epoch"], {})[r["set"]] = r
    return out


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--metric", default="shapes_verifier/strict", help="eval.jsonl column to report")
    ap.add_argument("--out", default="benchmarks/results/quickstart")
    ap.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    args = ap.parse_args(argv)

    per_seed = {}
    for seed in args.seeds:
        run_dir = os.path.join(args.out, f"seed_{seed}")
        if not os.path.isfile(os.path.join(run_dir, "final", "genalign_policy.json")):
            cfg = load_config(TrainConfig, args.config, [f"seed={seed}", f"output_dir={run_dir}", *args.overrides])
            t0 = time.perf_counter()
            train(cfg, resume=bool(run_contents(run_dir)))
            print(f"seed {seed}: trained in {time.perf_counter() - t0:.0f} s", flush=True)
        ev = read_eval(run_dir)
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            wall = [json.loads(line) for line in f if line.strip()][-1]["wall_seconds"]
        per_seed[seed] = {"before": ev[0], "after": ev[max(ev)], "wall_seconds": wall}

    sets = list(per_seed[args.seeds[0]]["before"])
    table = []
    for name in sets:
        before = [per_seed[s]["before"][name][args.metric] for s in args.seeds]
        after = [per_seed[s]["after"][name][args.metric] for s in args.seeds]
        deltas = [a - b for a, b in zip(after, before)]
        table.append({"set": name, "before": mean_std(before), "after": mean_std(after), "delta": mean_std(deltas),
                      "samples_per_seed": per_seed[args.seeds[0]]["before"][name]["samples"]})
    walls = [per_seed[s]["wall_seconds"] for s in args.seeds]

    print(f"\n{args.config}, seeds {args.seeds}, metric {args.metric} (held-out prompts, fixed sampling seeds)")
    print("| set | samples/seed | before | after | after − before |")
    print("|---|---|---|---|---|")
    for r in table:
        print(f"| {r['set']} | {r['samples_per_seed']} | {r['before'][0]:.3f} ± {r['before'][1]:.3f} | "
              f"{r['after'][0]:.3f} ± {r['after'][1]:.3f} | {r['delta'][0]:+.3f} ± {r['delta'][1]:.3f} |")
    print(f"training wall time per seed: {statistics.mean(walls):.0f} ± {statistics.pstdev(walls):.0f} s")

    os.makedirs(args.out, exist_ok=True)
    # summary.json / summary.png for strict accuracy, summary_<metric>.json / .png for another metric
    suffix = "" if args.metric == "shapes_verifier/strict" else "_" + args.metric.rsplit("/", 1)[-1]
    with open(os.path.join(args.out, f"summary{suffix}.json"), "w") as f:
        json.dump({"config": args.config, "overrides": args.overrides, "seeds": args.seeds, "metric": args.metric, "table": table,
                   "wall_seconds": walls, "per_seed": per_seed}, f, indent=2)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    xs = range(len(table))
    for off, key, label in ((-0.18, "before", "before"), (0.18, "after", "after DDPO")):
        ax.bar([x + off for x in xs], [r[key][0] for r in table], 0.36, yerr=[r[key][1] for r in table], capsize=3, label=label)
    ax.set_xticks(list(xs), [r["set"] for r in table])
    ax.set_ylabel(args.metric)
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title(f"held-out accuracy, mean ± std over seeds {args.seeds}", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, f"summary{suffix}.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
