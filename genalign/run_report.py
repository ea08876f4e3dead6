"""What a training run shows of itself: fixed-seed evaluation, before/after grids, report.html.

The grids are drawn from the evaluated samples: grid condition ``c`` of eval set ``s`` and
column ``j`` use the seed evaluation gives that condition's sample ``j`` (``eval.seed + j``),
so the grid and the eval table describe the same samples. Outputs may be images (saved as
PNGs) or texts (stored in grids.json); conditions may be any object (labelled by
``condition_text``, told apart by ``condition_key``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

import torch

from genalign import runfiles
from genalign.conditions import condition_key, condition_text
from genalign.progress import write
from genalign.report import detach_outputs, is_images, metric_names
from genalign.timing import PHASES
from genalign.trajectory import concat_outputs

#: The value range a reward type declares (so a mean ± std band never leaves it).
DECLARED_RANGES: dict[str, tuple[float, float]] = {"shapes_verifier": (0.0, 1.0), "rule": (0.0, 1.0), "color_coverage": (0.0, 1.0)}


def reward_bounds(components: Sequence[Any]) -> tuple[float, float] | None:
    """The range of ``Σ_k w_k r_k`` when every component declares its range, else None."""
    lo = hi = 0.0
    for c in components:
        r = DECLARED_RANGES.get(getattr(c, "type", ""))
        if r is None:
            return None
        a, b = c.weight * r[0], c.weight * r[1]
        lo, hi = lo + min(a, b), hi + max(a, b)
    return lo, hi


def _mean_se(values: torch.Tensor) -> tuple[float, float]:
    v = values[torch.isfinite(values)].double()
    if len(v) == 0:
        return float("nan"), float("nan")
    se = float(v.std(unbiased=True) / math.sqrt(len(v))) if len(v) > 1 else 0.0
    return float(v.mean()), se


def condition_tier(condition: Any) -> Any:
    """A condition's difficulty tier when it carries one (``condition["tier"]`` or ``.tier``), else None."""
    if isinstance(condition, dict):
        return condition.get("tier")
    return getattr(condition, "tier", None)


def _row(epoch: int, name: str, conditions: Sequence[Any], scores: torch.Tensor, comps: dict[str, torch.Tensor]) -> dict[str, Any]:
    """One eval.jsonl row: the set's size and mean ± s.e. of the reward and its components.

    ``tier`` is recorded when the set's conditions carry tiers: the tier, or the list of the
    tiers it mixes (in order of appearance), when they are JSON values.
    """
    row: dict[str, Any] = {"epoch": epoch, "set": name, "prompts": len({condition_key(c) for c in conditions}),
                           "samples": len(scores)}
    tiers = list(dict.fromkeys(t for t in map(condition_tier, conditions) if isinstance(t, (int, float, str))))
    if tiers:
        row["tier"] = tiers[0] if len(tiers) == 1 else tiers
    row["reward"], row["reward_se"] = _mean_se(scores)
    bad = int((~torch.isfinite(scores)).sum())
    if bad:  # left out of the means above
        row["nonfinite"] = bad
    for k, v in comps.items():
        row[k], row[f"{k}_se"] = _mean_se(v)
    return row


def format_eval(rows: list[dict[str, Any]]) -> str:
    """``tier 5: reward 0.457, strict 0.276, partial 0.457`` per eval set, joined by '; '."""
    parts = []
    for r in rows:
        names = metric_names(r)
        bad = f" ({r['nonfinite']} non-finite rewards left out)" if r.get("nonfinite") else ""
        parts.append(f"{r['set']}: " + ", ".join(f"{short} {r[k]:.3f}" for k, short in names.items()) + bad)
    return "; ".join(parts)


