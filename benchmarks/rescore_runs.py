"""Re-score finished training runs under one fixed evaluation protocol, side by side.

Each run directory (``genalign train`` output with ``config.yaml`` and ``final/``) is scored
twice with its own reward and eval prompt sets: the pretrained policy of its config ("before")
and its ``final/`` policy ("after"), with fixed sampling seeds. Use it when runs were made under
different eval settings, or to score them with more samples than training could afford.

    python benchmarks/rescore_runs.py --arm window benchmarks/results/noise_window/window/seed_* \\
        --arm fresh runs/fresh/seed_* --prompts-per-set 48 --samples 4 --out benchmarks/results/rescore.json

Prints mean ± std over each arm's runs of after − before per eval set and metric; writes JSON
and, beside it, a PNG of the deltas (bars: mean ± std, dots: runs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from genalign.configs import load_config  # noqa: E402
from genalign.evaluation import load_policy, sample_and_score  # noqa: E402
from genalign.train_config import TrainConfig  # noqa: E402
from rewards.registry import build_reward  # noqa: E402

METRICS = ("shapes_verifier/strict", "shapes_verifier/partial")


def score(policy_path: str, cfg: TrainConfig, args: argparse.Namespace, reward) -> dict[str, dict[str, float]]:
    policy = load_policy(policy_path, steps=cfg.policy.num_steps, guidance_scale=cfg.policy.guidance_scale)
    policy.config.eta = cfg.policy.eta
    out = {}
    for name, prompts in cfg.prompts.eval_sets(args.prompts_per_set).items():
        _, res = sample_and_score(policy, prompts, args.samples, args.seed, reward, desc=f"{os.path.basename(policy_path)} {name}")
        out[name] = {m: float(res.components[m].mean()) for m in METRICS}
        out[name]["samples"] = len(res.scores)
    return out


def plot(results: dict[str, dict], path: str) -> None:
    """Bars of mean after − before per eval set and arm, one panel per metric, runs as dots."""
    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 3.4), dpi=110, squeeze=False)
    width = 0.8 / len(results)
    for ax, metric in zip(axes[0], METRICS):
        for i, (name, res) in enumerate(results.items()):
            rows = [r for r in res["table"] if r["metric"] == metric]
            xs = [j + (i - (len(results) - 1) / 2) * width for j in range(len(rows))]
            ax.bar(xs, [r["mean"] for r in rows], width, yerr=[r["std"] for r in rows], capsize=3, label=name)
            for x, r in zip(xs, rows):
                ax.plot([x] * len(r["deltas"]), r["deltas"], "k.", ms=3)
            ax.set_xticks(range(len(rows)), [r["set"] for r in rows])
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_title(f"{metric}: after − before", fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arm", nargs="+", action="append", required=True, metavar=("NAME", "RUN_DIR"),
                    help="an arm's name followed by its run directories (repeat for several arms)")
    ap.add_argument("--prompts-per-set", type=int, default=48, help="eval prompts per set (cycled over small pools)")
    ap.add_argument("--samples", type=int, default=4, help="samples per listed prompt")
    ap.add_argument("--seed", type=int, default=1000, help="first sampling seed")
    ap.add_argument("--out", default=None, help="JSON file to write")
    args = ap.parse_args(argv)

    before_cache: dict[str, dict] = {}
    results: dict[str, dict] = {}
    for arm in args.arm:
        if len(arm) < 2:
            ap.error(f"--arm {arm[0]}: give the arm's run directories after its name")
        name, runs = arm[0], arm[1:]
        per_run = {}
        for run in runs:
            final = os.path.join(run, "final")
            if not os.path.isdir(final):
                raise FileNotFoundError(f"{run}: no final/ policy (unfinished run?)")
            cfg = load_config(TrainConfig, os.path.join(run, "config.yaml"), [])
            reward = build_reward(cfg.reward.components)
            key = json.dumps([cfg.policy.pretrained, cfg.policy.num_steps, cfg.policy.guidance_scale, cfg.policy.eta,
                              cfg.prompts.eval_sets(args.prompts_per_set), repr(cfg.reward.components)])
            if key not in before_cache:
                before_cache[key] = score(cfg.policy.pretrained, cfg, args, reward)
            per_run[run] = {"before": before_cache[key], "after": score(final, cfg, args, reward)}
        sets = list(next(iter(per_run.values()))["before"])
        table = []
        for s in sets:
            for m in METRICS:
                deltas = [r["after"][s][m] - r["before"][s][m] for r in per_run.values()]
                table.append({"set": s, "metric": m, "before": [r["before"][s][m] for r in per_run.values()],
                              "deltas": deltas, "mean": statistics.mean(deltas),
                              "std": statistics.stdev(deltas) if len(deltas) > 1 else 0.0,
                              "samples": next(iter(per_run.values()))["before"][s]["samples"]})
        results[name] = {"runs": per_run, "table": table}

    print(f"\n{args.prompts_per_set} prompts × {args.samples} samples per set, sampling seeds from {args.seed}")
    print("| arm | set | metric | samples | before | after − before (mean ± std) | per run |")
    print("|---|---|---|---|---|---|---|")
    for name, res in results.items():
        for r in res["table"]:
            print(f"| {name} | {r['set']} | {r['metric'].split('/')[-1]} | {r['samples']} | {statistics.mean(r['before']):.3f} | "
                  f"{r['mean']:+.3f} ± {r['std']:.3f} | {' / '.join(f'{d:+.3f}' for d in r['deltas'])} |")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"prompts_per_set": args.prompts_per_set, "samples": args.samples, "seed": args.seed,
                       "arms": results}, f, indent=2)
        plot(results, os.path.splitext(args.out)[0] + ".png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
