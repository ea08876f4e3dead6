"""Run a benchmark's (method, seed) cells as worker subprocesses, keeping finished cells.

A benchmark script that measures one cell per process (so each cell's wall time and peak
memory are its own) calls :func:`run_cells` with a worker command; the worker prints one line
``RESULT <json>``. Results accumulate in ``results.json`` under ``"<method> | seed <seed>"``, and
a cell already there is read, not repeated.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence


def load_results(path: str) -> dict:
    """``results.json`` at ``path``, or an empty one."""
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return {"runs": {}}


def run_cells(path: str, methods: Sequence[str], seeds: Sequence[int], worker: Callable[[str, int], list[str]],
              settings: dict, describe: Callable[[dict], str] = lambda r: "") -> dict:
    """Run ``worker(method, seed)`` (a command line) for every cell not yet in ``path``; returns the results."""
    results = load_results(path)
    results.setdefault("runs", {})
    for method in methods:
        for seed in seeds:
            key = f"{method} | seed {seed}"
            if key in results["runs"]:
                continue
            proc = subprocess.run(worker(method, seed), capture_output=True, text=True)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode or not lines:
                sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
                raise SystemExit(f"{key} failed (exit {proc.returncode})")
            results["runs"][key] = json.loads(lines[-1][len("RESULT "):])
            print(f"{key}: {describe(results['runs'][key])}", file=sys.stderr, flush=True)
            results["settings"] = settings
            with open(path, "w") as f:
                json.dump(results, f, indent=1)
    return results


def train_once(cfg: dict, run_dir: str) -> list[dict]:
    """Train the config dict ``cfg`` into ``run_dir`` unless its final policy is there (an
    interrupted run resumes); returns its per-epoch metrics."""
    from genalign.configs import from_dict
    from genalign.train_config import TrainConfig
    from genalign.trainer import train

    if not os.path.isfile(os.path.join(run_dir, "final", "genalign_policy.json")):
        from genalign.runfiles import run_contents

        train(from_dict(TrainConfig, cfg), resume=bool(run_contents(run_dir)))
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def mean_std(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.3f}"
