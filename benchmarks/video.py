"""DDPO, GRPO and D3PO on the tiny text-to-video model: Moving Shapes accuracy before and after.

Every method trains the same LoRA video policy from configs/video_quickstart.yaml (the 20
held-out one-object prompts, the config's reward: the motion verifier plus the Shapes World
verifier on every frame, 4 prompts x 8 clips an epoch) for the same number of epochs; only the
algorithm section differs:

- DDPO: the quickstart's (noise windows of 2 steps among the first 40% of the chain, shared x_T,
  the group's mean reward as baseline);
- GRPO: group-normalised advantages, shared x_T, 2 random steps of the first 40% trained;
- D3PO: reward-ranked pairs within each prompt's group, the same steps; β and ε moved to the
  video latent size (D = 4x8x8x8 = 2048, 8x the image quickstart's 256: β·8, ε/8).

Each final policy (and the base model, once per seed) samples fixed evaluation clips: every
held-out one-object prompt x ``--samples`` clips with seeds no training run draws. Each object
is scored for colour (present in every frame), shape (the Shapes World verifier's detection of
its colour on the middle frame) and direction (the motion verifier); clip accuracy is the motion
verifier's strict verdict. Each run is a subprocess, so its peak resident memory is its own.
Prints markdown tables (mean ± std over seeds, and each method minus the base model per seed, on the
same evaluation clips' seeds) and writes results.json, accuracy.png and
clips.png (a frame strip: the same held-out prompts and sampling seeds from the base model and
from each method's seed-0 policy). Finished runs in --out are read, not repeated.

    python benchmarks/video.py                                    # seeds 0 1 2, 240 clips per evaluation
    python benchmarks/video.py --methods base DDPO --seeds 0 1 2 3 4  # the main job's DDPO on 5 seeds
    python benchmarks/video.py --eval-split train --samples 3 --out DIR  # the 70 prompts no reward run sees
    python benchmarks/video.py --seeds 0 --epochs 1 --samples 1 --out /tmp/video  # smoke

A folder's trained runs can be evaluated again without training: copy its runs/ into a new
--out at the same depth (a saved LoRA names its base model by a relative path).
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

CONFIG = "configs/video_quickstart.yaml"
METHODS = ("base", "DDPO", "GRPO", "D3PO")
EVAL_SEED = 7_000_000  # evaluation clip seeds start here; training seeds stay far below
WINDOW = {"step_window": [0.0, 0.4], "timestep_fraction": 0.5}
ALGORITHMS = {
    "GRPO": {"name": "grpo", "shared_noise": True, "adv_clip_max": 5.0, **WINDOW},
    "D3PO": {"name": "d3po", "beta": 0.8, "clip_eps": 0.0125, **WINDOW},
}
METRICS = ("direction", "color", "shape", "clip_strict")


def sampler_keys(policy: dict) -> dict:
    """The config's sampling settings, for evaluating a saved policy the way it was trained."""
    keys = ("num_steps", "eta", "first_step_eta", "guidance_scale", "num_frames")
    return {k: policy[k] for k in keys if k in policy}


def run_config(base: dict, method: str, seed: int, epochs: int, run_dir: str) -> dict:
    cfg = copy.deepcopy(base)
    cfg.update(seed=seed, output_dir=run_dir)
    cfg["report"] = {"enabled": False}
    cfg["eval"] = {"enabled": False}
    cfg["train"]["epochs"] = epochs
    cfg["train"]["checkpoint_every"] = 0
    if method in ALGORITHMS:
        cfg["algorithm"] = dict(ALGORITHMS[method])
    return cfg


def evaluate(policy_dir: str, base: dict, seed: int, samples: int, split: str = "heldout") -> dict:
    """Attribute accuracies of ``samples`` clips per one-object prompt of ``split``."""
    import torch

    from genalign.policies import VideoDiffusionPolicy, VideoDiffusionPolicyConfig
    from genalign.recipes.pretrain_video import score_clips, summarise
    from genalign.toyworld.moving import all_moving_specs, make_condition
    from rewards.shapes_verifier import ShapesVerifierReward

    sampling = sampler_keys(base["policy"])
    policy = VideoDiffusionPolicy.from_pretrained(policy_dir, VideoDiffusionPolicyConfig(**sampling))
    conds = [make_condition(s, sampling["num_frames"]) for s in all_moving_specs(1, split)]
    verifier = ShapesVerifierReward.from_pretrained("assets/models/shapes-verifier")
    clips, rows = [], []
    for i in range(0, len(conds), 10):
        chunk = conds[i : i + 10]
        seeds = [EVAL_SEED + seed * 100_000 + (i + c) * samples + j for c in range(len(chunk)) for j in range(samples)]
        clips.append(policy.rollout(chunk, samples, seeds).outputs.cpu())
        rows += [c for c in chunk for _ in range(samples)]
    return summarise(score_clips(torch.cat(clips), rows, verifier))


