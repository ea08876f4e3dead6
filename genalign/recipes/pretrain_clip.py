"""Pretrain the tiny Shapes World CLIP in ``assets/models/shapes-clip`` and an aesthetic-style
head on it, so the CLIP-score and aesthetic rewards run for real offline.

    genalign toyworld pretrain clip --out assets/models/shapes-clip [--minutes M] [--steps N] [--seed S]

**CLIP.** Radford et al., "Learning Transferable Visual Models From Natural Language
Supervision" (2021), https://arxiv.org/abs/2103.00020: an open_clip ``CLIP`` built from a JSON
architecture config (a ViT on 32x32 renders, patch 4, and a causal text transformer over
open_clip's own BPE tokenizer, which ships inside the package), trained from scratch with the
symmetric InfoNCE loss (van den Oord et al. 2018, https://arxiv.org/abs/1807.03748) on
(render, prompt) pairs of the train split. Code names -> the paper's pseudo-code:
``image_features -> I_e``, ``text_features -> T_e`` (L2-normalised), ``logit_scale -> t``
(logits = exp(t) · I_e · T_eᵀ, exp(t) clamped at 100 as in the paper).

Shapes World differs from web captions in one way that matters: a render of "a small red
circle" *also* satisfies the prompt "a red circle" (``check_scene`` is the judge), so the
batch's off-diagonal pairs are not all negatives. :func:`positive_mask` marks every pair
whose prompt holds for the scene, and :func:`clip_loss` spreads the target of each row
uniformly over its positives (a multi-positive InfoNCE; with only the diagonal positive it is
exactly CLIP's loss). The other prompts of the batch are the negatives; since a random
batch seldom holds "a red circle on the left" next to "a red circle on the right", each
tier-2, 4 and 5 prompt also brings one copy of itself with another position, relation or
count as an extra negative text (:func:`swap_negatives`, after NegCLIP), so that naming the
objects alone does not meet the loss. Renders are re-augmented like
the verifier's (:func:`genalign.recipes.common.augment`: hue, saturation,
brightness, down-up scaling, blur, noise), so the score stays meaningful on a tiny
generator's samples.

Every batch is fresh renders (new seeds) of train-split prompts drawn with the tiers of
:data:`genalign.recipes.common.TIER_WEIGHTS`; no training scene shows a held-out pair
or relation, and no held-out prompt is used as a negative. Training stops at ``--steps`` or
``--minutes``, whichever comes first, and the learning-rate schedule (warm-up then cosine)
follows the same progress. Measured at the defaults with one torch thread on 2 shared CPU
cores: 1.65 steps/s, so the 4000 steps take about 40 minutes, plus about a minute of
evaluation and head fitting.

**Aesthetic head.** The LAION aesthetic predictor v2 layout of :mod:`rewards.aesthetic`
(a linear MLP on the L2-normalised image embedding), fitted by MSE to the synthetic
preference :func:`synthetic_aesthetic` (centred, saturated shapes score high), computed from
each render's ground-truth objects. It is fitted on train-split renders and measured
(Spearman and Pearson correlation) on renders of held-out prompts.

**Output folder** (written beside ``--out`` first and moved into place when complete):
``open_clip_config.json`` (the architecture, flat, as ``open_clip.add_model_config`` reads
it), ``open_clip_model.safetensors``, ``aesthetic_head.safetensors`` and
``training_log.json`` (arguments, versions, loss curve, zero-shot retrieval accuracy per
tier and split, accuracy at telling position, relation and count swaps apart, head
correlations). The rewards load it through their configs::

    ClipScoreConfig(model=".../open_clip_config.json", pretrained=".../open_clip_model.safetensors")
    AestheticConfig(head=".../aesthetic_head.safetensors", model=<same>, pretrained=<same>)
"""

from __future__ import annotations

import argparse
import colorsys
import json
import math
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from genalign.toyworld.prompts import all_prompts, is_heldout, sample_prompts
from genalign.toyworld.render import PlacedObject, render_scene
from genalign.toyworld.spec import (
    COUNT_WORDS,
    POSITIONS,
    RELATIONS,
    TIERS,
    SceneSpec,
    check_scene,
    parse_prompt,
)
from rewards.aesthetic import AestheticHead
from rewards.open_clip_backbone import clip_preprocess, load_open_clip

