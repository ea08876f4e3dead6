"""Labelling rounds: the store's queue, answers, undo, averaging and agreement; concurrent
annotators; and the whole loop on the tiny pipeline: sample a round, label it by a scripted
annotator, train D3PO on the labels, sample the next round from the updated policy."""

import json
import os
import sqlite3
import threading

import pytest
import torch
from safetensors.torch import load_file

from genalign import labelling
from genalign.algorithms.preferences import LabelledSampleMismatch
from genalign.configs import ConfigError
from genalign.preference_store import (
    Comparison,
    PreferenceStore,
    Sample,
    UnknownComparisonError,
    sample_digests,
)
from rewards.registry import build_reward


def fake_round(path, prompts=("a red circle", "a blue square"), k=3, store=None):
    """A round of ``k`` text samples per prompt and all their pairs, without a model."""
    store = store or PreferenceStore(str(path), create=True)
    samples, pairs = [], []
    for p, prompt in enumerate(prompts):
        ids = [f"s0-e1-r{p * k + j}" for j in range(k)]
        samples += [Sample(i, 0, prompt, prompt, "text", sample_digests([i])[0], text=f"answer {i}") for i in ids]
        pairs += [(prompt, a, b) for x, a in enumerate(ids) for b in ids[x + 1 :]]
    store.add_round(1, samples, pairs)
    return store


def test_queue_answers_progress_and_undo(tmp_path):
    store = fake_round(tmp_path / "labels.sqlite")
    assert store.progress("ann") == (0, 6)
    q1 = store.next_comparison("ann")
    assert (q1["sample_a"], q1["sample_b"]) == ("s0-e1-r0", "s0-e1-r1")
    assert store.record(q1["id"], "ann", "b") is True
    assert store.record(q1["id"], "ann", "a") is False, "a repeated answer writes nothing"
    q2 = store.next_comparison("ann")
    store.record(q2["id"], "ann", "skip")
    assert store.progress("ann") == (2, 6)
    assert store.label("a red circle", "s0-e1-r1", "s0-e1-r0") == 1
    assert store.label("a red circle", "s0-e1-r0", "s0-e1-r2") is None, "a skip is no label"
    assert store.undo("ann") == {"id": q2["id"], "action": "skip"}
    assert store.next_comparison("ann")["id"] == q2["id"], "the undone comparison comes back"
    assert store.undo("ann") == {"id": q1["id"], "action": "b"}
    assert store.label("a red circle", "s0-e1-r0", "s0-e1-r1") is None, "undo removes the label"
    assert len(store) == 0 and store.undo("ann") is None
    with pytest.raises(UnknownComparisonError):
        store.record(999, "ann", "a")
    with pytest.raises(ValueError, match="answer"):
        store.record(q1["id"], "ann", "left")
    assert store.next_comparison("other")["id"] == q1["id"], "each annotator has their own queue"


def test_labels_average_over_annotators_and_agreement(tmp_path):
    store = fake_round(tmp_path / "labels.sqlite", prompts=("a red circle",), k=3)
    q = [store.comparison(i) for i in range(1, 4)]  # (r0, r1), (r0, r2), (r1, r2)
    answers = {"ann": ["a", "a", "tie"], "bob": ["a", "b", "tie"], "cat": ["b", "b", "tie"]}
    for who, acts in answers.items():
        for c, act in zip(q, acts):
            store.record(c["id"], who, act)
    assert store.label("a red circle", "s0-e1-r0", "s0-e1-r1") == 1  # 2 of 3 prefer a
    assert store.label("a red circle", "s0-e1-r0", "s0-e1-r2") == -1
    assert store.label("a red circle", "s0-e1-r1", "s0-e1-r2") == 0  # everyone: tie
    store.add([Comparison("a red circle", "s0-e1-r1", "s0-e1-r0", "b", "bob")])  # bob changes his mind (reversed order)
    assert store.label("a red circle", "s0-e1-r0", "s0-e1-r1") == 1, "bob's latest vote still prefers r0"
    store.add([Comparison("a red circle", "s0-e1-r1", "s0-e1-r0", "a", "bob")])
    assert store.label("a red circle", "s0-e1-r0", "s0-e1-r1") == -1, "now 1 for r0, 2 for r1"
    # Items: votes (+1, -1, -1) agree on 1 of 3 annotator pairs, (+1, -1, -1) 1 of 3, (0, 0, 0) 3 of 3.
    ag = store.agreement()
    assert ag["items"] == 3 and ag["agreement"] == pytest.approx((1 / 3 + 1 / 3 + 1) / 3)
    # Fleiss: category shares a: 2/9, b: 4/9, tie: 3/9 -> P_e = 29/81; kappa = (5/9 - 29/81) / (1 - 29/81)
    assert ag["fleiss_kappa"] == pytest.approx((5 / 9 - 29 / 81) / (1 - 29 / 81))
    assert store.annotators() == {"ann": 3, "bob": 5, "cat": 3}


