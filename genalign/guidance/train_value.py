"""``genalign value CONFIG.yaml``: train SVDD-MC's value function on the policy's own rollouts."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field

import torch

from genalign.configs import opt
from genalign.guidance.value_model import ValueNet, ValueNetConfig, train_value, value_dataset
from genalign.progress import progress


@dataclass
class ValueTrainConfig:
    policy: str = opt("assets/models/tiny-sd", "policy whose rollouts (and sampler) the value function serves")
    steps: int = opt(10, "denoising steps (must equal the steps used when guiding)")
    reward: str = opt("shapes_verifier", "named reward to predict: shapes_verifier, jpeg_compressibility")
    reward_score: str = opt("partial", "shapes_verifier score to predict: strict or partial")
    tiers: list[int] = opt(field(default_factory=lambda: [1, 2, 5]), "Shapes World tiers of the training prompts")
    split: str = opt("heldout", "Shapes World split of the training prompts")
    prompts: int = opt(48, "prompts per tier")
    samples_per_prompt: int = opt(8, "rollouts per prompt")
    seed: int = opt(0, "seed of prompts, rollouts and training")
    epochs: int = opt(15, "regression epochs")
    learning_rate: float = opt(1e-3, "AdamW learning rate")
    batch_size: int = opt(256, "states per regression step")
    width: int = opt(64, "channels of the value network")
    out: str = opt("runs/value", "directory for value.safetensors, value_config.json and train_log.json")

    def validate(self) -> None:
        if self.reward_score not in ("strict", "partial"):
            raise ValueError(f"'reward_score' must be strict or partial, got {self.reward_score!r}")
        if min(self.prompts, self.samples_per_prompt, self.epochs, self.steps) < 1:
            raise ValueError("'prompts', 'samples_per_prompt', 'epochs' and 'steps' must be >= 1")


def run(cfg: ValueTrainConfig) -> dict:
    from genalign.evaluation import _build_named_reward, load_policy
    from genalign.toyworld import sample_prompts

    reward = _build_named_reward(cfg.reward)
    if reward is None:
        raise ValueError("a value function needs a reward to predict")
    if hasattr(reward, "score"):
        reward.score = cfg.reward_score
    policy = load_policy(cfg.policy, cfg.steps)
    prompts = [p for t in cfg.tiers for p in sample_prompts(t, cfg.prompts, cfg.split, seed=cfg.seed + 17)]
    t0 = time.perf_counter()
    parts, n = [], cfg.samples_per_prompt
    per_call = max(1, 64 // n)
    with torch.no_grad():
        for i in progress(range(0, len(prompts), per_call), desc="value rollouts"):
            chunk = prompts[i : i + per_call]
            gens = [torch.Generator().manual_seed(cfg.seed * 1_000_003 + (i + p) * n + j) for p in range(len(chunk)) for j in range(n)]
            traj = policy.rollout(chunk, n, gens)
            parts.append(value_dataset(traj, reward(traj.outputs, traj.conditions).scores, first_id=i * n))
    data = tuple(torch.cat([p[k] for p in parts]) for k in range(5))
    rollout_s = time.perf_counter() - t0
    x, cond = data[0], data[2]
    torch.manual_seed(cfg.seed)
    net = ValueNet(ValueNetConfig(in_channels=x.shape[1], cond_dim=cond.shape[-1], num_steps=cfg.steps, width=cfg.width))
    t0 = time.perf_counter()
    history = train_value(net, data, cfg.epochs, cfg.learning_rate, cfg.batch_size, cfg.seed)
    log = {"config": asdict(cfg), "states": len(data[3]), "rollout_seconds": rollout_s,
           "train_seconds": time.perf_counter() - t0, "target_variance": float(data[3].var()), **history}
    net.save(cfg.out)
    with open(os.path.join(cfg.out, "train_log.json"), "w") as f:
        json.dump(log, f, indent=2)
    print(json.dumps({k: log[k] for k in ("states", "target_variance", "rollout_seconds", "train_seconds")}
                     | {"heldout_mse_before": history["heldout"][0], "heldout_mse_after": history["heldout"][-1]}))
    return log
