"""SVDD-MC's value function: a small time-conditioned regressor v(x_t, t, c) -> final reward.

Trained by regression on the policy's own rollouts (Monte Carlo targets): every state x_t of
a rollout, at every step, is paired with the reward its finished sample received — so the
targets are the rewards the pretrained policy actually reaches from that state, not rewards
of clean latents with noise added.

Input: the state ``[B, C, h, w]`` (diffusion latents), the step index and the condition's
embedding (``extras['prompt_embeds']`` ``[B, L, D]``, mean-pooled). Weights are saved as
safetensors next to a JSON config; loading never unpickles.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from genalign.trajectory import Trajectory

WEIGHTS, CONFIG = "value.safetensors", "value_config.json"


@dataclass
class ValueNetConfig:
    in_channels: int = 4
    cond_dim: int = 32
    num_steps: int = 10
    width: int = 64


class ValueNet(nn.Module):
    def __init__(self, config: ValueNetConfig):
        super().__init__()
        self.config = config
        w = config.width
        self.conv = nn.Sequential(
            nn.Conv2d(config.in_channels, w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(w, w, 3, padding=1, stride=2), nn.SiLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.step_emb = nn.Embedding(config.num_steps + 1, w)
        self.cond = nn.Linear(config.cond_dim, w)
        self.head = nn.Sequential(nn.Linear(3 * w, w), nn.SiLU(), nn.Linear(w, 1))

    def forward(self, x: torch.Tensor, step: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x ``[B, C, h, w]``, step ``[B]`` long, cond ``[B, L, D]`` -> value ``[B]``."""
        h = self.conv(x.float()).flatten(1)  # [B, W]
        feats = torch.cat([h, self.step_emb(step.long()), self.cond(cond.float().mean(1))], 1)  # [B, 3W]
        return self.head(feats).squeeze(1)

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, os.path.join(directory, WEIGHTS))
        with open(os.path.join(directory, CONFIG), "w") as f:
            json.dump(asdict(self.config), f, indent=2)

    @classmethod
    def load(cls, directory: str) -> ValueNet:
        for name in (WEIGHTS, CONFIG):
            if not os.path.isfile(os.path.join(directory, name)):
                raise FileNotFoundError(f"value model {directory!r} has no {name}")
        with open(os.path.join(directory, CONFIG)) as f:
            net = cls(ValueNetConfig(**json.load(f)))
        net.load_state_dict(load_file(os.path.join(directory, WEIGHTS)))
        return net.eval()


def value_dataset(
    traj: Trajectory, rewards: torch.Tensor, first_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every (state after k steps, k, condition) of finished rollouts with their final reward.

    Returns x ``[B*(T+1), C, h, w]``, step ``[B*(T+1)]``, cond ``[B*(T+1), L, D]``, target, and
    the rollout id of each row (``first_id`` + row), so held-out splits keep rollouts whole."""
    b, t = traj.batch_size, traj.num_steps
    states = torch.cat([traj.states, traj.actions[:, -1:]], 1)  # [B, T+1, C, h, w]: x after 0..T steps
    steps = torch.arange(t + 1).unsqueeze(0).expand(b, -1)  # [B, T+1]
    cond = traj.extras["prompt_embeds"].unsqueeze(1).expand(-1, t + 1, -1, -1)  # [B, T+1, L, D]
    target = rewards.float().view(b, 1).expand(-1, t + 1)
    rollout = (first_id + torch.arange(b)).view(b, 1).expand(-1, t + 1)
    keep = torch.isfinite(target).flatten()
    return (states.flatten(0, 1)[keep], steps.flatten()[keep], cond.flatten(0, 1)[keep], target.flatten()[keep],
            rollout.flatten()[keep])


def train_value(
    net: ValueNet, data: tuple[torch.Tensor, ...], epochs: int = 20, lr: float = 1e-3, batch_size: int = 256,
    seed: int = 0, holdout: float = 0.2,
) -> dict[str, list[float]]:
    """MSE regression; returns per-epoch train and held-out losses. The held-out split takes
    whole rollouts (every state of a held-out rollout is held out)."""
    x, step, cond, target, rollout = data
    g = torch.Generator().manual_seed(seed)
    ids = rollout.unique()
    val_ids = ids[torch.randperm(len(ids), generator=g)[: int(len(ids) * holdout)]]
    is_val = torch.isin(rollout, val_ids)
    val, tr = is_val.nonzero().view(-1), (~is_val).nonzero().view(-1)
    n_val = len(val)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    history: dict[str, list[float]] = {"train": [], "heldout": []}

    def loss_on(idx: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(net(x[idx], step[idx], cond[idx]), target[idx])

    with torch.no_grad():
        history["heldout"].append(float(loss_on(val)) if n_val else math.nan)
    for _ in range(epochs):
        net.train()
        order = tr[torch.randperm(len(tr), generator=g)]
        total = 0.0
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            loss = loss_on(idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        net.eval()
        history["train"].append(total / max(len(order), 1))
        with torch.no_grad():
            history["heldout"].append(float(loss_on(val)) if n_val else math.nan)
    return history


class MCValue:
    """SVDD-MC: the learned value of the state after ``step`` steps (a finished sample's state
    is scored the same way, so guidance never calls the reward)."""

    def __init__(self, net: ValueNet, counter=None):
        self.net, self.counter = net.eval(), counter

    @torch.no_grad()
    def __call__(self, traj: Trajectory, step: int) -> torch.Tensor:
        x = traj.actions[:, -1] if step == traj.num_steps else traj.states[:, step]
        s = torch.full((traj.batch_size,), step, dtype=torch.long)
        if self.counter is not None:
            self.counter.extra["value_calls"] = self.counter.extra.get("value_calls", 0) + traj.batch_size
        return self.net(x, s.to(x.device), traj.extras["prompt_embeds"])
