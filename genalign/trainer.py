"""One trainer for every Algorithm × Policy × RewardModel: rollout → score → loss → step.

Runs on accelerate: one process on CPU, or ``accelerate launch`` for DDP or FSDP
with no code change. Conditions are split across processes by prompt, so a prompt's
group of rollouts stays on one process; rewards are gathered so per-prompt statistics
are global and identical everywhere.

Reproducibility: every random draw comes from its own named stream (genalign.seeds): each
rollout row from (seed, ROLLOUT, epoch, row), each shuffle from (seed, SHUFFLE, epoch, pass),
and so on; checkpoints keep the global RNG states and the algorithm's weight snapshots, so a
resumed run reproduces the uninterrupted one exactly on CPU.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object, set_seed

from genalign import checkpoint, monitoring, run_report, runfiles, timing
from genalign import deepspeed_zero as zero
from genalign import seeds as seeding
from genalign.algorithms import ALGORITHMS
from genalign.algorithms.advantages import active_steps
from genalign.algorithms.base import SamplingPlan
from genalign.configs import ConfigError, to_dict
from genalign.optimise import EpochSums, global_count, minibatches, scale_gradients
from genalign.policies import POLICIES
from genalign.policies.window import NoiseWindow
from genalign.progress import progress, write
from genalign.seeds import Stream, derive_seed
from genalign.train_config import TrainConfig
from genalign.trajectory import Trajectory, concat_outputs
from rewards.compose import NonFiniteRewardError, Retrying, check_finite
from rewards.registry import build_reward


def mark_last(items: Iterable[Any]) -> Iterator[tuple[bool, Any]]:
    """(is the last one, item) for each item of ``items``, reading one ahead."""
    it = iter(items)
    try:
        current = next(it)
    except StopIteration:
        return
    for following in it:
        yield False, current
        current = following
    yield True, current


def die_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Ask Linux to send this process ``sig`` when its parent dies (``prctl(PR_SET_PDEATHSIG)``),
    so workers of a killed ``accelerate launch`` stop instead of training on unattended.
    Returns False where the call is not available (not Linux)."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return False
    pr_set_pdeathsig = 1
    if libc.prctl(pr_set_pdeathsig, int(sig), 0, 0, 0) != 0:
        return False
    return os.getppid() != 1  # the parent may already be gone: then nothing will be sent


class NonFiniteTrainingError(RuntimeError):
    """The loss or the trainable weights became NaN/inf; the run stops before saving anything."""


class OnPolicyMismatchError(RuntimeError):
    """The policy being trained does not give the rollout's log-probs for the rollout's own samples."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped a run at the end of an epoch, after writing its checkpoint."""


@contextlib.contextmanager
def interrupt_flag():
    """Within the block, a first SIGINT only sets a flag (read by calling the yielded function),
    so the run can stop at the end of its epoch with a checkpoint; a second one interrupts at
    once. Outside the main thread nothing changes."""
    hit = [False]
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        if hit[0]:
            raise KeyboardInterrupt
        hit[0] = True
        write("[genalign] interrupted: stopping after this epoch with a checkpoint (Ctrl-C again to stop at once)")

    signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: hit[0]
    finally:
        signal.signal(signal.SIGINT, previous)


# Keys a resumed run may change: how long it runs and how often/many checkpoints it keeps.
RESUMABLE_CHANGES = ("train.epochs", "train.checkpoint_every", "train.keep_checkpoints")


