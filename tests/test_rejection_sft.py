"""Rejection-sampling fine-tuning: threshold selection, the SFT loss on hand-written tensors, and
one training epoch whose loss is the teacher-forced NLL of exactly the accepted outputs."""

import math

import pytest
import torch
import yaml

from genalign.algorithms.base import Algorithm
from genalign.algorithms.rejection_sft import RejectionSFT, RejectionSFTConfig
from genalign.configs import load_config
from genalign.policies.text_lm import TextLMPolicy
from genalign.train_config import TrainConfig
from genalign.trainer import Trainer
from genalign.trajectory import Trajectory

NAN = float("nan")


def test_is_an_algorithm_that_trains_on_forward_process_data():
    algo = RejectionSFT()
    assert isinstance(algo, Algorithm) and not algo.needs_reference and RejectionSFTConfig().requires() == frozenset()
    plan = algo.plan(0, 0, torch.Generator())
    assert plan.kind == "rollouts" and plan.teacher_forced
    with pytest.raises(ValueError, match="no off-policy targets"):
        algo.targets(["a"], [0], None, None)


def test_keeps_every_sample_at_or_above_the_threshold():
    """min_reward 2: rows 0 (2.0) and 3 (2.5) are kept; 1.99, 1.0 and NaN are not, whatever their group."""
    rewards = torch.tensor([2.0, 1.0, NAN, 2.5, 1.99])
    algo = RejectionSFT(RejectionSFTConfig(min_reward=2.0))
    adv = algo.advantages(rewards, ["a"] * 5, torch.tensor([0, 0, 0, 0, 1]))
    assert [i for i, a in enumerate(adv.tolist()) if not math.isnan(a)] == [0, 3] and adv[[0, 3]].tolist() == [1.0, 1.0]
    assert algo.epoch_metrics() == {"accept_rate": 0.4}


def test_sft_loss_is_the_token_mean_nll_of_kept_active_steps():
    """Row 0 kept, 3 active steps with log π = −1, −2, −0.5; row 1 kept, 1 active step (−3, then
    padding); row 2 not kept (advantage 0 after the trainer's NaN → 0). Loss = (1 + 2 + 0.5 + 3) / 4
    = 1.625 exactly (binary fractions); ∂L/∂log π = −1/4 on the 4 kept active entries."""
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 1]]).bool()
    b = Trajectory(
        conditions=["a", "a", "b"], group=torch.tensor([0, 0, 1]), log_probs=torch.zeros(3, 3), mask=mask,
        step_ids=torch.arange(3).expand(3, 3).clone(), advantages=torch.tensor([1.0, 1.0, 0.0]), aligned=False,
    )
    new = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -9.0, -9.0], [-4.0, -4.0, -4.0]], requires_grad=True)
    algo = RejectionSFT()
    steps = algo.train_steps(b, torch.Generator())
    assert steps.tolist() == [[0, 1, 2]] * 3
    terms = algo.loss(b.subset(steps), new, None)
    assert (terms.total.item(), terms.normaliser, terms.counts) == (6.5, 4.0, {"kept": 2.0})
    assert terms.mean.item() == 1.625 and terms.metric("nll") == 1.625
    terms.mean.backward()
    assert new.grad.tolist() == [[-0.25, -0.25, -0.25], [-0.25, 0.0, 0.0], [0.0, 0.0, 0.0]]
    parts = [algo.loss(b.subset(torch.tensor(c)), new.detach()[:, c], None) for c in ([0], [1, 2])]
    assert sum(p.total.item() for p in parts) == 6.5 and sum(p.normaliser for p in parts) == 4.0


