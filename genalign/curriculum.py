"""Curriculum training: an ordered list of stages, each a normal training run that starts
from the previous stage's weights.

Curr-ReFT (Deng et al., "Boosting the Generalization and Reasoning of Vision Language Models
with Curriculum Reinforcement Learning", 2025) trains in stages of growing difficulty
(yes/no, then multiple choice, then open answers), each with its own questions and reward, then
finishes with rejection-sampling fine-tuning; the same runner orders Shapes World prompt tiers
for the diffusion policies. A train config with a ``curriculum:`` list runs it::

    curriculum:
      - name: yesno
        prompts: {source: shapes_qa, tiers: [4]}
        train: {epochs: 10}               # at most 10 epochs ...
        stop_at_reward: 0.9               # ... or fewer: stop once the reward reaches 0.9
        reward_window: 2                  # (mean of the last 2 epochs' reward_mean)
      - name: open
        prompts: {source: shapes_qa, tiers: [1, 2, 3]}
        train: {epochs: 5, learning_rate: 1.0e-3}

Stage configs. Each stage overrides the top-level config section by section: a section the stage
gives (``prompts``, ``reward``, ``algorithm``, ``train``, ``eval``, ``report``) is merged key
by key into the top-level one, except that a tagged section naming another ``source`` /
``name`` replaces it whole. The policy is the same for every stage (its weights pass from
stage to stage). Stage ``i`` (from 0) runs with seed ``seed + i`` and writes a normal run
directory ``output_dir/<name>/``; the last stage's final policy is copied to
``output_dir/final``. Evaluation seeds (``eval.seed``) stay fixed, so evaluations of different
stages score the same samples' seeds.

Hand-off. A stage starts from the trainable state (LoRA or full weights) of the previous
stage's last checkpoint; its optimizer state starts fresh (a new AdamW at the stage's learning
rate). A policy's reference (``policy.reference()``, for KL terms) stays the pretrained model.

Stopping. A stage runs ``train.epochs`` epochs, or, with ``stop_at_reward``, stops after the
first epoch at which the mean of ``reward_mean`` over the stage's last ``reward_window`` epochs
reaches the threshold (never before ``reward_window`` epochs); ``train.epochs`` is then the
cap. The stopping epoch is always checkpointed.

Resume. ``output_dir/curriculum.json`` (written atomically) records the completed stages.
``--resume`` skips them, resumes the unfinished stage from its latest checkpoint with the
trainer's own exact resume (a stage interrupted before its first checkpoint restarts), and
continues with the next ones; a resumed curriculum reproduces the uninterrupted one on CPU.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

import yaml
from accelerate import PartialState

from genalign.configs import ConfigError, from_dict, opt, to_dict
from genalign.policies.unet_tuning import POLICY_FILE, portable_location, resolve_location

STATE_FILE = "curriculum.json"
#: top-level sections a stage may override (the policy is shared by all stages)
STAGE_SECTIONS = ("prompts", "reward", "algorithm", "train", "eval", "report")
#: tagged sections: a stage naming another tag value replaces the section instead of merging
_TAGS = {"prompts": "source", "algorithm": "name"}


@dataclass
class CurriculumStage:
    """One stage of a curriculum (an entry of the config's ``curriculum`` list)."""

    name: str = opt(help="stage name: its run directory is output_dir/<name>/ (letters, digits, '-', '_')")
    prompts: dict[str, Any] | None = opt(None, "the stage's prompt source (merged into / replacing the top-level 'prompts')")
    reward: dict[str, Any] | None = opt(None, "the stage's reward section (merged into the top-level 'reward')")
    algorithm: dict[str, Any] | None = opt(None, "the stage's algorithm (merged into / replacing the top-level 'algorithm')")
    train: dict[str, Any] | None = opt(None, "train-loop keys of this stage (e.g. epochs, learning_rate)")
    eval: dict[str, Any] | None = opt(None, "eval keys of this stage")
    report: dict[str, Any] | None = opt(None, "report keys of this stage")
    stop_at_reward: float | None = opt(
        None, "stop the stage once the mean reward_mean of its last reward_window epochs reaches this; train.epochs caps it"
    )
    reward_window: int = opt(1, "epochs averaged for stop_at_reward (a moving mean; the stage runs at least this many)")

    def validate(self) -> None:
        if not self.name or not all(c.isalnum() or c in "-_" for c in self.name) or self.name == "final":
            raise ValueError(f"'name' must be a non-empty word of letters, digits, '-' or '_' (not 'final'), got {self.name!r}")
        if self.reward_window < 1:
            raise ValueError(f"'reward_window' must be >= 1, got {self.reward_window}")

    def should_stop(self, history: list[dict[str, Any]]) -> bool:
        """Whether the stage's rewards so far (its per-epoch metrics) meet ``stop_at_reward``."""
        if self.stop_at_reward is None or len(history) < self.reward_window:
            return False
        last = [float(r["reward_mean"]) for r in history[-self.reward_window :]]
        return sum(last) / len(last) >= self.stop_at_reward


def _merge(base: dict[str, Any], stage: CurriculumStage) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for section in STAGE_SECTIONS:
        override = getattr(stage, section)
        if override is None:
            continue
        tag = _TAGS.get(section)
        if merged[section] is None or (tag is not None and tag in override and override[tag] != merged[section].get(tag)):
            merged[section] = copy.deepcopy(override)
        else:
            merged[section] = {**merged[section], **copy.deepcopy(override)}
    return merged


def stage_configs(config: Any) -> list[tuple[CurriculumStage, Any]]:
    """Each stage of ``config.curriculum`` with its full, validated TrainConfig.

    Errors name the stage key, e.g. ``'curriculum[1].prompts.tiers'``.
    """
    from genalign.train_config import TrainConfig

    base = to_dict(config)
    base["curriculum"] = []
    out: list[tuple[CurriculumStage, Any]] = []
    names: set[str] = set()
    for i, raw in enumerate(config.curriculum):
        where = f"curriculum[{i}]"
        stage = from_dict(CurriculumStage, raw, where)
        if stage.name in names:
            raise ConfigError(f"'{where}.name': stage name {stage.name!r} is used twice")
        names.add(stage.name)
        merged = _merge(base, stage)
        if merged["prompts"] is None:
            raise ConfigError(f"'{where}.prompts' is missing: give the stage (or the whole config) a prompt source")
        merged["output_dir"] = os.path.join(config.output_dir, stage.name)
        merged["seed"] = config.seed + i
        try:
            stage_config = from_dict(TrainConfig, merged, where)
        except ConfigError as e:
            message = str(e)
            raise ConfigError(message if where in message else f"{where} ({stage.name}): {message}") from None
        out.append((stage, stage_config))
    return out


def _read_state(out: str) -> dict[str, Any]:
    path = os.path.join(out, STATE_FILE)
    if not os.path.isfile(path):
        return {"completed": []}
    with open(path) as f:
        return json.load(f)


def _write_state(out: str, state: dict[str, Any]) -> None:
    from genalign.runfiles import write_text

    write_text(os.path.join(out, STATE_FILE), json.dumps(state, indent=2))


def _last_trainable(run_dir: str) -> dict[str, Any]:
    """The trainable state of a finished stage: its latest checkpoint's weights."""
    from safetensors.torch import load_file

    from genalign import checkpoint

    path = checkpoint.latest_checkpoint(os.path.join(run_dir, "checkpoints"))
    if path is None:
        raise FileNotFoundError(f"{run_dir} has no checkpoint to hand its weights to the next stage")
    return load_file(os.path.join(path, "trainable.safetensors"))


def _copy_final(src: str, out: str) -> None:
    """Copy the last stage's ``final/`` to ``out/final`` (atomically), with the model locations its
    policy file records relative to the stage's folder rewritten relative to the new one."""
    tmp = tempfile.mkdtemp(prefix=".tmp-final-", dir=out)
    os.rmdir(tmp)
    shutil.copytree(src, tmp)
    final = os.path.join(out, "final")
    meta_path = os.path.join(tmp, POLICY_FILE)
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        for key, value in meta.items():
            if isinstance(value, str) and value.startswith((os.curdir + os.sep, os.pardir + os.sep)):
                meta[key] = portable_location(resolve_location(value, src), final)
        with open(meta_path, "w") as f:
            json.dump(meta, f, indent=2)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)


