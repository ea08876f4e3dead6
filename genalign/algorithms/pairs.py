"""Pairwise preference math shared by D3PO, SePPO and B²-DiffuRL's DPO variant.

- :func:`group_pairs`: every unordered pair of rows in the same group (K(K−1)/2 per group).
- :func:`per_step_dpo_loss`: DPO (Rafailov et al. 2023) applied at each denoising step, with
  D3PO's clipped ratio (Yang et al. 2024, eq. 11). For a pair (w, l) and a trained step j,
  with Δ = log π_θ(a_j | s_j) − log π_ref(a_j | s_j) (mean over dims, as everywhere):

      r = clip(exp Δ, 1−ε, 1+ε)      ⇔   log r = clamp(Δ, log(1−ε), log(1+ε))
      L_j = −log σ(β (log r_w − log r_l))

  The clip is a trust region: once the ratio of a row leaves [1−ε, 1+ε] its term carries
  no gradient (ε = 0: no clip). ``sign`` (+1 or −1 per pair) lets SePPO flip the loser's role.
- :func:`pair_dpo_loss`: the same loss for any trajectory. When steps are aligned (step j of
  both rows is a denoising step at one timestep) it is :func:`per_step_dpo_loss`; when they are
  not (two texts: token j of one follows a different prefix than token j of the other) each
  row's log-ratios are first summed over its active steps, Δ_row = log π_θ(y) − log π_ref(y),
  and the pair gets one logit: DPO itself (Rafailov et al. 2023).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from genalign.algorithms.base import LossTerms


def group_pairs(group: torch.Tensor) -> torch.Tensor:
    """Rows with equal ``group`` ids ``[B]`` -> pairs ``[P, 2]`` (i < j), grouped in row order."""
    g = group.view(-1)
    same = (g.unsqueeze(0) == g.unsqueeze(1)).triu(diagonal=1)  # [B, B]
    return same.nonzero()  # [P, 2]


def per_step_dpo_loss(
    delta_w: torch.Tensor,
    delta_l: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    clip_eps: float,
    sign: torch.Tensor | None = None,
) -> LossTerms:
    """Sum of L_j over active (pair, step) entries; normaliser: their number.

    delta_w, delta_l: ``[P, K]`` log-ratios of the winner and the loser at the same steps;
    mask: ``[P, K]``; sign: ``[P]`` (default +1): the logit is β(log r_w − sign · log r_l).
    Metrics are sums over the same entries (pair_accuracy, logit_mean, ratio_clip_fraction).
    """
    log_rw, log_rl = _clip_log_ratio(delta_w, clip_eps), _clip_log_ratio(delta_l, clip_eps)  # [P, K]
    s = torch.ones(delta_w.shape[0], device=delta_w.device) if sign is None else sign.to(delta_w.device).float()
    logits = beta * (log_rw - s.unsqueeze(1) * log_rl)  # [P, K]
    m = mask.to(delta_w.device).float()
    total = torch.where(m > 0, -F.logsigmoid(logits), torch.zeros_like(logits)).sum()
    with torch.no_grad():
        metrics = {
            "pair_accuracy": float(((logits > 0).float() * m).sum()),
            "logit_mean": float((logits * m).sum()),
            "ratio_clip_fraction": float((((log_rw != delta_w) | (log_rl != delta_l)).float() * m).sum()),
        }
    return LossTerms(total, float(m.sum()), metrics)


def _clip_log_ratio(delta: torch.Tensor, clip_eps: float) -> torch.Tensor:
    """log clip(exp Δ, 1−ε, 1+ε); ε = 0 leaves Δ unclipped."""
    if clip_eps == 0:
        return delta
    return delta.clamp(math.log(1 - clip_eps), math.log(1 + clip_eps))


def pair_dpo_loss(
    delta_w: torch.Tensor,
    delta_l: torch.Tensor,
    mask_w: torch.Tensor,
    mask_l: torch.Tensor,
    aligned: bool,
    beta: float,
    clip_eps: float,
    sign: torch.Tensor | None = None,
) -> LossTerms:
    """DPO over pairs of rows, per step when the steps are aligned, per row otherwise.

    delta_w, delta_l: ``[P, K]`` log π_θ − log π_ref of the winner and the loser; mask_w,
    mask_l: ``[P, K]`` their active steps. Aligned: :func:`per_step_dpo_loss` on the steps both
    rows act at (one entry per pair and step). Unaligned: one entry per pair, with
    Δ = Σ_j mask · delta over each row's own active steps (whole rows must be in the call: an
    unaligned trajectory is never cut into step chunks), then the same clipped logit.
    """
    if aligned:
        return per_step_dpo_loss(delta_w, delta_l, mask_w & mask_l, beta, clip_eps, sign)
    sum_w = (delta_w * mask_w.float()).sum(1, keepdim=True)  # [P, 1]: the winner's sequence log-ratio
    sum_l = (delta_l * mask_l.float()).sum(1, keepdim=True)
    active = (mask_w.any(1) & mask_l.any(1)).unsqueeze(1)  # [P, 1]
    return per_step_dpo_loss(sum_w, sum_l, active, beta, clip_eps, sign)
