"""Does a policy read the position words at all? Paired left/right and top/bottom gaps.

Strict accuracy on tier 2 mixes two things: whether the object is drawn and whether it lands
in the named band (centre x < 0.4 for "on the left", ...). This script isolates the second.
Every tier-2 prompt of the split is sampled with the same seeds (row j uses ``seed + j``), so
"a blue circle on the left" and "a blue circle on the right" start from identical noise. The
verifier's detection of the prompt's object (or its first detection) gives a centre, and
per policy the script reports

* ``x gap``: mean centre x over "on the right" prompts minus over "on the left" prompts,
* ``y gap``: mean centre y over "at the bottom" prompts minus over "at the top" prompts,
* ``in band``: the fraction of detected objects in the named band (chance is what a policy
  blind to the words gets from its layout prior alone) and tier-2 strict accuracy,
* ``text sep``: how far apart the text encoder puts the position words, relative to colours:
  the mean distance between the prompt embeddings ``[L, D]`` of "a C S on the left" and
  "a C S on the right" (and top / bottom) over the mean distance between "a C S P" and
  "a C' S P" (two colours, same shape and position). The UNet can only follow a word the
  encoder tells apart from its opposite.

* ``distinct cells``: at the input of the UNet's first cross-attention (which the prompt does
  not reach yet), for a constant latent at t = 900, how many of the latent cells have a feature vector of their own (the
  rest equal some other cell to 1e-4). A UNet has no position embedding; only the convolutions'
  zero padding tells a cell where it is, and cells out of the padding's reach all look alike,
  so that layer cannot attend to "left" differently in them.

A policy that ignores the words has both gaps at 0 (up to nothing: the noise is paired); a
policy that follows them has gaps up to about 0.6.

    python benchmarks/position_sensitivity.py assets/models/tiny-sd runs/quickstart/final \\
        --out benchmarks/results/position_sensitivity.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

from genalign.evaluation import load_policy, sample_and_score
from genalign.toyworld import parse_prompt
from genalign.toyworld.prompts import all_prompts
from genalign.toyworld.spec import POSITIONS, satisfies_position
from rewards.shapes_verifier import DetectedObject, ShapesVerifierReward


def object_centre(prompt: str, detected: list[dict]) -> DetectedObject | None:
    """The detection matching the prompt's (colour, shape), else the strongest one, else None."""
    clause = parse_prompt(prompt).clauses[0]
    objs = [DetectedObject(**d) for d in detected]
    same = [o for o in objs if (o.shape, o.color) == (clause.shape, clause.color)]
    return (same or objs or [None])[0]


def text_separation(policy, prompts: list[str]) -> float:
    """Mean embedding distance of opposite positions over that of two colours (see module doc)."""
    specs = [parse_prompt(p).clauses[0] for p in prompts]
    opposite = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
    colours = sorted({c.color for c in specs})
    pos_pairs, col_pairs = [], []
    for prompt, c in zip(prompts, specs):
        pos_pairs.append((prompt, prompt.replace(POSITIONS[c.position], POSITIONS[opposite[c.position]])))
        other = colours[(colours.index(c.color) + 1) % len(colours)]
        col_pairs.append((prompt, prompt.replace(c.color, other, 1)))

    def mean_distance(pairs: list[tuple[str, str]]) -> float:
        a = policy.encode([p for p, _ in pairs])["prompt_embeds"]  # [N, L, D]
        b = policy.encode([q for _, q in pairs])["prompt_embeds"]
        return float((a - b).flatten(1).norm(dim=1).mean())

    with torch.no_grad():
        return mean_distance(pos_pairs) / mean_distance(col_pairs)