STRIP_PROMPTS = ("a blue circle moving left", "a purple triangle moving up", "a blue circle moving right",
                 "a yellow square moving down", "a green triangle staying still")  # held-out pairs


def clip_strip(out: str, methods: list[str], seed: int = 0) -> str:
    """clips.png: each STRIP_PROMPTS prompt sampled (one clip, the same seed) by the base model and
    by each trained method's ``seed`` run, in rows labelled by method."""
    import torch

    from genalign.policies import VideoDiffusionPolicy, VideoDiffusionPolicyConfig
    from genalign.recipes.pretrain_video import frame_strip
    from genalign.toyworld.moving import make_condition, parse_moving_prompt

    with open(CONFIG) as f:
        base = yaml.safe_load(f)
    sampling = sampler_keys(base["policy"])
    conds = [make_condition(parse_moving_prompt(p), sampling["num_frames"]) for p in STRIP_PROMPTS]
    seeds = [EVAL_SEED + 99_000 + i for i in range(len(conds))]  # the same clip seeds in every row
    clips, labels = [], []
    for m in methods:
        path = base["policy"]["pretrained"] if m == "base" else os.path.join(out, "runs", f"{m.lower()}_seed{seed}", "final")
        if not os.path.isdir(path):
            continue
        policy = VideoDiffusionPolicy.from_pretrained(path, VideoDiffusionPolicyConfig(**sampling))
        clips.append(policy.rollout(conds, 1, seeds).outputs.cpu())
        labels += [f"{m}: {p}" for p in STRIP_PROMPTS]
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "clips.png")
    frame_strip(torch.cat(clips), labels).save(path)
    return path


