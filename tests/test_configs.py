"""Every YAML under configs/ validates; wrong keys and values fail with the key's name."""

import glob
import os

import pytest
import yaml

from genalign.cli import main
from genalign.configs import ConfigError, apply_overrides, load_config
from genalign.train_config import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True)
                 if os.sep + "accelerate" + os.sep not in p)  # accelerate launch configs: their own test
#: assets a project command builds and that the repository may not hold yet -> that command
BUILT_BY_COMMAND = {"assets/models/tiny-lcm": "genalign toyworld distill lcm --out assets/models/tiny-lcm"}


def test_there_are_configs():
    assert len(CONFIGS) >= 2


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.relpath(p, ROOT) for p in CONFIGS])
def test_config_validates(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # configs use repo-relative asset paths
    missing = False
    if os.path.relpath(path, ROOT).startswith(os.path.join("configs", "sample")):
        from genalign.evaluation import SampleConfig

        cfg = load_config(SampleConfig, path)  # configs/sample/: `genalign sample` configs
        assert cfg.policy and (cfg.prompts or cfg.prompt_source is not None)
    elif os.path.relpath(path, ROOT).startswith(os.path.join("configs", "value")):
        from genalign.guidance.train_value import ValueTrainConfig

        cfg = load_config(ValueTrainConfig, path)  # configs/value/: `genalign value` configs
        assert cfg.policy and cfg.tiers
    else:
        with open(path) as f:
            pretrained = ((yaml.safe_load(f) or {}).get("policy") or {}).get("pretrained")
        missing = pretrained in BUILT_BY_COMMAND and not os.path.isdir(pretrained)
        # Every other key still validates when the asset is not built: a hub-id stand-in passes the location check.
        cfg = load_config(TrainConfig, path, ["policy.pretrained=org/not-built-yet"] if missing else [])
        assert cfg.policy is not None and cfg.reward.components
    with open(path) as f:
        assert f.readline().startswith("#"), "each YAML starts with a header saying what it runs and how"
    if missing:
        pytest.skip(f"{pretrained} is not built yet (make it with `{BUILT_BY_COMMAND[pretrained]}`); other keys validated")


def _write(tmp_path, data):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    return str(p)


BASE = {"policy": {"type": "stable_diffusion", "pretrained": "org/model"}, "prompts": {"source": "list", "prompts": ["a"]}}


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"train": {"lerning_rate": 1e-3}}, r"unknown key 'train\.lerning_rate' \(did you mean 'learning_rate'\?\)"),
        ({"train": {"epochs": "ten"}}, r"'train\.epochs' must be an integer"),
        ({"train": {"mixed_precision": "fp8"}}, r"'train\.mixed_precision' must be one of"),
        ({"algorithm": {"name": "ppo2"}}, r"'algorithm\.name': unknown name 'ppo2'"),
        ({"algorithm": {"name": "ddpo", "clip": 0.1}}, r"unknown key 'algorithm\.clip'; valid keys: .*clip_range"),
        ({"policy": {"type": "stable_diffusion", "pretrained": "./missing/dir"}}, r"'policy'.*no model directory"),
        ({"policy": {"type": "stable_diffusion", "pretrained": "org/model", "eta": 0.0}}, r"'eta' must be in \(0, 1\]"),
        ({"reward": {"components": [{"type": "jpeg_compressibility", "qualty": 90}]}}, r"reward\.components\.0\.qualty"),
        ({"train": {"rollout_batch_size": 6, "samples_per_prompt": 4}}, r"multiple of 'samples_per_prompt'"),
        ({"prompts": {"source": "list", "prompts": []}}, r"'prompts'.*empty"),
        ({"algorithm": {"name": "ddpo", "noise_window": 2, "timestep_fraction": 0.5}}, r"'noise_window' trains exactly"),
        ({"policy": {"type": "consistency", "pretrained": "org/model"}, "algorithm": {"name": "ddpo", "noise_window": 2}},
         r"'algorithm\.noise_window' needs a policy"),
        ({"policy": {"type": "text_lm", "pretrained": "org/model"}, "algorithm": {"name": "ddpo", "noise_window": 2}},
         r"'algorithm\.noise_window' needs a policy that supports noise_window .* policy\.type 'text_lm' supports \['shared_noise'\]"),
        ({"policy": {"type": "text_lm", "pretrained": "org/model"}, "algorithm": {"name": "seppo"}},
         r"'algorithm\.targets' is 'world', but prompt source 'list' has no ground truth"),
        ({"policy": {"type": "text_lm", "pretrained": "org/model", "temperature": 0.0}}, r"temperature"),
        ({"policy": {"type": "flow_matching", "pretrained": "org/model", "noise_level": 0.0}}, r"'noise_level' must be > 0"),
        ({"policy": {"type": "flow_matching", "pretrained": "org/model", "sde": "cps", "noise_level": 1.5}},
         r"'noise_level' must be \(0, 1\] for sde 'cps'"),
        ({"policy": {"type": "flow_matching", "pretrained": "org/model", "sde": "euler"}}, r"'policy\.sde' must be one of"),
        ({"policy": {"type": "flow_matching", "pretrained": "org/model", "eta": 1.0}}, r"unknown key 'policy\.eta'"),
        ({"algorithm": {"name": "ddpo", "antithetic": True}}, r"'antithetic' mirrors .* set 'shared_noise: true'"),
        ({"algorithm": {"name": "ddpo", "antithetic": True, "shared_noise": True}, "train": {"samples_per_prompt": 3, "rollout_batch_size": 9}},
         r"'train\.samples_per_prompt' must be even"),
    ],
)
def test_bad_config_names_the_key(tmp_path, patch, message):
    data = {**BASE, **patch}
    with pytest.raises(ConfigError, match=message):
        load_config(TrainConfig, _write(tmp_path, data))


