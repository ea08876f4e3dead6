"""The GPU check script runs end to end (on the CPU, narrow models): every part writes its JSON
and the summary holds the ratios a GPU run reports."""

import json
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_dry_run(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    monkeypatch.chdir(ROOT)
    import gpu_check

    summary = gpu_check.main(["--dry-run", "--out-dir", str(tmp_path)])
    for name in ("rollout_overhead", "train_epoch", "text_rollout", "summary"):
        assert (tmp_path / f"{name}.json").is_file(), name
    for key in ("rollout_ratio", "epoch_ratio", "text_rollout_ratio"):
        assert math.isfinite(summary[key]) and summary[key] > 0, key
    epoch = json.loads((tmp_path / "train_epoch.json").read_text())
    assert epoch["unet_calls_per_epoch"] == 3 + 2 * 3, "rollout steps + minibatches × trained steps, in each arm"
    assert epoch["loss_check"]["abs_diff"] <= 1e-4 * abs(epoch["loss_check"]["genalign"])
    assert summary["dry_run"] and summary["seconds"]["total"] > 0
    sys.modules.pop("gpu_check", None)