@torch.no_grad()
def evaluate(trainer: Any, epoch: int) -> list[dict[str, Any]]:
    """Score fixed prompts with fixed seeds; rows go to eval.jsonl (epoch 0 = before training).

    A tier whose training pool is part of the eval split gets its two parts as separate sets
    plus the whole tier (``"tier t (all)"``, the same samples pooled).
    """
    from genalign.evaluation import sample_and_score

    cfg = trainer.config
    ev = cfg.eval
    rows, tier_parts = [], {}
    for name, prompts in trainer.prompts.eval_sets(ev.prompts_per_set).items():
        with trainer.acc.autocast():
            _, out = sample_and_score(trainer.policy, prompts, ev.samples_per_prompt, ev.seed, trainer.reward,
                                      cfg.train.rollout_batch_size, desc=f"eval {name}")
        comps = {k: v.float() for k, v in out.components.items()}
        rows.append(_row(epoch, name, prompts, out.scores.float(), comps))
        if name.endswith((" (training pool)", " (never trained)")):
            tier = name.rsplit(" (", 1)[0]
            tier_parts.setdefault(tier, []).append((prompts, out.scores.float(), comps))
    for tier, parts in tier_parts.items():
        if len(parts) > 1:
            prompts = [p for part in parts for p in part[0]]
            scores = torch.cat([part[1] for part in parts])
            comps = {k: torch.cat([part[2][k] for part in parts]) for k in parts[0][2]}
            rows.append(_row(epoch, f"{tier} (all)", prompts, scores, comps))
    if trainer.main:
        runfiles.append_jsonl(os.path.join(trainer.out, "eval.jsonl"), rows)
        label = "before training" if epoch == 0 else f"after epoch {epoch}"
        write(f"[genalign] eval {label}: {format_eval(rows)}")
    return rows


def grid_prompts(sets: dict[str, list[Any]], n: int) -> list[tuple[str, Any]]:
    """Up to ``n`` (set, condition) pairs, taken in turn from each eval set in its order; a
    condition listed again in a set (same ``condition_key``) is taken once."""
    queues: dict[str, list[Any]] = {}
    for name, conds in sets.items():
        firsts: dict[str, Any] = {}
        for c in conds:
            firsts.setdefault(condition_key(c), c)
        queues[name] = list(firsts.values())
    picks: list[tuple[str, Any]] = []
    while len(picks) < n and any(queues.values()):
        for name, queue in queues.items():
            if queue and len(picks) < n:
                picks.append((name, queue.pop(0)))
    return picks


#: Reward components that label a grid cell.
VERDICTS = ("strict", "partial", "correct", "format")


def verdict(components: dict[str, float], reward: float) -> dict[str, Any]:
    """What a grid cell is labelled with: the reward, and the verdict components the reward has
    (a verifier's ``strict`` pass/fail and ``partial`` score, a rule's ``correct`` and ``format``)."""
    out: dict[str, Any] = {"reward": reward}
    for k, v in components.items():
        short = k.rsplit("/", 1)[-1]
        if short in VERDICTS and short not in out:
            out[short] = v
    return out


