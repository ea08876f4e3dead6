"""Train and evaluate the Shapes World verifier (a tiny grid detector, see
:mod:`rewards.shapes_verifier`), and write its weights, config and model card.

    genalign toyworld pretrain verifier --out assets/models/shapes-verifier

Data: renders of train-split prompts of every tier, half of them, and free scenes of
1-4 random objects, the other half, some with one object replaced by junk (class
"other": ellipse, two-lump smudge, bar, crescent); no scene ever shows a held-out
colour x shape pair (:data:`genalign.toyworld.HELDOUT_PAIRS`), so held-out accuracy
is honest. Every batch is re-augmented like the output of a tiny generative model
(hue drift, saturation and brightness change, blur, downscale-upscale, noise).

Evaluation (:func:`evaluate_verifier`) renders fresh scenes (seeds from
:data:`EVAL_SEED_BASE` on, never used in training) per tier and split and scores
each prompt against its own scene, another prompt's scene, a near miss's scene and
its own scene with junk, clean, augmented and at 64 px; labels come from
``check_scene`` on the true objects.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import replace
from itertools import product
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from genalign.toyworld.prompts import HELDOUT_PAIRS, all_prompts, all_specs
from genalign.toyworld.render import (
    BACKGROUND,
    SUPERSAMPLE,
    PlacedObject,
    draw_objects,
    render_objects,
    render_scene,
)
from genalign.toyworld.spec import (
    COLORS,
    SHAPES,
    SIZES,
    TIERS,
    SceneSpec,
    check_scene,
    parse_prompt,
)
from rewards.shapes_verifier import (
    CONFIG_NAME,
    HEAD_CHANNELS,
    OTHER_SHAPE,
    SHAPE_CLASSES,
    WEIGHTS_NAME,
    ShapesGridDetector,
    ShapesVerifierReward,
)

from .common import EVAL_SEED_BASE, TRAIN_SEEDS_PER_RUN, augment

JUNK_KINDS = ("ellipse", "peanut", "bar", "crescent")


def encode_targets(objects: Sequence[PlacedObject], grid: int) -> torch.Tensor:
    """Ground truth -> ``[6, G, G]``: objectness, shape id (:data:`SHAPE_CLASSES`), colour id,
    size id (-1, ignored, for junk), offset x, y in the cell."""
    target = torch.zeros(6, grid, grid)
    colors = list(COLORS)
    for o in objects:
        gx, gy = min(int(o.x * grid), grid - 1), min(int(o.y * grid), grid - 1)
        size_id = -1 if o.shape == OTHER_SHAPE else SIZES.index(o.size)
        target[:, gy, gx] = torch.tensor([
            1.0, SHAPE_CLASSES.index(o.shape), colors.index(o.color), size_id,
            o.x * grid - gx, o.y * grid - gy,
        ])
    return target


def _junk_polygon(kind: str, cx: float, cy: float, r: float, rng: random.Random) -> list[tuple[float, float]]:
    """Corners of a junk shape of extent about ``r`` around ``(cx, cy)`` (pixel units)."""
    turn = rng.uniform(0, math.pi)
    if kind == "ellipse":  # clearly elongated, unlike a circle
        a = r * rng.uniform(1.0, 1.1)
        local = [(a * math.cos(t), a / rng.uniform(1.9, 2.6) * math.sin(t)) for t in
                 (2 * math.pi * k / 24 for k in range(24))]
    else:  # bar
        h, w = r * 1.05, r * rng.uniform(0.22, 0.38)
        local = [(-h, -w), (h, -w), (h, w), (-h, w)]
    c, s = math.cos(turn), math.sin(turn)
    return [(cx + c * x - s * y, cy + s * x + c * y) for x, y in local]


def draw_with_junk(objects: Sequence[PlacedObject], junk: int, size: int,
                   rng: random.Random) -> tuple[Image.Image, list[PlacedObject]]:
    """Redraw a scene with ``objects[junk]`` replaced by a junk shape of its colour and place.

    Returns the image and the objects with the junk one's shape set to ``"other"``.
    """
    r0, g0, b0 = (c + rng.randint(-4, 4) for c in BACKGROUND)
    background = (r0, g0, b0)
    scale = size * SUPERSAMPLE
    keep = [o for i, o in enumerate(objects) if i != junk]
    canvas = draw_objects(keep, scale, background, supersample=1)  # drawn large, filtered below
    draw = ImageDraw.Draw(canvas)
    o = objects[junk]
    cx, cy, r = o.x * scale, o.y * scale, o.radius * scale
    kind = rng.choice(JUNK_KINDS)
    t = rng.uniform(0, 2 * math.pi)
    if kind == "crescent":  # a disc with a bite taken out
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=o.rgb)
        d, rb = r * rng.uniform(0.45, 0.7), r * rng.uniform(0.75, 0.9)
        bx, by = cx + d * math.cos(t), cy + d * math.sin(t)
        draw.ellipse([bx - rb, by - rb, bx + rb, by + rb], fill=background)
    elif kind == "peanut":  # two overlapping discs, like a smudge of a weak generator
        for side in (-1, 1):
            d, rl = side * r * rng.uniform(0.3, 0.4), r * rng.uniform(0.5, 0.6)
            lx, ly = cx + d * math.cos(t), cy + d * math.sin(t)
            draw.ellipse([lx - rl, ly - rl, lx + rl, ly + rl], fill=o.rgb)
    else:
        draw.polygon(_junk_polygon(kind, cx, cy, r, rng), fill=o.rgb)
    labels = [replace(o, shape=OTHER_SHAPE) if i == junk else o for i, o in enumerate(objects)]
    return canvas.resize((size, size), Image.Resampling.BOX), labels


def to_uint8(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> ``[3, H, W]`` uint8."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def build_dataset(n: int, seed: int, size: int = 32, grid: int = 8,
                  junk: float = 0.4) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` training scenes -> images ``[n, 3, size, size]`` uint8, targets ``[n, 6, G, G]``.

    Even indices render a random train-split prompt of a random tier; odd indices a free
    list of 1-4 objects from the train colour x shape pairs, where with probability
    ``junk`` one object is replaced by a junk shape (class "other").
    """
    specs = {tier: all_specs(tier, "train") for tier in TIERS}
    pairs = [(s, c) for c, s in product(COLORS, SHAPES) if (c, s) not in HELDOUT_PAIRS]
    images = torch.empty(n, 3, size, size, dtype=torch.uint8)
    targets = torch.empty(n, 6, grid, grid)
    rng = random.Random(seed)
    for i in range(n):
        scene_seed = seed * TRAIN_SEEDS_PER_RUN + i
        if i % 2 == 0:
            spec = rng.choice(specs[rng.choice(list(TIERS))])
            image, objects = render_scene(spec, scene_seed, size)
        else:
            items = [(*rng.choice(pairs), rng.choice(SIZES)) for _ in range(rng.randint(1, 4))]
            image, objects = render_objects(items, scene_seed, size)
            if rng.random() < junk:
                image, objects = draw_with_junk(objects, rng.randrange(len(objects)), size, rng)
        images[i] = to_uint8(image)
        targets[i] = encode_targets(objects, grid)
    return images, targets