def test_step_window_trains_only_the_chain_steps_inside_it():
    """A 10-step chain with step_window [0, 0.4]: every row trains steps 0-3 (i / 10 < 0.4), and
    the loss over that subset is the NLL of those steps only; a bad window is named."""
    t = torch.arange(10, dtype=torch.float32)
    b = Trajectory(conditions=["a", "b"], group=torch.tensor([0, 1]), log_probs=torch.zeros(2, 10),
                   mask=torch.ones(2, 10, dtype=torch.bool), step_ids=torch.arange(10).expand(2, 10).clone(),
                   advantages=torch.tensor([1.0, 0.0]), aligned=False)
    algo = RejectionSFT(RejectionSFTConfig(step_window=[0.0, 0.4]))
    steps = algo.train_steps(b, torch.Generator())
    assert steps.tolist() == [[0, 1, 2, 3]] * 2
    terms = algo.loss(b.subset(steps), -t[:4].expand(2, 4), None)  # log π = −step index
    assert (terms.total.item(), terms.normaliser) == (6.0, 4.0)  # 0 + 1 + 2 + 3 over row 0's 4 steps
    for bad in ([0.5, 0.5], [0.0, 1.5], [0.2]):
        with pytest.raises(ValueError, match="'step_window'"):
            RejectionSFTConfig(step_window=bad).validate()


CONDITIONS = [{"prompt": f"w{i:02d} w{i + 1:02d}", "answer": "w00", "key": f"q{i}"} for i in range(4)]


def test_an_epoch_trains_on_the_accepted_outputs_teacher_forced(tiny_lm_dir, tmp_path, monkeypatch):
    path = tmp_path / "rs.yaml"
    path.write_text(yaml.safe_dump({
        "policy": {"type": "text_lm", "pretrained": tiny_lm_dir, "max_new_tokens": 3},
        "prompts": {"source": "list", "prompts": CONDITIONS},
        # random tiny-LM responses begin with a w0* word now and then: those are accepted
        "reward": {"components": [{"type": "rule", "rule": "format", "format_pattern": "w0.*"}]},
        "algorithm": {"name": "rejection_sft", "min_reward": 1.0},
        "train": {"epochs": 1, "prompts_per_epoch": 4, "samples_per_prompt": 4, "rollout_batch_size": 16,
                  "train_batch_size": 16, "learning_rate": 1e-2},
        "report": {"enabled": False}, "eval": {"enabled": False}, "output_dir": str(tmp_path / "run"),
    }))
    config = load_config(TrainConfig, str(path))
    trainer = Trainer(config)
    rolled, encoded = [], []
    rollout, forward = trainer.policy.rollout, trainer.policy.forward_process

    def spy_rollout(*args, **kwargs):
        rolled.append(rollout(*args, **kwargs))
        return rolled[-1]

    def spy_forward(conditions, outputs, seeds=None):
        encoded.append((list(conditions), list(outputs), forward(conditions, outputs, seeds)))
        return encoded[-1][2]

    monkeypatch.setattr(trainer.policy, "rollout", spy_rollout)
    monkeypatch.setattr(trainer.policy, "forward_process", spy_forward)
    (epoch,) = trainer.train()

    outputs = [o for t in rolled for o in t.outputs]
    conditions = [c for t in rolled for c in t.conditions]
    accepted = [i for i, o in enumerate(outputs) if o.startswith("w0")]
    assert 0 < len(accepted) < len(outputs)
    assert len(encoded) == 1  # one call, with exactly the accepted outputs, in row order
    assert encoded[0][0] == [conditions[i] for i in accepted] and encoded[0][1] == [outputs[i] for i in accepted]
    assert epoch["kept"] == len(accepted) and epoch["accept_rate"] == len(accepted) / len(outputs)
    # the loss: the token-mean NLL of the accepted texts (+ EOS) under the initial policy (LoRA B = 0:
    # the pretrained model), recomputed here with a fresh policy; float32 sums of a few dozen terms
    fresh = TextLMPolicy.from_pretrained(tiny_lm_dir, config.policy)
    data = fresh.forward_process(encoded[0][0], encoded[0][1])
    assert int(data.mask.sum()) == sum(len(o.split()) + 1 for o in encoded[0][1])  # word-level tokens + EOS
    with torch.no_grad():
        lp = fresh.log_prob(data, torch.arange(data.num_steps).expand(data.batch_size, -1))
    nll = float(-lp[data.mask].sum() / data.mask.sum())
    assert epoch["loss"] == pytest.approx(nll, rel=1e-5)
    assert epoch["optimizer_steps"] == 1.0
