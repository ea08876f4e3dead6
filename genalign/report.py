"""Run reports: sample grids, reward curves, and a self-contained report.html.

Samples are images (a ``[B, 3, H, W]`` tensor in [0, 1]), clips (a ``[B, F, 3, H, W]`` tensor
in [0, 1]) or texts (a list of B strings); :func:`is_images` tells tensors from texts and
:func:`is_video` clips from images. Grids show a clip as a frame strip (:func:`to_stills`);
per-sample files of a clip are animated GIFs (:func:`save_gif`).
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402


def is_images(outputs: Any) -> bool:
    """Whether a batch of outputs is images (a ``[B, 3, H, W]`` tensor) rather than a list of texts."""
    return isinstance(outputs, torch.Tensor)


def is_video(outputs: Any) -> bool:
    """Whether a batch of outputs is clips (a ``[B, F, 3, H, W]`` tensor)."""
    return isinstance(outputs, torch.Tensor) and outputs.ndim == 5


def to_stills(outputs: torch.Tensor, pad: int = 1) -> torch.Tensor:
    """Images unchanged; clips ``[B, F, 3, H, W]`` as frame strips ``[B, 3, H, F*W + (F-1)*pad]``
    (frames left to right, white gaps), so every image grid shows them as they are."""
    if not is_video(outputs):
        return outputs
    b, f, c, h, w = outputs.shape
    strip = torch.ones(b, c, h, f * w + (f - 1) * pad, dtype=outputs.dtype, device=outputs.device)
    for k in range(f):
        strip[..., k * (w + pad) : k * (w + pad) + w] = outputs[:, k]
    return strip


def save_gif(clip: torch.Tensor, path: str, scale: int = 4, fps: int = 8) -> None:
    """One clip ``[F, 3, H, W]`` in [0, 1] as a looping animated GIF, upscaled ``scale``x (nearest)."""
    arr = (clip.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    frames = [Image.fromarray(a).resize((a.shape[1] * scale, a.shape[0] * scale), Image.NEAREST) for a in arr]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0)


def detach_outputs(outputs: Any) -> Any:
    """Outputs off the accelerator: images as a float32 CPU tensor, texts as a list of strings."""
    return outputs.detach().float().cpu() if is_images(outputs) else [str(t) for t in outputs]


def image_grid(images: torch.Tensor, rows: int, scale: int = 1, pad: int = 2) -> Image.Image:
    """``[N, 3, H, W]`` in [0, 1] -> one PIL grid with ``rows`` rows (row-major order)."""
    n, _, h, w = images.shape
    cols = -(-n // rows)
    arr = (images.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        canvas[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = arr[i]
    img = Image.fromarray(canvas)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img


def plot_curves(
    history: list[dict[str, Any]], path: str, keys: Sequence[str] = ("reward_mean",), bounds: tuple[float, float] | None = None
) -> None:
    """Reward (and any monitored metric) against reward queries; ±std band for reward_mean.

    The band stays inside the reward's range: ``bounds`` (the declared range, when known) and,
    when the history logs them, each epoch's observed ``reward_min`` / ``reward_max``.
    """
    if not history:
        return
    x = [h["reward_queries"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    for key in keys:
        if key not in history[0]:
            continue
        y = np.array([h[key] for h in history], dtype=float)
        ax.plot(x, y, marker="o", label=key)
        if key == "reward_mean" and "reward_std" in history[0]:
            s = np.array([h["reward_std"] for h in history], dtype=float)
            lo, hi = y - s, y + s
            if bounds is not None:
                lo, hi = np.clip(lo, *bounds), np.clip(hi, *bounds)
            if "reward_min" in history[0] and "reward_max" in history[0]:
                lo = np.maximum(lo, [h["reward_min"] for h in history])
                hi = np.minimum(hi, [h["reward_max"] for h in history])
            ax.fill_between(x, lo, hi, alpha=0.2, label="reward_mean ± std" + (" (within range)" if bounds else ""))
    ax.set_xlabel("reward queries")
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_time_split(seconds: dict[str, float], path: str) -> None:
    """A horizontal bar per phase (seconds and share of the run), longest first."""
    if not seconds:
        return
    items = sorted(seconds.items(), key=lambda kv: kv[1])
    total = sum(v for _, v in items)
    fig, ax = plt.subplots(figsize=(6, 0.4 * len(items) + 1.0), dpi=110)
    ax.barh([k for k, _ in items], [v for _, v in items], color="#4c72b0")
    for i, (_, v) in enumerate(items):
        ax.text(v, i, f" {v:.1f} s ({100 * v / total:.0f}%)", va="center", fontsize=8)
    ax.set_xlabel("wall seconds")
    ax.set_xlim(0, max(v for _, v in items) * 1.35)
    ax.set_title(f"where the run's {total:.0f} s went", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def metric_names(row: dict[str, Any]) -> dict[str, str]:
    """Eval-row key -> short display name: the reward, then sub-components (``strict``, ``partial``,
    ``correct``, ``format``).

    A top-level component equal to the whole reward (a single reward model) is left out.
    """
    comps = [k for k, v in row.items() if k not in ("epoch", "set", "prompts", "samples", "reward", "tier", "nonfinite")
             and not k.endswith("_se") and isinstance(v, (int, float))]
    tops = [k for k in comps if "/" not in k]
    keys = ["reward"] + [k for k in comps if "/" in k or len(tops) > 1]
    shorts = [k.rsplit("/", 1)[-1] for k in keys]
    return {k: (s if shorts.count(s) == 1 else k) for k, s in zip(keys, shorts)}


def headline_keys(row: dict[str, Any]) -> dict[str, str]:
    """The metrics a report leads with: a verifier's strict and partial, else a rule's correct and
    format, when the reward has them; else the reward."""
    names = metric_names(row)
    for group in (("strict", "partial"), ("correct", "format")):
        picked = {k: s for k, s in names.items() if s in group}
        if picked:
            return picked
    return {"reward": "reward"}


def _value(row: dict[str, Any], key: str) -> str:
    se = row.get(f"{key}_se")
    return f"{row[key]:.3f}" + (f" ± {se:.3f}" if se is not None and se == se else "")


def _headline(evals: list[dict[str, Any]]) -> str:
    if not evals:
        return "<p>No evaluation in this run (eval.enabled is false).</p>"
    last = max(r["epoch"] for r in evals)
    sets = list(dict.fromkeys(r["set"] for r in evals))
    keys = headline_keys(evals[0])
    head = "".join(f"<th>{html.escape(s)}: before → after</th>" for s in keys.values())
    body = ""
    for name in sets:
        before = next((r for r in evals if r["set"] == name and r["epoch"] == 0), None)
        after = next((r for r in evals if r["set"] == name and r["epoch"] == last), None)
        cells = ""
        for k in keys:
            b = _value(before, k) if before else "–"
            a = _value(after, k) if after and last > 0 else "–"
            delta = f" <b>({after[k] - before[k]:+.3f})</b>" if before and after and last > 0 else ""
            cells += f"<td>{b} → {a}{delta}</td>"
        n = (after or before)["samples"]
        prompts = (after or before).get("prompts", "")
        body += f"<tr><td>{html.escape(name)}</td><td>{prompts}</td><td>{n}</td>{cells}</tr>"
    return (
        f"<h2>Result: evaluation before training → after epoch {last}</h2>"
        "<p>Fixed prompts and fixed sampling seeds; mean ± standard error over samples.</p>"
        f"<table class='headline'><tr><th>eval set</th><th>prompts</th><th>samples</th>{head}</tr>{body}</table>"
    )


def _caption(cell: dict[str, Any]) -> str:
    if "strict" in cell:
        mark = "<span class='pass'>✓ pass</span>" if cell["strict"] >= 0.5 else "<span class='fail'>✗ fail</span>"
        return mark + (f" · partial {cell['partial']:.2f}" if "partial" in cell else "")
    if "correct" in cell:
        mark = "<span class='pass'>✓ correct</span>" if cell["correct"] >= 0.5 else "<span class='fail'>✗ wrong</span>"
        fmt = " · format ✗" if cell.get("format", 1.0) < 0.5 else ""
        return mark + fmt + f" · reward {cell['reward']:.3g}"
    return f"reward {cell['reward']:.3g}"


def _sample(cell: dict[str, Any]) -> str:
    """A grid cell's sample: its image, or its response text (escaped, whitespace kept)."""
    if "image" in cell:
        return f"<img src='{cell['image']}'>"
    return f"<pre class='response'>{html.escape(cell['text'])}</pre>"