def detector_loss(detector: ShapesGridDetector, logits: torch.Tensor,
                  targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Objectness BCE on every cell + class CE and offset L1 on cells holding an object.

    logits ``[B, 15, G, G]``, targets ``[B, 6, G, G]`` from :func:`encode_targets`.
    """
    parts = detector.split_head(logits)
    present = targets[:, 0] > 0.5  # [B, G, G]
    obj = F.binary_cross_entropy_with_logits(parts["objectness"], targets[:, 0], pos_weight=torch.tensor(4.0))

    def ce(name: str, channel: int) -> torch.Tensor:
        flat = parts[name].permute(0, 2, 3, 1)[present]  # [N_obj, classes]
        return F.cross_entropy(flat, targets[:, channel][present].long(), ignore_index=-1)

    offset = parts["offset"].permute(0, 2, 3, 1)[present].sigmoid()  # [N_obj, 2]
    terms = {
        "objectness": obj,
        "shape": ce("shape", 1),
        "color": ce("color", 2),
        "size": ce("size", 3),
        "offset": 4 * F.l1_loss(offset, targets[:, 4:6].permute(0, 2, 3, 1)[present]),
    }
    return sum(terms.values()), {k: float(v.detach()) for k, v in terms.items()}


def train(seed: int, steps: int, n_scenes: int, batch_size: int, lr: float,
          channels: Sequence[int], color_hidden: int, junk: float) -> tuple[ShapesGridDetector, dict[str, float]]:
    """Train a detector; returns it with timings (seconds) of data and optimisation."""
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    images, targets = build_dataset(n_scenes, seed, junk=junk)
    t_data = time.perf_counter() - t0
    print(f"rendered {n_scenes} training scenes in {t_data:.1f} s")
    detector = ShapesGridDetector(channels, color_hidden)
    opt = torch.optim.AdamW(detector.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    detector.train()
    t1 = time.perf_counter()
    for step in range(1, steps + 1):
        idx = torch.randint(0, n_scenes, (batch_size,), generator=gen)
        x = augment(images[idx].float() / 255, gen)  # [B, 3, 32, 32]
        loss, terms = detector_loss(detector, detector(x), targets[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        if step % 250 == 0 or step == steps:
            rate = step / (time.perf_counter() - t1)
            print(f"step {step}/{steps} loss {loss.item():.4f} "
                  + " ".join(f"{k} {v:.3f}" for k, v in terms.items()) + f" ({rate:.1f} steps/s)", flush=True)
    detector.eval()
    return detector, {"data_s": t_data, "train_s": time.perf_counter() - t1}


def save_verifier(detector: ShapesGridDetector, out: Path, extra: dict | None = None) -> None:
    """Write ``model.safetensors`` and ``config.json`` to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in detector.state_dict().items()}, str(out / WEIGHTS_NAME))
    config = {
        "architecture": "ShapesGridDetector",
        "channels": list(detector.channels),
        "color_hidden": detector.color_hidden,
        "input_size": detector.input_size,
        "grid": detector.grid,
        "head": HEAD_CHANNELS,
        "shapes": list(SHAPE_CLASSES),
        "colors": list(COLORS),
        "sizes": list(SIZES),
        "threshold": 0.5,
        "nms_distance": 0.12,
        **(extra or {}),
    }
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")


