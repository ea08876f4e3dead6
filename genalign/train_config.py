"""The config of one training run: what ``genalign train CONFIG.yaml`` reads.

Plain dicts map the names used in YAML to classes (policy ``type``, algorithm ``name``,
reward ``type``, prompt ``source``); the whole file validates before any model loads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal

from genalign.algorithms import ALGORITHMS
from genalign.configs import (
    ConfigError,
    apply_overrides,
    from_dict,
    load_config,
    opt,
    tagged,
    to_dict,
)
from genalign.policies import POLICIES
from genalign.prompts import PROMPT_SOURCES
from rewards.registry import REWARDS

POLICY_CONFIGS = {k: v[0] for k, v in POLICIES.items()}
ALGORITHM_CONFIGS = {k: v[0] for k, v in ALGORITHMS.items()}
REWARD_CONFIGS = {k: v[0] for k, v in REWARDS.items()}


@dataclass
class RewardSection:
    components: list[Any] = tagged(REWARD_CONFIGS, "type", default=["jpeg_compressibility"], help="rewards summed with their weights into the trained reward")
    monitor: list[Any] = tagged(REWARD_CONFIGS, "type", default=[], help="held-out rewards only logged (a reward-hacking monitor), never trained")
    alarm_margin: float = opt(0.0, "reward-hacking alarm: fire when the monitor's moving average falls more than this below its "
                                   "best while the trained reward's does not fall (0 disables; needs a monitor)", ge=0)
    alarm_window: int = opt(3, "epochs in the alarm's moving averages", ge=1)
    alarm_action: Literal["warn", "stop"] = opt("warn", "on the alarm, warn and go on, or stop the run; with a monitor and "
                                                       "an alarm, best_monitor/ keeps the policy of the monitor's best epoch")

    def validate(self) -> None:
        if not self.components:
            raise ValueError("'components' is empty: give at least one reward")
        if self.alarm_margin > 0 and not self.monitor:
            raise ValueError("'alarm_margin' > 0 needs a 'monitor' reward to compare the trained reward with")


@dataclass
class TrainLoop:
    epochs: int = opt(10, "epochs; each samples, scores and trains on a fresh batch of rollouts")
    prompts_per_epoch: int = opt(16, "conditions drawn per epoch (split over processes)")
    samples_per_prompt: int = opt(4, "rollouts per condition (a group: shared per-prompt statistics)")
    rollout_batch_size: int = opt(16, "rows per rollout call (a multiple of samples_per_prompt)")
    train_batch_size: int = opt(8, "rows per forward/backward pass")
    gradient_accumulation_steps: int = opt(1, "minibatches per optimizer step (gradients of all trained steps accumulate too)")
    inner_epochs: int = opt(1, "passes of optimisation over each epoch's rollouts")
    learning_rate: float = opt(3e-4, "AdamW learning rate", gt=0)
    adam_beta1: float = opt(0.9, "AdamW β1", ge=0, lt=1)
    adam_beta2: float = opt(0.999, "AdamW β2", ge=0, lt=1)
    adam_eps: float = opt(1e-8, "AdamW ε", gt=0)
    weight_decay: float = opt(1e-4, "AdamW weight decay", ge=0)
    max_grad_norm: float = opt(1.0, "gradient norm clip (0 disables)", ge=0)
    mixed_precision: Literal["no", "fp16", "bf16"] = opt("no", "accelerate mixed precision (GPU); CPU runs use fp32")
    checkpoint_every: int = opt(1, "write a resumable checkpoint every this many epochs (0: only at the end)", ge=0)
    keep_checkpoints: int = opt(2, "how many recent checkpoints to keep", ge=1)
    on_nonfinite_reward: Literal["drop", "error"] = opt("drop", "a NaN/inf reward row is dropped from training (and counted) or stops the run")
    probe_rows: int = opt(
        2, "on-policy probe: each epoch, re-score this many fresh rollout rows with the weights that sampled them; "
        "their log-probs must equal the rollout's (0 disables)", ge=0)
    probe_tolerance: float | None = opt(
        None, "largest |log π_θ − log π_rollout| the probe accepts, in the policy's log-prob unit (default: 1e-3 in "
        "fp32, where one device agrees to ~1e-6; 5e-2 with mixed precision, whose rounding depends on batch shapes)",
        gt=0)
    reward_retries: int = opt(2, "a reward call that raises is retried this many times (then its rows are scored one by one "
                              "and rows still failing count as non-finite)", ge=0)
    reward_retry_wait: float = opt(1.0, "seconds before the first retry of a failed reward call (doubling)", ge=0)
    reward_timeout: float = opt(0.0, "seconds a reward call may take before it counts as failed and is retried (0: no "
                                "limit; for reward servers or models that can hang)", ge=0)
    max_nonfinite_fraction: float = opt(
        0.5, "with on_nonfinite_reward: drop, stop the run when more than this fraction of an epoch's rewards are "
        "NaN/inf or failed (a broken reward model, not a few bad rows)", ge=0, le=1)

    def validate(self) -> None:
        for name in ("epochs", "prompts_per_epoch", "samples_per_prompt", "rollout_batch_size", "train_batch_size", "gradient_accumulation_steps", "inner_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"'{name}' must be >= 1, got {getattr(self, name)}")
        if self.rollout_batch_size % self.samples_per_prompt:
            raise ValueError(
                f"'rollout_batch_size' ({self.rollout_batch_size}) must be a multiple of 'samples_per_prompt' ({self.samples_per_prompt})"
            )


@dataclass
class ReportConfig:
    enabled: bool = opt(True, "write report.html with before/after grids and reward curves")
    num_prompts: int = opt(8, "prompts in the before/after grid (from the prompt source's eval set)", ge=1)
    seeds: list[int] = opt([0, 1, 2, 3], "sampling seeds per grid prompt (one grid column each)", min_items=1)


@dataclass
class EvalConfig:
    enabled: bool = opt(True, "score fixed eval prompts (fixed seeds) before training, every `every` epochs, and after")
    prompts_per_set: int = opt(16, "prompts per eval set (Shapes World: per tier of the eval split)", ge=1)
    samples_per_prompt: int = opt(2, "samples per eval prompt (seeds seed, seed+1, …)", ge=1)
    seed: int = opt(1000, "first sampling seed of the eval samples")
    every: int = opt(0, "also evaluate every this many epochs (0: only before and after)", ge=0)

    def validate(self) -> None:
        from genalign.seeds import DERIVED_MIN

        # training draws derived seeds >= DERIVED_MIN, so plain eval seeds below it never coincide
        if not 0 <= self.seed < DERIVED_MIN // 2:
            raise ConfigError(f"'eval.seed' must be in [0, 2**61), got {self.seed}")


@dataclass
class TrainConfig:
    seed: int = opt(0, "seed for sampling, shuffling and initialisation; fixed seeds give identical CPU runs")
    output_dir: str = opt("runs/default", "run directory: config, metrics, checkpoints, final policy, report")
    policy: Any = tagged(POLICY_CONFIGS, "type", help="the generator to train")
    algorithm: Any = tagged(ALGORITHM_CONFIGS, "name", default="ddpo", help="the loss over trajectories")
    reward: RewardSection = opt(field(default_factory=RewardSection), "what the rollouts are scored with")
    prompts: Any = tagged(PROMPT_SOURCES, "source", help="where conditions come from")
    train: TrainLoop = opt(field(default_factory=TrainLoop), "the optimisation loop")
    report: ReportConfig = opt(field(default_factory=ReportConfig), "the HTML report")
    eval: EvalConfig = opt(field(default_factory=EvalConfig), "fixed-seed evaluation before/after training")
    curriculum: list[dict[str, Any]] = opt(
        [], "ordered training stages, each starting from the last one's weights (genalign.curriculum); a stage has a "
        "name, sections overriding this config's (prompts, reward, algorithm, train, eval, report) and optionally "
        "stop_at_reward / reward_window; empty: one plain run",
    )

    def validate(self) -> None:
        if self.policy is None:
            raise ConfigError("missing required section 'policy' (with a 'type', e.g. stable_diffusion)")
        if self.curriculum:  # every stage validates as a whole config of its own, with keys named curriculum[i]
            from genalign.curriculum import stage_configs

            self._check_capabilities()
            stage_configs(self)
            return
        if self.prompts is None:
            raise ConfigError("missing required section 'prompts' (with a 'source': list, file or shapes_world)")
        self._check_capabilities()
        if getattr(self.algorithm, "antithetic", False) and self.train.samples_per_prompt % 2:
            raise ConfigError(
                f"'algorithm.antithetic' pairs the rollouts of a prompt: 'train.samples_per_prompt' must be even, "
                f"got {self.train.samples_per_prompt}"
            )
        if getattr(self.algorithm, "targets", None) == "world" and not hasattr(self.prompts, "targets"):
            raise ConfigError(
                f"'algorithm.targets' is 'world', but prompt source '{self.prompts.source}' has no ground truth: "
                f"use prompts.source shapes_world or shapes_qa, or 'algorithm.targets: folder' with a 'targets_path'"
            )
        self._check_prompt_grammar()
        window, steps = getattr(self.algorithm, "noise_window", 0), getattr(self.policy, "num_steps", None)
        if window and steps is not None and window > steps:
            raise ConfigError(f"'algorithm.noise_window' ({window}) is wider than the chain ('policy.num_steps' = {steps})")
        frames, num_frames = getattr(self.prompts, "frames", None), getattr(self.policy, "num_frames", None)
        if frames is not None and num_frames is not None and frames != num_frames:
            raise ConfigError(f"'prompts.frames' ({frames}) and 'policy.num_frames' ({num_frames}) must match: "
                              f"the prompts describe clips of {frames} frames")

    def _check_capabilities(self) -> None:
        """The policy class must declare every sampling option the algorithm asks for; the
        algorithm's unit-dependent hyper-parameters take the policy's log-prob unit defaults."""
        from genalign.policies.base import SAMPLING_OPTIONS

        policy_cls = POLICIES[self.policy.type][1]
        for cap in sorted(self.algorithm.requires() - policy_cls.capabilities):
            key = f"'algorithm.{cap}'" if hasattr(self.algorithm, cap) else f"algorithm '{self.algorithm.name}'"
            raise ConfigError(
                f"{key} needs a policy that supports {cap} ({SAMPLING_OPTIONS[cap]}); policy.type "
                f"{self.policy.type!r} supports {sorted(policy_cls.capabilities) or 'no sampling options'}"
            )
        try:
            self.algorithm.resolve_units(policy_cls.log_prob_unit)
        except ValueError as e:
            raise ConfigError(f"algorithm: {e}") from None

    def _check_prompt_grammar(self) -> None:
        """Listed prompts must parse in Shapes World when a reward reads them as Shapes World scenes."""
        readers = [
            (f"reward.{section}.{i}", c.type)
            for section in ("components", "monitor")
            for i, c in enumerate(getattr(self.reward, section))
            if c.type == "shapes_verifier" or (c.type == "vqa" and c.mode == "question_set" and not c.questions_path)
        ]
        if not readers or self.prompts.source == "shapes_world":
            return
        from genalign.toyworld import parse_prompt

        p = self.prompts
        if p.source == "list":
            listed = [(f"prompts.prompts.{i}", t) for i, t in enumerate(p.prompts)]
            listed += [(f"prompts.eval_prompts.{i}", t) for i, t in enumerate(p.eval_prompts)]
        else:
            listed = [(f"prompts.path ({p.path}, prompt {i + 1})", t) for i, t in enumerate(p.load())]
        for key, text in listed:
            try:
                parse_prompt(text)
            except ValueError as e:
                where, kind = readers[0]
                raise ConfigError(
                    f"'{key}' is not a Shapes World prompt, which reward '{kind}' ('{where}') needs: {e}"
                ) from None


def resolve_config(config: TrainConfig | str | os.PathLike, overrides: list[str] | None = None) -> TrainConfig:
    """A validated TrainConfig from a YAML path or a TrainConfig, with ``key.sub=value`` overrides applied."""
    if isinstance(config, TrainConfig):
        if not overrides:
            return config
        return from_dict(TrainConfig, apply_overrides(to_dict(config), overrides, TrainConfig))
    if isinstance(config, (str, os.PathLike)):
        return load_config(TrainConfig, os.fspath(config), overrides)
    raise TypeError(f"config must be a YAML path or a TrainConfig, got {type(config).__name__}")
