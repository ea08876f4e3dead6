"""Shared probability math: the per-step Gaussian log-density used by every diffusion policy.

Convention (used everywhere in genalign): the log-density of a latent action is the
**mean over latent dimensions** of the elementwise Gaussian log-density, not the sum.
The sum over ~16k dimensions of an SD latent makes ratios overflow and training unstable;
the mean keeps one step's log-prob O(1). Every hyper-parameter that touches log-probs
(PPO clip range, DPO beta, KL weight) is therefore on this per-dimension scale.
"""

from __future__ import annotations

import math

import torch

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Mean over non-batch dims of log N(x; mean, std^2).

    x, mean: ``[B, ...]``; std: broadcastable to x (a ``[B, 1, ..., 1]`` per-sample scale
    or a scalar), strictly positive. Returns ``[B]`` in float32.
    """
    x, mean = x.float(), mean.float()
    std = torch.as_tensor(std, dtype=torch.float32, device=x.device)
    if bool((std <= 0).any()):
        raise ValueError("gaussian_log_prob needs std > 0 (a deterministic step has no density)")
    log_density = -((x.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - _HALF_LOG_2PI
    return log_density.flatten(1).mean(dim=1)  # [B]
