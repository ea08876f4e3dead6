"""DDPO math on hand-written tensors, and per-prompt statistics."""

import math

import pytest
import torch

from genalign.algorithms import DDPO, Algorithm, DDPOConfig
from genalign.algorithms.advantages import PerPromptStats, batch_normalize, ppo_clip_loss
from genalign.trajectory import Trajectory


def batch(adv, old_lp):
    b, k = old_lp.shape
    return Trajectory(
        conditions=["p"] * b, group=torch.zeros(b, dtype=torch.long), states=torch.zeros(b, k, 1),
        actions=torch.zeros(b, k, 1), timesteps=torch.zeros(b, k, dtype=torch.long), log_probs=old_lp,
        mask=torch.ones(b, k, dtype=torch.bool), step_ids=torch.arange(k).expand(b, k).clone(), advantages=adv,
    )


def test_is_an_algorithm():
    assert isinstance(DDPO(), Algorithm)


def test_ddpo_loss_hand_derived():
    """ε = 0.2. Row 0: A = 1, ρ = e^0.5 = 1.6487 -> max(−1.6487, −1.2) = −1.2 (clipped).
    Row 1: A = −2, ρ = e^−0.5 = 0.6065 -> max(1.2131, 1.6) = 1.6 (clipped).
    Σ = −1.2 + 1.6 = 0.4 over 2 entries; both clipped -> clip_fraction 1; approx_kl = ½·mean(0.25) = 0.125."""
    algo = DDPO(DDPOConfig(clip_range=0.2))
    new = torch.tensor([[0.5], [0.0]], requires_grad=True)
    terms = algo.loss(batch(torch.tensor([1.0, -2.0]), torch.tensor([[0.0], [0.5]])), new, None)
    loss = terms.total  # a sum over the 2 active entries; the trainer divides by the step's count
    assert terms.normaliser == 2
    assert loss.item() == pytest.approx(0.4, abs=1e-6)
    assert terms.metric("clip_fraction") == pytest.approx(1.0)
    assert terms.metric("approx_kl") == pytest.approx(0.125, abs=1e-6)
    loss.backward()
    assert torch.count_nonzero(new.grad) == 0, "clipped terms carry no gradient"


def test_ddpo_loss_unclipped_gradient_and_adv_clip():
    """Inside the trust region L = −A ρ, so dL/dlogπ = −A ρ / N. A = 10 is clipped to 5."""
    algo = DDPO(DDPOConfig(clip_range=0.2, adv_clip_max=5.0))
    new = torch.tensor([[0.05, 0.0]], requires_grad=True)
    loss = algo.loss(batch(torch.tensor([10.0]), torch.zeros(1, 2)), new, None).mean
    expected = -5.0 * (math.exp(0.05) + 1.0) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    torch.testing.assert_close(new.grad, torch.tensor([[-5.0 * math.exp(0.05) / 2, -5.0 / 2]]))


def test_mask_excludes_steps():
    lp = torch.tensor([[0.0, 0.0]])
    b = batch(torch.tensor([1.0]), lp)
    b.mask = torch.tensor([[True, False]])
    terms = ppo_clip_loss(torch.tensor([[1.0]]), torch.tensor([[0.1, 5.0]]), lp, 0.2, b.mask)
    assert terms.total.item() == pytest.approx(-math.exp(0.1), rel=1e-6) and terms.normaliser == 1


def test_per_prompt_stats_hand_values():
    """'a' has 2 ≥ min_count rewards {1, 3}: μ = 2, σ = 1 -> A = ∓1. 'b' has 1 < min_count:
    batch statistics over {1, 3, 10}: μ = 14/3, σ = 3.8586 -> A = 1.3821. NaN -> 0, not buffered."""
    stats = PerPromptStats(buffer_size=8, min_count=2)
    adv = stats(torch.tensor([1.0, 3.0, 10.0, float("nan")]), ["a", "a", "b", "b"])
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0, 1.3821, 0.0]), atol=1e-4, rtol=0)
    assert list(stats.buffers["b"]) == [10.0]
    # a second batch uses the buffered history of 'a': {1, 3, 5} -> μ = 3, σ = 1.633
    adv2 = stats(torch.tensor([5.0]), ["a"])
    assert adv2.item() == pytest.approx((5 - 3) / (math.sqrt(8 / 3) + 1e-6), rel=1e-5)
    restored = PerPromptStats(8, 2)
    restored.load_state_dict(stats.state_dict())
    assert list(restored.buffers["a"]) == [1.0, 3.0, 5.0]


