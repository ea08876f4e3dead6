"""Curr-ReFT against plain GRPO on Shapes VQA with the tiny Qwen2-VL, at equal samples.

Every method trains the same LoRA policy (configs/vlm_curr_reft.yaml: reward ``curr_reft``,
fresh out-of-domain questions of four types (colour, shape, count, position; relation questions
are never trained), 16 questions x 8 samples per epoch) for the same number of epochs, hence the
same number of sampled responses; only the schedule differs:

- plain GRPO: every format mixed, 3E + R epochs;
- Curr-ReFT without RS: yes/no E epochs -> multiple choice E -> open E + R;
- Curr-ReFT + RS: yes/no E -> multiple choice E -> open E -> rejection sampling R (keep the
  responses with reward 2 = correct + well-formed, SFT on them at lr 5e-4).

Each final policy (and the base model) answers fixed evaluation questions: ``--per-cell``
questions per format x type, out-of-domain (reserved for evaluation: training never draws them)
and in-domain (never trained: does training on new compositions keep the old ones?), ``--samples`` sampled responses each (temperature 1, fixed seeds
per seed of the run). Accuracy is the exact-answer rule (the words between the tags equal the
gold answer). Prints markdown tables (mean ± std over seeds) per format and per type, and writes
results.json and accuracy.png to --out. Runs already finished in --out are read, not repeated.

    python benchmarks/vqa_curriculum.py                          # seeds 0 1 2, E = 10, R = 10
    python benchmarks/vqa_curriculum.py --seeds 0 --epochs 2 --rs-epochs 1 --per-cell 2 --out /tmp/vqa  # smoke
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

from genalign.configs import from_dict  # noqa: E402
from genalign.policies.vlm import VLMPolicy, VLMPolicyConfig  # noqa: E402
from genalign.runfiles import run_contents
from genalign.toyworld.vqa import FORMATS, QTYPES, sample_vqa_conditions  # noqa: E402
from genalign.train_config import TrainConfig  # noqa: E402
from genalign.trainer import train  # noqa: E402
from rewards.rules import RuleVerifier  # noqa: E402

CONFIG = "configs/vlm_curr_reft.yaml"
SPLITS = {"train": "in-domain", "heldout": "out-of-domain"}
EVAL_SEED = 4242  # conditions: sample_vqa_conditions(..., seed=EVAL_SEED, part="eval")
METHODS = ("base", "plain GRPO", "Curr-ReFT (no RS)", "Curr-ReFT + RS")


def method_config(base: dict, method: str, seed: int, epochs: int, rs_epochs: int, run_dir: str) -> dict:
    """The training config of ``method`` (equal epochs x questions x samples for all)."""
    cfg = copy.deepcopy(base)
    cfg.update(seed=seed, output_dir=run_dir)
    cfg["report"] = {"enabled": False}
    cfg["eval"] = {"enabled": False}
    stages = {s["name"]: s for s in cfg.pop("curriculum")}
    if method == "plain GRPO":
        cfg["train"]["epochs"] = 3 * epochs + rs_epochs
        return cfg
    plan = [("yesno", epochs), ("choice", epochs), ("open", epochs + (rs_epochs if method == "Curr-ReFT (no RS)" else 0))]
    if method == "Curr-ReFT + RS":
        plan.append(("rejection_sampling", rs_epochs))
    cfg["curriculum"] = []
    for name, n in plan:
        stage = copy.deepcopy(stages[name])
        stage["train"] = {**stage.get("train", {}), "epochs": n}
        cfg["curriculum"].append(stage)
    return cfg


def evaluate(policy: VLMPolicy, seed: int, per_cell: int, samples: int, verifier: RuleVerifier) -> dict[str, float]:
    """Accuracy per ``split/format/type`` cell over ``per_cell`` questions x ``samples`` responses."""
    out: dict[str, float] = {}
    for split in SPLITS:
        for fmt in FORMATS:
            for qtype in QTYPES:
                conds = sample_vqa_conditions(fmt, qtype, per_cell, split, seed=EVAL_SEED, part="eval")
                seeds = [10_000 * seed + i for i in range(len(conds) * samples)]
                traj = policy.rollout(conds, samples, seeds)
                out[f"{split}/{fmt}/{qtype}"] = float(verifier(traj.outputs, traj.conditions).scores.float().mean())
    return out


def summarise(cells: dict[str, float]) -> dict[str, float]:
    """Means per split x format, split x type, and split overall (cells of equal size)."""
    out: dict[str, float] = {}
    for split in SPLITS:
        for fmt in FORMATS:
            out[f"{split}/{fmt}"] = statistics.mean(cells[f"{split}/{fmt}/{q}"] for q in QTYPES)
        for qtype in QTYPES:
            out[f"{split}/{qtype}"] = statistics.mean(cells[f"{split}/{f}/{qtype}"] for f in FORMATS)
        out[f"{split}/mean"] = statistics.mean(cells[k] for k in cells if k.startswith(split + "/"))
    return out


def mean_std(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.3f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=10, help="E: epochs per curriculum stage")
    ap.add_argument("--rs-epochs", type=int, default=10, help="R: epochs of the rejection-sampling stage")
    ap.add_argument("--per-cell", type=int, default=8, help="evaluation questions per split x format x type")
    ap.add_argument("--samples", type=int, default=2, help="evaluation responses per question")
    ap.add_argument("--methods", nargs="*", default=list(METHODS), help="subset of " + ", ".join(METHODS))
    ap.add_argument("--out", default="benchmarks/results/vqa_curriculum")
    args = ap.parse_args(argv)
    with open(CONFIG) as f:
        base = yaml.safe_load(f)
    verifier = RuleVerifier()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.json")
    results: dict = {}
    if os.path.isfile(path):
        with open(path) as f:
            results = json.load(f)
    for method in args.methods:
        for seed in args.seeds:
            key = f"{method} | seed {seed}"
            if key in results.get("runs", {}):
                continue
            t0 = time.monotonic()
            if method == "base":
                policy_dir = base["policy"]["pretrained"]
            else:
                run_dir = os.path.join(args.out, "runs", method.lower().replace(" ", "_").replace("(", "").replace(")", "").replace("+", "plus") + f"_seed{seed}")
                cfg = method_config(base, method, seed, args.epochs, args.rs_epochs, run_dir)
                if not os.path.isfile(os.path.join(run_dir, "final", "genalign_policy.json")):
                    train(from_dict(TrainConfig, cfg), resume=bool(run_contents(run_dir)))
                policy_dir = os.path.join(run_dir, "final")
            # the base model and the trained ones answer under the config's sampling settings alike
            sampling = {k: base["policy"][k] for k in ("max_new_tokens", "temperature") if k in base["policy"]}
            policy = VLMPolicy.from_pretrained(policy_dir, VLMPolicyConfig(**sampling))
            cells = evaluate(policy, seed, args.per_cell, args.samples, verifier)
            results.setdefault("runs", {})[key] = {"method": method, "seed": seed, "cells": cells,
                                                   "summary": summarise(cells), "seconds": round(time.monotonic() - t0, 1)}
            print(f"{key}: in-domain {results['runs'][key]['summary']['train/mean']:.3f}, "
                  f"out-of-domain {results['runs'][key]['summary']['heldout/mean']:.3f}", file=sys.stderr)
            results["settings"] = vars(args)
            with open(path, "w") as f:
                json.dump(results, f, indent=1)

    runs = [r for r in results["runs"].values() if r["method"] in args.methods and r["seed"] in args.seeds]
    by_method = {m: [r for r in runs if r["method"] == m] for m in args.methods}
    tables = []
    for axis, names in (("format", FORMATS), ("type", QTYPES)):
        for split, label in SPLITS.items():
            lines = [f"\n{label} accuracy per {axis} (mean ± std over seeds {args.seeds})\n",
                     f"| method | {' | '.join(names)} | mean |", "|---" * (len(names) + 2) + "|"]
            for m, rs in by_method.items():
                cells = [mean_std([r["summary"][f"{split}/{n}"] for r in rs]) for n in names]
                lines.append(f"| {m} | {' | '.join(cells)} | {mean_std([r['summary'][f'{split}/mean'] for r in rs])} |")
            tables.append("\n".join(lines))
    print("\n".join(tables))
    with open(os.path.join(args.out, "tables.md"), "w") as f:
        f.write("\n".join(tables) + "\n")

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharey=True)
    width = 0.8 / max(1, len(by_method))
    for ax, (split, label) in zip(axes, SPLITS.items()):
        for i, (m, rs) in enumerate(by_method.items()):
            ys = [statistics.mean(r["summary"][f"{split}/{f}"] for r in rs) for f in FORMATS]
            ax.bar([j + i * width for j in range(len(FORMATS))], ys, width, label=m)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(FORMATS))], FORMATS)
        ax.set_title(f"{label} accuracy")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "accuracy.png"), dpi=110)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