class Trainer:
    def __init__(self, config: TrainConfig, accelerator: Accelerator | None = None):
        if config.curriculum:
            raise ConfigError("a config with 'curriculum' stages runs with genalign.trainer.train (or genalign.curriculum.run_curriculum)")
        self.config = config
        # Several processes without CUDA (accelerate launch on CPUs) need cpu=True for gloo DDP.
        multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            die_with_parent()  # a killed launcher must not leave its workers training and writing
        # DeepSpeed on CPUs keeps its own launch path (gloo named explicitly; genalign.deepspeed_zero)
        self.acc = accelerator or Accelerator(mixed_precision=config.train.mixed_precision,
                                              cpu=multi_cpu and not zero.wants_deepspeed(), **zero.accelerator_kwargs())
        self.deepspeed = self.acc.distributed_type == DistributedType.DEEPSPEED
        self.zero_stage = zero.zero_stage(self.acc) if self.deepspeed else 0
        if self.deepspeed:
            zero.configure(self.acc, config.train.train_batch_size, config.train.max_grad_norm)
            zero.keep_models_whole()
        n_proc = self.acc.num_processes
        if config.train.prompts_per_epoch % n_proc:
            raise ConfigError(f"'train.prompts_per_epoch' ({config.train.prompts_per_epoch}) must be divisible by the {n_proc} processes")
        set_seed(config.seed)
        self.out = config.output_dir
        self.main = self.acc.is_main_process

        policy_cls = POLICIES[config.policy.type][1]
        try:
            self.policy = policy_cls.from_pretrained(config.policy.pretrained, config.policy)
        except OSError as e:  # a hub id while offline, a folder missing a component
            first = " ".join(str(e).split())[:300]
            raise FileNotFoundError(
                f"'policy.pretrained': cannot load {config.policy.pretrained!r} ({type(e).__name__}: {first}); give a "
                f"local pipeline directory, or a hub id with network access (HF_HUB_OFFLINE unset)"
            ) from e
        t = config.train

        def retrying(reward: Any) -> Retrying:
            return Retrying(reward, t.reward_retries, t.reward_retry_wait, warn=self._warn, timeout=t.reward_timeout)

        self.reward = retrying(build_reward(config.reward.components))
        self.monitor: Retrying | None = retrying(build_reward(config.reward.monitor)) if config.reward.monitor else None
        # unit-dependent hyper-parameters left unset take the defaults of the policy's log-prob unit
        self.algorithm = ALGORITHMS[config.algorithm.name][1](config.algorithm, unit=self.policy.log_prob_unit)
        self.prompts = config.prompts

        params = self.policy.trainable_parameters()
        if not params:
            raise ValueError("the policy has no trainable parameters")
        t = config.train
        optimizer = torch.optim.AdamW(
            params, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, weight_decay=t.weight_decay
        )
        if self.deepspeed:  # the engine is built from the module and the optimiser together
            preparer = zero.JointPreparer(self.acc, optimizer)
            self.modules = self.policy.prepare(preparer)
            self.optimizer = preparer.optimizer
        else:
            self.modules = self.policy.prepare(self.acc)
            self.optimizer = self.acc.prepare_optimizer(optimizer)
        self.params = params
        self.history: list[dict[str, Any]] = []
        self.start_epoch = 0
        self.samples = 0
        self.reward_queries = 0
        self.wall_before = 0.0
        self.snapshots: list[dict[str, torch.Tensor]] = []  # trainable weights per epoch start (algorithms that ask)

    # -- public ------------------------------------------------------------------------------
    def train(self, resume: bool = False, stop: Callable[[list[dict[str, Any]]], bool] | None = None,
              overwrite: bool = False) -> list[dict[str, Any]]:
        """Train ``train.epochs`` epochs, or until ``stop(history)`` (the per-epoch metrics so far)
        is True after an epoch; that epoch is then checkpointed and evaluated like the last one.

        ``output_dir`` must hold no run, or the same run with ``resume`` (its config.yaml may differ
        only in :data:`RESUMABLE_CHANGES`), or anything with ``overwrite`` (the old run's files
        are removed first)."""
        ckpt_root = os.path.join(self.out, "checkpoints")
        epochs = self.config.train.epochs
        user_stop = stop or (lambda history: False)
        stop = lambda history: user_stop(history) or self._alarm_stops(history)  # noqa: E731
        resume = self._claim_output_dir(ckpt_root, resume, overwrite)
        if resume:
            self._resume(ckpt_root)
            finished = self.start_epoch >= epochs or (self.history and stop(self.history))
            if finished and os.path.isdir(os.path.join(self.out, "final")):
                self._warn(
                    f"{self.out} is finished ({self.start_epoch} of {epochs} epochs): nothing to do; report.html and "
                    f"final/ are left as they are (raise train.epochs to train further)"
                )
                return self.history
        writer = self._tensorboard()
        timing.CLOCK.take()  # row 1 counts from here: the samples and evaluation before training
        grids = self._load_grids()
        if self.config.report.enabled and "before" not in grids:
            with timing.phase("report", whole=True):
                grids["before"] = self._grid("before")
        if self.config.eval.enabled and self.start_epoch == 0:
            self._evaluate(0)

        start = time.perf_counter()
        bar = progress(range(self.start_epoch, epochs), desc="epochs", disable=not self.main, initial=self.start_epoch, total=epochs)
        with interrupt_flag() as interrupted:
            for epoch in bar:
                if self.history and stop(self.history):
                    break
                self._train_epoch(epoch, start, writer, bar, stop, ckpt_root)
                last = epoch + 1 == epochs or stop(self.history)  # then the run finishes as usual
                if self._any_process(interrupted()) and not last:
                    every = self.config.train.checkpoint_every
                    if not (every and (epoch + 1) % every == 0):
                        self._checkpoint(ckpt_root, epoch + 1, self.history[-1]["wall_seconds"])
                    raise TrainingInterrupted(
                        f"stopped after epoch {epoch + 1} of {epochs}; its checkpoint is in {ckpt_root}: continue "
                        f"with --resume"
                    )
        with timing.phase("checkpoint"):
            self._save_final()
        if self.config.report.enabled:
            with timing.phase("report", whole=True):
                grids["after"] = self._grid("after")
            if self.main:
                self._write_report(grids, timing.CLOCK.take())
        if writer is not None:
            writer.close()
        self.acc.wait_for_everyone()
        return self.history

    def _train_epoch(self, epoch: int, start: float, writer: Any, bar: Any,
                     stop: Callable[[list[dict[str, Any]]], bool], ckpt_root: str) -> None:
        """One epoch, the evaluation due after it, its log row, and its checkpoint.

        The row's ``time/<phase>`` are the seconds each phase took since the previous row (row 1
        includes the evaluation before training; a checkpoint's write counts in the next row);
        ``samples_per_second`` is the epoch's samples over its training phases' seconds."""
        epochs = self.config.train.epochs
        samples_before = self.samples
        metrics = self._epoch(epoch)
        self.history.append(metrics)
        self._watch_monitor()
        last = epoch + 1 == epochs or stop(self.history)
        ev = self.config.eval
        if ev.enabled and (last or (ev.every and (epoch + 1) % ev.every == 0)):
            self._evaluate(epoch + 1)
        seconds = timing.CLOCK.take()
        metrics.update({f"time/{k}": v for k, v in seconds.items()})
        working = sum(seconds[k] for k in timing.TRAINING_PHASES)
        metrics["samples_per_second"] = (self.samples - samples_before) / working if working > 0 else 0.0
        metrics["wall_seconds"] = self.wall_before + time.perf_counter() - start
        # rollouts, rewards and updates only (no evaluation, checkpoints or grids), over the whole run
        metrics["train_seconds"] = (self.history[-2]["train_seconds"] if len(self.history) > 1 else 0.0) + working
        if self.main:
            runfiles.append_jsonl(os.path.join(self.out, "metrics.jsonl"), [metrics])
            if writer is not None:
                for k, v in metrics.items():
                    writer.add_scalar(k, v, epoch + 1)
            bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", loss=f"{metrics['loss']:.3g}",
                            samples_s=f"{metrics['samples_per_second']:.3g}")
        every = self.config.train.checkpoint_every
        if (every and (epoch + 1) % every == 0) or last:
            self._checkpoint(ckpt_root, epoch + 1, metrics["wall_seconds"])

    def _alarm(self, history: list[dict[str, Any]]) -> monitoring.Alarm | None:
        r = self.config.reward
        if r.alarm_margin <= 0 or not history or "monitor_mean" not in history[-1]:
            return None
        return monitoring.check([h["reward_mean"] for h in history], [h["monitor_mean"] for h in history],
                                r.alarm_window, r.alarm_margin)

    def _alarm_stops(self, history: list[dict[str, Any]]) -> bool:
        return self.config.reward.alarm_action == "stop" and self._alarm(history) is not None

    def _watch_monitor(self) -> None:
        """After an epoch: mark and announce the reward-hacking alarm; keep the policy of the
        monitor's best epoch in ``best_monitor/`` (with ``best_monitor.json``)."""
        r, metrics = self.config.reward, self.history[-1]
        if r.alarm_margin <= 0 or "monitor_mean" not in metrics:
            return
        alarm = self._alarm(self.history)
        if alarm is not None:
            metrics["hacking_alarm"] = 1
            if len(self.history) < 2 or "hacking_alarm" not in self.history[-2]:
                self._warn(alarm.message(r.alarm_margin) + ("; the run stops" if r.alarm_action == "stop" else ""))
        best = monitoring.best_epoch([h["monitor_mean"] for h in self.history], r.alarm_window)
        if best == metrics["epoch"]:
            with self._full_weights():  # every process gathers (ZeRO-3); the main one writes
                if self.main:
                    self._save_policy("best_monitor")
        if best == metrics["epoch"] and self.main:
            runfiles.write_json(os.path.join(self.out, "best_monitor.json"),
                                {"epoch": best, "monitor_moving_average": monitoring.moving_average(
                                    [h["monitor_mean"] for h in self.history], r.alarm_window)[-1]})

    def _any_process(self, flag: bool) -> bool:
        """True on every process when ``flag`` is True on any (one all-reduce with several)."""
        if self.acc.num_processes == 1:
            return flag
        return bool(self.acc.reduce(torch.tensor([float(flag)], device=self.acc.device), "sum").item() > 0)

    # -- one epoch ---------------------------------------------------------------------------
    def _epoch(self, epoch: int) -> dict[str, Any]:
        cfg, acc = self.config, self.acc
        n = cfg.train.samples_per_prompt
        if self.algorithm.needs_snapshots:
            with self._full_weights():  # index e = weights at the start of epoch e
                self.snapshots.append(self.policy.trainable_state_dict())
        plan = self.epoch_plan(epoch)
        local = self.local_prompts()

        trajs, comps, monitor, scores = [], defaultdict(list), defaultdict(list), []
        for _chunk, ids, traj, outputs, conditions in self.epoch_rollouts(epoch, plan):
            with timing.phase("reward"):
                scored = self.reward(outputs, conditions)
                watched = self.monitor(outputs, conditions) if self.monitor is not None else None
            for k, v in scored.components.items():
                comps[k].append(v.float().cpu())
            if watched is not None:
                monitor["_total"].append(watched.scores.float().cpu())
                for k, v in watched.components.items():
                    monitor[k].append(v.float().cpu())
            scores.append(scored.scores.float().cpu())
            if plan.kind == "off_policy":  # the reward only monitors the reference samples; roles are the labels
                traj = traj.with_rewards(torch.zeros(traj.batch_size, device=traj.log_probs.device))
            else:
                traj = traj.with_rewards(scored.scores.to(traj.log_probs.device))
                traj.extras["reward_components"] = torch.stack([v.float() for v in scored.components.values()], 1).to(
                    traj.log_probs.device
                )  # [n, C]
            traj.extras["sample_id"] = ids * 2 if plan.kind == "off_policy" else ids  # off-policy: winners, then references
            trajs.append(traj)
        traj = Trajectory.cat(trajs)
        with timing.phase("probe"):
            probe = self._probe(traj) if plan.kind in ("rollouts", "branches") else None

        # Gather rewards so that statistics are global and identical on every process.
        rewards_all = acc.gather(traj.rewards.float())  # [N_global]
        conds_all = gather_object(list(traj.conditions)) if acc.num_processes > 1 else list(traj.conditions)
        group_all = acc.gather(traj.group)
        # rewards of the samples this epoch produced (off-policy: the monitored reference samples)
        measured = acc.gather(torch.cat(scores).to(acc.device)) if plan.kind == "off_policy" else rewards_all
        bad = int((~torch.isfinite(measured)).sum())
        if bad:
            if cfg.train.on_nonfinite_reward == "error":
                for k, v in comps.items():
                    check_finite(k, torch.cat(v), traj.conditions)
                raise NonFiniteRewardError(f"non-finite rewards in epoch {epoch + 1}")
            if bad > cfg.train.max_nonfinite_fraction * len(measured):
                names = ", ".join(f"{k}: {int((~torch.isfinite(torch.cat(v))).sum())}" for k, v in comps.items())
                raise NonFiniteRewardError(
                    f"epoch {epoch + 1}: {bad} of {len(measured)} rewards are NaN/inf or failed (per component on this "
                    f"process: {names}), more than train.max_nonfinite_fraction = {cfg.train.max_nonfinite_fraction}; "
                    f"the run stops (its last checkpoint is intact)"
                )
            self._warn(f"epoch {epoch + 1}: {bad} non-finite rewards dropped from training")
        adv_all = self.algorithm.advantages(rewards_all.cpu(), conds_all, group_all.cpu())
        lo = acc.process_index * traj.batch_size
        adv = adv_all[lo : lo + traj.batch_size].to(traj.log_probs.device)
        trained = torch.isfinite(traj.rewards) & torch.isfinite(adv)  # NaN reward: dropped; NaN advantage: not selected
        traj.advantages = torch.nan_to_num(adv, nan=0.0)
        traj.mask = traj.mask & trained.unsqueeze(1)
        rows = torch.tensor([p * n + j for p in local for j in range(n)])  # [N_local]: the rows' numbers in the epoch
        if acc.num_processes == 1 and not bool(trained.all()):
            kept = trained.nonzero().view(-1)
            traj, trained, rows = traj[kept], trained[kept], rows[kept.cpu()]  # skip untrained rows (DDP keeps shapes)
        if plan.teacher_forced and traj.batch_size:
            with timing.phase("rollout"):  # the forward process re-encodes the samples as training data
                traj = self._teacher_forced(traj, trained, rows.tolist(), epoch)
        if self.algorithm.needs_reference and plan.reference != "initial":
            with timing.phase("reference"):
                traj.extras["ref_log_probs"] = self._snapshot_log_probs(traj, int(plan.reference))

        # An epoch may select no row at all (B²-DiffuRL when no branch stands out): no update.
        with timing.phase("train"):
            train_metrics = self._optimise(traj, epoch, plan) if traj.batch_size else {"loss": 0.0, "optimizer_steps": 0.0}

        self.samples += cfg.train.prompts_per_epoch * n
        self.reward_queries += len(measured)
        good = measured[torch.isfinite(measured)]
        metrics: dict[str, Any] = {
            "epoch": epoch + 1,
            "reward_mean": float(good.mean()) if len(good) else float("nan"),
            "reward_std": float(good.std(unbiased=False)) if len(good) else float("nan"),
            "samples": self.samples,
            "reward_queries": self.reward_queries,
            "nonfinite_rewards": bad,
            "trained_rows": int(acc.gather(trained.sum().view(1).to(acc.device)).sum()),
            **train_metrics,
        }
        if probe is not None:
            metrics["probe_logprob_diff"] = probe
        metrics.update(self.algorithm.epoch_metrics())
        if plan.kind == "branches":
            metrics["branch_step"] = int(traj.extras["branch_step"].min()) if traj.batch_size else -1
        if plan.kind == "off_policy":
            metrics["reference_snapshot"] = int(plan.reference)
        total = monitor.pop("_total", None)
        if total is not None:
            metrics["monitor_mean"] = float(acc.gather(torch.cat(total).to(acc.device)).nanmean())
        for prefix, table in (("reward/", comps), ("monitor/", monitor)):
            for k, v in table.items():
                metrics[prefix + k] = float(acc.gather(torch.cat(v).to(acc.device)).nanmean())
        return metrics

    def epoch_plan(self, epoch: int) -> SamplingPlan:
        """How epoch ``epoch`` (0-based) samples: drawn by the algorithm from the epoch's stream."""
        return self.algorithm.plan(epoch, len(self.snapshots), seeding.generator(self.config.seed, Stream.PLAN, epoch))

    def local_prompts(self) -> list[int]:
        """The numbers of the epoch's prompts that this process samples."""
        return list(range(self.acc.process_index, self.config.train.prompts_per_epoch, self.acc.num_processes))

    def epoch_rollouts(self, epoch: int, plan: SamplingPlan) -> Iterator[tuple[list[int], list[str], Trajectory, Any, list[Any]]]:
        """This process's rollouts of epoch ``epoch``, one call per ``rollout_batch_size`` rows:
        (prompt numbers, sample ids ``s{seed}-e{epoch+1}-r{row}``, trajectory, outputs to
        score, their conditions). The same weights give the same samples bit-for-bit: labelling
        rounds (genalign.labelling) sample an epoch with this before the trainer trains it."""
        n, seed = self.config.train.samples_per_prompt, self.config.seed
        prompts = self.prompts.sample(self.config.train.prompts_per_epoch, seed=derive_seed(seed, Stream.PROMPTS, epoch))
        local = self.local_prompts()
        per_call = max(1, self.config.train.rollout_batch_size // n)
        chunks = [local[i : i + per_call] for i in range(0, len(local), per_call)]
        for chunk in progress(chunks, desc=f"epoch {epoch + 1} rollouts", leave=False, disable=not self.main):
            rows = [p * n + j for p in chunk for j in range(n)]  # the rows' numbers within the epoch
            with timing.phase("rollout"):
                traj, outputs, conditions = self._collect(plan, [prompts[p] for p in chunk], rows, epoch, chunk)
            yield chunk, [f"s{seed}-e{epoch + 1}-r{r}" for r in rows], traj, outputs, conditions

    @torch.no_grad()
    def _probe(self, traj: Trajectory) -> float:
        """The on-policy probe: recompute the log-probs of a few fresh rows (at most 2 of their
        acting steps each) with the current weights and compare them with the rollout's. The
        largest difference (over processes) is returned; above ``train.probe_tolerance`` the
        run stops, because the update would then train on a policy other than the sampler
        (an adapter not applied, a dtype or device drift, a stale copy of the weights)."""
        t = self.config.train
        rows = torch.arange(min(t.probe_rows, traj.batch_size))
        diff = 0.0
        if len(rows):
            sub = traj[rows]
            steps = active_steps(sub.mask)[:, :2]  # [r, k]
            with self.acc.autocast():
                recomputed = self.policy.log_prob(sub, steps).float()  # [r, k]
            rolled = sub.log_probs.gather(1, steps.to(sub.log_probs.device)).float()
            acting = sub.mask.gather(1, steps.to(sub.mask.device))
            gap = (recomputed - rolled.to(recomputed.device)).abs()[acting.to(recomputed.device)]
            diff = float(gap.max()) if gap.numel() else 0.0
            if not math.isfinite(diff):
                diff = math.inf
        if self.acc.num_processes > 1:
            diff = float(self.acc.reduce(torch.tensor([diff], device=self.acc.device), "max").item())
        tolerance = t.probe_tolerance or (1e-3 if t.mixed_precision == "no" else 5e-2)
        if diff > tolerance:
            raise OnPolicyMismatchError(
                f"on-policy probe: re-scoring {len(rows)} fresh rollout rows with the weights that sampled them moved "
                f"their log-probs by {diff:.3g} (train.probe_tolerance = {tolerance:g}): the trained policy is "
                f"not the one that sampled (an adapter not applied, a dtype or device mismatch, stale weights in the "
                f"sampler); the run stops before training on it"
            )
        return diff

    def _collect(
        self, plan: SamplingPlan, chunk_prompts: list[Any], rows: list[int], epoch: int, chunk: list[int]
    ) -> tuple[Trajectory, Any, list[Any]]:
        """One rollout call of the epoch, shaped by the plan: prompts ``chunk`` (their numbers in
        the epoch), rows ``rows`` (``p · n + j``). Each row and prompt draws from its own stream.

        Returns the trajectory to train on, and the outputs/conditions the reward scores (for
        ``off_policy``: the reference samples, whose scores are only monitored).
        """
        n, seed = self.config.train.samples_per_prompt, self.config.seed
        device = self.acc.device
        row_seeds = [derive_seed(seed, Stream.ROLLOUT, epoch, r) for r in rows]
        with self.acc.autocast():
            if plan.kind == "rollouts":
                traj = self.policy.rollout(chunk_prompts, n, row_seeds, **self._sampling_options(plan, epoch, chunk))
                traj.group = torch.tensor(chunk, device=traj.group.device).repeat_interleave(n)
                return traj, traj.outputs, traj.conditions
            if plan.kind == "branches":
                prefix = self.policy.rollout(chunk_prompts, 1, [derive_seed(seed, Stream.BRANCH_PREFIX, epoch, p) for p in chunk])
                # each prefix branches at the same fraction of its own length (a chain's T, a response's tokens)
                length = prefix.mask.sum(1).cpu()  # [P]
                steps = (plan.branch_at * length.double()).round().long().clamp(min=0)
                steps = torch.minimum(steps, (length - 1).clamp(min=0))
                traj = self.policy.continue_from(prefix, steps, n, row_seeds)
                traj.group = torch.tensor(chunk, device=traj.group.device).repeat_interleave(n)
                return traj, traj.outputs, traj.conditions
            # off_policy: reference samples (losers or anchors) and off-policy targets (winners)
            with self._weights(plan.reference):
                ref = self.policy.rollout(chunk_prompts, n, row_seeds)
            conds = list(ref.conditions)
            target_seeds = [derive_seed(seed, Stream.TARGETS, epoch, r) for r in rows]
            targets = self.algorithm.targets(conds, target_seeds, ref.outputs, self.prompts)
            # The pair shares its forward noise, drawn from its own stream: independent of the
            # reference sample's rollout noise (which would otherwise be the first draw).
            forward = [derive_seed(seed, Stream.FORWARD, epoch, r) for r in rows]
            traj = self.policy.forward_process(conds + conds, concat_outputs([targets, ref.outputs]), forward + forward)
            pair = torch.tensor(rows, device=device)
            traj.group = torch.cat([pair, pair]).to(traj.group.device)
            traj.extras["role"] = torch.cat([torch.ones(len(conds)), torch.zeros(len(conds))]).long().to(traj.group.device)
            return traj, ref.outputs, conds

    def _teacher_forced(self, traj: Trajectory, trained: torch.Tensor, rows: list[int], epoch: int) -> Trajectory:
        """The rows' outputs re-encoded as data by ``policy.forward_process`` (teacher forcing for
        tokens, forward-process noising for images), with the rollouts' rewards, advantages and
        groups; untrained rows stay masked out. Each row's forward noise has its own stream."""
        seeds = [derive_seed(self.config.seed, Stream.FORWARD, epoch, r) for r in rows]
        with torch.no_grad(), self.acc.autocast():
            data = self.policy.forward_process(list(traj.conditions), traj.outputs, seeds)
        device = data.mask.device
        data = data.with_rewards(traj.rewards.to(device))
        data.advantages = traj.advantages.to(device)
        data.group = traj.group.to(device)
        data.mask = data.mask & trained.to(device).unsqueeze(1)
        data.extras.update({k: traj.extras[k] for k in ("sample_id", "reward_components") if k in traj.extras})
        return data

    def _sampling_options(self, plan: SamplingPlan, epoch: int, chunk: list[int]) -> dict[str, Any]:
        """The policy options a rollouts plan asks for (each a declared policy capability)."""
        seed = self.config.seed
        options: dict[str, Any] = {}
        if plan.shared_noise:
            options["shared_noise"] = True
        if plan.noise_window > 0:
            starts = [  # one draw per prompt, from the prompt's own generator
                NoiseWindow.draw(1, plan.noise_window, plan.noise_window_starts,
                                 seeding.generator(seed, Stream.NOISE_WINDOW, epoch, p)).starts[0]
                for p in chunk
            ]
            options["noise_window"] = NoiseWindow(starts, plan.noise_window)
        if plan.antithetic:
            options["antithetic"] = True
        missing = sorted(set(options) - set(self.policy.capabilities))
        if missing:
            raise ConfigError(
                f"algorithm '{self.algorithm.name}' samples with {missing}, which policy type "
                f"'{self.config.policy.type}' does not support (it declares {sorted(self.policy.capabilities) or 'none'})"
            )
        return options

    @contextlib.contextmanager
    def _weights(self, reference: int | str):
        """Run with the trainable weights of snapshot ``reference`` (``"initial"``: unchanged)."""
        if reference == "initial" or not self.snapshots:
            yield
            return
        with self._full_weights(modify=True):
            current = self.policy.trainable_state_dict()
            self.policy.load_trainable_state_dict(self.snapshots[int(reference)])
        try:
            yield
        finally:
            with self._full_weights(modify=True):
                self.policy.load_trainable_state_dict(current)

    @torch.no_grad()
    def _snapshot_log_probs(self, traj: Trajectory, index: int) -> torch.Tensor:
        """log π_ref at every step of every row, under snapshot ``index``: ``[N, T]``."""
        out = []
        steps = torch.arange(traj.num_steps)
        bs = self.config.train.train_batch_size
        with self._weights(index), self.acc.autocast():
            for i in range(0, traj.batch_size, bs):
                out.append(self.policy.log_prob(traj[torch.arange(i, min(i + bs, traj.batch_size))], steps).float())
        return torch.cat(out)

    def _minibatches(self, traj: Trajectory, g: torch.Generator, whole_groups: bool) -> list[torch.Tensor]:
        return minibatches(traj.batch_size, traj.group, self.config.train.train_batch_size, g, whole_groups)

    def _optimise(self, traj: Trajectory, epoch: int, plan: SamplingPlan) -> dict[str, float]:
        """Inner epochs over ``traj``: each optimiser step follows ∇(Σ total)/(Σ normaliser) over
        its accumulation window (all minibatches, step chunks and processes), so memory settings
        do not change the update (genalign.optimise)."""
        cfg, acc, seed = self.config.train, self.acc, self.config.seed
        sums = EpochSums()
        ga = cfg.gradient_accumulation_steps
        for inner in range(cfg.inner_epochs):
            batches = self._minibatches(traj, seeding.generator(seed, Stream.SHUFFLE, epoch, inner), plan.whole_groups)
            all_steps = self.algorithm.train_steps(traj, seeding.generator(seed, Stream.TRAIN_STEPS, epoch, inner))  # [N, K]
            for start in range(0, len(batches), ga):
                window = batches[start : start + ga]  # the last window of a pass may be partial
                calls = self._window_calls(traj, all_steps, window)  # made one at a time
                normaliser, scale = 0.0, 1.0
                if self.deepspeed:  # each loss is scaled before its backward (see genalign.deepspeed_zero)
                    calls = list(calls)
                    scale = acc.num_processes / self._window_normaliser(calls)
                for sync, (first_col, mb, sub, sub_steps) in mark_last(calls):
                    if self.deepspeed:  # the engine clips and steps at the window's last backward
                        acc.gradient_state._set_sync_gradients(sync)
                    with self._no_sync(not sync), acc.autocast():
                        log_probs = self.policy.log_prob(mb, sub_steps)  # [b, k]
                        ref = None
                        if "ref_log_probs" in mb.extras:
                            ref = mb.extras["ref_log_probs"].to(log_probs.device).gather(1, sub_steps.to(log_probs.device))
                        elif self.algorithm.needs_reference:
                            with torch.no_grad(), self.policy.reference(), timing.phase("reference"):
                                ref = self.policy.log_prob(mb, sub_steps)
                        terms = self.algorithm.loss(sub, log_probs, ref)
                        # one process: stop before this backward, no step taken yet (several: the weight check below)
                        if acc.num_processes == 1 and not math.isfinite(float(terms.total.detach())):
                            raise NonFiniteTrainingError(
                                f"epoch {epoch + 1}: the loss is {float(terms.total.detach())} before optimizer step {sums.steps + 1}; "
                                f"no step was taken and the last checkpoint is intact (check the rewards, learning rate "
                                f"and clip ranges)"
                            )
                        acc.backward(terms.total * scale if self.deepspeed else terms.total)
                    normaliser += terms.normaliser
                    sums.add(terms, first_pass=inner == 0 and first_col)
                if self.deepspeed:
                    acc.gradient_state._set_sync_gradients(True)
                    if cfg.max_grad_norm > 0:
                        sums.grad_norms.append(float(self.modules[0].get_global_grad_norm()))
                else:  # one normaliser for the step; DDP already averaged the gradients over processes
                    n_global = global_count(normaliser, acc)
                    scale_gradients(self.modules, self.params, acc.num_processes / n_global if n_global > 0 else 0.0)
                    if cfg.max_grad_norm > 0:
                        sums.grad_norms.append(float(acc.clip_grad_norm_(self.params, cfg.max_grad_norm)))
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                sums.steps += 1
                # the values this process holds (ZeRO-3: its shards, so every process must hear of one)
                broken = not all(bool(torch.isfinite(v).all()) for v in zero.local_values(self.params, self.zero_stage))
                if self._any_process(broken) if self.zero_stage == 3 else broken:
                    raise NonFiniteTrainingError(
                        f"epoch {epoch + 1}: optimizer step {sums.steps} made trainable weights NaN/inf; nothing from "
                        f"this epoch is saved and the last checkpoint is intact (lower train.learning_rate or set "
                        f"train.max_grad_norm)"
                    )
        return sums.reduce(acc)

    def _window_calls(self, traj: Trajectory, all_steps: torch.Tensor,
                      window: list[torch.Tensor]) -> Iterator[tuple[bool, Trajectory, Trajectory, torch.Tensor]]:
        """The loss calls of one accumulation window, in order: (first step chunk of its minibatch,
        minibatch, its sub-trajectory at the chunk's steps, those steps ``[b, k]``)."""
        for idx in window:
            mb, steps = traj[idx], all_steps[idx]  # [b, K]; −1 entries pad rows with fewer steps
            k_total = steps.shape[1]
            # rows whose steps only mean something together (tokens) are scored whole
            chunk = (self.policy.step_chunk if traj.aligned else None) or k_total
            for c in range(0, k_total, chunk):
                padded = steps[:, c : c + chunk]
                sub_steps = padded.clamp(min=0)
                sub = mb.subset(sub_steps)
                sub.mask = sub.mask & (padded >= 0).to(sub.mask.device)
                yield c == 0, mb, sub, sub_steps

    def _window_normaliser(self, calls: list[tuple[bool, Trajectory, Trajectory, torch.Tensor]]) -> float:
        """Σ normaliser of a window over every process, before its backward passes: the loss
        with zero log-probs (a normaliser counts entries or pairs, whatever the log-probs)."""
        local = 0.0
        with torch.no_grad():
            for _, mb, sub, sub_steps in calls:
                zeros = torch.zeros(sub_steps.shape, device=self.acc.device)
                ref = zeros if ("ref_log_probs" in mb.extras or self.algorithm.needs_reference) else None
                local += self.algorithm.loss(sub, zeros, ref).normaliser
        n_global = global_count(local, self.acc)
        return n_global if n_global > 0 else math.inf  # nothing active anywhere: every loss scales to 0

    def _full_weights(self, modify: bool = False):
        """Whole trainable weights inside the block (ZeRO-3 gathers them; every process enters)."""
        return zero.full_weights(self.params, self.zero_stage, modify)

    def _no_sync(self, skip: bool):
        if not skip or self.acc.num_processes == 1 or self.deepspeed:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        for m in self.modules:
            stack.enter_context(self.acc.no_sync(m))
        return stack

    # -- checkpoints, final policy, report ----------------------------------------------------
    def _checkpoint(self, root: str, epoch: int, wall: float) -> None:
        with timing.phase("checkpoint"):
            with self._full_weights():
                trainable = self.policy.trainable_state_dict()
            shards = self._save_optimizer_shards(root, epoch) if self.deepspeed else None
            if self.main:
                state = {
                    "samples": self.samples,
                    "reward_queries": self.reward_queries,
                    "wall_seconds": wall,
                    "algorithm": self.algorithm.state_dict(),
                    "snapshots": len(self.snapshots),
                }
                # the weight snapshots an algorithm draws references from (index e: start of epoch e)
                tensors = {"snapshots": {f"{i}/{k}": v for i, snap in enumerate(self.snapshots) for k, v in snap.items()}}
                checkpoint.write_checkpoint(
                    root, epoch, trainable, None if shards else self.optimizer, state,
                    keep=self.config.train.keep_checkpoints, tensors=tensors if self.snapshots else None, files=shards,
                )
                if shards:
                    shutil.rmtree(os.path.dirname(shards[0]), ignore_errors=True)
            self.acc.wait_for_everyone()

    def _save_optimizer_shards(self, root: str, epoch: int) -> list[str]:
        """DeepSpeed: every process writes its optimiser shard into one staging folder (a
        ``.tmp-*`` name, so an interrupted write is cleaned up on resume); the main process moves
        them into the checkpoint it writes. Returns the shards' paths."""
        staging = os.path.join(root, f".tmp-optimizer-epoch_{epoch:05d}")
        if self.main:
            shutil.rmtree(staging, ignore_errors=True)
            os.makedirs(staging)
        self.acc.wait_for_everyone()
        zero.save_optimizer(self.optimizer, staging, self.acc.process_index)
        self.acc.wait_for_everyone()
        return [os.path.join(staging, zero.optimizer_file(r)) for r in range(self.acc.num_processes)]

    def _claim_output_dir(self, ckpt_root: str, resume: bool, overwrite: bool) -> bool:
        """Check that ``output_dir`` may take this run (:func:`check_output_dir`) and prepare it;
        returns whether to resume. Every process decides from the files as they are, then the
        main process changes them."""
        out, config_path = self.out, os.path.join(self.out, "config.yaml")
        mode = check_output_dir(self.config, resume, overwrite)
        if mode == "restart":
            self._warn(f"{out} has no complete checkpoint: the run starts again from epoch 0")
        self.acc.wait_for_everyone()  # every process has read the directory before it changes
        if self.main:
            if mode in ("overwrite", "restart"):
                runfiles.clear_run(out)
            for path in runfiles.remove_stale_temps(out):
                self._warn(f"removed {path}, left by an interrupted write")
            os.makedirs(out, exist_ok=True)
            if mode == "resume" or not os.path.isfile(config_path):
                runfiles.write_config(config_path, to_dict(self.config))
        self.acc.wait_for_everyone()
        return mode == "resume"

    def _resume(self, root: str) -> None:
        path = checkpoint.latest_checkpoint(root)
        if path is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {root}")
        self.load_checkpoint(path)
        for name in ("metrics.jsonl", "eval.jsonl"):
            path_ = os.path.join(self.out, name)
            rows = runfiles.read_jsonl(path_)
            kept = [r for r in rows if r["epoch"] <= self.start_epoch]
            if name == "metrics.jsonl":
                self.history = kept
            if self.main and os.path.isfile(path_):  # drop what was logged after the checkpoint: it will be redone
                runfiles.write_jsonl(path_, kept)
        self._warn(f"resumed from {path} (epoch {self.start_epoch})")

    def load_checkpoint(self, path: str) -> None:
        """Weights, optimiser, algorithm state and counters from a checkpoint folder (nothing is
        written: the run's logs are left as they are)."""
        trainable, state = checkpoint.read_checkpoint(path, None if self.deepspeed else self.optimizer)
        with self._full_weights(modify=True):
            self.policy.load_trainable_state_dict(trainable)
        if self.deepspeed:  # after the weights: DeepSpeed may rebuild its fp32 master copy from them
            zero.load_optimizer(self.optimizer, path, self.acc.process_index, self.acc.num_processes)
        self.algorithm.load_state_dict(state["algorithm"])
        self.snapshots = []
        if state.get("snapshots"):
            flat = checkpoint.read_tensors(path, "snapshots")
            self.snapshots = [
                {k.split("/", 1)[1]: v for k, v in flat.items() if k.split("/", 1)[0] == str(i)} for i in range(state["snapshots"])
            ]
        elif self.algorithm.needs_snapshots and state["epoch"] > 0:
            raise ValueError(f"{path} holds no weight snapshots, which {self.algorithm.name} needs to resume exactly")
        self.start_epoch = state["epoch"]
        self.samples, self.reward_queries = state["samples"], state["reward_queries"]
        self.wall_before = state["wall_seconds"]

    def _save_final(self) -> None:
        with self._full_weights():  # every process gathers (ZeRO-3); the main one writes
            if self.main:
                self._save_policy("final")
        self.acc.wait_for_everyone()

    def _save_policy(self, name: str) -> None:
        """The current policy as ``<output_dir>/<name>/``, replaced only once fully written."""
        final = os.path.join(self.out, name)
        tmp = tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=self.out)
        try:
            self.policy.save_pretrained(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)

    def _evaluate(self, epoch: int) -> list[dict[str, Any]]:
        """Score fixed prompts with fixed seeds; rows go to eval.jsonl (epoch 0 = before training)."""
        with timing.phase("evaluation", whole=True):
            return run_report.evaluate(self, epoch)

    def _grid(self, tag: str) -> dict[str, Any]:
        """Before/after samples of eval prompts at their eval seeds, labelled with their verdicts."""
        return run_report.grid(self, tag)

    def _load_grids(self) -> dict[str, Any]:
        return run_report.load_grids(self.out)

    def _write_report(self, grids: dict[str, Any], unlogged: dict[str, float]) -> None:
        """report.html; ``unlogged``: phase seconds after the last row (final save, grids)."""
        run_report.write_run_report(self, grids, unlogged)

    def _tensorboard(self):
        if not self.main:
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=os.path.join(self.out, "tensorboard"))

    def _warn(self, message: str) -> None:
        if self.main:
            write(f"[genalign] {message}")


