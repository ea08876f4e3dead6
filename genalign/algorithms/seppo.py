"""SePPO: semi-policy preference optimisation — off-policy winners, on-policy reference losers.

Paper: Zhang et al., "SePPO: Semi-Policy Preference Optimization for Diffusion Alignment"
(2024). No public training code exists; this is our derivation from the paper's abstract and
method description, with every choice stated.

Data per prompt c: a winning output y_w from a given off-policy set (``targets``: the prompt
source's ground truth — Shapes World renders, Shapes QA's gold answers — or a folder of
prompt–image pairs) and a reference sample y_ref drawn from a previous checkpoint π_ref of the
policy itself. No reward model, no human pairs.

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
On token trajectories (``aligned`` False) the likelihood of an output is exact: y_w is
teacher-forced, each row's token log-ratios are summed before the logit (DPO), and every token
is trained (genalign.algorithms.pairs).

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
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch

from genalign.algorithms.base import LossTerms, SamplingPlan
from genalign.algorithms.pairs import pair_dpo_loss
from genalign.algorithms.units import unit_default
from genalign.configs import opt
from genalign.targets import FolderTargets, ShapesWorldTargets
from genalign.trajectory import Trajectory


@dataclass
class SePPOConfig:
    name: Literal["seppo"] = opt("seppo", "algorithm name")
    targets: Literal["world", "shapes_world", "folder"] = opt(
        "world",
        "off-policy winning outputs: 'world' = the prompt source's ground truth (Shapes World renders, Shapes QA answers); "
        "'shapes_world' = renders of Shapes World prompts from any source (e.g. a list); 'folder' = prompt–image pairs",
    )
    targets_path: str = opt("", "folder of prompt–image pairs (imagefolder layout with metadata.jsonl); targets: folder")
    reference: Literal["random_previous", "latest", "initial"] = opt(
        "random_previous", "which checkpoint generates the reference samples and anchors the ratio"
    )
    beta: float = opt(0.1, "β of the DPO logit; on per-dimension-mean log-probs (diffusion) β weights the joint log-ratio by β/D: to transfer to another latent size D′ use β·D′/D (docs/hyperparameter_units.md); on tokens it is DPO's β on the sequence log-ratio")
    clip_eps: float | None = opt(None, "ratio clip ε as D3PO (0: no clip); None: the policy's unit default, 0.1 per step for per-dimension-mean log-probs (transfer to latent size D′ as ε·D/D′, docs/hyperparameter_units.md) and 0 for tokens")
    anchor_margin: float = opt(
        0.0, "a reference sample counts as winning when mean Δ_ref exceeds this; Δ is a per-dimension mean, so a margin m bounds the joint log-ratio by m·D: transfer to latent size D′ as m·D/D′ (docs/hyperparameter_units.md)"
    )
    steps_per_sample: int = opt(4, "forward-process chain steps trained per output (random, shared by the pair); token trajectories train every token")

    def requires(self) -> frozenset[str]:
        return frozenset()

    def resolve_units(self, unit: str) -> None:
        self.clip_eps = unit_default(self.clip_eps, unit, {"dimension_mean": 0.1, "token": 0.0}, "clip_eps")

    def validate(self) -> None:
        if self.targets == "folder" and not self.targets_path:
            raise ValueError("'targets_path' is required when targets is 'folder'")
        if self.beta <= 0 or (self.clip_eps is not None and not 0 <= self.clip_eps < 1):
            raise ValueError(f"need beta > 0 and 0 <= clip_eps < 1, got {self.beta}, {self.clip_eps}")
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

    def __init__(self, config: SePPOConfig | None = None, unit: str = "dimension_mean"):
        self.config = replace(config or SePPOConfig())
        self.config.resolve_units(unit)
        self.name = "seppo"
        self.folder = FolderTargets(self.config.targets_path) if self.config.targets == "folder" else None

    def plan(self, epoch: int, num_snapshots: int, generator: torch.Generator) -> SamplingPlan:
        c = self.config
        if c.reference == "initial" or num_snapshots <= 1:
            ref: int | str = 0
        elif c.reference == "latest":
            ref = num_snapshots - 1
        else:
            ref = int(torch.randint(num_snapshots, (1,), generator=generator))
        return SamplingPlan(kind="off_policy", whole_groups=True, reference=ref)

    def targets(self, conditions: Sequence[Any], seeds: Sequence[int], like: Any, prompts: Any) -> Any:
        """The winners: ``targets: folder`` images (sized like the reference samples), else the
        prompt source's ground truth."""
        if self.folder is not None:
            return self.folder(conditions, seeds, like.shape[-1]).to(like.device)
        if self.config.targets == "shapes_world":
            return ShapesWorldTargets()(conditions, seeds, like.shape[-1]).to(like.device)
        if not hasattr(prompts, "targets"):
            raise ValueError(
                f"prompt source {getattr(prompts, 'source', type(prompts).__name__)!r} has no ground truth to use as "
                f"SePPO's winners: set 'algorithm.targets: folder' with a 'targets_path'"
            )
        out = prompts.targets(conditions, seeds, like)
        return out.to(like.device) if hasattr(out, "to") else out

    def advantages(self, rewards: torch.Tensor, conditions: Sequence[Any], group: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(rewards, dtype=torch.float32)  # no reward model: the roles are the labels

    def train_steps(self, traj: Trajectory, generator: torch.Generator) -> torch.Tensor:
        """``steps_per_sample`` random chain steps per pair (``group``), the same for both rows:
        ``[B, K]``; unaligned (token) rows: all steps."""
        every = torch.arange(traj.num_steps).unsqueeze(0).expand(traj.batch_size, -1).clone()
        if not traj.aligned:
            return every
        k = min(self.config.steps_per_sample, traj.num_steps)
        groups = traj.group.cpu()
        uniq = groups.unique()
        drawn = torch.stack([torch.randperm(traj.num_steps, generator=generator)[:k].sort().values for _ in uniq])
        where = {int(g): i for i, g in enumerate(uniq)}
        return drawn[torch.tensor([where[int(g)] for g in groups])]  # [B, K]

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
        sign = anchor_signs(delta[r], mask[r], self.config.anchor_margin)  # [P]
        c = self.config
        terms = pair_dpo_loss(delta[w], delta[r], mask[w], mask[r], batch.aligned, c.beta, c.clip_eps, sign)
        # per loss entry ((pair, step) aligned, pair otherwise): the share whose reference sample acts as a winner
        entries = (mask[w] & mask[r]).float().sum(1) if batch.aligned else (mask[w].any(1) & mask[r].any(1)).float()
        terms.metrics["ref_as_winner"] = float(((sign < 0).float() * entries).sum())
        terms.counts = {"pairs": float(len(w))}
        return terms

    def epoch_metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:  # SePPO keeps no statistics between epochs
            raise ValueError(f"SePPO has no state to restore, got keys {sorted(state)}")
