"""`genalign sample` writes its outputs; CLI errors are one clear line with exit code 2."""

import json

import pytest

from genalign.cli import main


def test_sample_writes_images_rewards_and_grid(tiny_sd_dir, tmp_path, capsys):
    out = tmp_path / "s"
    code = main(["sample", tiny_sd_dir, "--prompt", "a red circle", "--prompt", "a blue square", "--n", "2",
                 "--steps", "2", "--reward", "jpeg_compressibility", "--out", str(out)])
    assert code == 0
    rows = [json.loads(line) for line in (out / "rewards.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["seed"]) for r in rows] == [("a red circle", 0), ("a red circle", 1), ("a blue square", 0), ("a blue square", 1)]
    assert all(r["reward"] < 0 and "jpeg_kb" in r["components"] for r in rows)
    assert all((out / r["image"]).is_file() for r in rows)
    assert (out / "grid.png").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"] == 4
    assert abs(summary["reward_mean"] - sum(r["reward"] for r in rows) / 4) < 1e-6


def test_sample_errors(tiny_sd_dir, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# only a comment\n")
    assert main(["sample", tiny_sd_dir, "--prompts", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert "has no prompts" in capsys.readouterr().err
    assert main(["sample", tiny_sd_dir, "--out", str(tmp_path / "o")]) == 2
    assert "no prompts" in capsys.readouterr().err
    assert main(["sample", tiny_sd_dir, "--prompt", "x", "--reward", "beauty", "--out", str(tmp_path / "o")]) == 2
    assert "unknown reward 'beauty'" in capsys.readouterr().err
    assert main(["sample", "./no/such/model", "--prompt", "x", "--reward", "none"]) == 2
    assert "no model directory" in capsys.readouterr().err


@pytest.mark.parametrize("model, options", [("tiny_sd_dir", {}), ("tiny_sd3_dir", {"max_sequence_length": 4})])
def test_sample_config_with_guidance(model, options, request, tmp_path, capsys):
    """A YAML sample config runs SVDD-PM and reports its compute; a bad method names the key.
    SVDD needs only a policy's ``step`` and ``predict_final``: on the flow policy (an SD3
    pipeline) it runs with the same compute as on tiny-sd."""
    import json

    import yaml

    cfg = {"policy": request.getfixturevalue(model), "prompts": ["a red circle"], "n": 2, "steps": 3,
           "reward": "jpeg_compressibility", "method": "svdd_pm", "candidates": 2, "out": str(tmp_path / "svdd"),
           **({"policy_options": options} if options else {})}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["sample", str(path)]) == 0
    summary = json.loads((tmp_path / "svdd" / "summary.json").read_text())
    assert summary["method"] == "svdd_pm" and summary["samples"] == 2
    assert summary["model_evals"] == 2 * 2 * 3 + 2 * 2 * 2 and summary["reward_calls"] == 2 * 2 * 3
    rows = [json.loads(line) for line in (tmp_path / "svdd" / "rewards.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all("reward" in r for r in rows)
    capsys.readouterr()
    assert main(["sample", str(path), "method=beam_search"]) == 2
    assert "method" in capsys.readouterr().err
    assert main(["sample", str(path), "reward=none"]) == 2
    assert "needs a reward" in capsys.readouterr().err


def test_sample_writes_clips_as_gifs_and_strips_and_eval_refuses_video(tiny_video_dir, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "v"
    code = main(["sample", tiny_video_dir, "--prompt", "a red circle moving right", "--n", "2", "--steps", "2",
                 "--reward", "motion", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in (out / "rewards.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["reward"] in (0.0, 1.0) for r in rows)
    for r in rows:
        strip = Image.open(out / r["image"])
        assert strip.width > 4 * strip.height  # 8 frames side by side
        assert Image.open(out / r["image"].replace(".png", ".gif")).n_frames == 8
    assert main(["eval", tiny_video_dir]) == 2
    assert "is a video policy" in capsys.readouterr().err
