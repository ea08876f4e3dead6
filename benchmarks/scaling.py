"""How an epoch's time grows with its size: a DDPO epoch on tiny-sd as the batch (rollouts per
epoch) and the denoising steps grow, and a GRPO epoch on a text LM as the response length grows.

Each point is the median of ``--repeats`` epochs after a warm-up (``Trainer._epoch``: rollout,
reward, update; every step trained). Time should grow linearly in each of them (the work is
batch × steps model calls, or batch × tokens for text); the plot shows each series against the
line through its smallest point, and the table the time per unit of work, so a departure from
linear growth reads as a rising or falling per-unit cost.

    OMP_NUM_THREADS=1 python benchmarks/scaling.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from genalign.configs import load_config  # noqa: E402
from genalign.train_config import TrainConfig  # noqa: E402
from genalign.trainer import Trainer  # noqa: E402


def epoch_seconds(overrides: list[str], repeats: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(load_config(TrainConfig, None, [*overrides, "eval.enabled=false", "report.enabled=false",
                                                          "train.probe_rows=0", f"output_dir={tmp}/run"]))
        trainer._epoch(0)  # warm-up
        times = []
        for e in range(1, repeats + 1):
            t0 = time.perf_counter()
            trainer._epoch(e)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def image(batch: int, steps: int) -> list[str]:
    return ["policy.type=stable_diffusion", "policy.pretrained=assets/models/tiny-sd", f"policy.num_steps={steps}",
            "algorithm.name=ddpo", "algorithm.noise_window=0", "reward.components=[{type: jpeg_compressibility}]",
            "prompts.source=shapes_world", "prompts.tiers=[1]", f"train.prompts_per_epoch={batch // 8}",
            "train.samples_per_prompt=8", f"train.rollout_batch_size={batch}", "train.train_batch_size=8",
            f"train.gradient_accumulation_steps={batch // 8}"]


def text(model: str, tokens: int) -> list[str]:
    return ["policy.type=text_lm", f"policy.pretrained={model}", f"policy.max_new_tokens={tokens}", "algorithm.name=grpo",
            "reward.components=[{type: rule, rule: exact}]", "prompts.source=shapes_qa", "train.prompts_per_epoch=4",
            "train.samples_per_prompt=8", "train.rollout_batch_size=32", "train.train_batch_size=16",
            "train.gradient_accumulation_steps=2"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/scaling.json")
    args = ap.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from text_rollout import random_lm

    series: dict[str, list[dict]] = {"image: rollouts per epoch (10 steps)": [], "image: denoising steps (16 rollouts)": [],
                                     "text: response tokens (32 rollouts)": []}
    for batch in (8, 16, 32, 64):
        series["image: rollouts per epoch (10 steps)"].append({"x": batch, "seconds": epoch_seconds(image(batch, 10), args.repeats)})
    for steps in (5, 10, 20, 40):
        series["image: denoising steps (16 rollouts)"].append({"x": steps, "seconds": epoch_seconds(image(16, steps), args.repeats)})
    with tempfile.TemporaryDirectory() as tmp:
        # a random 256-wide, 4-layer LM over tiny-lm's tokenizer: it rarely stops early, so responses
        # reach the length asked for
        model = random_lm("assets/models/tiny-lm", 256, 4, os.path.join(tmp, "lm"))
        for tokens in (8, 16, 32, 64):
            series["text: response tokens (32 rollouts)"].append({"x": tokens, "seconds": epoch_seconds(text(model, tokens), args.repeats)})
        for name, points in series.items():
            print(f"{name}: " + ", ".join(f"{p['x']} -> {p['seconds']:.2f} s ({p['seconds'] / p['x'] * 1e3:.1f} ms per unit)" for p in points))

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4), dpi=110)
    for ax, (name, points) in zip(axes, series.items()):
        xs, ys = [p["x"] for p in points], [p["seconds"] for p in points]
        ax.plot(xs, ys, marker="o", label="measured")
        ax.plot(xs, [ys[0] * x / xs[0] for x in xs], linestyle="--", color="grey", label="linear from the first point")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(name.split(": ")[1].split(" (")[0])
        ax.set_ylabel("epoch seconds")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    fig.savefig(os.path.splitext(args.out)[0] + ".png")
    with open(args.out, "w") as f:
        json.dump({"series": series, "threads": torch.get_num_threads(), "repeats": args.repeats,
                   "torch": torch.__version__}, f, indent=2)


if __name__ == "__main__":
    main()