def _fields(spec: SceneSpec) -> list:
    return [spec.relation] + [v for c in spec.clauses for v in (c.shape, c.color, c.count, c.size, c.position)]


def near_misses(prompt: str, pool: Sequence[str]) -> list[str]:
    """Prompts of ``pool`` with the same structure that differ from ``prompt`` in exactly one
    field (a colour, shape, count, size, position or the relation)."""
    fields = _fields(parse_prompt(prompt))
    out = []
    for other in pool:
        theirs = _fields(parse_prompt(other))
        if len(theirs) == len(fields) and sum(a != b for a, b in zip(fields, theirs)) == 1:
            out.append(other)
    return out


def _eval_scene(prompt: str, kind: str, seed: int, size: int) -> tuple[Image.Image, list[PlacedObject]]:
    image, objects = render_scene(parse_prompt(prompt), seed, size)
    if kind != "junk":
        return image, objects
    rng = random.Random(seed)
    return draw_with_junk(objects, rng.randrange(len(objects)), size, rng)


def evaluate_verifier(verifier: ShapesVerifierReward, n_per_tier: int = 400, seed: int = 0,
                      splits: Sequence[str] = ("train", "heldout")) -> list[dict]:
    """Strict-verdict agreement of ``verifier`` with ground truth on fresh renders.

    Per tier and split, ``n_per_tier`` prompts each scored against four renders:
    ``pos`` its own scene; ``neg`` the scene of another random prompt of the tier and
    split; ``near`` the scene of a near miss (:func:`near_misses`: one colour, shape,
    count, size, position or relation changed); ``junk`` its own scene with one object
    replaced by a junk shape of the same colour (:func:`draw_with_junk`). Labels are
    ``check_scene`` on the true objects (a near miss like "a small red circle" for "a
    red circle" is labelled 1). Every render is scored clean at 32 px, augmented
    (:func:`augment`) and clean at 64 px. ``fpr_*``: rate of verdict 1 among the neg,
    near and junk scenes labelled 0.
    """
    rows = []
    gen = torch.Generator().manual_seed(seed)
    next_seed = EVAL_SEED_BASE + seed * TRAIN_SEEDS_PER_RUN
    kinds = ("pos", "neg", "near", "junk")
    for tier, split in product(TIERS, splits):
        prompts = all_prompts(tier, split)
        rng = random.Random(f"eval/{seed}/{tier}/{split}")
        asked, shown = [], []  # prompt scored, prompt rendered; rows cycle through `kinds`
        for _ in range(n_per_tier):
            prompt = rng.choice(prompts)
            near = near_misses(prompt, prompts) or [p for p in prompts if p != prompt]
            asked += [prompt] * len(kinds)
            shown += [prompt, rng.choice([p for p in prompts if p != prompt]), rng.choice(near), prompt]
        scene_seeds = range(next_seed, next_seed + len(shown))
        next_seed += len(shown)
        kind = torch.arange(len(shown)) % len(kinds)  # [4n]
        scenes = [_eval_scene(p, kinds[k], s, 32) for p, k, s in zip(shown, kind.tolist(), scene_seeds)]
        truth = torch.tensor([check_scene(parse_prompt(a), objs).strict for a, (_, objs) in zip(asked, scenes)])
        clean = torch.stack([to_uint8(img) for img, _ in scenes]).float() / 255  # [4n, 3, 32, 32]
        big = torch.stack(
            [to_uint8(_eval_scene(p, kinds[k], s, 64)[0]) for p, k, s in zip(shown, kind.tolist(), scene_seeds)]
        ).float() / 255  # [4n, 3, 64, 64]
        inputs = {"clean": clean, "aug": augment(clean, gen), "64px": big}
        row: dict = {"tier": tier, "split": split, "n": n_per_tier}
        for name, x in inputs.items():
            pred = verifier(x, asked).components["strict"].bool()  # [4n]
            right = pred == truth
            for k, label in enumerate(kinds):
                row[f"{label}_{name}"] = float(right[kind == k].float().mean())
            false = (kind > 0) & ~truth
            row[f"fpr_{name}"] = float(pred[false].float().mean()) if false.any() else 0.0
        rows.append(row)
    return rows