def check_output_dir(config: TrainConfig, resume: bool = False, overwrite: bool = False) -> str:
    """Whether ``config.output_dir`` may take this run, decided from the files alone (nothing
    is changed, no model is loaded): ``"new"`` (no run there), ``"overwrite"``, ``"resume"`` (the
    same run: its config.yaml differs at most in :data:`RESUMABLE_CHANGES`) or ``"restart"`` (the
    same run, killed before its first checkpoint). Anything else raises, naming the reason."""
    out = config.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"'output_dir': {out} is a file, not a directory")
    parent = os.path.abspath(out)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise PermissionError(f"'output_dir': cannot create or write {out} ({parent} is not a writable directory)")
    present = runfiles.run_contents(out)
    if overwrite:
        return "overwrite"
    if not resume:
        if present:
            raise FileExistsError(
                f"{out} already holds a run ({', '.join(present)}): continue it with --resume (Python: resume=True), "
                f"replace it with --overwrite (overwrite=True), or set output_dir elsewhere"
            )
        return "new"
    if not present:
        raise FileNotFoundError(f"--resume: {out} holds no run to continue (no config, no checkpoint)")
    config_path = os.path.join(out, "config.yaml")
    if os.path.isfile(config_path):
        changes = runfiles.config_changes(runfiles.read_config(config_path), to_dict(config))
        fixed = {k: v for k, v in changes.items() if k not in RESUMABLE_CHANGES}
        if fixed:
            listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in fixed.items())
            raise ConfigError(
                f"--resume: the config differs from the run's ({config_path}) in {listed}. Resume with the run's "
                f"config (only {', '.join(RESUMABLE_CHANGES)} may change), or start a new run (another output_dir, "
                f"or --overwrite)"
            )
    return "resume" if checkpoint.latest_checkpoint(os.path.join(out, "checkpoints")) else "restart"


def train(
    config: TrainConfig | str | os.PathLike, overrides: list[str] | None = None, resume: bool = False,
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """Python API equal to ``genalign train CONFIG [overrides] [--resume]``: returns the per-epoch metrics.

    >>> from genalign import train
    >>> history = train("configs/quickstart.yaml", overrides=["train.epochs=3"], resume=False)

    ``config`` is a YAML path or a :class:`TrainConfig`; ``overrides`` are ``key.sub=value``
    strings as on the command line. The whole config validates before any model loads.
    ``resume=True`` continues the run in ``output_dir`` from its latest checkpoint (with the same
    config); ``overwrite=True`` replaces a run already there.
    """
    from genalign.train_config import resolve_config

    config = resolve_config(config, overrides)
    if config.curriculum:  # ordered stages, each a run of its own (genalign.curriculum)
        from genalign.curriculum import run_curriculum

        return run_curriculum(config, resume=resume, overwrite=overwrite)
    # Before any model loads. No process writes to the folder before every process has passed
    # the same check again in Trainer.train (behind a barrier), so the checks cannot race.
    check_output_dir(config, resume, overwrite)
    return Trainer(config).train(resume=resume, overwrite=overwrite)