def _grids(grids: dict[str, dict[str, Any]]) -> str:
    tags = [t for t in ("before", "after") if t in grids] + [t for t in grids if t not in ("before", "after")]
    if not tags:
        return ""
    g0 = grids[tags[0]]
    if not all("cells" in grids[t] for t in tags):  # grids written by an older version: images and rewards only
        return "".join(
            f"<h3>{html.escape(t)}</h3><img src='{grids[t]['png']}' style='image-rendering: pixelated; max-width: 520px'>"
            for t in tags
        )
    summary = []
    for t in tags:
        cells = [c for row in grids[t]["cells"] for c in row]
        if cells and "strict" in cells[0]:
            summary.append(f"{t}: {sum(c['strict'] >= 0.5 for c in cells)}/{len(cells)} pass strict")
        elif cells and "correct" in cells[0]:
            summary.append(f"{t}: {sum(c['correct'] >= 0.5 for c in cells)}/{len(cells)} correct")
        elif cells:
            summary.append(f"{t}: mean reward {sum(c['reward'] for c in cells) / len(cells):.3f}")
    seeds = g0.get("seeds", [])
    texts = any("text" in c for t in tags for row in grids[t]["cells"] for c in row)
    head = "<th>eval set</th><th>prompt</th>" + "".join(
        f"<th colspan='{len(seeds)}'>{html.escape(t)} (seeds {', '.join(map(str, seeds))})</th>" for t in tags
    )
    body = ""
    for i, prompt in enumerate(g0["prompts"]):
        body += f"<tr><td>{html.escape(g0.get('sets', [''] * len(g0['prompts']))[i])}</td><td>{html.escape(prompt)}</td>"
        for t in tags:
            for cell in grids[t]["cells"][i]:
                body += f"<td class='cell'>{_sample(cell)}<br>{_caption(cell)}</td>"
        body += "</tr>"
    return (
        "<h2>Samples before and after training</h2>"
        f"<p>Eval prompts with the seeds evaluation gives them (the {'responses' if texts else 'images'} the table above scores), "
        f"each labelled with the reward's verdict. {html.escape('; '.join(summary))}.</p>"
        f"<table class='samples'><tr>{head}</tr>{body}</table>"
    )


