"""The tiny LCM at 1, 2, 4 and 8 steps next to its teacher (tiny-sd) at 20 DDIM steps.

Samples both with plain diffusers pipelines (``LatentConsistencyModelPipeline`` for the
student, the genalign SD policy for the teacher, which reproduces ``StableDiffusionPipeline``),
on the same Shapes World prompts and seeds per tier and split, and scores them with the
verifier. Prints a markdown table and writes JSON to ``--out``.

    python benchmarks/lcm_steps.py --lcm assets/models/tiny-lcm --teacher assets/models/tiny-sd
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from types import SimpleNamespace

import torch
from diffusers import LatentConsistencyModelPipeline

from genalign.evaluation import evaluate_tiers, load_policy
from rewards.shapes_verifier import ShapesVerifierReward


class PipelineSampler:
    """``rollout(prompts, n, generators)`` over a diffusers LCM pipeline (images in [0, 1])."""

    def __init__(self, pipe: LatentConsistencyModelPipeline, steps: int, guidance_scale: float, size: int):
        self.pipe, self.steps, self.guidance_scale, self.size = pipe, steps, guidance_scale, size

    @torch.no_grad()
    def rollout(self, prompts: Sequence[str], n: int, generators: list[torch.Generator]) -> SimpleNamespace:
        conditions = [p for p in prompts for _ in range(n)]
        images = self.pipe(
            conditions, num_inference_steps=self.steps, guidance_scale=self.guidance_scale, generator=generators,
            height=self.size, width=self.size, output_type="pt",
        ).images  # [B, 3, H, W] in [0, 1]
        return SimpleNamespace(outputs=images.float(), conditions=conditions)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lcm", default="assets/models/tiny-lcm")
    ap.add_argument("--teacher", default="assets/models/tiny-sd")
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--teacher-steps", type=int, default=20)
    ap.add_argument("--guidance-scale", type=float, default=None, help="LCM guidance (default: the pipeline's 8.5)")
    ap.add_argument("--tiers", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    ap.add_argument("--prompts-per-tier", type=int, default=32)
    ap.add_argument("--n", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--verifier", default="assets/models/shapes-verifier")
    ap.add_argument("--out", default="benchmarks/results/tiny_lcm_steps.json")
    args = ap.parse_args(argv)

    verifier = ShapesVerifierReward.from_pretrained(args.verifier)
    pipe = LatentConsistencyModelPipeline.from_pretrained(args.lcm, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    guidance = args.guidance_scale if args.guidance_scale is not None else 8.5
    rows = []
    models = [(f"tiny-lcm {k} step{'s' if k > 1 else ''}", PipelineSampler(pipe, k, guidance, size), k) for k in args.steps]
    teacher = load_policy(args.teacher, args.teacher_steps)
    models.append((f"tiny-sd {args.teacher_steps} DDIM steps (teacher)", teacher, args.teacher_steps))
    for name, sampler, steps in models:
        for split in ("train", "heldout"):
            t0 = time.perf_counter()
            table = evaluate_tiers(sampler, verifier, args.tiers, split, args.prompts_per_tier, args.n, args.seed)
            seconds = time.perf_counter() - t0
            rows.append({"model": name, "steps": steps, "split": split, "seconds": seconds, "table": table})
            print(f"{name} {split}: " + ", ".join(f"t{r['tier']} {r['strict']:.3f}" for r in table), flush=True)

    print(f"\nstrict accuracy per tier, {args.prompts_per_tier} prompts × {args.n} seeds per tier (LCM guidance {guidance})")
    print("| model | split | " + " | ".join(f"tier {t}" for t in args.tiers) + " |")
    print("|---|---|" + "---|" * len(args.tiers))
    for r in rows:
        print(f"| {r['model']} | {r['split']} | " + " | ".join(f"{x['strict']:.3f}" for x in r["table"]) + " |")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"lcm": args.lcm, "teacher": args.teacher, "guidance_scale": guidance, "seed": args.seed,
                   "prompts_per_tier": args.prompts_per_tier, "n": args.n, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