@torch.no_grad()
def distinct_cells(unet, t: int = 900) -> tuple[int, int]:
    """(cells with a distinct feature vector, all cells) at the first cross-attention's input."""
    first = next(m for block in unet.down_blocks for m in getattr(block, "attentions", []))
    seen: dict[str, torch.Tensor] = {}
    handle = first.register_forward_pre_hook(lambda _m, args: seen.setdefault("x", args[0]))
    try:
        shape = (1, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
        context = torch.zeros(1, 1, unet.config.cross_attention_dim, dtype=unet.dtype, device=unet.device)
        unet(torch.zeros(shape, dtype=unet.dtype, device=unet.device), torch.tensor([t], device=unet.device),
             encoder_hidden_states=context)
    finally:
        handle.remove()
    cells = seen["x"][0].flatten(1).T.float()  # [H*W, C]
    cells = cells / cells.norm(dim=1).mean()
    unique = torch.unique((cells * 1e4).round(), dim=0)
    return len(unique), len(cells)


def measure(policy, verifier, prompts: list[str], n: int, seed: int, desc: str) -> dict:
    _, out = sample_and_score(policy, prompts, n, seed, verifier, desc=desc)
    centres: dict[str, list[tuple[float, float]]] = {}
    in_band: list[float] = []
    for i, prompt in enumerate(prompts):
        position = parse_prompt(prompt).clauses[0].position
        for det in out.details[i * n : (i + 1) * n]:
            obj = object_centre(prompt, det["detected"])
            if obj is None:
                continue
            centres.setdefault(position, []).append((obj.x, obj.y))
            in_band.append(float(satisfies_position(obj, position)))

    def mean(position: str, axis: int) -> float:
        return statistics.mean(c[axis] for c in centres[position])

    return {
        "x_gap": mean("right", 0) - mean("left", 0),
        "y_gap": mean("bottom", 1) - mean("top", 1),
        "mean_centre": {p: [mean(p, 0), mean(p, 1)] for p in sorted(centres)},
        "in_band": statistics.mean(in_band),
        "detected": len(in_band),
        "strict": float(out.components["strict"].mean()),
        "samples": len(prompts) * n,
        "text_sep": text_separation(policy, prompts),
        "distinct_cells": list(distinct_cells(policy.pipe.unet)),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("policies", nargs="+", help="pipeline folders or genalign policy folders (e.g. a run's final/)")
    ap.add_argument("--split", default="heldout", choices=["train", "heldout", "all"])
    ap.add_argument("--n", type=int, default=32, help="samples per prompt (same seeds for every prompt)")
    ap.add_argument("--seed", type=int, default=7000, help="first sampling seed")
    ap.add_argument("--steps", type=int, default=10, help="DDIM steps")
    ap.add_argument("--guidance-scale", type=float, default=4.0)
    ap.add_argument("--verifier", default="assets/models/shapes-verifier")
    ap.add_argument("--out", default=None, help="JSON file to write")
    args = ap.parse_args(argv)

    verifier = ShapesVerifierReward.from_pretrained(args.verifier)
    prompts = all_prompts(2, args.split)
    rows = {}
    for path in args.policies:
        policy = load_policy(path, steps=args.steps, guidance_scale=args.guidance_scale)
        rows[path] = measure(policy, verifier, prompts, args.n, args.seed, desc=path)

    print(f"\ntier-2 {args.split} prompts ({len(prompts)}), {args.n} paired samples each (seeds {args.seed}…)")
    print("| policy | x gap (right − left) | y gap (bottom − top) | in band | tier-2 strict | text sep | distinct cells |")
    print("|---|---|---|---|---|---|---|")
    for path, r in rows.items():
        print(f"| {os.path.normpath(path)} | {r['x_gap']:+.3f} | {r['y_gap']:+.3f} | {r['in_band']:.3f} | "
              f"{r['strict']:.3f} | {r['text_sep']:.3f} | {r['distinct_cells'][0]} / {r['distinct_cells'][1]} |")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"split": args.split, "n": args.n, "seed": args.seed, "steps": args.steps,
                       "guidance_scale": args.guidance_scale, "policies": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
