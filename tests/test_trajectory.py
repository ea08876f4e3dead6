"""Trajectory indexing, concatenation, step subsets and device moves keep fields aligned."""

from dataclasses import replace

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
    other = make(2)
    other.extras["emb"] = torch.zeros(2, 3)  # 7 features elsewhere: not a per-row tensor of one shape
    with pytest.raises(ValueError, match="trailing shapes"):
        Trajectory.cat([make(2), other])


def test_cat_pads_shorter_trajectories_with_inactive_steps():
    """Token trajectories of different lengths concatenate: the shorter one's steps are padded
    with mask False, log-prob 0, continuing step ids; its active-step count is unchanged."""
    a, b = make(2, t=5), make(2, t=3, offset=2)
    c = Trajectory.cat([a, b])
    assert c.num_steps == 5 and c.batch_size == 4
    assert c.mask[2:, 3:].sum() == 0 and bool(c.mask[2:, :3].all())
    assert c.log_probs[2:, 3:].abs().sum() == 0 and c.step_ids[2].tolist() == [0, 1, 2, 3, 4]
    torch.testing.assert_close(c.states[2:, :3], b.states)
    assert c.subset([0, 1]).lengths.tolist() == [5, 5, 3, 3]  # whole-row active steps survive a step subset


def test_ragged_and_padded_extras():
    """Ragged: one tensor per row, any shape. Padded: lengths that differ between batches,
    padded on the declared side with the declared value when concatenated."""
    from genalign.trajectory import Padded, Ragged

    a, b = make(2), make(1, offset=2)
    a.extras.update(pix=Ragged([torch.zeros(3, 4), torch.ones(5, 4)]),
                    ids=Padded(torch.tensor([[7, 8], [9, 10]]), pad_value=0, side="left"))
    b.extras.update(pix=Ragged([torch.full((1, 4), 2.0)]), ids=Padded(torch.tensor([[1, 2, 3]]), pad_value=0, side="left"))
    c = Trajectory.cat([a, b])
    assert [v.shape[0] for v in c.extras["pix"].values] == [3, 5, 1]
    assert c.extras["ids"].tensor.tolist() == [[0, 7, 8], [0, 9, 10], [1, 2, 3]]
    picked = c[[2, 0]]
    assert picked.extras["ids"].tensor.tolist() == [[1, 2, 3], [0, 7, 8]]
    assert picked.extras["pix"].values[0].shape == (1, 4) and picked.extras["pix"].values[1].shape == (3, 4)
    with pytest.raises(ValueError, match="rows"):
        replace(make(2), extras={"pix": Ragged([torch.zeros(1)])})


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


def make_chained(b=3, t=4, offset=0.0):
    from genalign.trajectory import chained

    chain = torch.arange(b * (t + 1) * 2, dtype=torch.float32).view(b, t + 1, 2) + offset  # [B, T+1, 2]
    states, actions = chained(chain)
    tr = make(b, t)
    return replace(tr, states=states, actions=actions), chain


def shares(tr) -> bool:
    return tr.states.untyped_storage().data_ptr() == tr.actions.untyped_storage().data_ptr()


def test_chained_states_and_actions_are_stored_once_through_index_cat_and_to():
    from genalign.trajectory import full_chain, shared_chain

    tr, chain = make_chained()
    assert shares(tr) and torch.equal(tr.actions[:, :-1], tr.states[:, 1:])
    assert shared_chain(tr.states, tr.actions).data_ptr() == chain.data_ptr()
    for out in (tr[[2, 0]], Trajectory.cat([tr, make_chained(offset=100.0)[0]]), tr.to("cpu"), tr[1:]):
        assert shares(out), "a chained trajectory lost its single storage"
        assert torch.equal(out.actions[:, :-1], out.states[:, 1:])
        assert out.states.untyped_storage().nbytes() == out.batch_size * (out.num_steps + 1) * 2 * 4
    sub = tr[[2, 0]]
    torch.testing.assert_close(sub.states, torch.stack([tr.states[2], tr.states[0]]))
    torch.testing.assert_close(sub.actions, torch.stack([tr.actions[2], tr.actions[0]]))
    torch.testing.assert_close(full_chain(tr), chain)
    # independent states and actions stay independent, and full_chain rebuilds the chain from copies
    plain = replace(tr, states=tr.states.clone(), actions=tr.actions.clone())
    assert not shares(plain) and shared_chain(plain.states, plain.actions) is None
    torch.testing.assert_close(full_chain(plain), chain)
    assert not shares(make()[[0, 1]])
    # trajectories of different lengths still concatenate (the padded copies are separate tensors)
    short, _ = make_chained(t=2)
    mixed = Trajectory.cat([tr, short])
    assert mixed.num_steps == 4 and not mixed.mask[3:, 2:].any()
