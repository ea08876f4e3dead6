"""The reward-hacking alarm: moving averages, when it fires and when not, and in a run: it
warns or stops, and best_monitor/ keeps the monitor's best policy."""

import json
import os

import pytest
import torch

from genalign import monitoring
from genalign.trainer import Trainer
from rewards.base import RewardOutput
from rewards.compose import WeightedSum


def test_moving_average_and_best_epoch():
    assert monitoring.moving_average([1, 2, 3, 4], 2) == [1.5, 2.5, 3.5]
    assert monitoring.moving_average([1, 2], 3) == []
    assert monitoring.best_epoch([0.1, 0.5, 0.5, 0.2], 1) == 2, "the earliest of equal bests"
    assert monitoring.best_epoch([0.1, 0.5, 0.4, 0.6], 2) == 4


def test_alarm_fires_only_on_divergence():
    rising = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    falling = [0.5, 0.5, 0.5, 0.4, 0.3, 0.2]
    alarm = monitoring.check(rising, falling, window=2, margin=0.1)
    assert alarm is not None and alarm.best_epoch == 2 and alarm.epoch == 6
    assert alarm.monitor_best == pytest.approx(0.5) and alarm.monitor_now == pytest.approx(0.25)
    assert "epoch 6" in alarm.message(0.1)
    assert monitoring.check(rising, falling, window=2, margin=0.3) is None, "a drop within the margin"
    assert monitoring.check(rising[::-1], falling, window=2, margin=0.1) is None, "both fall: the policy got worse, not hacked"
    assert monitoring.check(rising, rising, window=2, margin=0.0) is None, "both rise"
    # the drop is measured from the best moving average, not the first epoch
    assert monitoring.check([0, 1, 2, 3, 4], [0.0, 0.9, 0.9, 0.7, 0.7], window=1, margin=0.1) is not None
    assert monitoring.check([0, 1, 2, 3, 4], [0.0, 0.9, 0.9, 0.85, 0.85], window=1, margin=0.1) is None
    with pytest.raises(ValueError):
        monitoring.check([1.0], [1.0, 2.0], 1, 0.1)


class _Countdown:
    """A monitor that falls by 0.1 every epoch (4 rows per epoch) after two steady epochs."""

    name, differentiable = "countdown", False

    def __init__(self):
        self.rows = 0

    def __call__(self, outputs, conditions):
        epoch = self.rows // 4
        self.rows += len(conditions)
        return RewardOutput(scores=torch.full((len(conditions),), 1.0 - 0.1 * max(0, epoch - 1)))


class _Rising:
    name, differentiable = "rising", False

    def __init__(self):
        self.rows = 0

    def __call__(self, outputs, conditions):
        epoch = self.rows // 4
        self.rows += len(conditions)
        return RewardOutput(scores=torch.full((len(conditions),), 0.1 * epoch) + outputs.mean(dim=(1, 2, 3)) * 1e-3)


@pytest.mark.parametrize("action", ["warn", "stop"])
def test_alarm_in_a_run(sd_run_config, tmp_path, action):
    out = tmp_path / action
    trainer = Trainer(sd_run_config(str(out), "report.enabled=false", "train.epochs=6", "reward.monitor=[{type: jpeg_compressibility}]",
                             "reward.alarm_margin=0.15", "reward.alarm_window=1", f"reward.alarm_action={action}",
                             "eval.enabled=false"))
    trainer.reward = WeightedSum([_Rising()], [1.0])
    trainer.monitor = WeightedSum([_Countdown()], [1.0])
    history = trainer.train()
    # monitor per epoch: 1.0, 1.0, 0.9, 0.8, 0.7, 0.6 -> more than 0.15 below the best from epoch 4
    assert [round(h["monitor_mean"], 4) for h in history][:4] == [1.0, 1.0, 0.9, 0.8]
    assert [h.get("hacking_alarm", 0) for h in history] == ([0, 0, 0, 1] if action == "stop" else [0, 0, 0, 1, 1, 1])
    assert json.loads((out / "best_monitor.json").read_text())["epoch"] == 1
    assert os.path.isfile(out / "best_monitor" / "pytorch_lora_weights.safetensors")
    assert os.path.isdir(out / "final")
