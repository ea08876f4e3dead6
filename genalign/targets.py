"""Off-policy target outputs for a prompt: the "winning" samples of SePPO.

Two sources, chosen in the algorithm's config:

- ``world``: the prompt source's own ground truth (``ShapesWorldPrompts.targets`` renders a
  fresh layout of each prompt per seed with :class:`ShapesWorldTargets`, the data distribution
  the verifier was trained to accept).
- ``folder``: any folder of prompt–image pairs in the Hugging Face ``imagefolder`` layout:
  image files next to a ``metadata.jsonl`` whose lines are
  ``{"file_name": "cat_01.png", "prompt": "a cat"}``. A prompt may have several images;
  the seed picks one.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from genalign.conditions import condition_text


def pil_to_tensor(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """PIL images -> ``[N, 3, size, size]`` float in [0, 1] (bicubic resize when needed)."""
    out = []
    for im in images:
        im = im.convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1))
    return torch.stack(out)


class ShapesWorldTargets:
    def __call__(self, prompts: Sequence[Any], seeds: Sequence[int], size: int) -> torch.Tensor:
        from genalign.toyworld import parse_prompt, render

        texts = [condition_text(p) for p in prompts]
        return pil_to_tensor([render(parse_prompt(p), seed=int(s) % 2**31, size=size) for p, s in zip(texts, seeds)], size)


class FolderTargets:
    def __init__(self, path: str):
        meta = os.path.join(path, "metadata.jsonl")
        if not os.path.isfile(meta):
            raise FileNotFoundError(f"target folder {path!r} has no metadata.jsonl (lines of {{'file_name', 'prompt'}})")
        self.root = path
        self.by_prompt: dict[str, list[str]] = defaultdict(list)
        with open(meta) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                if "file_name" not in row or "prompt" not in row:
                    raise KeyError(f"{meta}:{n}: each line needs 'file_name' and 'prompt'")
                file = os.path.join(path, row["file_name"])
                if not os.path.isfile(file):
                    raise FileNotFoundError(f"{meta}:{n}: image {file!r} not found")
                self.by_prompt[row["prompt"]].append(file)
        if not self.by_prompt:
            raise ValueError(f"{meta} lists no images")

    @property
    def prompts(self) -> list[str]:
        return list(self.by_prompt)

    def __call__(self, prompts: Sequence[Any], seeds: Sequence[int], size: int) -> torch.Tensor:
        images = []
        for p, s in zip([condition_text(c) for c in prompts], seeds):
            files = self.by_prompt.get(p)
            if not files:
                raise KeyError(f"no target image for prompt {p!r} in {self.root}")
            with Image.open(files[int(s) % len(files)]) as im:
                images.append(im.copy())
        return pil_to_tensor(images, size)
