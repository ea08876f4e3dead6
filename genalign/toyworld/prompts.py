"""Prompt templates of the five tiers, the held-out compositions, and prompt sampling.

Templates per tier (every prompt space is small enough to enumerate):

1. "a [small|large] <colour> <shape>" (size optional)               54 prompts
2. "a <colour> <shape> <on the left|on the right|at the top|at the bottom>"  72
3. "a <colour> <shape> and a <colour> <shape>" (two different pairs) 306
4. "a <colour> <shape> <to the left of|to the right of|above|below> a <colour> <shape>"  1224
5. "<two|three|four> <colour> <shape>s"                               54

Held out of the train split (generalisation is measured on them):

* :data:`HELDOUT_PAIRS`: colour x shape pairs that never appear in a train prompt.
* :data:`HELDOUT_RELATIONS`: shape-level relations that never appear in a train
  prompt, in either phrasing: ("circle", "above", "square") also holds out
  "... square below ... circle".

A prompt is held out when any clause uses a held-out pair or its relation is held out;
``split="train"`` never returns one, ``split="heldout"`` returns only those.
"""

from __future__ import annotations

import random
from itertools import product

from .spec import COLORS, POSITIONS, RELATIONS, SHAPES, SIZES, ObjectClause, SceneSpec

HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {("green", "triangle"), ("blue", "circle"), ("yellow", "square"), ("purple", "triangle")}
)
HELDOUT_RELATIONS: frozenset[tuple[str, str, str]] = frozenset(
    {("circle", "above", "square"), ("triangle", "left of", "circle")}
)
SPLITS = ("train", "heldout", "all")
_CONVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def _heldout_relations() -> frozenset[tuple[str, str, str]]:
    return HELDOUT_RELATIONS | {(b, _CONVERSE[rel], a) for a, rel, b in HELDOUT_RELATIONS}


def is_heldout(spec: SceneSpec) -> bool:
    """Whether ``spec`` uses a held-out colour x shape pair or a held-out relation."""
    if any((c.color, c.shape) in HELDOUT_PAIRS for c in spec.clauses):
        return True
    if spec.relation is None:
        return False
    a, b = spec.clauses
    return (a.shape, spec.relation, b.shape) in _heldout_relations()


def _specs(tier: int) -> list[SceneSpec]:
    pairs = list(product(COLORS, SHAPES))
    if tier == 1:
        return [SceneSpec((ObjectClause(s, c, size=z),)) for z in (None, *SIZES) for c, s in pairs]
    if tier == 2:
        return [SceneSpec((ObjectClause(s, c, position=p),)) for p in POSITIONS for c, s in pairs]
    if tier in (3, 4):
        relations = [None] if tier == 3 else list(RELATIONS)
        return [
            SceneSpec((ObjectClause(sa, ca), ObjectClause(sb, cb)), rel)
            for rel in relations
            for (ca, sa), (cb, sb) in product(pairs, pairs)
            if (ca, sa) != (cb, sb)
        ]
    if tier == 5:
        return [SceneSpec((ObjectClause(s, c, count=n),)) for n in (2, 3, 4) for c, s in pairs]
    raise ValueError(f"unknown tier {tier!r}; tiers: 1, 2, 3, 4, 5")


def all_specs(tier: int, split: str = "all") -> list[SceneSpec]:
    """Every scene spec of a tier in a fixed order, filtered by split (train/heldout/all)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits: {', '.join(SPLITS)}")
    specs = _specs(tier)
    if split == "all":
        return specs
    return [s for s in specs if is_heldout(s) == (split == "heldout")]


def all_prompts(tier: int, split: str = "all") -> list[str]:
    """Every prompt of a tier in a fixed order, filtered by split (train/heldout/all)."""
    return [s.prompt for s in all_specs(tier, split)]


def sample_prompts(tier: int, n: int, split: str = "train", seed: int = 0) -> list[str]:
    """``n`` prompts of ``tier`` from ``split``, deterministic per seed.

    Draws without replacement from a shuffled copy of the tier's prompts and reshuffles
    when it runs out, so every prompt appears before any repeats.
    """
    pool = all_prompts(tier, split)
    rng = random.Random(f"shapes-world/{tier}/{split}/{seed}")
    out: list[str] = []
    while len(out) < n:
        batch = pool[:]
        rng.shuffle(batch)
        out.extend(batch[: n - len(out)])
    return out