def _eval_table(evals: list[dict[str, Any]]) -> str:
    if not evals:
        return ""
    keys = metric_names(evals[0])
    head = "".join(f"<th>{html.escape(s)}</th>" for s in keys.values())
    body = "".join(
        f"<tr><td>{r['epoch']}</td><td>{html.escape(str(r['set']))}</td><td>{r['samples']}</td>"
        + "".join(f"<td>{_value(r, k) if k in r else '–'}</td>" for k in keys)
        + "</tr>"
        for r in evals
    )
    return (
        "<h2>Evaluation at every evaluated epoch (epoch 0 = before training)</h2>"
        f"<table><tr><th>epoch</th><th>set</th><th>samples</th>{head}</tr>{body}</table>"
    )


def write_report(
    run_dir: str,
    config_yaml: str,
    history: list[dict[str, Any]],
    grids: dict[str, dict[str, Any]],
    timings: dict[str, float],
    evals: list[dict[str, Any]] | None = None,
) -> str:
    """Write ``report.html`` referencing PNGs in ``run_dir`` (no network needed to view it).

    Order: the headline eval metrics (before → after per eval set), the labelled before/after
    samples, the reward curve, the eval table, seconds per phase; the per-epoch metrics and the config
    sit in collapsed sections at the end.

    grids: tag -> {"png" (images only), "prompts" (condition texts), "sets", "seeds", "rewards",
    "cells": [[{"image" or "text", "reward", "strict"?, "partial"?, "correct"?, "format"?}]]}.
    """
    evals = evals or []
    metric_rows = ""
    if history:
        keys = [k for k in history[-1] if isinstance(history[-1][k], (int, float))]
        head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
        body = "".join("<tr>" + "".join(f"<td>{h.get(k, float('nan')):.4g}</td>" for k in keys) + "</tr>" for h in history)
        metric_rows = f"<table class='metrics'><tr>{head}</tr>{body}</table>"
    total = sum(timings.values()) or 1.0
    timing_rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.1f} s</td><td>{100 * v / total:.0f}%</td></tr>"
                          for k, v in timings.items())
    split = "<img src='time_split.png'>" if os.path.isfile(os.path.join(run_dir, "time_split.png")) else ""
    page = f"""<!doctype html><html><head><meta charset='utf-8'><title>genalign run report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1400px}} table{{border-collapse:collapse;font-size:12px}}
td,th{{border:1px solid #ccc;padding:2px 6px}} pre{{background:#f6f6f6;padding:1em}}
.headline{{font-size:16px}} .cell{{text-align:center;font-size:11px}} .cell img{{image-rendering:pixelated;width:128px}}
.response{{white-space:pre-wrap;text-align:left;max-width:260px;margin:0;font-size:12px;background:none;padding:0}}
.pass{{color:#080;font-weight:bold}} .fail{{color:#b00;font-weight:bold}} .metrics{{overflow-x:auto;display:block}}
summary{{cursor:pointer;font-size:1.2em;margin:1em 0}}</style></head><body>
<h1>genalign run report</h1>
{_headline(evals)}
{_grids(grids)}
<h2>Training reward</h2><img src='reward_curve.png'>
{_eval_table(evals)}
<h2>Time per phase</h2>{split}<table>{timing_rows}</table>
<details><summary>Metrics per epoch ({len(history)} rows; raw: metrics.jsonl)</summary>{metric_rows}</details>
<details><summary>Config (config.yaml)</summary><pre>{html.escape(config_yaml)}</pre></details>
</body></html>"""
    path = os.path.join(run_dir, "report.html")
    with open(path, "w") as f:
        f.write(page)
    return path
