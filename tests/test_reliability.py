"""Reliability: run directories that hold another run, resume with a changed config, non-finite
training, failing rewards, the on-policy probe, Ctrl-C, torn logs and stale temporary files."""

import os
import signal

import pytest
import torch
import yaml
from safetensors.torch import load_file

from genalign import checkpoint, runfiles
from genalign.cli import main
from genalign.configs import ConfigError
from genalign.trainer import (
    NonFiniteTrainingError,
    OnPolicyMismatchError,
    Trainer,
    TrainingInterrupted,
    train,
)
from rewards.base import RewardOutput
from rewards.compose import NonFiniteRewardError, Retrying, WeightedSum


@pytest.fixture
def config(sd_run_config):
    """This file's tiny run: ``config(output_dir, *overrides)``."""
    return lambda out, *extra: sd_run_config(out, "train.epochs=1", "train.reward_retry_wait=0", "report.enabled=false", *extra)


def epochs_logged(out, name="metrics.jsonl"):
    return [r["epoch"] for r in runfiles.read_jsonl(os.path.join(out, name))]


def test_resume_refuses_a_changed_config_and_keeps_the_run(config, tmp_path):
    out = str(tmp_path / "run")
    train(config(out))
    saved = (tmp_path / "run" / "config.yaml").read_text()
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    for change in ("seed=1", "train.learning_rate=5e-3", "reward.components=[{type: jpeg_incompressibility}]"):
        with pytest.raises(ConfigError) as err:
            train(config(out, "train.epochs=2", change), resume=True)
        key = change.split("=")[0].replace("reward.components", "reward.components.0.type")
        assert key in str(err.value) and "config.yaml" in str(err.value)
        assert "train.epochs" not in str(err.value).split("Resume with")[0], "an allowed change is not listed"
    assert (tmp_path / "run" / "config.yaml").read_text() == saved, "the run's config is never overwritten"
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics
    # more epochs is the one change a resume takes; the stored config then says so
    history = train(config(out, "train.epochs=2"), resume=True)
    assert [r["epoch"] for r in history] == [1, 2]
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]["epochs"] == 2


def test_output_dir_with_a_run_but_no_checkpoint(config, tmp_path):
    """Killed before its first checkpoint: a new run is refused, --resume starts it again from
    epoch 0 without mixing logs, --overwrite replaces it."""
    out = str(tmp_path / "run")
    train(config(out))
    import shutil

    shutil.rmtree(os.path.join(out, "checkpoints"))
    shutil.rmtree(os.path.join(out, "final"))
    with pytest.raises(FileExistsError, match="--overwrite") as err:
        train(config(out))
    assert "metrics.jsonl" in str(err.value)
    history = train(config(out), resume=True)
    assert [r["epoch"] for r in history] == [1]
    assert epochs_logged(out) == [1]
    assert epochs_logged(out, "eval.jsonl") == [0, 1]
    # a finished run is replaced only on request
    with pytest.raises(FileExistsError):
        train(config(out, "seed=3"))
    train(config(out, "seed=3"), overwrite=True)
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["seed"] == 3
    assert epochs_logged(out) == [1]
    with pytest.raises(FileNotFoundError, match="no run"):
        train(config(str(tmp_path / "empty")), resume=True)


def test_latest_pointer_to_a_missing_checkpoint_falls_back(tmp_path):
    root = str(tmp_path / "ckpt")
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    for epoch in (1, 2):
        checkpoint.write_checkpoint(root, epoch, {"w": torch.full((2,), float(epoch))}, opt, {})
    (tmp_path / "ckpt" / "latest").write_text("epoch_00009")
    assert checkpoint.latest_checkpoint(root).endswith("epoch_00002")
    os.remove(os.path.join(root, "epoch_00002", "state.json"))  # incomplete: skipped
    assert checkpoint.latest_checkpoint(root).endswith("epoch_00001")


