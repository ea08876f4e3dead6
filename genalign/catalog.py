"""``genalign list``: what exists, read from the registries, one line of help each."""

from __future__ import annotations

import dataclasses
import inspect
import sys
from typing import Any

#: ``genalign sample --method``: how samples are drawn (no training).
SAMPLING_METHODS = {
    "plain": "the policy's own sampler (DDIM for stable_diffusion, LCM for consistency, token sampling for text), one sample per seed",
    "best_of_n": "best-of-N: draw N candidates per output, keep the one the reward scores highest",
    "svdd_pm": "SVDD-PM: every `chunk` steps keep the best of M candidates, valued by the reward of the predicted x_0 (tokens: greedy completion)",
    "svdd_mc": "SVDD-MC: as svdd_pm, valued by a value function trained with `genalign value` (image policies)",
    "self_certainty": "self-certainty best-of-N: keep the sample whose token distributions are furthest from uniform (token policies; no reward)",
    "borda": "Borda voting: N samples vote for their answers with (N - rank + 1)^p votes by self-certainty rank (token policies; no reward)",
}


def _first_line(text: str | None) -> str:
    lines = [line.strip() for line in (text or "").strip().splitlines()]
    return lines[0] if lines else ""


def describe_entry(config_cls: type, impl: Any) -> str:
    """One help line: the implementation's own docstring, else its config tag's help, else its module's."""
    doc = _first_line(impl.__doc__) if inspect.isclass(impl) else ""
    if doc:
        return doc
    tag_help = dataclasses.fields(config_cls)[0].metadata.get("help", "") if dataclasses.is_dataclass(config_cls) else ""
    if tag_help and tag_help not in ("policy kind", "algorithm name"):
        return tag_help
    return _first_line(sys.modules[impl.__module__].__doc__)


def catalog() -> dict[str, list[tuple[str, str]]]:
    """Section -> [(name used in configs / on the command line, one line of help)]."""
    from genalign.algorithms import ALGORITHMS
    from genalign.policies import POLICIES
    from rewards.registry import REWARDS

    return {
        "policies (policy.type)": [(k, describe_entry(c, p)) for k, (c, p) in POLICIES.items()],
        "algorithms (algorithm.name)": [(k, describe_entry(c, a)) for k, (c, a) in ALGORITHMS.items()],
        "rewards (reward.components[].type)": [(k, describe_entry(c, r)) for k, (c, r) in REWARDS.items()],
        "sampling methods (genalign sample --method)": list(SAMPLING_METHODS.items()),
    }


def format_catalog() -> str:
    out = []
    for section, entries in catalog().items():
        out.append(f"{section}:")
        width = max(len(name) for name, _ in entries)
        out.extend(f"  {name:<{width}}  {help_}" for name, help_ in entries)
        out.append("")
    out.append("Every config key with its help: genalign train --help-config")
    return "\n".join(out)
