"""Per-prompt strict and partial accuracy of one or more policies on every prompt of a split.

Tier means hide which prompts move: this scores each prompt of the chosen tiers with the same
sampling seeds for every policy (row j of a prompt uses ``seed + j``) and prints one row per
prompt, one column pair per policy, plus what the verifier most often detects for the first
policy (the failure mode).

    python benchmarks/per_prompt.py assets/models/tiny-sd \\
        benchmarks/results/noise_window/window/seed_0/final benchmarks/results/noise_window/window/seed_2/final \\
        --out benchmarks/results/noise_window/per_prompt.json

Writes JSON with every prompt's scores per policy.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys

from genalign.evaluation import load_policy, sample_and_score
from genalign.toyworld.prompts import all_prompts
from rewards.shapes_verifier import ShapesVerifierReward


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("policies", nargs="+", help="pipeline folders or genalign policy folders (e.g. a run's final/)")
    ap.add_argument("--tiers", type=int, nargs="+", default=[1, 2, 5])
    ap.add_argument("--split", default="heldout", choices=["train", "heldout"])
    ap.add_argument("--n", type=int, default=16, help="samples per prompt")
    ap.add_argument("--seed", type=int, default=5000, help="first sampling seed")
    ap.add_argument("--steps", type=int, default=10, help="DDIM steps")
    ap.add_argument("--guidance-scale", type=float, default=4.0)
    ap.add_argument("--verifier", default="assets/models/shapes-verifier")
    ap.add_argument("--out", default=None, help="JSON file to write")
    args = ap.parse_args(argv)

    verifier = ShapesVerifierReward.from_pretrained(args.verifier)
    prompts = {t: all_prompts(t, args.split) for t in args.tiers}
    scores: dict[str, dict[str, dict]] = {}
    for path in args.policies:
        policy = load_policy(path, steps=args.steps, guidance_scale=args.guidance_scale)
        scores[path] = {}
        for tier, tier_prompts in prompts.items():
            _, out = sample_and_score(policy, tier_prompts, args.n, args.seed, verifier, desc=f"{path} tier {tier}")
            strict = out.components["strict"].view(len(tier_prompts), args.n).mean(1)
            partial = out.components["partial"].view(len(tier_prompts), args.n).mean(1)
            for i, prompt in enumerate(tier_prompts):
                seen = collections.Counter(
                    " + ".join(sorted(f"{d['size']} {d['color']} {d['shape']}" for d in det["detected"])) or "nothing"
                    for det in out.details[i * args.n : (i + 1) * args.n]
                )
                scores[path][prompt] = {"tier": tier, "strict": float(strict[i]), "partial": float(partial[i]),
                                        "most_detected": seen.most_common(1)[0]}

    names = [os.path.normpath(p) for p in args.policies]
    print(f"\n{args.split} prompts, {args.n} samples each (seeds {args.seed}…), strict / partial per policy")
    print("| tier | prompt | " + " | ".join(names) + f" | most detected ({names[0]}) |")
    print("|---|---|" + "---|" * len(names) + "---|")
    for tier, tier_prompts in prompts.items():
        for prompt in tier_prompts:
            cells = [f"{scores[p][prompt]['strict']:.2f} / {scores[p][prompt]['partial']:.2f}" for p in args.policies]
            what, count = scores[args.policies[0]][prompt]["most_detected"]
            print(f"| {tier} | {prompt} | " + " | ".join(cells) + f" | {what} ({count}/{args.n}) |")
        means = [sum(scores[p][q]["strict"] for q in tier_prompts) / len(tier_prompts) for p in args.policies]
        print(f"| {tier} | **mean strict** | " + " | ".join(f"{m:.3f}" for m in means) + " | |")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"split": args.split, "n": args.n, "seed": args.seed, "steps": args.steps,
                       "guidance_scale": args.guidance_scale, "scores": scores}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
