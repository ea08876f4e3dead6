"""One algorithm object, two modalities: held-out accuracy before and after training.

Text (the default): Shapes QA with the tiny causal LM (configs/text_grpo.yaml), every method
at equal samples (same epochs, prompts per epoch and samples per prompt), several seeds:
GRPO with each loss aggregation ("grpo" per-sequence mean, "dapo" token mean, "dr_grpo"
constant normaliser without std scaling), RAFT (each group's best answer, SFT on it) and DDPO
(PPO-clip with sequence advantages). Only the ``algorithm:`` section differs between runs.

Image (``--image``): the same GRPO class on the tiny Stable Diffusion model, on the quickstart's
held-out counting prompts (tier 5, the tier with headroom), beside the quickstart's DDPO.

    python benchmarks/one_api.py                         # text, seeds 0 1 2
    python benchmarks/one_api.py --image --seeds 0 1     # tiny SD: GRPO beside DDPO

Each run's eval.jsonl holds fixed held-out conditions scored with fixed sampling seeds
(epoch 0 = before training). Prints a markdown table (mean ± std over seeds of the held-out
accuracy before, after, and the gain), writes JSON and a PNG of the training reward curves.
Runs already finished in --out are read, not repeated.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys

import matplotlib
import yaml

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from genalign.configs import from_dict  # noqa: E402
from genalign.runfiles import run_contents
from genalign.train_config import TrainConfig  # noqa: E402
from genalign.trainer import train  # noqa: E402

TEXT_METHODS: dict[str, dict] = {
    "GRPO (grpo: sequence mean)": {"name": "grpo", "loss_aggregation": "grpo"},
    "GRPO (dapo: token mean)": {"name": "grpo", "loss_aggregation": "dapo"},
    "GRPO (dr_grpo: constant, no std)": {"name": "grpo", "loss_aggregation": "dr_grpo", "scale_rewards": "none",
                                         "max_steps_normaliser": 8},
    "RAFT (group best)": {"name": "raft", "select": "group_best"},
    "DDPO / PPO-clip": {"name": "ddpo"},
}
IMAGE_METHODS: dict[str, dict | None] = {
    "DDPO (quickstart)": None,  # the quickstart's own algorithm section
    "GRPO": {"name": "grpo", "shared_noise": False},
}


def read_eval(run_dir: str) -> dict[int, dict[str, dict]]:
    with open(os.path.join(run_dir, "eval.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    out: dict[int, dict[str, dict]] = {}
    for r in rows:
        out.setdefault(r["epoch"], {})[r["set"]] = r
    return out


def read_metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def overall(evals: dict[str, dict], metric: str, sets: list[str] | None) -> float:
    """Mean of ``metric`` over the eval sets (equal sizes: the mean over all samples)."""
    names = sets or sorted(evals)
    return statistics.mean(evals[s][metric] for s in names)


def run_one(base: dict, algorithm: dict | None, seed: int, run_dir: str, overrides: dict) -> None:
    cfg = copy.deepcopy(base)
    if algorithm is not None:
        cfg["algorithm"] = dict(algorithm)
    cfg.update(seed=seed, output_dir=run_dir)
    for key, value in overrides.items():  # dotted keys: train.epochs=...
        node = cfg
        *path, last = key.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    train(from_dict(TrainConfig, cfg), resume=bool(run_contents(run_dir)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", action="store_true", help="tiny SD instead of the text world")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results/one_api_{text,image})")
    ap.add_argument("--methods", nargs="*", default=None, help="subset of method names to run")
    args = ap.parse_args(argv)
    kind = "image" if args.image else "text"
    out = args.out or f"benchmarks/results/one_api_{kind}"
    config = "configs/quickstart.yaml" if args.image else "configs/text_grpo.yaml"
    with open(config) as f:
        base = yaml.safe_load(f)
    methods = IMAGE_METHODS if args.image else TEXT_METHODS
    if args.methods:
        methods = {k: v for k, v in methods.items() if k in args.methods}
    metric = "shapes_verifier/strict" if args.image else "rule_exact/correct"
    sets = ["tier 5 (all)"] if args.image else None
    overrides = {"report.enabled": False}

    results: dict[str, dict] = {}
    for name, algorithm in methods.items():
        per_seed = {}
        for seed in args.seeds:
            slug = name.split(" ")[0].lower() + ("" if algorithm is None else "_" + algorithm.get("loss_aggregation", algorithm.get("select", "")))
            run_dir = os.path.join(out, f"{slug}_seed{seed}")
            if not os.path.isfile(os.path.join(run_dir, "final", "genalign_policy.json")):
                run_one(base, algorithm, seed, run_dir, overrides)
            ev = read_eval(run_dir)
            last = max(ev)
            curve = [m["reward_mean"] for m in read_metrics(run_dir)]
            per_seed[seed] = {
                "before": overall(ev[0], metric, sets), "after": overall(ev[last], metric, sets),
                "per_set_after": {s: ev[last][s][metric] for s in sorted(ev[last])},
                "per_set_before": {s: ev[0][s][metric] for s in sorted(ev[0])},
                "reward_curve": curve, "run_dir": run_dir,
                "train_seconds": read_metrics(run_dir)[-1]["train_seconds"],
            }
            print(f"{name} seed {seed}: {per_seed[seed]['before']:.3f} -> {per_seed[seed]['after']:.3f}", file=sys.stderr)
        before = mean_std([r["before"] for r in per_seed.values()])
        after = mean_std([r["after"] for r in per_seed.values()])
        gain = mean_std([r["after"] - r["before"] for r in per_seed.values()])
        results[name] = {"algorithm": algorithm, "seeds": per_seed, "before": before, "after": after, "gain": gain}

    os.makedirs(out, exist_ok=True)
    what = "tier-5 (all) strict accuracy" if args.image else "held-out exact-answer accuracy (5 tiers)"
    print(f"\n| method ({what}) | before | after | gain (mean ± std over {len(args.seeds)} seeds) |")
    print("|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['before'][0]:.3f} | {r['after'][0]:.3f} ± {r['after'][1]:.3f} | "
              f"{r['gain'][0]:+.3f} ± {r['gain'][1]:.3f} |")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"config": config, "metric": metric, "sets": sets, "seeds": args.seeds, "results": results}, f, indent=1)
    fig, ax = plt.subplots(figsize=(7, 4))
    window = 5  # each epoch draws other conditions (the same for every method): smooth over epochs
    for name, r in results.items():
        curves = [s["reward_curve"] for s in r["seeds"].values()]
        n = min(len(c) for c in curves)
        mean = [statistics.mean(c[i] for c in curves) for i in range(n)]
        smooth = [statistics.mean(mean[max(0, i - window + 1): i + 1]) for i in range(n)]
        ax.plot(range(1, n + 1), smooth, label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"training reward ({window}-epoch moving avg.)")
    ax.set_title(f"{'tiny SD, quickstart prompts' if args.image else 'Shapes QA, tiny LM'}: equal samples per epoch")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "reward_curves.png"), dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
