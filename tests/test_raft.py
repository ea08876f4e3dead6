"""RAFT selection and its likelihood loss on hand-written tensors."""

import math

import pytest
import torch

from genalign.algorithms.base import Algorithm
from genalign.algorithms.raft import RAFT, RAFTConfig
from genalign.trajectory import Trajectory

NAN = float("nan")


def kept(adv):
    return [i for i, a in enumerate(adv.tolist()) if not math.isnan(a)]


def test_is_an_algorithm():
    assert isinstance(RAFT(), Algorithm)


def test_group_best_ties_and_nan():
    """Group 0 = {1, 3, 3, NaN}: the best is 3, first at row 1 (row 2 ties and loses). Group 1 =
    {2, 0}: row 4. Group 2 is all NaN: nothing kept. Kept rows get 1.0, the rest NaN."""
    rewards = torch.tensor([1.0, 3.0, 3.0, NAN, 2.0, 0.0, NAN, NAN])
    group = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    adv = RAFT().advantages(rewards, ["a"] * 8, group)
    assert kept(adv) == [1, 4] and adv[[1, 4]].tolist() == [1.0, 1.0]
    # min_reward 2.5: group 1's best (2) does not reach it
    assert kept(RAFT(RAFTConfig(min_reward=2.5)).advantages(rewards, ["a"] * 8, group)) == [1]


def test_top_fraction_over_the_batch():
    """7 finite rewards; keep_fraction 0.25 -> ceil(1.75) = 2: the two 0.9s (rows 1, 4);
    0.5 -> ceil(3.5) = 4: adds 0.7 (row 6) and 0.5 (row 2). Groups play no part. With
    keep_fraction 1 every finite row is kept, the NaN never; min_reward 0.6 cuts 0.5."""
    rewards = torch.tensor([0.1, 0.9, 0.5, NAN, 0.9, 0.3, 0.7, 0.2])
    group = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])

    def top(**kw):
        return kept(RAFT(RAFTConfig(select="top_fraction", **kw)).advantages(rewards, ["a"] * 8, group))

    assert top(keep_fraction=0.25) == [1, 4]
    assert top(keep_fraction=0.5) == [1, 2, 4, 6]
    assert top(keep_fraction=1.0) == [0, 1, 2, 4, 5, 6, 7]
    assert top(keep_fraction=0.5, min_reward=0.6) == [1, 4, 6]
    with pytest.raises(ValueError, match="keep_fraction"):
        RAFTConfig(keep_fraction=0.0).validate()


def test_loss_is_mean_nll_over_kept_active_steps():
    """Row 0 kept (advantage 1), 3 active steps, log π = −1, −2, −0.5; row 1 kept, 1 active step
    (then padding), log π = −3; row 2 not kept (the trainer zeroes a NaN advantage). Loss =
    (1 + 2 + 0.5 + 3) / 4 = 1.625; ∂L/∂log π = −1/4 on the 4 kept active entries, 0 elsewhere."""
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 1]]).bool()
    b = Trajectory(
        conditions=["a", "a", "b"], group=torch.tensor([0, 0, 1]), log_probs=torch.zeros(3, 3), mask=mask,
        step_ids=torch.arange(3).expand(3, 3).clone(), advantages=torch.tensor([1.0, 1.0, 0.0]), aligned=False,
    )
    new = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -9.0, -9.0], [-4.0, -4.0, -4.0]], requires_grad=True)
    algo = RAFT()
    steps = algo.train_steps(b, torch.Generator())
    assert steps.tolist() == [[0, 1, 2]] * 3
    terms = algo.loss(b.subset(steps), new, None)
    assert terms.normaliser == 4 and terms.counts == {"kept": 2.0}
    assert terms.mean.item() == pytest.approx(1.625, rel=1e-6)
    assert terms.metric("nll") == pytest.approx(1.625, rel=1e-6)
    terms.mean.backward()
    want = torch.tensor([[-0.25, -0.25, -0.25], [-0.25, 0.0, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(new.grad, want, rtol=1e-6, atol=0)
    # a step chunk at a time: the same sums
    parts = [algo.loss(b.subset(torch.tensor(c)), new.detach()[:, c], None) for c in ([0], [1, 2])]
    assert sum(p.total.item() for p in parts) == pytest.approx(terms.total.item(), rel=1e-6)
    assert sum(p.normaliser for p in parts) == terms.normaliser


def test_protocol_bits():
    assert RAFTConfig().requires() == frozenset() and not RAFT().needs_reference
    RAFTConfig().resolve_units("token")  # nothing depends on the unit
    assert RAFT().plan(0, 0, torch.Generator()).kind == "rollouts"
    assert RAFT().state_dict() == {}
    with pytest.raises(ValueError, match="no state"):
        RAFT().load_state_dict({"x": 1})
