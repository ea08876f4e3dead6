"""The curriculum runner: stage order, weight hand-off, threshold stopping, exact resume, key errors."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from safetensors.torch import load_file

from genalign import checkpoint
from genalign.configs import ConfigError, load_config
from genalign.curriculum import CurriculumStage
from genalign.policies.text_lm import TextLMPolicy
from genalign.policies.unet_tuning import POLICY_FILE, resolve_location
from genalign.train_config import TrainConfig
from genalign.trainer import Trainer, train

CONDITIONS = [{"prompt": "w01 w02", "answer": "w03", "key": "q1"}, {"prompt": "w04 w05", "answer": "w06", "key": "q2"},
              {"prompt": "w07", "answer": "w08", "key": "q3"}, {"prompt": "w09 w10", "answer": "w11", "key": "q4"}]
#: random tiny-LM responses begin with a w0* word now and then: a reward with a signal at once
REWARD = {"components": [{"type": "rule", "rule": "format", "format_pattern": "w0.*"}]}


def write_config(lm_dir, tmp_path, stages, out="run", **top):
    data = {
        "policy": {"type": "text_lm", "pretrained": lm_dir, "max_new_tokens": 3},
        "algorithm": {"name": "grpo"},
        "reward": REWARD,
        "train": {"epochs": 2, "prompts_per_epoch": 2, "samples_per_prompt": 4, "rollout_batch_size": 8,
                  "train_batch_size": 8, "learning_rate": 1e-2, "weight_decay": 0.0},
        "report": {"enabled": False},
        "eval": {"enabled": False},
        "output_dir": str(tmp_path / out),
        "curriculum": stages,
        **top,
    }
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


TWO_STAGES = [
    {"name": "easy", "prompts": {"source": "list", "prompts": CONDITIONS[:2]}},
    {"name": "hard", "prompts": {"source": "list", "prompts": CONDITIONS[2:]}, "train": {"learning_rate": 5e-3}},
]


def latest_weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(f"{checkpoint.latest_checkpoint(str(run_dir / 'checkpoints'))}/trainable.safetensors")


def test_stages_run_in_order_and_hand_over_their_weights(tiny_lm_dir, tmp_path, monkeypatch):
    starts, ends = [], []
    original = Trainer.train

    def spy(self, *args, **kwargs):
        starts.append((self.config.output_dir, {k: v.clone() for k, v in self.policy.trainable_state_dict().items()}))
        history = original(self, *args, **kwargs)
        ends.append({k: v.clone() for k, v in self.policy.trainable_state_dict().items()})
        return history

    monkeypatch.setattr(Trainer, "train", spy)
    history = train(write_config(tiny_lm_dir, tmp_path, TWO_STAGES))
    out = tmp_path / "run"
    assert [d for d, _ in starts] == [str(out / "easy"), str(out / "hard")]
    assert [(r["stage"], r["epoch"]) for r in history] == [("easy", 1), ("easy", 2), ("hard", 1), ("hard", 2)]
    state = json.loads((out / "curriculum.json").read_text())
    assert state["stages"] == ["easy", "hard"] and [c["name"] for c in state["completed"]] == ["easy", "hard"]
    assert [c["stopped_by"] for c in state["completed"]] == ["epochs", "epochs"]
    # stage 2 starts from exactly stage 1's final weights, which moved away from the initial ones
    easy_final = latest_weights(out / "easy")
    first, second = starts[0][1], starts[1][1]
    assert second.keys() == easy_final.keys() == ends[0].keys()
    for k in second:
        assert torch.equal(second[k], easy_final[k]) and torch.equal(second[k], ends[0][k]), k
    assert any(not torch.equal(first[k], second[k]) for k in first)
    # the final policy is the last stage's; each stage is a normal run directory with its own seed and overrides
    assert sorted(p.name for p in (out / "final").iterdir()) == sorted(p.name for p in (out / "hard" / "final").iterdir())
    for f in (out / "hard" / "final").iterdir():
        if f.name != POLICY_FILE:
            assert (out / "final" / f.name).read_bytes() == f.read_bytes()
    # the policy file's base model is recorded relative to each folder: both resolve to the same model
    stage_base = json.loads((out / "hard" / "final" / POLICY_FILE).read_text())["base"]
    final_base = json.loads((out / "final" / POLICY_FILE).read_text())["base"]
    assert os.path.samefile(resolve_location(stage_base, str(out / "hard" / "final")), tiny_lm_dir)
    assert os.path.samefile(resolve_location(final_base, str(out / "final")), tiny_lm_dir)
    loaded = TextLMPolicy.from_pretrained(str(out / "final"))
    for k, v in loaded.trainable_state_dict().items():
        assert torch.equal(v, ends[-1][k]), k
    hard = yaml.safe_load((out / "hard" / "config.yaml").read_text())
    assert (hard["seed"], hard["train"]["learning_rate"], hard["prompts"]["prompts"]) == (1, 5e-3, CONDITIONS[2:])
    assert yaml.safe_load((out / "easy" / "config.yaml").read_text())["train"]["learning_rate"] == 1e-2
    for stage in ("easy", "hard"):
        assert [json.loads(x)["epoch"] for x in (out / stage / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    # a finished curriculum is never overwritten without --resume
    with pytest.raises(FileExistsError, match="--resume"):
        train(write_config(tiny_lm_dir, tmp_path, TWO_STAGES))


def test_reward_threshold_stops_a_stage_with_a_moving_mean(tiny_lm_dir, tmp_path, monkeypatch):
    stage = CurriculumStage(name="s", stop_at_reward=0.75, reward_window=2)
    rows = [{"reward_mean": r} for r in (0.25, 1.0, 0.5, 0.0)]
    # moving means of the last 2 epochs (binary fractions, exact): -, 0.625, 0.75, 0.25
    assert [stage.should_stop(rows[:n]) for n in range(5)] == [False, False, False, True, False]
    assert not CurriculumStage(name="s").should_stop(rows)  # no threshold: epochs only

    stages = [  # any reward reaches -1: the first stage stops after its 2-epoch window, not its 5-epoch cap
        {"name": "quick", "prompts": {"source": "list", "prompts": CONDITIONS[:2]}, "train": {"epochs": 5},
         "stop_at_reward": -1.0, "reward_window": 2},
        {"name": "capped", "prompts": {"source": "list", "prompts": CONDITIONS[2:]}, "train": {"epochs": 1},
         "stop_at_reward": 5.0},
    ]
    history = train(write_config(tiny_lm_dir, tmp_path, stages))
    assert [(r["stage"], r["epoch"]) for r in history] == [("quick", 1), ("quick", 2), ("capped", 1)]
    state = json.loads((tmp_path / "run" / "curriculum.json").read_text())
    assert [(c["epochs"], c["stopped_by"]) for c in state["completed"]] == [(2, "reward"), (1, "epochs")]
    assert checkpoint.latest_checkpoint(str(tmp_path / "run" / "quick" / "checkpoints")).endswith("epoch_00002")

    # killed after the early-stopped stage finished but before it was recorded: --resume does not
    # train it past its stopping epoch (nor the finished last stage)
    state_file = tmp_path / "run" / "curriculum.json"
    state_file.write_text(json.dumps({**state, "completed": []}))
    started = []
    original = Trainer._epoch
    monkeypatch.setattr(Trainer, "_epoch", lambda self, epoch: started.append(epoch) or original(self, epoch))
    again = train(write_config(tiny_lm_dir, tmp_path, stages), resume=True)
    assert started == [] and [(r["stage"], r["epoch"]) for r in again] == [(r["stage"], r["epoch"]) for r in history]
    assert json.loads(state_file.read_text())["completed"] == state["completed"]


class Killed(RuntimeError):
    pass


def test_resume_continues_the_unfinished_stage_and_matches_an_uninterrupted_run(tiny_lm_dir, tmp_path, monkeypatch):
    full = train(write_config(tiny_lm_dir, tmp_path, TWO_STAGES, out="a"))

    calls = []
    original = Trainer._epoch

    def dies_in_stage_two(self, epoch):
        calls.append(epoch)
        if len(calls) == 4:  # stage 1: 2 epochs; stage 2: epoch 1 checkpointed, killed in epoch 2
            raise Killed("killed")
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "_epoch", dies_in_stage_two)
    path = write_config(tiny_lm_dir, tmp_path, TWO_STAGES, out="b")
    with pytest.raises(Killed):
        train(path)
    monkeypatch.setattr(Trainer, "_epoch", original)
    out = tmp_path / "b"
    assert [c["name"] for c in json.loads((out / "curriculum.json").read_text())["completed"]] == ["easy"]
    assert not (out / "final").exists()
    with pytest.raises(FileExistsError, match="--resume"):
        train(path)

    started = []
    monkeypatch.setattr(Trainer, "_epoch", lambda self, epoch: started.append(epoch) or original(self, epoch))
    resumed = train(path, resume=True)
    assert started == [1]  # only stage 2's second epoch is trained again
    assert [(r["stage"], r["epoch"]) for r in resumed] == [(r["stage"], r["epoch"]) for r in full]
    for a, b in zip(full, resumed):
        for key in ("reward_mean", "loss", "samples"):
            assert a[key] == b[key], (a["stage"], a["epoch"], key)
    for stage in ("easy", "hard"):
        wa, wb = latest_weights(tmp_path / "a" / stage), latest_weights(out / stage)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), stage
    # resuming a finished curriculum trains nothing
    started.clear()
    assert len(train(path, resume=True)) == 4 and started == []


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        ({"name": "x", "prompts": {"source": "shapes_qa", "tierz": [1]}}, "unknown key 'curriculum[1].prompts.tierz'"),
        ({"name": "x", "prompts": {"source": "shapes_qa", "tiers": [7]}}, "'curriculum[1].prompts'"),
        ({"name": "x", "promts": {}}, "unknown key 'curriculum[1].promts' (did you mean 'prompts'?)"),
        ({"name": "x", "train": {"epocs": 2}}, "unknown key 'curriculum[1].train.epocs'"),
        ({"name": "x", "algorithm": {"name": "nope"}}, "'curriculum[1].algorithm.name': unknown name 'nope'"),
        ({"name": "easy"}, "'curriculum[1].name': stage name 'easy' is used twice"),
        ({"prompts": {"source": "shapes_qa"}}, "missing required key 'curriculum[1].name'"),
        ({"name": "x", "policy": {"type": "text_lm"}}, "unknown key 'curriculum[1].policy'"),
    ],
)
def test_a_bad_stage_key_is_named_before_any_model_loads(tiny_lm_dir, tmp_path, stage, message):
    path = write_config(tiny_lm_dir, tmp_path, [TWO_STAGES[0], stage], prompts={"source": "list", "prompts": CONDITIONS})
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, path)
    assert message in str(err.value)


def test_a_stage_without_prompts_is_refused(tiny_lm_dir, tmp_path):
    path = write_config(tiny_lm_dir, tmp_path, [{"name": "x"}])
    with pytest.raises(ConfigError, match=r"'curriculum\[0\].prompts' is missing"):
        load_config(TrainConfig, path)


def test_a_tagged_section_is_merged_or_replaced(tiny_lm_dir, tmp_path):
    from genalign.curriculum import stage_configs

    stages = [{"name": "a", "prompts": {"tiers": [5]}, "algorithm": {"beta": 0.1}},
              {"name": "b", "prompts": {"source": "list", "prompts": ["w01"]}, "algorithm": {"name": "rejection_sft", "min_reward": 2.0}}]
    config = load_config(TrainConfig, write_config(tiny_lm_dir, tmp_path, stages,
                                                   prompts={"source": "shapes_qa", "split": "heldout"}))
    (_, a), (_, b) = stage_configs(config)
    assert (a.prompts.source, a.prompts.tiers, a.prompts.split, a.algorithm.name, a.algorithm.beta) == ("shapes_qa", [5], "heldout", "grpo", 0.1)
    assert (b.prompts.source, b.prompts.prompts, b.algorithm.name, b.algorithm.min_reward) == ("list", ["w01"], "rejection_sft", 2.0)
    assert (a.output_dir, b.output_dir) == (str(tmp_path / "run" / "a"), str(tmp_path / "run" / "b"))


def test_the_shipped_curriculum_configs_validate():
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    from genalign.curriculum import stage_configs

    text = load_config(TrainConfig, os.path.join(root, "configs/text_curr_reft.yaml"))
    assert [(s.name, c.prompts.tiers, c.algorithm.name) for s, c in stage_configs(text)] == [
        ("lookup", [1, 2], "grpo"), ("count_relation", [3, 4], "grpo"), ("count_hard", [5], "grpo"),
        ("rejection_sampling", [1, 2, 3, 4, 5], "rejection_sft"),
    ]
    shapes = load_config(TrainConfig, os.path.join(root, "configs/curriculum_shapes_tiers.yaml"))
    assert [(s.name, c.prompts.tiers, c.policy.type) for s, c in stage_configs(shapes)] == [
        ("tier1", [1], "stable_diffusion"), ("tier2", [2], "stable_diffusion"), ("tier3", [3], "stable_diffusion"),
    ]


def test_the_command_line_reports_each_stage(tiny_lm_dir, tmp_path, capsys):
    from genalign.cli import main

    assert main(["train", write_config(tiny_lm_dir, tmp_path, TWO_STAGES)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("stage ")] == ["stage easy", "stage hard"]
    assert any(f"final policy {tmp_path / 'run'}/final" in line for line in lines)