def run_curriculum(config: Any, resume: bool = False, overwrite: bool = False) -> list[dict[str, Any]]:
    """Run every stage of ``config.curriculum`` in order (see the module docstring).

    Returns the per-epoch metrics of all stages, each row with its ``stage`` name.
    ``overwrite``: remove a curriculum run already in ``output_dir`` (its stages, state and final/) first.
    """
    from genalign import checkpoint
    from genalign.trainer import Trainer

    stages = stage_configs(config)
    out = config.output_dir
    names = [s.name for s, _ in stages]
    if overwrite and PartialState().is_main_process and os.path.isdir(out):
        for name in (*names, "final"):
            shutil.rmtree(os.path.join(out, name), ignore_errors=True)
        for name in (STATE_FILE, "config.yaml"):
            if os.path.isfile(os.path.join(out, name)):
                os.remove(os.path.join(out, name))
    PartialState().wait_for_everyone()
    resume = resume and not overwrite
    state = _read_state(out)
    if resume:
        done = [c["name"] for c in state["completed"]]
        if done != names[: len(done)]:
            raise ConfigError(f"{out}: its completed stages {done} are not the first stages of this curriculum {names}")
    elif os.path.isfile(os.path.join(out, STATE_FILE)) or any(
        checkpoint.latest_checkpoint(os.path.join(out, n, "checkpoints")) for n in names
    ):
        raise FileExistsError(f"{out} already holds a curriculum run: continue it with --resume, or set output_dir elsewhere")
    main = PartialState().is_main_process
    if main:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "config.yaml"), "w") as f:
            yaml.safe_dump(to_dict(config), f, sort_keys=False)
    state["stages"] = names

    history: list[dict[str, Any]] = []
    previous: str | None = None
    for index, (stage, stage_config) in enumerate(stages):
        run_dir = stage_config.output_dir
        record = next((c for c in state["completed"] if c["name"] == stage.name), None)
        if record is None:
            has_checkpoint = checkpoint.latest_checkpoint(os.path.join(run_dir, "checkpoints")) is not None
            if main and not has_checkpoint and os.path.isdir(run_dir):
                shutil.rmtree(run_dir)  # interrupted before its first checkpoint: the stage restarts
            trainer = Trainer(stage_config)
            if previous is not None:
                trainer.policy.load_trainable_state_dict(_last_trainable(previous))
            trainer._warn(f"curriculum stage {index + 1}/{len(stages)}: {stage.name}")
            stage_history = trainer.train(resume=has_checkpoint, stop=stage.should_stop)
            stopped = "reward" if stage.should_stop(stage_history) else "epochs"
            record = {
                "name": stage.name,
                "epochs": len(stage_history),
                "stopped_by": stopped,
                "reward_first": stage_history[0]["reward_mean"] if stage_history else None,
                "reward_last": stage_history[-1]["reward_mean"] if stage_history else None,
            }
            state["completed"].append(record)
            if main:
                _write_state(out, state)
            trainer.acc.wait_for_everyone()
            del trainer
        else:
            with open(os.path.join(run_dir, "metrics.jsonl")) as f:
                stage_history = [json.loads(line) for line in f if line.strip()]
        history.extend({**row, "stage": stage.name} for row in stage_history)
        previous = run_dir
    if main and previous is not None:
        _copy_final(os.path.join(previous, "final"), out)
    return history