def test_batch_normalize_and_train_steps():
    torch.testing.assert_close(batch_normalize(torch.tensor([1.0, 3.0, float("nan")])), torch.tensor([-1.0, 1.0, 0.0]), atol=1e-5, rtol=0)
    algo = DDPO(DDPOConfig(timestep_fraction=0.5))
    tr = batch(torch.zeros(3), torch.zeros(3, 10))
    steps = algo.train_steps(tr, torch.Generator().manual_seed(0))
    assert steps.shape == (3, 5)
    assert all(len(set(row.tolist())) == 5 for row in steps)
    assert not torch.equal(steps[0], steps[1]), "each row draws its own subset"
    assert DDPO().train_steps(tr, torch.Generator()).shape == (3, 10)


def test_step_window_limits_trained_steps():
    """T = 10, window [0, 0.6): steps 0..5; fraction 0.5 draws 3 of them per row."""
    from genalign.algorithms.advantages import window_steps

    g = torch.Generator().manual_seed(0)
    assert window_steps(2, 10, [0.0, 0.6], 1.0, g).tolist() == [list(range(6))] * 2
    drawn = window_steps(50, 10, [0.0, 0.6], 0.5, g)
    assert drawn.shape == (50, 3) and int(drawn.max()) <= 5
    assert window_steps(1, 10, [0.95, 1.0], 1.0, g).tolist() == [[9]]  # never empty
    with pytest.raises(ValueError, match="step_window"):
        DDPOConfig(step_window=[0.7, 0.2]).validate()


def test_noise_window_trains_exactly_the_active_steps():
    from genalign.algorithms.advantages import active_steps

    mask = torch.zeros(3, 10, dtype=torch.bool)
    mask[0, 2:4] = True
    mask[1, 6:8] = True  # row 2: dropped (e.g. a NaN reward), no active step
    steps = active_steps(mask)
    assert steps.tolist()[:2] == [[2, 3], [6, 7]]
    assert not mask[2, steps[2]].any()  # padding lands on inactive steps, which the loss masks out
    algo = DDPO(DDPOConfig(noise_window=2, noise_window_starts=[0.0, 0.4], shared_noise=True))
    tr = batch(torch.zeros(3), torch.zeros(3, 10))
    tr.mask = mask
    assert torch.equal(algo.train_steps(tr, torch.Generator()), steps)
    plan = algo.plan(0, 0, torch.Generator())
    assert (plan.noise_window, plan.noise_window_starts, plan.shared_noise, plan.antithetic) == (2, (0.0, 0.4), True, False)
    assert DDPO(DDPOConfig(shared_noise=True, antithetic=True)).plan(0, 0, torch.Generator()).antithetic
    with pytest.raises(ValueError, match="noise_window"):
        DDPOConfig(noise_window=2, timestep_fraction=0.5).validate()
    with pytest.raises(ValueError, match="noise_window_starts"):
        DDPOConfig(noise_window=2, noise_window_starts=[0.5, 0.5]).validate()


def test_group_baseline_normalises_within_each_group():
    from genalign.algorithms.advantages import group_normalize

    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.5, float("nan"), 0.7])
    group = torch.tensor([0, 0, 1, 1, 2, 2, 3])
    adv = group_normalize(rewards, group)
    torch.testing.assert_close(adv, torch.tensor([1.0, -1.0, 0.0, 0.0, 0.0, 0.0, 0.0]), atol=1e-5, rtol=0)
    algo = DDPO(DDPOConfig(group_baseline=True))
    torch.testing.assert_close(algo.advantages(rewards, ["a"] * 7, group), adv)


def test_equal_rewards_give_zero_not_nan():
    """A group whose rewards are all equal has σ = 0: the 1e-6 in the denominator turns 0/0 into
    0/1e-6 = 0, for the prompt's history and for the batch fallback alike."""
    history = PerPromptStats(buffer_size=8, min_count=2)
    adv = history(torch.tensor([0.7, 0.7, 0.7]), ["a", "a", "a"])
    assert torch.isfinite(adv).all() and torch.equal(adv, torch.zeros(3))
    fallback = PerPromptStats(buffer_size=8, min_count=100)
    adv = fallback(torch.tensor([0.2, 0.2]), ["b", "c"])
    assert torch.isfinite(adv).all() and torch.equal(adv, torch.zeros(2))
    assert torch.equal(batch_normalize(torch.tensor([3.0, 3.0])), torch.zeros(2))
