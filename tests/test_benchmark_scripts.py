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


def test_video_direction_probe_bookkeeping(tmp_path, monkeypatch):
    """The probe on the shipped tiny-video model, one clip per direction: a table per timestep,
    and with the direction dropped from every prompt (the text is the same under every phrase)
    the true phrase's error equals the wrong ones' (ratio 1) and ties go to the first phrase, so
    exactly one direction in five counts as picked, and the text encoder's states of the four
    moving phrases are the same vectors (cosine 1). The sampled confusion matrix holds one clip
    per held-out prompt, its diagonal the accuracy."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    monkeypatch.chdir(ROOT)
    import video_direction_probe as probe

    assert probe.main(["--clips", "1", "--timesteps", "600", "--samples", "0", "--out", str(tmp_path / "real")]) == 0
    result = json.loads((tmp_path / "real" / "results.json").read_text())
    real, text = result["timesteps"]["600"], result["text"]
    assert result["samples"] is None
    assert all(-1 <= text[k][w] < 1 for k in ("direction", "colour") for w in ("word", "end"))
    assert len(real["mse"]) == 5 and all(len(row) == 5 and min(row) > 0 for row in real["mse"])
    assert 0 <= real["true_phrase_best"] <= 1 and real["error_true_over_wrong"] > 0
    monkeypatch.setattr(probe, "phrase", lambda color, shape, direction: f"a {color} {shape}")
    assert probe.main(["--clips", "1", "--timesteps", "600", "--samples", "0", "--out", str(tmp_path / "blind")]) == 0
    blind_result = json.loads((tmp_path / "blind" / "results.json").read_text())
    blind = blind_result["timesteps"]["600"]
    assert blind["error_true_over_wrong"] == 1.0 and blind["true_phrase_best"] == 0.2
    assert blind_result["text"]["direction"] == {"word": 1.0, "end": 1.0}
    assert blind_result["text"]["colour"]["end"] < 1.0  # the colours still differ
    monkeypatch.undo()
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    monkeypatch.chdir(ROOT)
    samples = probe.sampled_directions("assets/models/tiny-video", 1, 0)
    confusion = samples["confusion"]
    assert sum(sum(row.values()) for row in confusion.values()) == 20  # the 20 held-out one-object prompts
    assert samples["accuracy"] == sum(confusion[d][d] for d in confusion) / 20
    sys.modules.pop("video_direction_probe", None)