@torch.no_grad()
def grid(trainer: Any, tag: str) -> dict[str, Any]:
    """Sample the grid (eval conditions, eval seeds) and store it in grids.json under ``tag``.

    Each cell holds its sample (``"image"``: a PNG under report_images/, or ``"text"``: the
    response itself) and its verdict (:func:`verdict`).
    """
    from genalign.report import image_grid, is_video, save_gif, to_stills

    cfg = trainer.config
    rep, ev = cfg.report, cfg.eval
    picks = grid_prompts(trainer.prompts.eval_sets(ev.prompts_per_set), rep.num_prompts)
    seeds = [ev.seed + j for j in rep.seeds]
    n = len(seeds)
    per_call = max(1, cfg.train.rollout_batch_size // n)
    parts, scores, comps = [], [], {}
    for i in range(0, len(picks), per_call):
        chunk = [p for _, p in picks[i : i + per_call]]
        with trainer.acc.autocast():
            traj = trainer.policy.rollout(chunk, n, [s for _ in chunk for s in seeds])
        parts.append(detach_outputs(traj.outputs))
        out = trainer.reward(traj.outputs, traj.conditions)
        scores.append(out.scores.float().cpu())
        for k, v in out.components.items():
            comps.setdefault(k, []).append(v.float().cpu())
    outputs = concat_outputs(parts)  # [len(picks) * n, 3, H, W] images, or len(picks) * n texts
    images, video = is_images(outputs), is_video(outputs)
    r = torch.cat(scores)
    c = {k: torch.cat(v) for k, v in comps.items()}
    cells = []
    for i in range(len(picks)):
        row = []
        for j in range(n):
            k = i * n + j
            ext = "gif" if video else "png"
            sample = {"image": f"report_images/{tag}_{i}_{j}.{ext}"} if images else {"text": outputs[k]}
            row.append({**sample, **verdict({key: float(v[k]) for key, v in c.items()}, float(r[k]))})
        cells.append(row)
    result: dict[str, Any] = {
        "prompts": [condition_text(p) for _, p in picks], "keys": [condition_key(p) for _, p in picks],
        "sets": [s for s, _ in picks], "seeds": seeds, "rewards": r.view(len(picks), n).tolist(), "cells": cells,
    }
    if images:
        result["png"] = f"samples_{tag}.png"
    if trainer.main:
        if images:
            scale = 4 if outputs.shape[-1] <= 64 else 1
            # clips: frame strips in the grid, an animated GIF per cell
            image_grid(to_stills(outputs), rows=len(picks), scale=scale).save(os.path.join(trainer.out, result["png"]))
            os.makedirs(os.path.join(trainer.out, "report_images"), exist_ok=True)
            for i, row in enumerate(cells):
                for j, cell in enumerate(row):
                    path = os.path.join(trainer.out, cell["image"])
                    if video:
                        save_gif(outputs[i * n + j], path, scale=scale)
                    else:
                        image_grid(outputs[i * n + j][None], rows=1, scale=scale, pad=0).save(path)
        grids = load_grids(trainer.out)
        grids[tag] = result
        runfiles.write_json(os.path.join(trainer.out, "grids.json"), grids)
    return result


def load_grids(out: str) -> dict[str, Any]:
    path = os.path.join(out, "grids.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return {}


def phase_totals(history: list[dict[str, Any]], unlogged: dict[str, float]) -> dict[str, float]:
    """Seconds per phase over the whole run: the rows' ``time/<phase>`` (a resumed run's rows
    included) plus what came after the last row; phases that took no time are left out."""
    totals = dict.fromkeys(PHASES, 0.0)
    for row in history:
        for key, value in row.items():
            if key.startswith("time/"):
                totals[key[5:]] = totals.get(key[5:], 0.0) + float(value)
    for key, value in unlogged.items():
        totals[key] = totals.get(key, 0.0) + float(value)
    return {k: v for k, v in totals.items() if v > 0}


def write_run_report(trainer: Any, grids: dict[str, Any], unlogged: dict[str, float]) -> str:
    """report.html (with reward_curve.png and time_split.png) from the run directory's config,
    metrics and evals; ``unlogged``: phase seconds after the last metrics row."""
    from genalign.report import plot_curves, plot_time_split, write_report

    out, history = trainer.out, trainer.history
    keys = ["reward_mean"] + [k for k in (history[-1] if history else {}) if k.startswith("monitor/")]
    plot_curves(history, os.path.join(out, "reward_curve.png"), keys, bounds=reward_bounds(trainer.config.reward.components))
    totals = phase_totals(history, unlogged)
    plot_time_split(totals, os.path.join(out, "time_split.png"))
    with open(os.path.join(out, "config.yaml")) as f:
        config_yaml = f.read()
    evals = runfiles.read_jsonl(os.path.join(out, "eval.jsonl"))
    return write_report(out, config_yaml, history, grids, totals, evals)