from .common import (
    EVAL_SEED_BASE,
    TIER_WEIGHTS,
    TRAIN_SEEDS_PER_RUN,
    Budget,
    LossCurve,
    augment,
    command_line,
    seed_everything,
    set_lr,
    staged_folder,
    versions,
)

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
HEAD_NAME = "aesthetic_head.safetensors"
LOG_NAME = "training_log.json"
HEAD_SEED_OFFSET = TRAIN_SEEDS_PER_RUN // 2  # head-fitting renders: seeds s · TRAIN_SEEDS_PER_RUN + this + i
MAX_LOGIT_SCALE = 100.0  # exp(t) is clamped here (CLIP paper, section 2.5)


# --------------------------------------------------------------------------- architecture
def architecture(embed_dim: int = 64, vision_width: int = 96, vision_layers: int = 4,
                 patch_size: int = 4, text_width: int = 64, text_layers: int = 3,
                 head_width: int = 32, context_length: int = 16) -> dict:
    """An open_clip architecture config: ViT on 32x32 images + causal text transformer.

    ``vocab_size`` is that of open_clip's SimpleTokenizer (49408): every Shapes World word
    is one or two of its BPE tokens; the longest prompt is 10 tokens plus start and end.
    """
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": 32, "patch_size": patch_size, "width": vision_width,
                       "layers": vision_layers, "head_width": head_width},
        "text_cfg": {"context_length": context_length, "vocab_size": 49408, "width": text_width,
                     "heads": max(1, text_width // head_width), "layers": text_layers},
    }


# --------------------------------------------------------------------------- loss
def _pairs(spec: SceneSpec) -> Counter:
    return Counter({(c.color, c.shape): c.count for c in spec.clauses})


def positive_mask(specs: Sequence[SceneSpec], scenes: Sequence[Sequence[PlacedObject]]) -> torch.Tensor:
    """``[B_img, B_txt]`` bool: scene i satisfies prompt j (``check_scene(...).strict``).

    ``check_scene`` demands exact counts and no other objects, so a prompt can only hold when
    it names exactly the scene's multiset of (colour, shape); only those pairs are checked.
    """
    keys = [_pairs(s) for s in specs]
    mask = torch.zeros(len(scenes), len(specs), dtype=torch.bool)
    for i, objects in enumerate(scenes):
        present = Counter((o.color, o.shape) for o in objects)
        for j, spec in enumerate(specs):
            if keys[j] == present:
                mask[i, j] = check_scene(spec, objects).strict
    return mask


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
              positives: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE over a batch, with several positives per row and extra texts allowed.

    image_features ``[B, D]``, text_features ``[B + E, D]`` (L2-normalised; the first B are the
    images' own captions, E extra texts are hard negatives), logit_scale ``t`` (a scalar,
    exp(t) clamped at 100), positives ``[B, B + E]`` bool (default: the identity, E = 0), with
    at least one per row. Each row's target is uniform over its positives; image->text is
    averaged over the B images, text->image over the texts that hold for some image (an extra
    text that holds for none only serves as a negative). The loss is the mean of the two.
    With the identity it is CLIP's loss: ``(CE(logits, arange) + CE(logitsᵀ, arange)) / 2``.
    """
    b = image_features.shape[0]
    if positives is None:
        positives = torch.eye(b, dtype=torch.bool, device=image_features.device)
    logits = logit_scale.exp().clamp(max=MAX_LOGIT_SCALE) * image_features @ text_features.T  # [B, B+E]
    target = positives.float()
    image_to_text = F.cross_entropy(logits, target / target.sum(1, keepdim=True))
    held = positives.any(0)  # [B+E]
    column_target = target[:, held] / target[:, held].sum(0, keepdim=True)  # [B, B'] columns sum to 1
    text_to_image = F.cross_entropy(logits[:, held].T, column_target.T)
    return (image_to_text + text_to_image) / 2


# --------------------------------------------------------------------------- synthetic preference
def synthetic_aesthetic(objects: Sequence[PlacedObject]) -> float:
    """The synthetic preference the aesthetic head learns, in [0, 10] like LAION's scale.

    ``10 · (C + S) / 2`` with, over the scene's objects,

    - centring ``C = 1 − mean_i ‖(x_i, y_i) − (½, ½)‖ / (√2 / 2)``: 1 when every object sits
      at the centre of the image, 0 when all sit in corners (normalised coordinates);
    - saturation ``S = mean_i (max(rgb_i) − min(rgb_i)) / max(rgb_i)``: HSV saturation of the
      colour each object was drawn with (pure red 1, white and grey 0).

    The background is ignored; an empty scene scores 0.
    """
    if not objects:
        return 0.0
    half_diagonal = math.sqrt(2) / 2
    centring = 1 - sum(math.hypot(o.x - 0.5, o.y - 0.5) for o in objects) / (len(objects) * half_diagonal)
    saturation = sum(colorsys.rgb_to_hsv(*(c / 255 for c in o.rgb))[1] for o in objects) / len(objects)
    return 10 * (centring + saturation) / 2


# --------------------------------------------------------------------------- data
def to_tensor(images) -> torch.Tensor:
    """PIL RGB images -> ``[B, 3, H, W]`` float in [0, 1]."""
    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])).permute(0, 3, 1, 2) / 255


class SceneStream:
    """Endless batches of fresh train-split renders with their specs and true objects.

    Tiers are drawn with :data:`TIER_WEIGHTS`; scene i of run seed s uses render seed
    ``s · TRAIN_SEEDS_PER_RUN + i``, below :data:`EVAL_SEED_BASE`.
    """

    def __init__(self, seed: int, split: str = "train", pool_per_tier: int = 4000):
        self.rng = random.Random(seed)
        self.next_seed = seed * TRAIN_SEEDS_PER_RUN
        self.tiers = sorted(TIER_WEIGHTS)
        self.weights = [TIER_WEIGHTS[t] for t in self.tiers]
        self.pools = {t: sample_prompts(t, pool_per_tier, split=split, seed=seed + t) for t in self.tiers}
        self.specs: dict[str, SceneSpec] = {}

    def batch(self, n: int) -> tuple[torch.Tensor, list[str], list[SceneSpec], list[list[PlacedObject]]]:
        """images ``[n, 3, 32, 32]`` in [0, 1], prompts, specs, ground-truth objects."""
        tiers = self.rng.choices(self.tiers, weights=self.weights, k=n)
        prompts = [self.rng.choice(self.pools[t]) for t in tiers]
        specs = [self.specs.setdefault(p, parse_prompt(p)) for p in prompts]
        scenes = [render_scene(s, self.next_seed + i) for i, s in enumerate(specs)]
        self.next_seed += n
        return to_tensor([im for im, _ in scenes]), prompts, specs, [objs for _, objs in scenes]


# --------------------------------------------------------------------------- training
def train_clip(model, tokenizer, preprocess_cfg: dict, stream: SceneStream, args,
               log_every: int = 25) -> dict:
    """Train ``model`` in place; returns the log (loss curve, steps, wall time)."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "embedding" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98))
    budget = Budget(args.steps, args.minutes, warmup=max(1, min(100, args.steps // 10)))
    gen = torch.Generator().manual_seed(args.seed + 1)
    rng = random.Random(args.seed + 2)
    ids_cache: dict[str, torch.Tensor] = {}
    curve, step = LossCurve(log_every, budget), 0
    model.train().requires_grad_(True)
    while not budget.done(step):
        set_lr(opt, args.lr * budget.lr_factor(step))
        images, prompts, specs, scenes = stream.batch(args.batch_size)
        if args.augment:
            images = augment(images, gen)  # [B, 3, 32, 32]
        extras = swap_negatives(specs, args.swap_negatives, rng)
        texts = prompts + [v.prompt for v in extras]
        missing = [p for p in dict.fromkeys(texts) if p not in ids_cache]
        if missing:
            ids_cache.update(zip(missing, tokenizer(missing)))
        tokens = torch.stack([ids_cache[p] for p in texts])  # [B+E, L]
        positives = positive_mask(specs + extras, scenes)  # [B, B+E]
        image_features = F.normalize(model.encode_image(clip_preprocess(images, preprocess_cfg)), dim=-1)  # [B, D]
        text_features = F.normalize(model.encode_text(tokens), dim=-1)  # [B+E, D]
        loss = clip_loss(image_features, text_features, model.logit_scale, positives)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(MAX_LOGIT_SCALE))
        step += 1
        row = curve.add(step, dict(loss=loss.item(), positives_per_image=positives.sum().item() / len(prompts),
                                   extra_texts=len(extras)))
        if row:
            row["logit_scale"] = float(model.logit_scale.detach().exp())
            print(f"step {step} loss {row['loss']:.4f} (exp t {row['logit_scale']:.1f}, "
                  f"{step / max(budget.elapsed(), 1e-9):.2f} steps/s)", flush=True)
    model.eval().requires_grad_(False)
    return dict(steps=step, wall_s=budget.elapsed(), curve=curve.points)


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def image_embeddings(model, preprocess_cfg: dict, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """``[N, 3, H, W]`` in [0, 1] -> L2-normalised ``[N, D]``, as the rewards compute them."""
    return torch.cat([F.normalize(model.encode_image(clip_preprocess(images[i : i + batch], preprocess_cfg)).float(), dim=-1)
                      for i in range(0, len(images), batch)])


@torch.no_grad()
def retrieval_accuracy(model, tokenizer, preprocess_cfg: dict, seed: int = 0, candidates: int = 64,
                       repeats: int = 4, splits: Sequence[str] = ("train", "heldout")) -> list[dict]:
    """Zero-shot image -> prompt retrieval on fresh renders, per tier and split.

    Per tier and split (and "mixed": all tiers), ``repeats`` times: draw up to
    ``candidates`` distinct prompts of the split, render each once (seeds from
    :data:`EVAL_SEED_BASE`, never used in training), and pick for every render the prompt
    of highest cosine. ``top1``: the picked prompt holds for the render (``check_scene``
    on its true objects; "a red circle" is right for a render of "a small red circle").
    ``chance``: the mean share of candidates that hold, the accuracy of a random pick.
    """
    rows = []
    next_seed = EVAL_SEED_BASE + seed * TRAIN_SEEDS_PER_RUN
    for split in splits:
        for tier in [*TIERS, "mixed"]:
            pool = [p for t in TIERS for p in all_prompts(t, split)] if tier == "mixed" else all_prompts(tier, split)
            rng = random.Random(f"shapes-clip/eval/{seed}/{split}/{tier}")
            right = chance = n = 0.0
            for _ in range(repeats):
                prompts = rng.sample(pool, min(candidates, len(pool)))
                specs = [parse_prompt(p) for p in prompts]
                scenes = [render_scene(s, next_seed + i) for i, s in enumerate(specs)]
                next_seed += len(specs)
                img = image_embeddings(model, preprocess_cfg, to_tensor([im for im, _ in scenes]))
                txt = F.normalize(model.encode_text(tokenizer(prompts)).float(), dim=-1)
                holds = positive_mask(specs, [objs for _, objs in scenes])  # [N, N]
                pick = (img @ txt.T).argmax(1)  # [N]
                right += holds[torch.arange(len(prompts)), pick].sum().item()
                chance += holds.float().mean(1).sum().item()
                n += len(prompts)
            rows.append(dict(split=split, tier=tier, candidates=min(candidates, len(pool)), images=int(n),
                             top1=right / n, chance=chance / n))
    return rows


def swap_variants(spec: SceneSpec) -> tuple[str, list[SceneSpec]]:
    """The spec with its one distinguishing attribute set to every value it can take:
    position (tier 2), relation (tier 4) or count (tier 5); returns (attribute, variants)."""
    clause = spec.clauses[0]
    if spec.tier == 2:
        return "position", [SceneSpec((replace(clause, position=p),)) for p in POSITIONS]
    if spec.tier == 4:
        return "relation", [SceneSpec(spec.clauses, r) for r in RELATIONS]
    if spec.tier == 5:
        return "count", [SceneSpec((replace(clause, count=n),)) for n in COUNT_WORDS if n > 1]
    raise ValueError(f"tier {spec.tier} has no single attribute to swap; tiers 2, 4 and 5 do")


def swap_negatives(specs: Sequence[SceneSpec], p: float, rng: random.Random) -> list[SceneSpec]:
    """Hard-negative captions in the manner of NegCLIP (Yuksekgonul et al. 2023,
    https://arxiv.org/abs/2210.01936): each tier-2, 4 or 5 prompt, with probability ``p``,
    contributes one of its :func:`swap_variants` other than itself (another position,
    relation or count) that is not a held-out prompt. Batches rarely hold such a pair by
    chance, so without them the loss can be met by naming the objects alone.
    :func:`positive_mask` still decides what holds, so a variant that the scene also
    satisfies counts as a positive."""
    extras = []
    for spec in specs:
        if spec.tier in (2, 4, 5) and rng.random() < p:
            extras.append(rng.choice([v for v in swap_variants(spec)[1] if v != spec and not is_heldout(v)]))
    return extras


@torch.no_grad()
def swap_accuracy(model, tokenizer, preprocess_cfg: dict, seed: int = 0, n: int = 128,
                  splits: Sequence[str] = ("train", "heldout")) -> list[dict]:
    """The hard negatives: can the model tell a render's prompt from the same prompt with
    another position, relation or count (:func:`swap_variants`)?

    Per split and tier 2, 4, 5: ``n`` fresh renders of random prompts (seeds after those of
    :func:`retrieval_accuracy`), each picking the variant of highest cosine; ``top1``: the
    pick holds for the render; ``chance``: mean share of variants that hold.
    """
    rows = []
    next_seed = EVAL_SEED_BASE + seed * TRAIN_SEEDS_PER_RUN + TRAIN_SEEDS_PER_RUN // 2
    for split in splits:
        for tier in (2, 4, 5):
            rng = random.Random(f"shapes-clip/swap/{seed}/{split}/{tier}")
            specs = [parse_prompt(p) for p in rng.choices(all_prompts(tier, split), k=n)]
            scenes = [render_scene(s, next_seed + i) for i, s in enumerate(specs)]
            next_seed += n
            img = image_embeddings(model, preprocess_cfg, to_tensor([im for im, _ in scenes]))  # [n, D]
            right = chance = 0.0
            for spec, (_, objects), emb in zip(specs, scenes, img):
                attribute, variants = swap_variants(spec)
                txt = F.normalize(model.encode_text(tokenizer([v.prompt for v in variants])).float(), dim=-1)
                holds = positive_mask(variants, [objects])[0]  # [V]
                right += holds[(txt @ emb).argmax()].item()
                chance += holds.float().mean().item()
            rows.append(dict(split=split, tier=tier, attribute=attribute, variants=len(variants), images=n,
                             top1=right / n, chance=chance / n))
    return rows


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 0..N-1 (ties broken by order; the scores here are continuous)."""
    ranks = torch.empty_like(x)
    ranks[x.argsort()] = torch.arange(len(x), dtype=x.dtype)
    return ranks


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    return pearson(_ranks(a.double()), _ranks(b.double()))


def aesthetic_data(model, preprocess_cfg: dict, n: int, split: str, seed: int, first_seed: int,
                   do_augment: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` renders of ``split`` prompts -> (normalised embeddings ``[n, D]``, scores ``[n]``)."""
    stream = SceneStream(seed, split=split)
    stream.next_seed = first_seed
    embeddings, scores = [], []
    gen = torch.Generator().manual_seed(seed)
    for start in range(0, n, 256):
        images, _, _, scenes = stream.batch(min(256, n - start))
        if do_augment:
            images = augment(images, gen)
        embeddings.append(image_embeddings(model, preprocess_cfg, images))
        scores.append(torch.tensor([synthetic_aesthetic(objs) for objs in scenes]))
    return torch.cat(embeddings), torch.cat(scores)


def fit_aesthetic_head(embeddings: torch.Tensor, scores: torch.Tensor, steps: int, seed: int,
                       lr: float = 1e-3, batch: int = 256) -> tuple[AestheticHead, list[float]]:
    """MSE fit of the LAION v2 head on normalised embeddings ``[N, D]`` -> scores ``[N]``."""
    torch.manual_seed(seed)
    head = AestheticHead(embeddings.shape[1])
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    head.train()
    curve = []
    for step in range(steps):
        idx = torch.randint(0, len(scores), (batch,), generator=gen)
        loss = F.mse_loss(head(embeddings[idx]), scores[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        if (step + 1) % max(1, steps // 10) == 0:
            curve.append(round(loss.item(), 4))
    return head.eval().requires_grad_(False), curve


@torch.no_grad()
def head_metrics(head: AestheticHead, embeddings: torch.Tensor, scores: torch.Tensor) -> dict:
    pred = head(embeddings)
    return dict(n=len(scores), spearman=spearman(pred, scores), pearson=pearson(pred, scores),
                rmse=float((pred - scores).pow(2).mean().sqrt()), score_std=float(scores.std()))


# --------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="genalign toyworld pretrain clip",
        description="Pretrain the tiny Shapes World CLIP (open_clip) and its aesthetic-style head.",
    )
    p.add_argument("--out", default="assets/models/shapes-clip", help="output model folder")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation, data and augmentation")
    p.add_argument("--steps", type=int, default=4000, help="CLIP optimisation steps (cap)")
    p.add_argument("--minutes", type=float, default=40.0, help="wall-clock cap on CLIP training (0: none)")
    p.add_argument("--batch-size", type=int, default=128, help="(render, prompt) pairs per step")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (warm-up, then cosine)")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW decay of matrices (not embeddings, norms, biases)")
    p.add_argument("--no-augment", dest="augment", action="store_false", help="train on clean renders only")
    p.add_argument("--swap-negatives", type=float, default=1.0,
                   help="probability that a tier 2/4/5 prompt adds a swapped-attribute caption as an extra negative (0: batch negatives only)")
    p.add_argument("--embed-dim", type=int, default=64, help="joint embedding width")
    p.add_argument("--vision-width", type=int, default=96, help="ViT width")
    p.add_argument("--vision-layers", type=int, default=4, help="ViT layers")
    p.add_argument("--text-width", type=int, default=64, help="text transformer width")
    p.add_argument("--text-layers", type=int, default=3, help="text transformer layers")
    p.add_argument("--head-width", type=int, default=32, help="attention head width (heads = width / this)")
    p.add_argument("--head-scenes", type=int, default=8000, help="train-split renders the aesthetic head is fitted on")
    p.add_argument("--head-steps", type=int, default=3000, help="aesthetic head optimisation steps")
    p.add_argument("--eval-scenes", type=int, default=2000, help="held-out renders for the head's correlations")
    p.add_argument("--eval-repeats", type=int, default=4, help="retrieval batches per tier and split")
    p.add_argument("--swap-scenes", type=int, default=256, help="renders per split and tier of the position / relation / count swap test")
    p.add_argument("--save-dtype", choices=["float16", "float32"], default="float16",
                   help="dtype of the saved CLIP weights (trained in float32; loaded back as float32, and "
                        "everything after training is measured on the saved weights)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; 1 is fastest when another job shares the CPU (0: torch's choice)")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be at least 1")
    if args.minutes < 0:
        p.error("--minutes must be >= 0 (0: no time cap)")
    return args


def check_out(out: Path) -> None:
    """Refuse an ``--out`` that is a file, lies under a file, or is a folder of something else."""
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise FileExistsError(f"'--out': {str(parent)!r} is a file, so {str(out)!r} cannot be a folder")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"'--out': {str(out)!r} is a file, expected a model folder")
    if out.is_dir() and any(out.iterdir()) and not (out / CONFIG_NAME).is_file():
        raise FileExistsError(
            f"'--out': {str(out)!r} is a non-empty folder without {CONFIG_NAME}; "
            "refusing to replace something that is not a shapes-clip model")


def main(argv=None) -> Path:
    """Train the CLIP, fit the head, evaluate both, save; returns the output folder."""
    import open_clip

    args = parse_args(argv)
    out = Path(args.out).resolve()
    check_out(out)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.monotonic()
    seed_everything(args.seed)
    with staged_folder(out) as tmp:
        arch = architecture(args.embed_dim, args.vision_width, args.vision_layers, 4, args.text_width,
                            args.text_layers, args.head_width)
        (tmp / CONFIG_NAME).write_text(json.dumps(arch, indent=2) + "\n")
        torch.manual_seed(args.seed)
        model, tokenizer, preprocess_cfg = load_open_clip(str(tmp / CONFIG_NAME), "")
        log: dict = dict(
            command=command_line("genalign toyworld pretrain clip", argv),
            args=vars(args),
            architecture=arch,
            tier_weights=TIER_WEIGHTS,
            versions=versions(open_clip, np),
            threads=torch.get_num_threads(),
            parameters=dict(visual=sum(p.numel() for p in model.visual.parameters()),
                            total=sum(p.numel() for p in model.parameters())),
        )
        print(f"parameters: {log['parameters']}", flush=True)
        log["clip"] = train_clip(model, tokenizer, preprocess_cfg, SceneStream(args.seed), args)
        save_dtype = getattr(torch, args.save_dtype)
        save_file({k: v.to(save_dtype).contiguous() for k, v in model.state_dict().items()}, str(tmp / WEIGHTS_NAME))

        # Everything below measures the saved files, loaded the way the rewards load them.
        t1 = time.monotonic()
        model, tokenizer, preprocess_cfg = load_open_clip(str(tmp / CONFIG_NAME), str(tmp / WEIGHTS_NAME))
        rows = retrieval_accuracy(model, tokenizer, preprocess_cfg, seed=args.seed, repeats=args.eval_repeats)
        log["retrieval"] = rows
        for r in rows:
            print(f"retrieval {r['split']:>7} tier {r['tier']!s:>5}: top-1 {100 * r['top1']:.1f}% "
                  f"(chance {100 * r['chance']:.1f}%, {r['candidates']} prompts)", flush=True)
        log["swaps"] = swap_accuracy(model, tokenizer, preprocess_cfg, seed=args.seed, n=args.swap_scenes)
        for r in log["swaps"]:
            print(f"swap {r['attribute']:>8} {r['split']:>7}: top-1 {100 * r['top1']:.1f}% "
                  f"(chance {100 * r['chance']:.1f}%, {r['variants']} variants)", flush=True)
        log["retrieval_wall_s"] = round(time.monotonic() - t1, 1)

        t2 = time.monotonic()
        eval_seed = EVAL_SEED_BASE + (args.seed + 1) * TRAIN_SEEDS_PER_RUN  # after the retrieval renders
        fit_x, fit_y = aesthetic_data(model, preprocess_cfg, args.head_scenes, "train", args.seed,
                                      first_seed=args.seed * TRAIN_SEEDS_PER_RUN + HEAD_SEED_OFFSET)
        head, head_curve = fit_aesthetic_head(fit_x, fit_y, args.head_steps, args.seed)
        save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(tmp / HEAD_NAME))
        heldout = aesthetic_data(model, preprocess_cfg, args.eval_scenes, "heldout", args.seed, eval_seed)
        train_fresh = aesthetic_data(model, preprocess_cfg, args.eval_scenes, "train", args.seed,
                                     eval_seed + args.eval_scenes)
        heldout_aug = aesthetic_data(model, preprocess_cfg, args.eval_scenes, "heldout", args.seed,
                                     eval_seed, do_augment=True)
        log["aesthetic"] = dict(
            score="10 * (centring + saturation) / 2 from ground-truth objects (synthetic_aesthetic)",
            fit_scenes=args.head_scenes, fit_loss_curve=head_curve,
            fit=head_metrics(head, fit_x, fit_y),
            train_fresh=head_metrics(head, *train_fresh),
            heldout=head_metrics(head, *heldout),
            heldout_augmented=head_metrics(head, *heldout_aug),
            wall_s=round(time.monotonic() - t2, 1),
        )
        for name in ("fit", "train_fresh", "heldout", "heldout_augmented"):
            m = log["aesthetic"][name]
            print(f"aesthetic {name}: spearman {m['spearman']:.3f} pearson {m['pearson']:.3f} "
                  f"rmse {m['rmse']:.3f} (score std {m['score_std']:.3f})", flush=True)
        log["reward_configs"] = {
            "clip_score": {"type": "clip_score", "model": f"{args.out}/{CONFIG_NAME}",
                           "pretrained": f"{args.out}/{WEIGHTS_NAME}"},
            "aesthetic": {"type": "aesthetic", "head": f"{args.out}/{HEAD_NAME}",
                          "model": f"{args.out}/{CONFIG_NAME}", "pretrained": f"{args.out}/{WEIGHTS_NAME}"},
        }
        log["weights_bytes"] = sum(f.stat().st_size for f in tmp.glob("*.safetensors"))
        log["total_wall_s"] = round(time.monotonic() - t0, 1)
        (tmp / LOG_NAME).write_text(json.dumps(log, indent=1) + "\n")
    print(f"saved {out} ({log['weights_bytes'] / 1e6:.1f} MB of weights) in {log['total_wall_s'] / 60:.1f} min")
    return out


if __name__ == "__main__":
    main()