def test_stale_temporary_files_are_removed(config, tmp_path):
    out = tmp_path / "run"
    train(config(str(out)))
    (out / "checkpoints" / ".tmp-epoch_00002-abc").mkdir()
    (out / ".tmp-xyz").write_text("half")
    train(config(str(out), "train.epochs=2"), resume=True)
    assert not [n for n in os.listdir(out) + os.listdir(out / "checkpoints") if n.startswith(".tmp-")]


def test_jsonl_torn_last_line_dropped_damaged_line_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 1}\n{"epoch": 2}\n{"epo')
    assert runfiles.read_jsonl(str(path)) == [{"epoch": 1}, {"epoch": 2}]
    path.write_text('{"epoch": 1}\nnot json\n{"epoch": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2"):
        runfiles.read_jsonl(str(path))
    runfiles.append_jsonl(str(tmp_path / "new.jsonl"), [{"a": 1}])
    runfiles.append_jsonl(str(tmp_path / "new.jsonl"), [{"a": 2}])
    assert (tmp_path / "new.jsonl").read_text() == '{"a": 1}\n{"a": 2}\n'


def test_nonfinite_loss_stops_before_any_step_is_saved(config, tmp_path):
    out = str(tmp_path / "run")
    trainer = Trainer(config(out, "train.epochs=2"))
    loss = trainer.algorithm.loss
    calls = []

    def poisoned(*args, **kwargs):
        terms = loss(*args, **kwargs)
        calls.append(1)
        if trainer.history:  # epoch 2
            terms.total = terms.total * float("nan")
        return terms

    trainer.algorithm.loss = poisoned
    with pytest.raises(NonFiniteTrainingError, match="epoch 2: the loss is nan"):
        trainer.train()
    assert calls and not os.path.exists(os.path.join(out, "final"))
    saved = load_file(os.path.join(checkpoint.latest_checkpoint(os.path.join(out, "checkpoints")), "trainable.safetensors"))
    assert all(torch.isfinite(v).all() for v in saved.values())
    assert epochs_logged(out) == [1]


def test_weights_that_become_nonfinite_stop_the_run(config, tmp_path):
    trainer = Trainer(config(str(tmp_path / "run")))
    step = trainer.optimizer.step

    def overflow(*args, **kwargs):
        out = step(*args, **kwargs)
        trainer.params[0].data.fill_(float("inf"))
        return out

    trainer.optimizer.step = overflow
    with pytest.raises(NonFiniteTrainingError, match="NaN/inf"):
        trainer.train()
    assert not os.path.exists(tmp_path / "run" / "final")


class _Broken:
    """A reward server that fails its first ``fail_times`` calls (or every call); counts calls."""

    differentiable = False

    def __init__(self, name="server", fail_times=0, always=False):
        self.name, self.fail_times, self.always, self.calls = name, fail_times, always, 0

    def __call__(self, outputs, conditions):
        self.calls += 1
        if self.always or self.calls <= self.fail_times:
            raise ConnectionError("reward server unreachable")
        return RewardOutput(scores=outputs.float().mean(dim=(1, 2, 3)))


def test_reward_failures_retried_then_masked_then_stop(config, tmp_path):
    waits = []
    flaky = _Broken(fail_times=2)
    wrapped = Retrying(WeightedSum([flaky], [1.0]), retries=2, wait=0.5, warn=lambda m: None, sleep=waits.append)
    out = wrapped(torch.rand(3, 3, 8, 8), ["a", "b", "c"])
    assert waits == [0.5, 1.0] and flaky.calls == 3 and torch.isfinite(out.scores).all()

    # rows that keep failing are NaN (dropped and counted), the others scored alone
    class RowBroken(_Broken):
        def __call__(self, outputs, conditions):
            if "b" in conditions:
                raise TimeoutError("timed out")
            return super().__call__(outputs, conditions)

    wrapped = Retrying(WeightedSum([RowBroken()], [1.0]), retries=1, wait=0, warn=lambda m: None, sleep=lambda s: None)
    out = wrapped(torch.rand(3, 3, 8, 8), ["a", "b", "c"])
    assert torch.isnan(out.scores).tolist() == [False, True, False] and wrapped.failed_rows == 1
    assert set(out.components) == {"server"}
    # errors in the inputs are not retried
    from rewards.jpeg import JpegCompressibility

    slept = []
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        Retrying(WeightedSum([JpegCompressibility()], [1.0]), warn=lambda m: None, sleep=slept.append)(
            torch.rand(2, 3, 8, 8) * 5, ["a", "b"])
    assert slept == []

    # a reward that never answers stops the run with a message naming the fraction
    trainer = Trainer(config(str(tmp_path / "run"), "train.reward_retries=1"))
    trainer.reward = Retrying(WeightedSum([_Broken(always=True)], [1.0]), retries=1, wait=0, warn=lambda m: None)
    with pytest.raises(NonFiniteRewardError, match="max_nonfinite_fraction"):
        trainer.train()


def test_a_hanging_reward_times_out_and_is_retried(config, tmp_path):
    """A reward that hangs on its first call (a stuck server) counts as failed after
    ``train.reward_timeout`` and the retry answers; one that hangs on a row leaves that row NaN."""
    import threading

    release = threading.Event()

    class Hangs(_Broken):
        def __init__(self, hang_calls=(1,), hang_on=None):
            super().__init__()
            self.hang_calls, self.hang_on = hang_calls, hang_on

        def __call__(self, outputs, conditions):
            self.calls += 1
            if self.calls in self.hang_calls or (self.hang_on is not None and self.hang_on in conditions):
                release.wait(30)  # "forever" for the test; released at the end so no thread outlives it
            return RewardOutput(scores=outputs.float().mean(dim=(1, 2, 3)))

    messages = []
    try:
        stuck = Hangs()
        out = Retrying(stuck, retries=1, wait=0, warn=messages.append, sleep=lambda s: None, timeout=0.2)(
            torch.rand(3, 3, 8, 8), ["a", "b", "c"])
        assert stuck.calls == 2 and torch.isfinite(out.scores).all()
        assert "RewardTimeout" in messages[0] and "0.2 s" in messages[0]

        one_row = Hangs(hang_calls=(), hang_on="b")
        wrapped = Retrying(one_row, retries=0, wait=0, warn=messages.append, sleep=lambda s: None, timeout=0.2)
        out = wrapped(torch.rand(3, 3, 8, 8), ["a", "b", "c"])
        assert torch.isnan(out.scores).tolist() == [False, True, False] and wrapped.failed_rows == 1
    finally:
        release.set()
    # the config key reaches the trainer's wrapper
    trainer = Trainer(config(str(tmp_path / "run"), "train.reward_timeout=2.5"))
    assert trainer.reward.timeout == 2.5


def test_all_nan_rewards_stop_the_run(config, tmp_path):
    class AllNaN:
        name, differentiable = "nan", False

        def __call__(self, outputs, conditions):
            return RewardOutput(scores=torch.full((len(conditions),), float("nan")))

    trainer = Trainer(config(str(tmp_path / "run")))
    trainer.reward = WeightedSum([AllNaN()], [1.0])
    with pytest.raises(NonFiniteRewardError, match="4 of 4 rewards"):
        trainer.train()
    assert not os.path.exists(tmp_path / "run" / "final")


def test_on_policy_probe_passes_and_catches_an_unbound_adapter(config, tmp_path):
    history = train(config(str(tmp_path / "ok"), "train.epochs=2"))
    assert all(0 <= r["probe_logprob_diff"] <= 1e-5 for r in history)

    # a sampler that runs without the trained adapter (a LoRA not bound to the rollout engine)
    trainer = Trainer(config(str(tmp_path / "bad"), "train.epochs=2"))
    rollout = trainer.policy.rollout

    def unbound(*args, **kwargs):
        with trainer.policy.reference():
            return rollout(*args, **kwargs)

    trainer.policy.rollout = unbound
    with pytest.raises(OnPolicyMismatchError, match="probe"):
        trainer.train()
    assert epochs_logged(str(tmp_path / "bad")) == [1], "epoch 1 (adapter still zero) passes, epoch 2 stops"


def test_ctrl_c_checkpoints_at_the_end_of_the_epoch(config, tmp_path):
    out = str(tmp_path / "run")
    trainer = Trainer(config(out, "train.epochs=3", "train.checkpoint_every=0"))
    epoch = trainer._epoch

    def interrupted(e):
        if e == 0:
            os.kill(os.getpid(), signal.SIGINT)  # arrives mid-epoch
        return epoch(e)

    trainer._epoch = interrupted
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted, match="--resume"):
        trainer.train()
    assert checkpoint.latest_checkpoint(os.path.join(out, "checkpoints")).endswith("epoch_00001")
    assert epochs_logged(out) == [1]
    assert signal.getsignal(signal.SIGINT) is handler, "the handler is restored"
    history = train(config(out, "train.epochs=3", "train.checkpoint_every=0"), resume=True)
    assert [r["epoch"] for r in history] == [1, 2, 3]


def test_cli_prints_one_line_for_any_error(tiny_sd_dir, tmp_path, capsys, monkeypatch):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({
        "policy": {"type": "stable_diffusion", "pretrained": str(tiny_sd_dir), "num_steps": 2},
        "prompts": {"source": "list", "prompts": ["a red circle"]}, "output_dir": str(tmp_path / "run"),
    }))

    def boom(*args, **kwargs):
        raise RuntimeError("LoRA rank 8 does not match the checkpoint's 4")

    monkeypatch.setattr("genalign.trainer.train", boom)
    assert main(["train", str(cfg)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("genalign: RuntimeError: LoRA rank 8 does not match the checkpoint's 4 "
                   "(run with --debug for the traceback)")
    with pytest.raises(RuntimeError):
        main(["--debug", "train", str(cfg)])
    assert main(["train", str(cfg), "train.learning_rate=-1"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_rollouts_do_not_depend_on_how_they_are_batched(config, tmp_path):
    """The same epoch sampled 1, 2 or 4 prompts per rollout call gives the same samples, rewards
    and update, with and without a noise window."""
    for window in ("algorithm.noise_window=0", "algorithm.noise_window=1"):
        runs = []
        for batch in (2, 4, 8):
            runs.append(train(config(
                str(tmp_path / f"{window[-1]}-{batch}"), window, "algorithm.shared_noise=true",
                "algorithm.timestep_fraction=1.0", "train.prompts_per_epoch=4", f"train.rollout_batch_size={batch}",
                "eval.enabled=false",
            ))[0])
        for other in runs[1:]:
            for key in ("reward_mean", "reward_std", "loss"):
                assert other[key] == pytest.approx(runs[0][key], rel=1e-4, abs=1e-6), (window, key)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux (prctl, /proc)")
def test_workers_die_with_a_killed_launcher(tmp_path):
    """A worker (grandchild) that called die_with_parent stops when its launcher (child) is killed."""
    import subprocess
    import sys
    import time

    pid_file = tmp_path / "worker.pid"
    worker = (f"import os, time; from genalign.trainer import die_with_parent; assert die_with_parent(); "
              f"open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)")
    launcher = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {worker!r}]); time.sleep(120)"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-c", launcher], env={**os.environ, "PYTHONPATH": root})
    deadline = time.monotonic() + 120
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline, "the worker never started"
        time.sleep(0.2)
    pid = int(pid_file.read_text())
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for _ in range(100):
        try:
            with open(f"/proc/{pid}/status") as f:
                state = next(line for line in f if line.startswith("State:"))
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            return  # gone
        if "Z" in state.split()[1]:
            return  # dead, waiting to be reaped by whoever adopted it
        time.sleep(0.1)
    pytest.fail("the worker outlived its killed launcher")
