"""Does storing an asset's weights in float16 change what it does? Float32 vs float16 copies.

tiny-lcm's UNet and shapes-clip's CLIP weights ship in float16 (loaded back as float32). This
compares them with float32 copies, e.g. the files before conversion, taken from git history::

    mkdir -p /tmp/fp32 && git archive d7ec504 assets/models/tiny-lcm assets/models/shapes-clip | tar -x -C /tmp/fp32
    python benchmarks/fp16_assets.py --lcm32 /tmp/fp32/assets/models/tiny-lcm \\
        --clip32 /tmp/fp32/assets/models/shapes-clip --out benchmarks/results/fp16_assets.json

* LCM: the same prompts and seeds (8 train and 8 held-out prompts of tiers 1, 2 and 5, 4 seeds,
  4 steps, guidance 4) from both copies; pixel differences and how many strict verdicts differ.
* CLIP: the retrieval table of the model card from both copies, and aesthetic-head scores of
  256 renders.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from genalign.evaluation import load_policy, sample_and_score
from genalign.recipes.pretrain_clip import retrieval_accuracy
from genalign.toyworld import parse_prompt, render
from genalign.toyworld.prompts import all_prompts, sample_prompts
from rewards.aesthetic import AestheticConfig, AestheticReward
from rewards.open_clip_backbone import load_open_clip
from rewards.shapes_verifier import ShapesVerifierReward


def compare_lcm(lcm32: str, lcm16: str, verifier: ShapesVerifierReward) -> dict:
    prompts = [p for t in (1, 2, 5) for split in ("train", "heldout") for p in all_prompts(t, split)[:8]]
    out = {}
    for name, path in (("float32", lcm32), ("float16", lcm16)):
        policy = load_policy(path, steps=4, guidance_scale=4.0)
        images, scores = sample_and_score(policy, prompts, 4, 0, verifier, desc=f"lcm {name}")
        out[name] = (images, scores.components["strict"])
    diff = (out["float32"][0] - out["float16"][0]).abs()
    return {
        "samples": int(diff.shape[0]),
        "max_pixel_diff": float(diff.max()),
        "mean_pixel_diff": float(diff.mean()),
        "strict_float32": float(out["float32"][1].mean()),
        "strict_float16": float(out["float16"][1].mean()),
        "verdicts_differ": int((out["float32"][1] != out["float16"][1]).sum()),
    }


def compare_clip(clip32: str, clip16: str) -> dict:
    tables, aesthetic = {}, {}
    prompts = sample_prompts(3, 128, "heldout", seed=3) + sample_prompts(1, 128, "train", seed=3)
    images = [render(parse_prompt(p), i) for i, p in enumerate(prompts)]
    for name, folder in (("float32", clip32), ("float16", clip16)):
        config, weights = os.path.join(folder, "open_clip_config.json"), os.path.join(folder, "open_clip_model.safetensors")
        model, tokenizer, cfg = load_open_clip(config, weights)
        tables[name] = [(r["split"], r["tier"], r["top1"]) for r in retrieval_accuracy(model, tokenizer, cfg, seed=0, repeats=4)]
        head = AestheticReward(AestheticConfig(head=os.path.join(folder, "aesthetic_head.safetensors"), model=config,
                                               pretrained=weights))
        aesthetic[name] = head(images, prompts).scores
    diff = (aesthetic["float32"] - aesthetic["float16"]).abs()
    return {
        "retrieval_float32": tables["float32"],
        "retrieval_float16": tables["float16"],
        "retrieval_equal": tables["float32"] == tables["float16"],
        "aesthetic_renders": len(prompts),
        "aesthetic_max_diff": float(diff.max()),
        "aesthetic_score_std": float(aesthetic["float32"].std()),
        "aesthetic_corr": float(torch.corrcoef(torch.stack([aesthetic["float32"], aesthetic["float16"]]))[0, 1]),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lcm32", required=True, help="tiny-lcm folder with a float32 UNet")
    ap.add_argument("--lcm16", default="assets/models/tiny-lcm")
    ap.add_argument("--clip32", required=True, help="shapes-clip folder with float32 weights")
    ap.add_argument("--clip16", default="assets/models/shapes-clip")
    ap.add_argument("--verifier", default="assets/models/shapes-verifier")
    ap.add_argument("--out", default=None, help="JSON file to write")
    args = ap.parse_args(argv)

    result = {"lcm": compare_lcm(args.lcm32, args.lcm16, ShapesVerifierReward.from_pretrained(args.verifier)),
              "clip": compare_clip(args.clip32, args.clip16)}
    lcm, clip = result["lcm"], result["clip"]
    print("| asset | check | float32 vs float16 |")
    print("|---|---|---|")
    print(f"| tiny-lcm | {lcm['samples']} samples: max / mean pixel diff | {lcm['max_pixel_diff']:.4f} / {lcm['mean_pixel_diff']:.1e} |")
    print(f"| tiny-lcm | strict verdicts that differ | {lcm['verdicts_differ']} (strict {lcm['strict_float32']:.3f} vs {lcm['strict_float16']:.3f}) |")
    print(f"| shapes-clip | retrieval table equal | {clip['retrieval_equal']} |")
    print(f"| shapes-clip | aesthetic, {clip['aesthetic_renders']} renders: max diff (score std) | "
          f"{clip['aesthetic_max_diff']:.4f} ({clip['aesthetic_score_std']:.2f}), corr {clip['aesthetic_corr']:.4f} |")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
