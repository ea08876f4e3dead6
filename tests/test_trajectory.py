"""Trajectory indexing, concatenation, step subsets and device moves keep fields aligned."""

import pytest
import torch

from genalign.trajectory import Trajectory


def make(b=4, t=5, offset=0):
    return Trajectory(
        conditions=[f"p{i + offset}" for i in range(b)],
        group=torch.arange(b) // 2,
        states=torch.arange(b * t * 3, dtype=torch.float32).view(b, t, 3) + 1000 * offset,
        actions=-torch.arange(b * t * 3, dtype=torch.float32).view(b, t, 3),
        timesteps=torch.arange(t).flip(0).expand(b, t).clone() * 100,
        log_probs=torch.randn(b, t),
        mask=torch.ones(b, t, dtype=torch.bool),
        step_ids=torch.arange(t).expand(b, t).clone(),
        outputs=torch.rand(b, 3, 2, 2),
        rewards=torch.arange(b, dtype=torch.float32),
        extras={"emb": torch.randn(b, 7), "names": [f"n{i}" for i in range(b)]},
    )


def test_index_keeps_rows_aligned():
    tr = make()
    sub = tr[[2, 0]]
    assert sub.conditions == ["p2", "p0"]
    assert sub.extras["names"] == ["n2", "n0"]
    torch.testing.assert_close(sub.states[0], tr.states[2])
    torch.testing.assert_close(sub.extras["emb"][1], tr.extras["emb"][0])
    torch.testing.assert_close(sub.rewards, torch.tensor([2.0, 0.0]))
    assert tr[1:3].conditions == ["p1", "p2"]
    assert tr[torch.tensor([True, False, False, True])].conditions == ["p0", "p3"]


def test_cat_and_errors():
    a, b = make(2), make(3, offset=2)
    c = Trajectory.cat([a, b])
    assert c.batch_size == 5 and c.conditions[2] == "p2"
    torch.testing.assert_close(c.states[2:], b.states)
    with pytest.raises(ValueError, match="steps"):
        Trajectory.cat([make(2, t=5), make(2, t=4)])


def test_subset_shared_and_per_row_steps():
    tr = make()
    shared = tr.subset([1, 3])
    assert shared.states.shape == (4, 2, 3)
    torch.testing.assert_close(shared.states[:, 1], tr.states[:, 3])
    torch.testing.assert_close(shared.step_ids[0], torch.tensor([1, 3]))
    per_row = tr.subset(torch.tensor([[0], [1], [2], [4]]))
    for b, s in enumerate([0, 1, 2, 4]):
        torch.testing.assert_close(per_row.actions[b, 0], tr.actions[b, s])
        assert per_row.timesteps[b, 0] == tr.timesteps[b, s]
        assert per_row.log_probs[b, 0] == tr.log_probs[b, s]
    with pytest.raises(IndexError):
        tr.subset([5])


def test_construction_checks_and_to():
    with pytest.raises(ValueError, match="conditions"):
        Trajectory(["a"], torch.zeros(2), torch.zeros(2, 1), torch.zeros(2, 1), torch.zeros(2, 1), torch.zeros(2, 1),
                   torch.ones(2, 1, dtype=torch.bool), torch.zeros(2, 1, dtype=torch.long))
    moved = make().to("cpu")
    assert moved.extras["names"][0] == "n0" and moved.states.device.type == "cpu"
    with pytest.raises(ValueError, match="rewards"):
        make().with_rewards(torch.zeros(3))
