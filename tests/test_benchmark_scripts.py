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
    exactly one direction in five counts as picked."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    monkeypatch.chdir(ROOT)
    import video_direction_probe as probe

    assert probe.main(["--clips", "1", "--timesteps", "600", "--out", str(tmp_path / "real")]) == 0
    real = json.loads((tmp_path / "real" / "results.json").read_text())["timesteps"]["600"]
    assert len(real["mse"]) == 5 and all(len(row) == 5 and min(row) > 0 for row in real["mse"])
    assert 0 <= real["true_phrase_best"] <= 1 and real["error_true_over_wrong"] > 0
    monkeypatch.setattr(probe, "phrase", lambda color, shape, direction: f"a {color} {shape}")
    assert probe.main(["--clips", "1", "--timesteps", "600", "--out", str(tmp_path / "blind")]) == 0
    blind = json.loads((tmp_path / "blind" / "results.json").read_text())["timesteps"]["600"]
    assert blind["error_true_over_wrong"] == 1.0 and blind["true_phrase_best"] == 0.2
    sys.modules.pop("video_direction_probe", None)


def test_video_motion_modules_builds_trains_probes_and_saves(tmp_path, monkeypatch):
    """Two training steps of the AnimateDiff-style model: the probe's table is written, training
    changed the motion modules (they start as the identity), and the saved folder is an
    AnimateDiffPipeline the video policy samples clips from."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    monkeypatch.chdir(ROOT)
    import video_motion_modules as script

    from genalign.policies import VideoDiffusionPolicy, VideoDiffusionPolicyConfig

    save = tmp_path / "model"
    assert script.main(["--steps", "2", "--clips", "1", "--out", str(tmp_path / "out"), "--save", str(save)]) == 0
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    assert result["train"]["steps"] == 2 and set(result["probe"]) == {"300", "600", "900"}
    assert json.loads((save / "model_index.json").read_text())["_class_name"] == "AnimateDiffPipeline"
    from safetensors.torch import load_file

    weights = load_file(str(next((save / "unet").glob("*.safetensors"))))
    outs = [v for k, v in weights.items() if "motion_modules" in k and "proj_out.weight" in k]
    assert outs and any(float(v.abs().max()) > 0 for v in outs)  # trained away from zero
    policy = VideoDiffusionPolicy.from_pretrained(str(save), VideoDiffusionPolicyConfig(num_steps=2, num_frames=8))
    assert policy.rollout(["a red circle moving right"], 1, [0]).outputs.shape == (1, 8, 3, 32, 32)
    for name in ("video_motion_modules", "video_direction_probe"):
        sys.modules.pop(name, None)
