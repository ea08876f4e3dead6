"""RLCM on the tiny LCM vs DDPO on the tiny Stable Diffusion, same reward, side by side.

For each seed, trains ``--ddpo-config`` (DDPO, tiny-sd) and ``--rlcm-config`` (the same
DDPO algorithm object on the consistency policy), one after the other on the same machine,
both with a fixed-seed held-out evaluation every ``--eval-every`` epochs. Reports

* final held-out strict accuracy per tier (mean ± std over seeds, before → after);
* training time (rollouts + rewards + updates, evaluation excluded) and reward queries until
  RLCM first reaches the mean held-out accuracy DDPO ends at (averaged over the trained
  tiers), and the ratio to DDPO's totals;
* inference cost per image: UNet evaluations and measured seconds per image (batch 64).

    python benchmarks/rlcm_vs_ddpo.py --seeds 0 1 2 train.epochs=30

Prints a markdown table, writes ``summary.json`` and ``curves.png`` to ``--out``.
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

from genalign.configs import load_config  # noqa: E402
from genalign.policies import POLICIES  # noqa: E402
from genalign.runfiles import run_contents
from genalign.train_config import TrainConfig  # noqa: E402
from genalign.trainer import Trainer  # noqa: E402


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def curve(run_dir: str, metric: str) -> list[dict]:
    """Per evaluation: epoch, mean held-out metric over sets, per-set values, train seconds, reward queries."""
    evals = read_jsonl(os.path.join(run_dir, "eval.jsonl"))
    metrics = {m["epoch"]: m for m in read_jsonl(os.path.join(run_dir, "metrics.jsonl"))}
    by_epoch: dict[int, dict[str, float]] = {}
    for r in evals:
        by_epoch.setdefault(r["epoch"], {})[r["set"]] = r[metric]
    out = []
    for epoch in sorted(by_epoch):
        m = metrics.get(epoch, {"train_seconds": 0.0, "reward_queries": 0})
        out.append({"epoch": epoch, "mean": statistics.mean(by_epoch[epoch].values()), "sets": by_epoch[epoch],
                    "train_seconds": m["train_seconds"], "reward_queries": m["reward_queries"]})
    return out


@torch.no_grad()
def inference_cost(cfg: TrainConfig, n: int = 64) -> dict[str, float]:
    """UNet evaluations per image and seconds per image for the pretrained policy at its config's steps."""
    policy = POLICIES[cfg.policy.type][1].from_pretrained(cfg.policy.pretrained, cfg.policy)
    prompts = cfg.prompts.evaluation(n)
    gens = [torch.Generator().manual_seed(i) for i in range(n)]
    policy.rollout(prompts[:2], 1, gens[:2])  # warm-up
    t0 = time.perf_counter()
    policy.rollout(prompts, 1, gens)
    seconds = (time.perf_counter() - t0) / n
    # one UNet pass per sampling step, two with classifier-free guidance; a guidance-embedded
    # LCM needs one (consistency sampling's N steps include the final f_θ)
    cfg_passes = 1 if getattr(policy, "embed_dim", None) or getattr(policy, "guidance_scale", cfg.policy.guidance_scale) == 1.0 else 2
    return {"unet_evals_per_image": cfg.policy.num_steps * cfg_passes, "seconds_per_image": seconds,
            "steps": cfg.policy.num_steps}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ddpo-config", default="configs/ddpo_every_step.yaml")
    ap.add_argument("--ddpo-steps", type=int, default=20, help="DDIM steps of the DDPO policy")
    ap.add_argument("--rlcm-config", default="configs/rlcm.yaml")
    ap.add_argument("--rlcm-steps", type=int, default=4, help="consistency steps of the RLCM policy")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--eval-every", type=int, default=2)
    ap.add_argument("--metric", default="shapes_verifier/strict")
    ap.add_argument("--out", default="benchmarks/results/rlcm")
    ap.add_argument("overrides", nargs="*", help="key=value overrides applied to both arms (e.g. train.epochs=30)")
    args = ap.parse_args(argv)

    arms = {
        "DDPO (tiny-sd)": (args.ddpo_config, [f"policy.num_steps={args.ddpo_steps}"]),
        "RLCM (tiny-lcm)": (args.rlcm_config, [f"policy.num_steps={args.rlcm_steps}"]),
    }
    curves: dict[str, dict[int, list[dict]]] = {a: {} for a in arms}
    costs: dict[str, dict[str, float]] = {}
    run_dirs: dict[str, dict[int, str]] = {a: {} for a in arms}
    for seed in args.seeds:
        for arm, (config, extra) in arms.items():
            run_dir = os.path.join(args.out, f"seed_{seed}", arm.split()[0].lower())
            overrides = [f"seed={seed}", f"output_dir={run_dir}", f"eval.every={args.eval_every}",
                         "report.enabled=false", *args.overrides, *extra]
            cfg = load_config(TrainConfig, config, overrides)
            if not os.path.isfile(os.path.join(run_dir, "final", "genalign_policy.json")):
                Trainer(cfg).train(resume=bool(run_contents(run_dir)))
            curves[arm][seed] = curve(run_dir, args.metric)
            run_dirs[arm][seed] = run_dir
            if arm not in costs:
                costs[arm] = inference_cost(cfg)

    ddpo, rlcm = list(arms)
    rows = []
    for arm in arms:
        finals = [c[-1] for c in curves[arm].values()]
        befores = [c[0] for c in curves[arm].values()]
        sets = list(finals[0]["sets"])
        train_rewards = [[m["reward_mean"] for m in read_jsonl(os.path.join(d, "metrics.jsonl"))] for d in run_dirs[arm].values()]
        rows.append({
            "arm": arm,
            "train_reward_first5": mean_std([statistics.mean(r[:5]) for r in train_rewards]),
            "train_reward_last5": mean_std([statistics.mean(r[-5:]) for r in train_rewards]),
            "before": {s: mean_std([b["sets"][s] for b in befores]) for s in sets},
            "after": {s: mean_std([f["sets"][s] for f in finals]) for s in sets},
            "train_seconds": mean_std([f["train_seconds"] for f in finals]),
            "reward_queries": mean_std([f["reward_queries"] for f in finals]),
            **costs[arm],
        })
    # time and queries until RLCM reaches the held-out accuracy DDPO ends at (per seed)
    reach = []
    for seed in args.seeds:
        target = curves[ddpo][seed][-1]["mean"]
        hit = next((p for p in curves[rlcm][seed][1:] if p["mean"] >= target), None)
        reach.append({"seed": seed, "target": target, "epoch": hit["epoch"] if hit else None,
                      "train_seconds": hit["train_seconds"] if hit else None,
                      "reward_queries": hit["reward_queries"] if hit else None,
                      "ddpo_train_seconds": curves[ddpo][seed][-1]["train_seconds"],
                      "ddpo_reward_queries": curves[ddpo][seed][-1]["reward_queries"]})

    print(f"\nheld-out {args.metric}, seeds {args.seeds} (mean ± std over seeds; before → after)")
    sets = list(rows[0]["after"])
    print("| arm | steps | UNet evals / image | s / image | " + " | ".join(sets) + " | train s | reward queries |")
    print("|---" * (6 + len(sets)) + "|")
    for r in rows:
        cells = [f"{r['before'][s][0]:.3f} → {r['after'][s][0]:.3f} ± {r['after'][s][1]:.3f}" for s in sets]
        print(f"| {r['arm']} | {r['steps']} | {r['unet_evals_per_image']} | {r['seconds_per_image'] * 1e3:.1f} ms | "
              + " | ".join(cells) + f" | {r['train_seconds'][0]:.0f} ± {r['train_seconds'][1]:.0f} | "
              f"{r['reward_queries'][0]:.0f} |")
    for r in rows:
        print(f"{r['arm']}: training reward, mean of the first 5 epochs {r['train_reward_first5'][0]:.3f} "
              f"± {r['train_reward_first5'][1]:.3f} -> last 5 epochs {r['train_reward_last5'][0]:.3f} "
              f"± {r['train_reward_last5'][1]:.3f}")
    print("\nRLCM reaching DDPO's final mean held-out accuracy:")
    for r in reach:
        if r["epoch"] is None:
            print(f"  seed {r['seed']}: target {r['target']:.3f} not reached")
        else:
            print(f"  seed {r['seed']}: target {r['target']:.3f} at epoch {r['epoch']}: {r['train_seconds']:.0f} s "
                  f"vs DDPO {r['ddpo_train_seconds']:.0f} s (×{r['ddpo_train_seconds'] / max(r['train_seconds'], 1e-9):.1f}), "
                  f"{r['reward_queries']} vs {r['ddpo_reward_queries']} reward queries")

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump({"metric": args.metric, "seeds": args.seeds, "arms": rows, "reach": reach,
                   "curves": {a: {str(s): c for s, c in cs.items()} for a, cs in curves.items()}}, f, indent=2)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5), dpi=110)
    for arm, color in zip(arms, ("tab:blue", "tab:orange")):
        for i, c in enumerate(curves[arm].values()):
            label = arm if i == 0 else None
            axes[0].plot([p["train_seconds"] for p in c], [p["mean"] for p in c], color=color, alpha=0.8, label=label)
            axes[1].plot([p["reward_queries"] for p in c], [p["mean"] for p in c], color=color, alpha=0.8, label=label)
    for arm, color in zip(arms, ("tab:blue", "tab:orange")):
        for i, d in enumerate(run_dirs[arm].values()):
            m = read_jsonl(os.path.join(d, "metrics.jsonl"))
            r = [x["reward_mean"] for x in m]
            smooth = [statistics.mean(r[max(0, j - 4) : j + 1]) for j in range(len(r))]
            axes[2].plot([x["train_seconds"] for x in m], smooth, color=color, alpha=0.8, label=arm if i == 0 else None)
    axes[2].set_xlabel("training seconds (2 CPU cores)")
    axes[2].set_ylabel("training reward (5-epoch mean)")
    axes[2].legend(fontsize=8)
    axes[0].set_xlabel("training seconds (2 CPU cores)")
    axes[1].set_xlabel("reward queries")
    for ax in axes[:2]:
        ax.set_ylabel(f"held-out {args.metric.split('/')[-1]} (mean over tiers)")
        ax.legend(fontsize=8)
    fig.suptitle(f"RLCM vs DDPO on Shapes World, seeds {args.seeds}", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "curves.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