def test_unit_dependent_defaults_follow_the_policy(tmp_path):
    """Clip ranges left unset take the policy's log-prob unit default; set ones are kept."""
    text = {**BASE, "policy": {"type": "text_lm", "pretrained": "org/model"}}
    assert load_config(TrainConfig, _write(tmp_path, BASE)).algorithm.clip_range == 1e-4
    assert load_config(TrainConfig, _write(tmp_path, text)).algorithm.clip_range == 0.2
    assert load_config(TrainConfig, _write(tmp_path, text), ["algorithm.clip_range=0.1"]).algorithm.clip_range == 0.1
    grpo = load_config(TrainConfig, _write(tmp_path, {**text, "algorithm": {"name": "grpo", "clip_range_high": 0.28}}))
    assert (grpo.algorithm.clip_range_low, grpo.algorithm.clip_range_high) == (0.2, 0.28)
    d3po = load_config(TrainConfig, _write(tmp_path, {**BASE, "algorithm": {"name": "d3po"}}))
    assert d3po.algorithm.clip_eps == 0.1
    assert load_config(TrainConfig, _write(tmp_path, {**text, "algorithm": {"name": "d3po"}})).algorithm.clip_eps == 0.0


def test_overrides_and_defaults(tmp_path):
    cfg = load_config(TrainConfig, _write(tmp_path, BASE), ["train.epochs=3", "algorithm.clip_range=1e-3", "prompts.prompts=[x, y]"])
    assert cfg.train.epochs == 3 and cfg.algorithm.clip_range == 1e-3 and cfg.prompts.prompts == ["x", "y"]
    assert cfg.algorithm.name == "ddpo"
    data = apply_overrides({"a": [{"b": 1}]}, ["a.0.b=2"])
    assert data == {"a": [{"b": 2}]}
    with pytest.raises(ConfigError, match=r"override 'train\.epochs'.*not valid YAML"):
        apply_overrides({}, ["train.epochs=[1,"])
    with pytest.raises(ConfigError, match="not an index"):
        apply_overrides({"a": [{"b": 1}]}, ["a.3.b=2"])


def test_cli_reports_config_error_before_loading(tmp_path, capsys):
    path = _write(tmp_path, {**BASE, "trian": {}})
    assert main(["train", path]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'trian'" in err and "did you mean 'train'" in err
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_accelerate_launch_configs_load():
    """The launch configs in configs/accelerate/ parse as accelerate's own config files."""
    import pathlib

    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    folder = pathlib.Path(__file__).resolve().parents[1] / "configs" / "accelerate"
    kinds = {p.stem: load_config_from_file(str(p)) for p in sorted(folder.glob("*.yaml"))}
    assert kinds["ddp"].distributed_type == DistributedType.MULTI_GPU
    assert kinds["fsdp"].distributed_type == DistributedType.FSDP and kinds["fsdp"].fsdp_config
    assert kinds["multi_node"].num_machines == 2 and kinds["multi_node"].main_process_ip
    assert kinds["cpu_2proc"].num_processes == 2 and kinds["cpu_2proc"].num_machines == 1
    for stage in (2, 3):
        zero = kinds[f"zero{stage}"]
        assert zero.distributed_type == DistributedType.DEEPSPEED
        assert zero.deepspeed_config["zero_stage"] == stage and zero.deepspeed_config["gradient_accumulation_steps"] == 1