TABLE_COLUMNS = [
    ("tier", "tier"), ("split", "split"),
    ("pos_clean", "pos clean"), ("pos_aug", "pos aug"), ("pos_64px", "pos 64px"),
    ("neg_clean", "neg clean"), ("neg_aug", "neg aug"),
    ("near_clean", "near clean"), ("near_aug", "near aug"), ("near_64px", "near 64px"),
    ("junk_clean", "junk clean"), ("junk_aug", "junk aug"),
    ("fpr_clean", "FPR clean"), ("fpr_aug", "FPR aug"),
]


def format_table(rows: Sequence[dict]) -> str:
    """Markdown table of :func:`evaluate_verifier` rows (accuracies in %)."""
    lines = ["| " + " | ".join(h for _, h in TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for r in rows:
        cells = [str(r[k]) if k in ("tier", "split") else f"{100 * r[k]:.1f}" for k, _ in TABLE_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_model_card(out: Path, args: argparse.Namespace, detector: ShapesGridDetector,
                     timings: dict[str, float], rows: Sequence[dict]) -> None:
    """Write ``README.md`` describing how the verifier was made and what it scores."""
    n_params = sum(p.numel() for p in detector.parameters())
    weights_kb = (out / WEIGHTS_NAME).stat().st_size / 1024
    heldout = ", ".join(f"{c} {s}" for c, s in sorted(HELDOUT_PAIRS))
    scored = [k for k in rows[0] if k.split("_")[0] in ("pos", "neg", "near", "junk")]
    worst = {split: min(r[k] for r in rows if r["split"] == split for k in scored) for split in ("train", "heldout")}
    c0, c1 = detector.channels
    total_s = timings["data_s"] + timings["train_s"]
    card = f"""# Shapes World verifier

A {n_params / 1e3:.0f}k-parameter grid detector that reads a Shapes World image (circles,
squares, triangles; six colours; two sizes) into a list of objects, which
`genalign.toyworld.check_scene` then judges against the prompt. Used as the reward
`rewards.shapes_verifier.ShapesVerifierReward`:

```python
from rewards.shapes_verifier import ShapesVerifierReward
reward = ShapesVerifierReward.from_pretrained("assets/models/shapes-verifier")  # score="partial" for partial credit
out = reward(images, prompts)  # images [B, 3, H, W] in [0, 1] or PIL; out.scores [B] in {{0, 1}}
```

## Architecture
`ShapesGridDetector`: input 32x32 RGB (other sizes are resized with antialiasing).
Per cell of an 8x8 grid it predicts objectness (1), shape (3 + "other"), colour (6),
size (2) and the centre offset in the cell (2). Two branches keep colour and shape apart, so a
colour x shape pair never seen in training is read like a seen one:

- geometry (objectness, shape, size, offset) sees only the colour-blind intensity
  max(R, G, B): pixel-unshuffle to 16x16x4, two 3x3 conv + BatchNorm + ReLU layers
  (width {c0}), max-pool to 8x8, three such layers (width {c1}), a 1x1 head;
- colour sees single pixels only: a per-pixel MLP (two hidden layers of width
  {detector.color_hidden}) gives colour probabilities and a foreground weight; a cell's
  colour is the weighted mean over its 4x4 pixels.

Cells with objectness > 0.5 become objects; of two detections closer than 0.12 image
widths the weaker is dropped.

- parameters: {n_params:,}
- weights: {weights_kb:.0f} KB, fp32 safetensors (`model.safetensors`, `config.json`)

## Data
- {args.scenes:,} renders at 32 px, re-augmented each step: half are renders of
  train-split prompts of all five tiers, half free scenes of 1-4 random objects.
- In {100 * args.junk:.0f}% of the free scenes one object is replaced by junk of its colour (an
  elongated ellipse, a two-lump smudge, a bar or a crescent), labelled with the shape
  class "other". An "other" detection matches no clause, so a smudge fails the prompt
  instead of passing for a circle: a policy cannot farm reward with blobs.
- Held-out colour x shape pairs never appear in training, so the held-out rows
  below measure generalisation to unseen pairs: {heldout}.
- Augmentation, per image: hue rotation ±15° with saturation x0.75-1.15 (p=0.8);
  brightness x0.85-1.15 (p=0.8); downscale to 1/2 or 3/4 and back up (p=0.4);
  Gaussian blur σ 0.3-0.9 px (p=0.5); Gaussian noise σ up to 0.05 (p=0.5).

## Training
```
genalign toyworld pretrain verifier --out {args.out} --seed {args.seed} \\
    --steps {args.steps} --scenes {args.scenes} --batch-size {args.batch_size} --lr {args.lr} --junk {args.junk} --threads {args.threads}
```
- optimiser: AdamW (weight decay 1e-4), one-cycle learning rate peaking at {args.lr}
- batch {args.batch_size}, {args.steps} steps, seed {args.seed}
- loss: objectness BCE (positive weight 4) on all cells; cross-entropy for shape,
  colour and size, and 4x L1 on the centre offset, on cells holding an object
- wall time on 2 CPU cores, {args.threads} torch thread(s): {total_s:.0f} s to train
  ({timings["data_s"]:.0f} s rendering, {timings["train_s"]:.0f} s optimisation), then {timings["eval_s"]:.0f} s to evaluate; with
  another training job on the same cores expect up to about twice as long

## Evaluation
`evaluate_verifier` in `genalign/recipes/train_verifier.py` (seed {args.seed}): per tier
and split, {rows[0]["n"]} prompts, each scored against four fresh renders whose seeds
were never used in training:

- **pos**: its own scene;
- **neg**: the scene of another random prompt of the same tier and split;
- **near**: the scene of a near miss, the prompt with exactly one colour, shape,
  count, size, position or relation changed;
- **junk**: its own scene with one object replaced by junk of the same colour.

Labels come from `check_scene` on the true objects (so "a red circle" scored against
a render of "a small red circle" is labelled 1). Columns give the % of strict
verdicts that agree with the label, on clean 32 px renders, augmented renders (the
training augmentation, fresh draws) and clean 64 px renders. FPR is the % of neg,
near and junk scenes labelled 0 that the verifier still accepts; a verifier that
always says yes scores 100 there.

Lowest agreement in any column: train split {100 * worst["train"]:.1f}%, held-out split
{100 * worst["heldout"]:.1f}%.

{format_table(rows)}

## Limits
- The augmentation imitates a tiny generator's blur and hue drift, not every failure
  of a real one: half-drawn or overlapping shapes get an unreliable reading, and a
  colour between two named hues (orange, between red and yellow) is forced to one.
- Objects are assumed not to overlap (one object per grid cell at 32 px).
"""
    (out / "README.md").write_text(card)


def main(argv: Sequence[str] | None = None) -> None:
    """Train, evaluate and save the Shapes World verifier."""
    p = argparse.ArgumentParser(prog="genalign toyworld pretrain verifier", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("assets/models/shapes-verifier"), help="output folder")
    p.add_argument("--seed", type=int, default=0, help="seed of data, initialisation and augmentation")
    p.add_argument("--steps", type=int, default=2000, help="optimisation steps")
    p.add_argument("--scenes", type=int, default=30000, help="training renders, re-augmented each step")
    p.add_argument("--batch-size", type=int, default=128, help="renders per step")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--channels", type=int, nargs=2, default=[32, 64], help="channels at S/2 and S/4")
    p.add_argument("--junk", type=float, default=0.4, help="share of free scenes with a junk object")
    p.add_argument("--color-hidden", type=int, default=16, help="width of the per-pixel colour MLP")
    p.add_argument("--eval-per-tier", type=int, default=400, help="positives (and negatives) per tier and split")
    p.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads; 1 is fastest when another job shares the CPU (0: torch's choice)",
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    detector, timings = train(args.seed, args.steps, args.scenes, args.batch_size, args.lr, args.channels,
                              args.color_hidden, args.junk)
    save_verifier(detector, args.out)
    verifier = ShapesVerifierReward.from_pretrained(args.out)
    t0 = time.perf_counter()
    rows = evaluate_verifier(verifier, args.eval_per_tier, seed=args.seed)
    timings["eval_s"] = time.perf_counter() - t0
    print(format_table(rows))
    write_model_card(args.out, args, detector, timings, rows)
    (args.out / "eval.json").write_text(json.dumps({"timings_s": timings, "rows": rows}, indent=2) + "\n")
    print(f"saved to {args.out} (training {timings['data_s'] + timings['train_s']:.0f} s)")


if __name__ == "__main__":
    main()
