"""Where a run's time goes: the phase clock's accounting, and every run's per-phase seconds."""

import json

import pytest

from genalign import timing
from genalign.trainer import train


class FakeTime:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_nested_phases_are_charged_their_own_time(monkeypatch):
    clock, now = timing.PhaseClock(), FakeTime()
    monkeypatch.setattr(timing.time, "perf_counter", now)
    with clock.phase("rollout"):
        now.now += 2.0
        with clock.phase("decode"):
            now.now += 3.0
        now.now += 1.0
    with clock.phase("evaluation", whole=True):
        now.now += 4.0
        with clock.phase("decode"):  # inside a whole phase: charged to the evaluation
            now.now += 5.0
    seconds = clock.take()
    assert seconds["rollout"] == 3.0 and seconds["decode"] == 3.0 and seconds["evaluation"] == 9.0
    assert set(timing.PHASES) <= set(seconds) and seconds["train"] == 0.0
    assert sum(seconds.values()) == now.now, "the phases add up to the wall time"
    assert clock.take()["rollout"] == 0.0, "take starts afresh"
    with pytest.raises(RuntimeError), clock.phase("reward"):  # a phase that raises still counts
        now.now += 1.5
        raise RuntimeError("reward server down")
    assert clock.take()["reward"] == 1.5


def test_every_row_logs_its_phases_and_the_report_draws_them(sd_run_config, tmp_path):
    out = tmp_path / "run"
    history = train(sd_run_config(str(out), "train.epochs=2", "train.checkpoint_every=1", "report.num_prompts=2", "report.seeds=[0]"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows == history
    for row in rows:
        for name in ("rollout", "decode", "reward", "train", "probe"):
            assert row[f"time/{name}"] > 0, name
        working = sum(row[f"time/{name}"] for name in timing.TRAINING_PHASES)
        assert row["samples_per_second"] == pytest.approx(4 / working)  # 2 prompts x 2 samples an epoch
    # row 1 holds the evaluation before training, row 2 the one after it
    assert rows[0]["time/evaluation"] > 0 and rows[1]["time/evaluation"] > 0
    # a checkpoint's write counts in the next row: none before row 1, epoch 1's in row 2
    assert rows[0]["time/checkpoint"] == 0 and rows[1]["time/checkpoint"] > 0
    assert rows[1]["train_seconds"] == pytest.approx(
        sum(r[f"time/{n}"] for r in rows for n in timing.TRAINING_PHASES))
    # the phases of row 2 happened between the two rows' wall clocks
    assert sum(v for k, v in rows[1].items() if k.startswith("time/")) <= rows[1]["wall_seconds"] - rows[0]["wall_seconds"] + 1e-6
    assert (out / "time_split.png").is_file() and "time_split.png" in (out / "report.html").read_text()
