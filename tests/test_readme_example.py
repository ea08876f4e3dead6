"""The README's seams example runs as printed: one GRPO class on the tiny SD, the tiny LM and the tiny VLM."""

import math
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_seams_example_runs(monkeypatch):
    monkeypatch.chdir(README.parent)
    section = README.read_text().split("## The three seams", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md (the three seams)", "exec"), scope)
    kinds = {type(p).__name__ for p in scope["tasks"]}
    assert kinds == {"StableDiffusionPolicy", "VideoDiffusionPolicy", "TextLMPolicy", "VLMPolicy"}
    terms = scope["terms"]  # the last policy's (the VLM's) loss terms
    assert math.isfinite(float(terms.total)) and terms.normaliser > 0
    grads = [p.grad for p in scope["vlm"].trainable_parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