def one_run(method: str, seed: int, epochs: int, samples: int, out: str, split: str = "heldout") -> dict:
    """Train (unless base) and evaluate one (method, seed) in this process."""
    with open(CONFIG) as f:
        base = yaml.safe_load(f)
    t0 = time.monotonic()
    if method == "base":
        policy_dir, history = base["policy"]["pretrained"], []
    else:
        run_dir = os.path.join(out, "runs", f"{method.lower()}_seed{seed}")
        history = train_once(run_config(base, method, seed, epochs, run_dir), run_dir)
        policy_dir = os.path.join(run_dir, "final")
    # the trainer's own wall clock (metrics.jsonl), so a reused or resumed run reports its training time
    train_s = history[-1].get("wall_seconds", time.monotonic() - t0) if history else 0.0
    summary = evaluate(policy_dir, base, seed, samples, split)
    return {"method": method, "seed": seed, "summary": summary, "train_s": round(train_s, 1),
            "total_s": round(time.monotonic() - t0, 1), "peak_rss_mb": peak_rss_mb(),
            "reward_curve": [h.get("reward_mean") for h in history]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=None, help="training epochs per run (default: the config's)")
    ap.add_argument("--samples", type=int, default=12, help="evaluation clips per prompt of --eval-split; on the 20 "
                    "held-out prompts 12 gives 240 clips per run, a standard error near 0.03 on a proportion of 0.7")
    ap.add_argument("--methods", nargs="*", default=list(METHODS), help="subset of " + ", ".join(METHODS))
    ap.add_argument("--out", default="benchmarks/results/video")
    ap.add_argument("--eval-split", default="heldout", choices=("heldout", "train"),
                    help="the one-object prompts evaluated: the 20 held-out ones the runs train on, or the 70 "
                    "pretraining ones no reward run sees")
    ap.add_argument("--one", nargs=2, metavar=("METHOD", "SEED"), help=argparse.SUPPRESS)  # a worker run
    args = ap.parse_args(argv)
    with open(CONFIG) as f:
        epochs = args.epochs or yaml.safe_load(f)["train"]["epochs"]
    if args.one:
        result = one_run(args.one[0], int(args.one[1]), epochs, args.samples, args.out, args.eval_split)
        print("RESULT " + json.dumps(result))
        return 0
    os.makedirs(args.out, exist_ok=True)

    def worker(method: str, seed: int) -> list[str]:
        return [sys.executable, __file__, "--one", method, str(seed), "--epochs", str(epochs), "--samples",
                str(args.samples), "--out", args.out, "--eval-split", args.eval_split]

    def describe(r: dict) -> str:
        s = r["summary"]
        return f"direction {s['direction']:.3f}, colour {s['color']:.3f}, shape {s['shape']:.3f}, {r['total_s']:.0f} s"

    results = run_cells(os.path.join(args.out, "results.json"), args.methods, args.seeds, worker,
                        {**vars(args), "epochs": epochs}, describe)
    runs = [r for r in results["runs"].values() if r["method"] in args.methods and r["seed"] in args.seeds]
    by_method = {m: [r for r in runs if r["method"] == m] for m in args.methods}
    split_name = {"heldout": "Held-out", "train": "Pretraining (train split)"}[args.eval_split]
    lines = [f"\n{split_name} one-object prompts, {args.samples} clips each (mean ± std over seeds {args.seeds}; "
             f"{epochs} epochs per run)\n",
             "| method | direction | colour | shape | clip (strict) | train wall s | peak RSS MB |",
             "|---|---|---|---|---|---|---|"]
    for m, rs in by_method.items():
        cells = [mean_std([r["summary"][k] for r in rs]) for k in METRICS]
        wall = statistics.mean(r["train_s"] for r in rs)
        rss = max(r["peak_rss_mb"] for r in rs)
        lines.append(f"| {m} | {' | '.join(cells)} | {wall:.0f} | {rss:.0f} |")
    base_of = {r["seed"]: r["summary"] for r in by_method.get("base", [])}
    if base_of:  # trained minus base on the same evaluation clips' seeds
        lines += [f"\nTrained minus base per seed ({', '.join(map(str, args.seeds))}), then mean ± std\n",
                  "| method | direction | colour | shape |", "|---|---|---|---|"]
        for m, rs in by_method.items():
            paired = sorted((r for r in rs if r["seed"] in base_of), key=lambda r: r["seed"])
            if m == "base" or not paired:
                continue
            cells = []
            for k in ("direction", "color", "shape"):
                d = [r["summary"][k] - base_of[r["seed"]][k] for r in paired]
                spread = statistics.stdev(d) if len(d) > 1 else 0.0
                cells.append(", ".join(f"{x:+.3f}" for x in d) + f" ({statistics.mean(d):+.3f} ± {spread:.3f})")
            lines.append(f"| {m} | {' | '.join(cells)} |")
    dirs = sorted({d for r in runs for d in r["summary"]["direction_by_wanted"]})
    lines += ["\nDirection accuracy per wanted direction\n", f"| method | {' | '.join(dirs)} |", "|---" * (len(dirs) + 1) + "|"]
    for m, rs in by_method.items():
        lines.append(f"| {m} | " + " | ".join(mean_std([r["summary"]["direction_by_wanted"].get(d, 0.0) for r in rs]) for d in dirs) + " |")
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(args.out, "tables.md"), "w") as f:
        f.write(table + "\n")

    fig, ax = plt.subplots(figsize=(7, 3.4))
    width = 0.8 / max(1, len(by_method))
    for i, (m, rs) in enumerate(by_method.items()):
        ys = [statistics.mean(r["summary"][k] for r in rs) for k in METRICS]
        es = [statistics.stdev(r["summary"][k] for r in rs) if len(rs) > 1 else 0.0 for k in METRICS]
        ax.bar([j + i * width for j in range(len(METRICS))], ys, width, yerr=es, label=m, capsize=2)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(METRICS))], ["direction", "colour", "shape", "clip strict"])
    ax.set_ylim(0, 1)
    ax.set_title(f"Moving Shapes, {split_name.lower()} prompts")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "accuracy.png"), dpi=110)
    print("frame strip:", clip_strip(args.out, args.methods, seed=min(args.seeds)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
