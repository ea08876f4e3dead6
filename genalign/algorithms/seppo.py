"""SePPO: semi-policy preference optimisation — off-policy winners, on-policy reference losers.

Paper: Zhang et al., "SePPO: Semi-Policy Preference Optimization for Diffusion Alignment"
(2024). No public training code exists; this is our derivation from the paper's abstract and
method description, with every choice stated.

Data per prompt c: a winning output y_w from a given off-policy set (``targets``: Shapes World
renders or a folder of prompt–image pairs) and a reference sample y_ref drawn from a previous
checkpoint π_ref of the policy itself. No reward model, no human pairs.

Likelihood of an output. A diffusion model has no tractable log π(y_0 | c); as Diffusion-DPO
does, we use one step of the forward process: for a chain step j (timestep t, previous t'),
x_t ~ q(x_t | y_0) and x_t' ~ q(x_t' | x_t, y_0), and score log π_θ(x_t' | x_t, c) — the
Gaussian DDIM(η) step, whose log-density differs from −‖ε − ε_θ(x_t, t)‖² only by a
step-dependent scale and a constant. These are the trajectories of ``Policy.forward_process``;
winner and loser of a pair share the step j and the noise ε (as in Diffusion-DPO). With
Δ = log π_θ − log π_ref at that step (``delta``):

    loser  (the usual DPO pair):      L = −log σ(β (log r_w − log r_ref))
    winner (reference sample flipped): L = −log σ(β (log r_w + log r_ref))

with log r = clamp(Δ, log(1−ε), log(1+ε)) as in D3PO (``clip_eps``), averaged over steps.

Anchor-based criterion (which form applies, per sample): the anchor is the reference model's
own likelihood of its sample. If the current policy — which has been pulled toward the
winners — assigns y_ref a higher likelihood than π_ref does (mean Δ_ref over the pair's steps
> ``anchor_margin``), y_ref resembles the winners and is learned from as a winner; otherwise it
is pushed down as a loser. At the first epoch π_θ = π_ref, Δ = 0, and every reference sample is
a loser, which is DPO against self-generated negatives (SPIN-Diffusion's setting).

Reference selection (the paper's strategy to widen exploration): at each epoch the reference
is drawn uniformly from all previous checkpoints (snapshots of the trainable weights taken at
the start of every epoch, index 0 = the initial model). ``latest`` (SPIN-style) and
``initial`` (DPO-style) are offered for comparison.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from genalign.algorithms.base import LossTerms, SamplingPlan
from genalign.algorithms.pairs import per_step_dpo_loss
from genalign.configs import opt
from genalign.targets import FolderTargets, ShapesWorldTargets
from genalign.trajectory import Trajectory


@dataclass
class SePPOConfig:
    name: Literal["seppo"] = opt("seppo", "algorithm name")
    targets: Literal["shapes_world", "folder"] = opt("shapes_world", "off-policy winning outputs: Shapes World renders or a folder")
    targets_path: str = opt("", "folder of prompt–image pairs (imagefolder layout with metadata.jsonl); targets: folder")
    reference: Literal["random_previous", "latest", "initial"] = opt(
        "random_previous", "which checkpoint generates the reference samples and anchors the ratio"
    )
    beta: float = opt(0.1, "β of the DPO logit; log-probs are per-dimension means over the D latent dims, so β weights the joint log-ratio by β/D: to transfer to another latent size D′ use β·D′/D (docs/hyperparameter_units.md)")
    clip_eps: float = opt(0.1, "ratio clip ε (as D3PO); log-probs are per-dimension means over the D latent dims, so the joint-ratio bound is about ε·D: to transfer to another latent size D′ use ε·D/D′ (docs/hyperparameter_units.md)")
    anchor_margin: float = opt(
        0.0, "a reference sample counts as winning when mean Δ_ref exceeds this; Δ is a per-dimension mean, so a margin m bounds the joint log-ratio by m·D: transfer to latent size D′ as m·D/D′ (docs/hyperparameter_units.md)"
    )
    steps_per_sample: int = opt(4, "forward-process steps scored per output (random chain steps, shared by the pair)")

    def validate(self) -> None:
        if self.targets == "folder" and not self.targets_path:
            raise ValueError("'targets_path' is required when targets is 'folder'")
        if self.beta <= 0 or not 0 < self.clip_eps < 1:
            raise ValueError(f"need beta > 0 and 0 < clip_eps < 1, got {self.beta}, {self.clip_eps}")
        if self.steps_per_sample < 1:
            raise ValueError(f"'steps_per_sample' must be >= 1, got {self.steps_per_sample}")


def anchor_signs(delta_ref: torch.Tensor, mask: torch.Tensor, margin: float) -> torch.Tensor:
    """Per pair: −1 (reference sample treated as winning) when the policy's mean log-ratio on
    it exceeds ``margin``, else +1 (losing). delta_ref, mask: ``[P, K]`` -> ``[P]``."""
    m = mask.float()
    mean = (delta_ref.detach() * m).sum(1) / m.sum(1).clamp(min=1.0)
    return torch.where(mean > margin, -torch.ones_like(mean), torch.ones_like(mean))


class SePPO:
    needs_reference = True
    needs_snapshots = True

    def __init__(self, config: SePPOConfig | None = None):
        self.config = config or SePPOConfig()
        self.name = "seppo"
        self.targets = FolderTargets(self.config.targets_path) if self.config.targets == "folder" else ShapesWorldTargets()

    def plan(self, epoch: int, num_snapshots: int, generator: torch.Generator) -> SamplingPlan:
        c = self.config
        if c.reference == "initial" or num_snapshots <= 1:
            ref: int | str = 0
        elif c.reference == "latest":
            ref = num_snapshots - 1
        else:
            ref = int(torch.randint(num_snapshots, (1,), generator=generator))
        return SamplingPlan(kind="off_policy", whole_groups=True, steps_per_sample=c.steps_per_sample, reference=ref)

    def advantages(self, rewards: torch.Tensor, conditions: Sequence[Any], group: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(rewards, dtype=torch.float32)  # no reward model: the roles are the labels

    def train_steps(self, traj: Trajectory, generator: torch.Generator) -> torch.Tensor:
        return torch.arange(traj.num_steps).unsqueeze(0).expand(traj.batch_size, -1).clone()  # the sampled steps

    def loss(self, batch: Trajectory, log_probs: torch.Tensor, ref_log_probs: torch.Tensor | None) -> LossTerms:
        """``batch.extras['role']``: 1 for the off-policy winner, 0 for the reference sample;
        ``group`` pairs them."""
        if ref_log_probs is None:
            raise ValueError("SePPO needs reference log-probs")
        role = batch.extras["role"].to(log_probs.device)
        group = batch.group.to(log_probs.device)
        winners, refs = [], []
        for g in group.unique():
            rows = (group == g).nonzero().view(-1)
            w, r = rows[role[rows] == 1], rows[role[rows] == 0]
            if len(w) and len(r):
                winners.append(w[0])
                refs.append(r[0])
        if not winners:
            return LossTerms(log_probs.sum() * 0.0, 0.0, counts={"pairs": 0.0})
        w, r = torch.stack(winners), torch.stack(refs)
        delta = log_probs - ref_log_probs.detach()  # [B, K]
        mask = batch.mask.to(log_probs.device)
        pair_mask = mask[w] & mask[r]
        sign = anchor_signs(delta[r], pair_mask, self.config.anchor_margin)  # [P]
        terms = per_step_dpo_loss(delta[w], delta[r], pair_mask, self.config.beta, self.config.clip_eps, sign)
        # per (pair, step) entry, like the loss: the share of entries whose reference sample acts as a winner
        terms.metrics["ref_as_winner"] = float(((sign < 0).float().unsqueeze(1) * pair_mask.float()).sum())
        terms.counts = {"pairs": float(len(w))}
        return terms

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:  # SePPO keeps no statistics between epochs
            raise ValueError(f"SePPO has no state to restore, got keys {sorted(state)}")