def test_export_writes_decided_pairs(tmp_path):
    store = fake_round(tmp_path / "labels.sqlite", prompts=("a red circle",), k=3)
    store.record(1, "ann", "b")
    store.record(2, "ann", "tie")
    store.close()
    n = labelling.export(str(tmp_path), str(tmp_path / "out" / "prefs.jsonl"))
    rows = [json.loads(line) for line in open(tmp_path / "out" / "prefs.jsonl")]
    assert n == 1 and len(rows) == 1
    assert rows[0]["prompt"] == "a red circle"
    assert (rows[0]["chosen"], rows[0]["rejected"]) == ("answer s0-e1-r1", "answer s0-e1-r0")
    assert rows[0]["votes"] == {"b": 1} and rows[0]["round"] == 1


def test_a_store_from_before_rounds_is_upgraded(tmp_path):
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as c:
        c.execute("CREATE TABLE comparisons (id INTEGER PRIMARY KEY, prompt TEXT NOT NULL, sample_a TEXT NOT NULL, "
                  "sample_b TEXT NOT NULL, chosen TEXT NOT NULL, annotator TEXT NOT NULL, time TEXT NOT NULL)")
        c.execute("INSERT INTO comparisons VALUES (1, 'p', 'x', 'y', 'a', 'ann', '2026-01-01T00:00:00+00:00')")
    store = PreferenceStore(str(path))
    assert store.label("p", "x", "y") == 1
    fake_round(path, store=store)
    store.record(1, "ann", "a")
    assert len(store) == 2
    (tmp_path / "junk.sqlite").write_text("not a database " * 100)
    with pytest.raises(ValueError, match="not a preference store"):
        PreferenceStore(str(tmp_path / "junk.sqlite"))


