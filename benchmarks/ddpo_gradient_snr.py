"""How much signal is in one batch of DDPO's policy gradient? A diagnostic for Shapes World.

At fixed weights, draws several independent batches (prompts × samples per prompt), computes
DDPO's gradient of each (per-group normalised rewards, all steps of the chosen window), and
reports the cosine similarity between every pair of batch gradients. If the per-batch gradient
were mostly signal the cosines would approach 1; for pure noise they scatter around 0. With
mean cosine c, averaging m batches gives a direction whose cosine with the true gradient is
about sqrt(m c / (1 + m c)), so ~1/c batches are needed for a usable update.

It also measures, for a few prompts, the reward variance among continuations that share the
chain up to step k (``Policy.continue_from``): how much of the outcome is still open after k
steps, i.e. which steps carry credit.

    python benchmarks/ddpo_gradient_snr.py                     # tier 1 held-out, strict reward
    python benchmarks/ddpo_gradient_snr.py --windows 0.3 0.6 1.0 --batches 4
    python benchmarks/ddpo_gradient_snr.py --windows 1.0 --noise-windows 1 2 3   # noise windows vs full chain

Prints tables and writes JSON to --out.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys

import torch

from genalign.algorithms import DDPO, DDPOConfig
from genalign.algorithms.advantages import group_normalize
from genalign.configs import load_config
from genalign.policies import POLICIES
from genalign.policies.window import NoiseWindow
from genalign.train_config import TrainConfig
from rewards.registry import build_reward


def batch_gradient(policy, reward, prompts, k, seed, params, metric, window=1.0, noise_window=0, starts=(0.0, 0.4)) -> torch.Tensor:
    """DDPO's gradient on one fresh batch: all steps of the first ``window`` of the chain, or
    (``noise_window`` > 0) rollouts with shared x_T that draw noise only in a window of that many
    steps starting in ``starts``, trained at exactly those steps."""
    gens = [torch.Generator().manual_seed(seed * 100_003 + i) for i in range(len(prompts) * k)]
    kwargs = {}
    if noise_window:
        window_ = NoiseWindow.draw(len(prompts), noise_window, starts, torch.Generator().manual_seed(seed))
        kwargs = {"shared_noise": True, "noise_window": window_}
    traj = policy.rollout(prompts, k, gens, **kwargs)
    r = reward(traj.outputs, traj.conditions).components[metric].float()  # [N]
    traj.advantages = group_normalize(r, traj.group)
    if noise_window:
        algo = DDPO(DDPOConfig(clip_range=1.0, noise_window=noise_window))
    else:
        algo = DDPO(DDPOConfig(clip_range=1.0, step_window=[0.0, window]))
    steps = algo.train_steps(traj, torch.Generator())
    for p in params:
        p.grad = None
    for c in range(steps.shape[1]):  # one step at a time keeps memory flat
        loss = algo.loss(traj.subset(steps[:, c : c + 1]), policy.log_prob(traj, steps[:, c : c + 1]), None).mean
        loss.backward()
    return torch.cat([p.grad.flatten() for p in params]).clone()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--tiers", type=int, nargs="+", default=[1])
    ap.add_argument("--split", default="heldout")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per batch")
    ap.add_argument("--samples", type=int, default=8, help="samples per prompt")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--windows", type=float, nargs="+", default=[0.3, 0.6, 1.0], help="trained fraction of the chain (from the start)")
    ap.add_argument("--noise-windows", type=int, nargs="*", default=[1, 2],
                    help="also: noise windows of this many steps (shared x_T, group baseline), starts in --window-starts")
    ap.add_argument("--window-starts", type=float, nargs=2, default=[0.0, 0.4])
    ap.add_argument("--metric", default="shapes_verifier/strict")
    ap.add_argument("--branch-prompts", nargs="*", default=["two green triangles", "a purple triangle", "a small blue circle"])
    ap.add_argument("--out", default="benchmarks/results/ddpo_gradient_snr.json")
    args = ap.parse_args(argv)

    cfg = load_config(TrainConfig, args.config, [f"prompts.split={args.split}", "prompts.pool_size=0",
                                                 f"prompts.tiers=[{', '.join(map(str, args.tiers))}]"])
    policy = POLICIES[cfg.policy.type][1].from_pretrained(cfg.policy.pretrained, cfg.policy)
    reward = build_reward(cfg.reward.components)
    params = policy.trainable_parameters()
    result = {"config": args.config, "tiers": args.tiers, "split": args.split, "batch": args.prompts * args.samples,
              "metric": args.metric, "cosines": {}, "branch_variance": {}}

    print(f"gradient cosine between independent batches of {args.prompts}×{args.samples} rollouts ({args.metric})")
    print("| rollouts | trained steps | mean cosine | min | max |\n|---|---|---|---|---|")
    arms = [(f"first {w:.0%} of steps", str(w), {"window": w}) for w in args.windows]
    lo, hi = args.window_starts
    arms += [(f"noise window of {w} (start in [{lo}, {hi}))", f"noise_window={w}",
              {"noise_window": w, "starts": (lo, hi)}) for w in args.noise_windows]
    for label, key, kwargs in arms:
        grads = [batch_gradient(policy, reward, cfg.prompts.sample(args.prompts, seed=b), args.samples, b, params, args.metric, **kwargs)
                 for b in range(args.batches)]
        cos = [float(torch.nn.functional.cosine_similarity(a, b, dim=0)) for a, b in itertools.combinations(grads, 2)]
        result["cosines"][key] = cos
        kind = "shared x_T, noise in window" if "noise_window" in kwargs else "independent, noise at every step"
        print(f"| {kind} | {label} | {statistics.mean(cos):.3f} | {min(cos):.3f} | {max(cos):.3f} |")

    print("\nreward variance among 8 continuations sharing the chain up to step k (mean over 8 prefixes)")
    with torch.no_grad():
        for prompt in args.branch_prompts:
            base = policy.rollout([prompt], 8, [torch.Generator().manual_seed(100 + i) for i in range(8)])
            row = {}
            for k in range(0, base.num_steps, 2):
                br = policy.continue_from(base, k, 8, [torch.Generator().manual_seed(1000 + i) for i in range(64)])
                r = reward(br.outputs, br.conditions).components[args.metric].float().view(8, 8)
                row[k] = float(r.var(1, unbiased=False).mean())
            result["branch_variance"][prompt] = row
            print(f"{prompt!r}: " + ", ".join(f"k={k}: {v:.3f}" for k, v in row.items()))

    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
