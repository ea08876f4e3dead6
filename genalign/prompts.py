"""Where conditions come from: a list in the config, a text file, Shapes World or Shapes QA.

Every source draws an epoch's conditions deterministically from ``(seed, epoch)``, so a
resumed run sees exactly the conditions the uninterrupted run would have seen. A condition
is any object (genalign.conditions): a prompt string, or a dict such as
``{"prompt": ..., "answer": ...}`` that a rule reward verifies against. An embedded world
also knows the ground truth of its conditions (``targets``), which off-policy algorithms
(SePPO) use as winning samples.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from genalign.configs import opt
from genalign.toyworld.moving import MovingShapesPrompts
from genalign.toyworld.text_qa import ShapesQAPrompts
from genalign.toyworld.vqa import ShapesVQAPrompts


@dataclass
class ListPrompts:
    source: Literal["list"] = opt("list", "prompts given inline")
    prompts: list[Any] = opt(
        [], "the conditions: prompt strings, or dicts with a 'prompt' (and e.g. an 'answer' for rule rewards); each epoch samples from them uniformly with replacement"
    )
    eval_prompts: list[Any] = opt([], "fixed conditions for before/after grids and eval (default: the first prompts)")

    def validate(self) -> None:
        if not self.prompts:
            raise ValueError("'prompts' is empty: give at least one prompt")
        for key in ("prompts", "eval_prompts"):
            for i, c in enumerate(getattr(self, key)):
                if not isinstance(c, (str, dict)) or (isinstance(c, dict) and "prompt" not in c):
                    raise ValueError(f"'{key}.{i}' must be a prompt string or a dict with a 'prompt', got {c!r}")

    def sample(self, n: int, seed: int) -> list[Any]:
        rng = random.Random(seed)
        return [rng.choice(self.prompts) for _ in range(n)]

    def evaluation(self, n: int) -> list[Any]:
        pool = self.eval_prompts or self.prompts
        return [pool[i % len(pool)] for i in range(n)]

    def eval_sets(self, n: int) -> dict[str, list[Any]]:
        return {"eval": self.evaluation(n)}


def read_prompt_lines(path: str) -> list[str]:
    """The prompts of a text file: one per line, blank lines and ``#`` comments skipped; a file
    that is not UTF-8 text is an error naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
    except UnicodeDecodeError as e:
        raise ValueError(f"prompt file {path!r} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    return [line for line in lines if line and not line.startswith("#")]


@dataclass
class FilePrompts:
    source: Literal["file"] = opt("file", "prompts read from a text file, one per line")
    path: str = opt("", "text file with one prompt per line (blank lines and # comments skipped)")

    def validate(self) -> None:
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"'path': prompt file not found: {self.path!r}")
        if not self.load():
            raise ValueError(f"'path': prompt file {self.path!r} has no prompts")

    def load(self) -> list[str]:
        return read_prompt_lines(self.path)

    def sample(self, n: int, seed: int) -> list[str]:
        prompts = self.load()
        rng = random.Random(seed)
        return [rng.choice(prompts) for _ in range(n)]

    def evaluation(self, n: int) -> list[str]:
        prompts = self.load()
        return [prompts[i % len(prompts)] for i in range(n)]

    def eval_sets(self, n: int) -> dict[str, list[str]]:
        return {"eval": self.evaluation(n)}


@dataclass
class ShapesWorldPrompts:
    source: Literal["shapes_world"] = opt("shapes_world", "prompts from the Shapes World grammar")
    tiers: list[int] = opt([1, 2, 3, 4, 5], "difficulty tiers to draw from (1 one object … 5 counting)")
    split: Literal["train", "heldout"] = opt("train", "compositions to train on")
    eval_split: Literal["train", "heldout"] = opt("heldout", "compositions for before/after grids and eval")
    pool_size: int = opt(0, "if > 0, train on a fixed pool of this many prompts per tier (else fresh draws)", ge=0)

    def validate(self) -> None:
        bad = [t for t in self.tiers if t not in (1, 2, 3, 4, 5)]
        if bad or not self.tiers:
            raise ValueError(f"'tiers' must be a non-empty subset of 1..5, got {self.tiers}")

    def pool(self, tier: int) -> list[str]:
        """The fixed training prompts of ``tier`` when ``pool_size`` > 0 (else empty: fresh draws)."""
        from genalign.toyworld import sample_prompts

        return sample_prompts(tier, self.pool_size, self.split, seed=1000 + tier) if self.pool_size > 0 else []

    def sample(self, n: int, seed: int) -> list[str]:
        from genalign.toyworld import sample_prompts

        rng = random.Random(seed)
        if self.pool_size > 0:
            pool = [p for t in self.tiers for p in self.pool(t)]
            return [rng.choice(pool) for _ in range(n)]
        tiers = [rng.choice(self.tiers) for _ in range(n)]
        out = []
        for i, tier in enumerate(tiers):
            out.extend(sample_prompts(tier, 1, self.split, seed=seed * 100_003 + i))
        return out

    def evaluation(self, n: int) -> list[str]:
        from genalign.toyworld import sample_prompts

        per_tier = -(-n // len(self.tiers))
        prompts = [p for t in self.tiers for p in sample_prompts(t, per_tier, self.eval_split, seed=12345)]
        return prompts[:n]

    def eval_sets(self, n: int) -> dict[str, list[str]]:
        """``n`` fixed prompts of the eval split per trained tier, as ``"tier t"``.

        When the training pool is drawn from the eval split (``pool_size`` > 0 and
        ``split == eval_split``), a tier's ``n`` listed prompts are divided, in order, into
        ``"tier t (training pool)"`` (the prompts trained on) and ``"tier t (never trained)"``
        (the others), so the same samples show fit and transfer apart.
        """
        from genalign.toyworld import sample_prompts

        sets: dict[str, list[str]] = {}
        for t in self.tiers:
            prompts = sample_prompts(t, n, self.eval_split, seed=12345)
            if self.pool_size <= 0 or self.split != self.eval_split:
                sets[f"tier {t}"] = prompts
                continue
            pool = set(self.pool(t))
            for name, part in ((f"tier {t} (training pool)", [p for p in prompts if p in pool]),
                               (f"tier {t} (never trained)", [p for p in prompts if p not in pool])):
                if part:
                    sets[name] = part
        return sets

    def targets(self, conditions: Sequence[Any], seeds: Sequence[int], like: Any) -> Any:
        """Ground truth of each prompt: a fresh render per seed, at the size of ``like``
        (``[B, 3, H, W]`` images: the samples the targets stand opposite)."""
        from genalign.targets import ShapesWorldTargets

        return ShapesWorldTargets()(conditions, seeds, like.shape[-1])


PROMPT_SOURCES = {"list": ListPrompts, "file": FilePrompts, "shapes_world": ShapesWorldPrompts, "shapes_qa": ShapesQAPrompts,
                  "shapes_vqa": ShapesVQAPrompts, "moving_shapes": MovingShapesPrompts}