def test_concurrent_annotators_never_lose_a_label(tmp_path):
    """Eight annotators answer all pairs at once, each through their own connection, and two
    connections of one annotator race on every pair: every label lands exactly once."""
    path = tmp_path / "labels.sqlite"
    fake_round(path, prompts=[f"prompt {i}" for i in range(4)], k=4).close()  # 24 pairs
    errors = []

    def annotate(name):
        try:
            store = PreferenceStore(str(path))
            while (q := store.next_comparison(name)) is not None:
                store.record(q["id"], name, "a" if q["id"] % 2 else "b")
            store.close()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=annotate, args=(f"ann{i}",)) for i in range(8)]
    threads += [threading.Thread(target=annotate, args=("twice",)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    store = PreferenceStore(str(path))
    assert len(store) == 9 * 24
    assert store.annotators() == {**{f"ann{i}": 24 for i in range(8)}, "twice": 24}
    assert store.agreement()["agreement"] == 1.0


# -- the loop on the tiny pipeline -------------------------------------------------------------


@pytest.fixture
def label_config(sd_run_config, tmp_path):
    def build(*extra):
        return sd_run_config(
            str(tmp_path / "run"), "algorithm.name=d3po", "algorithm.preference=store",
            f"algorithm.store_path={tmp_path / 'labels' / 'labels.sqlite'}", "train.samples_per_prompt=3",
            "train.rollout_batch_size=6", "train.train_batch_size=3", "eval.enabled=false", "report.enabled=false",
            "policy.eta=1.0", *extra,
        )

    return build


def test_round_samples_the_epoch_the_trainer_trains(label_config, tmp_path):
    config = label_config()
    root = str(tmp_path / "labels")
    r1 = labelling.new_round(config)
    assert (r1.round, r1.epoch, r1.samples, r1.comparisons) == (1, 1, 6, 6)
    assert sorted(os.listdir(r1.folder)) == sorted(f"s0-e1-r{i}.png" for i in range(6))
    with pytest.raises(FileExistsError, match="not trained yet"):
        labelling.new_round(config)
    with pytest.raises(ValueError, match="no labels yet"):
        labelling.train_round(config)

    reward = build_reward(config.reward.components)
    assert labelling.label_with_reward(root, reward, "script") == 6
    history = labelling.train_round(config)
    # The trainer regenerated the labelled samples (their digests are checked) and read every label.
    assert history[-1]["epoch"] == 1 and history[-1]["pairs"] + history[-1]["unlabelled_pairs"] == 6
    decided = sum(bool(q["label"]) for q in PreferenceStore(os.path.join(root, "labels.sqlite")).queued_labels())
    assert history[-1]["pairs"] == decided > 0
    with pytest.raises(FileExistsError, match="already trained"):
        labelling.train_round(config)

    r2 = labelling.new_round(config)  # from the checkpoint of epoch 1
    assert (r2.round, r2.epoch) == (2, 2)
    labelling.label_with_reward(root, reward, "script")
    before = load_file(os.path.join(config.output_dir, "final", "pytorch_lora_weights.safetensors"))
    assert labelling.train_round(config)[-1]["epoch"] == 2
    after = load_file(os.path.join(config.output_dir, "final", "pytorch_lora_weights.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before), "round 2's labels trained"
    assert [r["round"] for r in labelling.status(root)] == [1, 2]


def test_training_refuses_samples_other_than_the_labelled_ones(label_config, tmp_path):
    config = label_config()
    root = str(tmp_path / "labels")
    labelling.new_round(config)
    labelling.label_with_reward(root, build_reward(config.reward.components), "script")
    with sqlite3.connect(os.path.join(root, "labels.sqlite")) as c:  # as if the base model changed since
        c.execute("UPDATE samples SET digest = 'other' WHERE id = 's0-e1-r1'")
    with pytest.raises(LabelledSampleMismatch, match="s0-e1-r1 differs"):
        labelling.train_round(config)


def test_round_config_errors(label_config, tmp_path):
    with pytest.raises(ConfigError, match="preference: store"):
        labelling.new_round(label_config("algorithm.preference=reward"))
    with pytest.raises(ConfigError, match="--out"):
        labelling.new_round(label_config(), out=str(tmp_path / "elsewhere"))
    with pytest.raises(ConfigError, match="labels.sqlite"):
        labelling.new_round(label_config(f"algorithm.store_path={tmp_path / 'prefs.db'}"))
    with pytest.raises(FileNotFoundError, match="label new"):
        labelling.train_round(label_config())


def token_round_config(tmp_path, *overrides):
    """A D3PO store config on a shipped token policy (tiny-lm or tiny-vlm), 2 prompts an epoch."""
    from genalign.configs import load_config
    from genalign.train_config import TrainConfig

    return load_config(TrainConfig, None, [
        "policy.max_new_tokens=4", "algorithm.name=d3po", "algorithm.preference=store",
        f"algorithm.store_path={tmp_path / 'labels' / 'labels.sqlite'}", "reward.components=[{type: rule, rule: exact}]",
        "train.prompts_per_epoch=2", "eval.enabled=false", "report.enabled=false", f"output_dir={tmp_path / 'run'}",
        *overrides,
    ])


def test_a_text_round_queues_texts_and_trains(tmp_path):
    """The same loop on the tiny LM: samples are texts stored in the store, the scripted
    annotator scores them against each condition's stored answer, and D3PO trains on them."""
    from genalign import label_server

    root = tmp_path / "labels"
    config = token_round_config(
        tmp_path, "policy.type=text_lm", "policy.pretrained=assets/models/tiny-lm", "prompts.source=shapes_qa",
        "prompts.tiers=[1]", "train.samples_per_prompt=4", "train.rollout_batch_size=8", "train.train_batch_size=4",
    )
    r = labelling.new_round(config)
    assert (r.samples, r.comparisons) == (8, 12) and os.listdir(r.folder) == []
    store = PreferenceStore(str(root / "labels.sqlite"))
    samples = store.samples()
    assert all(s.kind == "text" and s.text is not None for s in samples.values())
    assert all("answer" in json.loads(s.condition) for s in samples.values()), "the condition's answer is kept"
    server = label_server.LabelServer(str(root), port=0)
    try:
        shown = server.state("ann")["comparison"]["left"]
    finally:
        server.server_close()
    assert shown["kind"] == "text" and shown["text"] in {s.text for s in samples.values()}
    labelling.label_with_reward(str(root), build_reward(config.reward.components), "script")
    queued = store.queued_labels()
    history = labelling.train_round(config)
    assert history[-1]["pairs"] == sum(bool(q["label"]) for q in queued) > 0
    assert history[-1]["pairs"] + history[-1]["unlabelled_pairs"] == 12


def test_a_vlm_round_keeps_the_question_image(tmp_path):
    config = token_round_config(
        tmp_path, "policy.type=vlm", "policy.pretrained=assets/models/tiny-vlm", "prompts.source=shapes_vqa",
        "prompts.formats=[open]", "prompts.qtypes=[colour]", "train.samples_per_prompt=2",
        "train.rollout_batch_size=4", "train.train_batch_size=2",
    )
    r = labelling.new_round(config)
    assert sorted(os.listdir(r.folder)) == ["prompt-0.png", "prompt-1.png"]
    samples = PreferenceStore(str(tmp_path / "labels" / "labels.sqlite")).samples().values()
    assert {s.condition_file for s in samples} == {"round-001/prompt-0.png", "round-001/prompt-1.png"}
    assert all(s.kind == "text" for s in samples)


def test_label_commands(tmp_path, capsys):
    from genalign.cli import main

    store = fake_round(tmp_path / "labels.sqlite")
    store.record(1, "ann", "a")
    store.record(1, "bob", "b")
    store.record(2, "ann", "a")
    store.close()
    assert main(["label", "status", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:4] == ["round", "epoch", "pairs", "labelled"]
    # round 1: 6 pairs, 2 labelled, 1 decided (ann and bob cancel), agreement 0 over 1 item
    assert out[1].split()[:7] == ["1", "1", "6", "2", "1", "0.00", "-1.00"]
    assert main(["label", "export", str(tmp_path), "--out", str(tmp_path / "p.jsonl")]) == 0
    assert "1 preference pairs" in capsys.readouterr().out
    assert main(["label", "status", str(tmp_path / "nowhere")]) == 2
    assert "no labelling rounds" in capsys.readouterr().err


def test_training_on_labels_moves_the_policy_towards_the_chosen_samples(label_config, tmp_path):
    """After a round is trained, the labelled winners gained log-probability against their
    losers: Σ over the chain of log π_new − log π_old, winner minus loser, is positive on
    average over the decided pairs. Reversed labels (a sign slip anywhere between the page and
    the loss) would make it negative."""
    from genalign.algorithms.advantages import active_steps
    from genalign.trainer import Trainer

    config = label_config("train.learning_rate=3e-3")
    root = str(tmp_path / "labels")
    labelling.new_round(config)
    labelling.label_with_reward(root, build_reward(config.reward.components), "script")
    labelling.train_round(config)
    store = PreferenceStore(os.path.join(root, "labels.sqlite"))
    decided = [q for q in store.queued_labels() if q["label"]]
    assert decided

    trainer = Trainer(config)  # the base weights: regenerate the round's rollouts
    trajs = {i: t for _, ids, t, _, _ in trainer.epoch_rollouts(0, trainer.epoch_plan(0)) for i in [tuple(ids)]}
    (ids, traj), = trajs.items()
    steps = active_steps(traj.mask)
    old = traj.log_probs.gather(1, steps)
    trainer.load_checkpoint(os.path.join(config.output_dir, "checkpoints", "epoch_00001"))
    with torch.no_grad():
        new = trainer.policy.log_prob(traj, steps)
    gain = (new - old).sum(1)  # [B]
    row = {sample_id: i for i, sample_id in enumerate(ids)}
    margins = []
    for q in decided:
        w, lo = (q["sample_a"], q["sample_b"]) if q["label"] > 0 else (q["sample_b"], q["sample_a"])
        margins.append(float(gain[row[w]] - gain[row[lo]]))
    assert sum(margins) / len(margins) > 0, margins
