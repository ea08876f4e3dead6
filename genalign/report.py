"""Run reports: sample grids, reward curves, and a self-contained report.html."""

from __future__ import annotations

import html
import json
import os
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402


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


def plot_curves(history: list[dict[str, Any]], path: str, keys: Sequence[str] = ("reward_mean",)) -> None:
    """Reward (and any monitored metric) against reward queries; ±std band for reward_mean."""
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
            ax.fill_between(x, y - s, y + s, alpha=0.2)
    ax.set_xlabel("reward queries")
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(
    run_dir: str,
    config_yaml: str,
    history: list[dict[str, Any]],
    grids: dict[str, dict[str, Any]],
    timings: dict[str, float],
    evals: list[dict[str, Any]] | None = None,
) -> str:
    """Write ``report.html`` referencing PNGs in ``run_dir`` (no network needed to view it).

    grids: title -> {"png": file name, "prompts": [...], "rewards": [[...]]}.
    """
    sections = []
    for title, g in grids.items():
        rows = "".join(
            f"<tr><td>{html.escape(p)}</td><td>{' '.join(f'{r:.3g}' for r in rs)}</td></tr>"
            for p, rs in zip(g["prompts"], g["rewards"])
        )
        mean = float(np.mean([r for rs in g["rewards"] for r in rs])) if g["rewards"] else float("nan")
        sections.append(
            f"<div class='grid'><h3>{html.escape(title)} — mean reward {mean:.3f}</h3>"
            f"<img src='{g['png']}' style='image-rendering: pixelated; width: 100%; max-width: 520px'>"
            f"<table><tr><th>prompt (one grid row)</th><th>reward per seed</th></tr>{rows}</table></div>"
        )
    metric_rows = ""
    if history:
        keys = [k for k in history[-1] if isinstance(history[-1][k], (int, float))]
        head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
        body = "".join("<tr>" + "".join(f"<td>{h.get(k, float('nan')):.4g}</td>" for k in keys) + "</tr>" for h in history)
        metric_rows = f"<table class='metrics'><tr>{head}</tr>{body}</table>"
    eval_html = ""
    if evals:
        keys = [k for k in evals[0] if k not in ("epoch", "set")]
        head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
        body = "".join(
            f"<tr><td>{r['epoch']}</td><td>{html.escape(str(r['set']))}</td>"
            + "".join(f"<td>{r.get(k, float('nan')):.4g}</td>" for k in keys)
            + "</tr>"
            for r in evals
        )
        eval_html = (
            "<h2>Evaluation (fixed prompts and seeds; epoch 0 = before training)</h2>"
            f"<table><tr><th>epoch</th><th>set</th>{head}</tr>{body}</table>"
        )
    timing_rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.1f} s</td></tr>" for k, v in timings.items())
    page = f"""<!doctype html><html><head><meta charset='utf-8'><title>genalign run report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}} table{{border-collapse:collapse;font-size:12px}}
td,th{{border:1px solid #ccc;padding:2px 6px}} .grids{{display:flex;gap:2em;flex-wrap:wrap}} pre{{background:#f6f6f6;padding:1em}}
.metrics{{overflow-x:auto;display:block}}</style></head><body>
<h1>genalign run report</h1>
<h2>Samples before and after training (same prompts, same seeds)</h2>
<div class='grids'>{''.join(sections)}</div>
{eval_html}
<h2>Reward curve</h2><img src='reward_curve.png'>
<h2>Metrics per epoch</h2>{metric_rows}
<h2>Timings</h2><table>{timing_rows}</table>
<h2>Config</h2><pre>{html.escape(config_yaml)}</pre>
<p>Raw metrics: metrics.jsonl · grids data: <code>{html.escape(json.dumps(list(grids)))}</code></p>
</body></html>"""
    path = os.path.join(run_dir, "report.html")
    with open(path, "w") as f:
        f.write(page)
    return path
