"""The files of a run directory, written so that a kill at any moment leaves each one whole.

A run directory holds ``config.yaml`` (the config it was started with), ``metrics.jsonl`` (one
row per epoch), ``eval.jsonl``, ``grids.json``, ``checkpoints/``, ``final/``, the report and
TensorBoard logs. Every file here is replaced atomically (written beside it, then renamed), so a
reader sees the old or the new content, never half of it; temporary names start with ``.tmp-``
and :func:`remove_stale_temps` sweeps those a killed process left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import yaml

# What a run writes into its output directory (removed by ``--overwrite``).
RUN_FILES = ("config.yaml", "metrics.jsonl", "eval.jsonl", "grids.json", "report.html", "reward_curve.png", "time_split.png",
             "samples_before.png", "samples_after.png", "best_monitor.json")
RUN_DIRS = ("checkpoints", "final", "best_monitor", "tensorboard", "report_images")
TEMP_PREFIX = ".tmp-"


def write_text(path: str, text: str) -> None:
    """Replace ``path`` by ``text`` atomically."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path: str, value: Any) -> None:
    write_text(path, json.dumps(value))


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file ([] when it does not exist). A torn last line (a process
    killed mid-write by an older version, or a copy cut short) is dropped; any other line that is
    not JSON is an error naming the file and line."""
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")  # a complete file ends with a newline: its last item is ""
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number == len(lines):
                break  # the unterminated last line: written partly, dropped
            raise ValueError(f"{path}, line {number}: not a JSON row ({e.msg}); the file is damaged") from None
    return rows


def write_jsonl(path: str, rows: list[dict[str, Any]]) -> None:
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def append_jsonl(path: str, rows: list[dict[str, Any]]) -> None:
    """Add rows to a JSON-lines file by rewriting it atomically (run logs are small)."""
    write_jsonl(path, read_jsonl(path) + list(rows))


def write_config(path: str, config: dict[str, Any]) -> None:
    write_text(path, yaml.safe_dump(config, sort_keys=False))


def read_config(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


def run_contents(out: str) -> list[str]:
    """The run files and folders present in ``out`` (empty: no run there)."""
    if not os.path.isdir(out):
        return []
    return [n for n in (*RUN_FILES, *RUN_DIRS) if os.path.exists(os.path.join(out, n))]


def clear_run(out: str) -> None:
    """Remove a run's files from ``out`` (only the names a run writes; anything else stays)."""
    for name in RUN_FILES:
        path = os.path.join(out, name)
        if os.path.isfile(path):
            os.remove(path)
    for name in RUN_DIRS:
        shutil.rmtree(os.path.join(out, name), ignore_errors=True)
    remove_stale_temps(out)


def remove_stale_temps(out: str) -> list[str]:
    """Delete ``.tmp-*`` files and folders under ``out`` and ``out/checkpoints`` (left by a
    killed write; a live run never has one open at the moment it starts). Returns their paths."""
    removed = []
    for directory in (out, os.path.join(out, "checkpoints")):
        if not os.path.isdir(directory):
            continue
        for name in os.listdir(directory):
            if name.startswith(TEMP_PREFIX):
                path = os.path.join(directory, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
                removed.append(path)
    return removed


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"epochs": 3}}`` -> ``{"train.epochs": 3}`` (lists of mappings by index)."""
    if isinstance(config, dict):
        items = config.items()
    elif isinstance(config, list) and any(isinstance(v, dict) for v in config):
        items = ((str(i), v) for i, v in enumerate(config))
    else:
        return {prefix: config}
    flat: dict[str, Any] = {}
    for key, value in items:
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat if flat or not prefix else {prefix: config}


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Keys whose values differ between two config mappings: ``{key: (old, new)}`` (a missing
    key reads as ``<absent>``)."""
    a, b = flatten(old), flatten(new)
    missing = "<absent>"
    return {k: (a.get(k, missing), b.get(k, missing)) for k in sorted(set(a) | set(b)) if a.get(k, missing) != b.get(k, missing)}
