"""``genalign sample`` and ``genalign eval``: sample a policy, score it, write tables.

Both accept any policy location: a diffusers pipeline directory, a hub id, or the
``final/`` directory of a training run. Samples are seeded per row (prompt i, sample j
uses seed + j), so two policies compared with the same arguments see the same noise.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from genalign.policies import POLICIES
from genalign.policies.stable_diffusion import POLICY_FILE
from genalign.report import image_grid


def load_policy(path_or_id: str, steps: int | None = None, guidance_scale: float | None = None) -> Any:
    """A policy from a pipeline dir / hub id / genalign policy dir, with sampling overrides."""
    meta = None
    meta_path = os.path.join(path_or_id, POLICY_FILE)
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
    kind = meta["type"] if meta else "stable_diffusion"  # a bare diffusers pipeline
    if kind not in POLICIES:
        raise ValueError(f"{path_or_id}: unknown policy type {kind!r}; known: {sorted(POLICIES)}")
    config_cls, policy_cls = POLICIES[kind]
    config = config_cls(**meta["config"]) if meta else config_cls(pretrained=path_or_id)
    if steps is not None:
        config.num_steps = steps
    if guidance_scale is not None:
        config.guidance_scale = guidance_scale
    return policy_cls.from_pretrained(path_or_id, config)


@torch.no_grad()
def sample_and_score(
    policy: Any, prompts: Sequence[str], n: int, seed: int, reward: Any | None, batch_size: int = 64, desc: str = "sampling"
) -> tuple[torch.Tensor, Any]:
    """Rollout ``n`` samples per prompt (row j of a prompt uses ``seed + j``) and score them.

    Returns images ``[len(prompts) * n, 3, H, W]`` and the concatenated RewardOutput (or None).
    """
    from rewards.base import RewardOutput

    per_call = max(1, batch_size // n)
    images, scores, comps, details = [], [], {}, []
    for i in tqdm(range(0, len(prompts), per_call), desc=desc, leave=False):
        chunk = list(prompts[i : i + per_call])
        gens = [torch.Generator().manual_seed(seed + j) for _ in chunk for j in range(n)]
        traj = policy.rollout(chunk, n, gens)
        images.append(traj.outputs.cpu())
        if reward is not None:
            out = reward(traj.outputs, traj.conditions)
            scores.append(out.scores.float().cpu())
            for k, v in out.components.items():
                comps.setdefault(k, []).append(v.float().cpu())
            details.extend(out.details or [{} for _ in traj.conditions])
    imgs = torch.cat(images)
    if reward is None:
        return imgs, None
    return imgs, RewardOutput(torch.cat(scores), {k: torch.cat(v) for k, v in comps.items()}, details)


def _build_named_reward(name: str, verifier_path: str = "assets/models/shapes-verifier") -> Any | None:
    from rewards.jpeg import JpegCompressibility, JpegConfig

    if name == "none":
        return None
    if name == "auto":
        name = "shapes_verifier" if os.path.isdir(verifier_path) else "jpeg_compressibility"
    if name == "shapes_verifier":
        from rewards.shapes_verifier import ShapesVerifierReward

        return ShapesVerifierReward.from_pretrained(verifier_path)
    if name in ("jpeg_compressibility", "jpeg_incompressibility"):
        return JpegCompressibility(JpegConfig(type=name))
    raise ValueError(f"unknown reward {name!r}; choose shapes_verifier, jpeg_compressibility, jpeg_incompressibility, none or auto")


def sample_command(args: argparse.Namespace) -> int:
    prompts = list(args.prompt)
    if args.prompts:
        if not os.path.isfile(args.prompts):
            raise FileNotFoundError(f"prompt file not found: {args.prompts}")
        with open(args.prompts) as f:
            prompts += [line.strip() for line in f if line.strip() and not line.startswith("#")]
        if not prompts:
            raise ValueError(f"prompt file {args.prompts} has no prompts")
    if not prompts:
        raise ValueError("no prompts: pass --prompt TEXT (repeatable) or --prompts FILE")
    reward = _build_named_reward(args.reward)
    policy = load_policy(args.policy, args.steps, args.guidance_scale)
    t0 = time.perf_counter()
    images, scored = sample_and_score(policy, prompts, args.n, args.seed, reward)
    wall = time.perf_counter() - t0
    os.makedirs(os.path.join(args.out, "images"), exist_ok=True)
    rows = []
    for i, img in enumerate(images):
        p, j = divmod(i, args.n)
        name = f"images/{p:04d}_{j:02d}.png"
        image_grid(img[None], rows=1, pad=0).save(os.path.join(args.out, name))
        row = {"prompt": prompts[p], "seed": args.seed + j, "image": name}
        if scored is not None:
            row["reward"] = float(scored.scores[i])
            row["components"] = {k: float(v[i]) for k, v in scored.components.items()}
            row["details"] = scored.details[i] if scored.details else {}
        rows.append(row)
    with open(os.path.join(args.out, "rewards.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    image_grid(images, rows=len(prompts), scale=4 if images.shape[-1] <= 64 else 1).save(os.path.join(args.out, "grid.png"))
    summary = {"prompts": len(prompts), "samples": len(rows), "wall_seconds": wall}
    if scored is not None:
        summary["reward_mean"] = float(scored.scores.mean())
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary))
    return 0


def evaluate_tiers(
    policy: Any, verifier: Any, tiers: Sequence[int], split: str, prompts_per_tier: int, n: int, seed: int, batch_size: int = 64
) -> list[dict[str, Any]]:
    """Per-tier strict and partial accuracy on Shapes World prompts (prompts drawn with ``seed``)."""
    from genalign.toyworld import sample_prompts

    table = []
    for tier in tiers:
        prompts = sample_prompts(tier, prompts_per_tier, split, seed=seed)
        _, out = sample_and_score(policy, prompts, n, seed, verifier, batch_size, desc=f"tier {tier}")
        strict, partial = out.components["strict"], out.components["partial"]
        table.append(
            {
                "tier": tier,
                "split": split,
                "prompts": len(prompts),
                "samples": len(strict),
                "strict": float(strict.mean()),
                "strict_se": float(strict.std(unbiased=True) / len(strict) ** 0.5) if len(strict) > 1 else 0.0,
                "partial": float(partial.mean()),
            }
        )
    return table


def format_table(table: list[dict[str, Any]]) -> str:
    lines = ["| tier | split | samples | strict | ± s.e. | partial |", "|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['tier']} | {r['split']} | {r['samples']} | {r['strict']:.3f} | {r['strict_se']:.3f} | {r['partial']:.3f} |")
    return "\n".join(lines)


def eval_command(args: argparse.Namespace) -> int:
    from rewards.shapes_verifier import ShapesVerifierReward

    verifier = ShapesVerifierReward.from_pretrained(args.verifier)
    policy = load_policy(args.policy, args.steps, args.guidance_scale)
    table = evaluate_tiers(policy, verifier, args.tiers, args.split, args.prompts_per_tier, args.n, args.seed, args.batch_size)
    print(format_table(table))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"policy": args.policy, "seed": args.seed, "table": table}, f, indent=2)
    return 0
