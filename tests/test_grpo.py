"""GRPO math on hand-written tensors: advantages, aggregations, clipping, KL, chunking."""

import math

import pytest
import torch

from genalign.algorithms.advantages import group_advantages, k3_kl, ppo_clip_loss
from genalign.algorithms.base import Algorithm
from genalign.algorithms.grpo import GRPO, GRPOConfig
from genalign.trajectory import Trajectory

NAN = float("nan")


def traj(old_lp, mask=None, adv=None, group=None):
    """A token-like trajectory (no states/actions) with behaviour log-probs ``old_lp`` [B, T]."""
    b, t = old_lp.shape
    return Trajectory(
        conditions=[f"c{i}" for i in range(b)],
        group=torch.zeros(b, dtype=torch.long) if group is None else group,
        log_probs=old_lp,
        mask=torch.ones(b, t, dtype=torch.bool) if mask is None else mask,
        step_ids=torch.arange(t).expand(b, t).clone(),
        advantages=adv,
        aligned=False,
    )


def grpo(**kw):
    kw.setdefault("clip_range_low", 0.2)
    kw.setdefault("clip_range_high", 0.2)
    return GRPO(GRPOConfig(**kw))


def test_is_an_algorithm():
    assert isinstance(grpo(), Algorithm)


# -- advantages ----------------------------------------------------------------------------
def test_group_advantages_three_scalings():
    """Group 0 = {1, 2, 3}: mean 2, population std √(2/3); group 1 = {0, 4}: mean 2, std 2.
    The batch {1, 2, 3, 0, 4} has std √2. Centred rewards: [−1, 0, 1, −2, 2]."""
    rewards = torch.tensor([1.0, 2.0, 3.0, 0.0, 4.0])
    group = torch.tensor([0, 0, 0, 1, 1])
    centred = torch.tensor([-1.0, 0.0, 1.0, -2.0, 2.0])
    sg = math.sqrt(2 / 3) + 1e-4
    expected = {
        "group": torch.tensor([-1 / sg, 0.0, 1 / sg, -2 / 2.0001, 2 / 2.0001]),
        "batch": centred / (math.sqrt(2) + 1e-4),
        "none": centred,
    }
    for scale, want in expected.items():
        adv = grpo(scale_rewards=scale).advantages(rewards, ["a"] * 5, group)
        torch.testing.assert_close(adv, want, rtol=1e-6, atol=1e-7)


def test_nan_reward_touches_no_statistic():
    """A NaN reward gets a NaN advantage (not trained) and its group's mean/std, and the batch
    std, are those of the group without it."""
    with_nan = torch.tensor([1.0, NAN, 3.0, 5.0, 0.0, 2.0])
    without = torch.tensor([1.0, 3.0, 5.0, 0.0, 2.0])
    g_nan, g = torch.tensor([0, 0, 0, 0, 1, 1]), torch.tensor([0, 0, 0, 1, 1])
    for scale in ("group", "batch", "none"):
        algo = grpo(scale_rewards=scale)
        a = algo.advantages(with_nan, ["a"] * 6, g_nan)
        b = algo.advantages(without, ["a"] * 5, g)
        assert math.isnan(a[1])
        torch.testing.assert_close(a[[0, 2, 3, 4, 5]], b)
    # by hand, scale "group": {1, 3, 5} -> mean 3, std √(8/3)
    a = grpo().advantages(with_nan, ["a"] * 6, g_nan)
    assert a[0].item() == pytest.approx(-2 / (math.sqrt(8 / 3) + 1e-4), rel=1e-6)


def test_zero_variance_groups_counted_and_filtered():
    """Groups with a finite reward: 0, 1, 2 (group 3 is all NaN). Group 0 = {1, 1} and group 2
    = {2} (one sample) have all-equal rewards: advantage exactly 0, counted; with filtering, NaN."""
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 2.0, NAN, NAN])
    group = torch.tensor([0, 0, 1, 1, 2, 3, 3])
    algo = grpo()
    adv = algo.advantages(rewards, ["a"] * 7, group)
    assert adv[[0, 1, 4]].tolist() == [0.0, 0.0, 0.0]
    assert algo.epoch_metrics() == {"zero_variance_groups": 2.0, "groups": 3.0}
    filt = grpo(filter_zero_variance_groups=True)
    adv_f = filt.advantages(rewards, ["a"] * 7, group)
    assert torch.isnan(adv_f[[0, 1, 4, 5, 6]]).all()
    torch.testing.assert_close(adv_f[[2, 3]], torch.tensor([-0.5, 0.5]) / 0.5001)
    assert filt.epoch_metrics() == {"zero_variance_groups": 2.0, "groups": 3.0}
    _, flat = group_advantages(rewards, group)
    assert flat.tolist() == [True, True, False, False, True, False, False]


def test_adv_clip_max():
    adv = grpo(scale_rewards="none", adv_clip_max=1.5).advantages(torch.tensor([0.0, 4.0, NAN]), ["a"] * 3, torch.zeros(3, dtype=torch.long))
    assert adv[:2].tolist() == [-1.5, 1.5] and math.isnan(adv[2])


# -- aggregation ---------------------------------------------------------------------------
def two_rows():
    """Row 0: 3 active steps, A = 1; row 1: 1 active step (then padding), A = −2. π_θ = π_old at
    active steps (ρ = 1, inside the clip), so each active entry's term is −A: −1, −1, −1 and 2.
    The padding carries a log-prob of 100 (exp overflows), which must change nothing."""
    mask = torch.tensor([[True, True, True], [True, False, False]])
    b = traj(torch.zeros(2, 3), mask, adv=torch.tensor([1.0, -2.0]))
    new = torch.tensor([[0.0, 0.0, 0.0], [0.0, 100.0, 100.0]], requires_grad=True)
    return b, new


@pytest.mark.parametrize(
    "aggregation, loss, normaliser, grad",
    [
        # mean per sequence, then over the 2 sequences: (−3/3 + 2/1) / 2 = 0.5; dL/dlogπ = −A/(|o_i|·2)
        ("grpo", 0.5, 2.0, [[-1 / 6] * 3, [1.0, 0.0, 0.0]]),
        # mean over the 4 active steps: (−3 + 2) / 4 = −0.25; dL/dlogπ = −A/4
        ("dapo", -0.25, 4.0, [[-0.25] * 3, [0.5, 0.0, 0.0]]),
        # constant 2 sequences × T = 3: (−3 + 2) / 6 = −1/6; dL/dlogπ = −A/6
        ("dr_grpo", -1 / 6, 6.0, [[-1 / 6] * 3, [1 / 3, 0.0, 0.0]]),
    ],
)
def test_aggregations_hand_values(aggregation, loss, normaliser, grad):
    b, new = two_rows()
    algo = grpo(loss_aggregation=aggregation)
    algo.train_steps(b, torch.Generator())  # T = 3 for dr_grpo's constant
    terms = algo.loss(b.subset(torch.arange(3)), new, None)
    assert terms.normaliser == pytest.approx(normaliser, rel=1e-6)
    assert terms.mean.item() == pytest.approx(loss, rel=1e-6)
    terms.mean.backward()
    torch.testing.assert_close(new.grad, torch.tensor(grad), rtol=1e-6, atol=0)
    assert terms.metric("ratio_mean") == pytest.approx(1.0, rel=1e-6)


def test_dr_grpo_constant_from_config():
    """max_steps_normaliser = 10 replaces T: normaliser 2 × 10, loss (−3 + 2) / 20."""
    b, new = two_rows()
    terms = grpo(loss_aggregation="dr_grpo", max_steps_normaliser=10).loss(b.subset(torch.arange(3)), new, None)
    assert terms.normaliser == pytest.approx(20.0) and terms.mean.item() == pytest.approx(-0.05, rel=1e-6)
    with pytest.raises(ValueError, match="max_steps_normaliser"):
        grpo(loss_aggregation="dr_grpo").loss(b.subset(torch.arange(3)), new, None)


@pytest.mark.parametrize("aggregation", ["grpo", "dapo", "dr_grpo"])
def test_chunking_steps_and_rows_changes_nothing(aggregation):
    """Rows of lengths 4, 2, 3, some ratios clipped, β > 0. One call over all steps vs. step
    chunks {0, 1}, {2, 3} per row pair {0, 1}, {2}: same Σ total / Σ normaliser and gradient."""
    old = torch.tensor([[0.0, -0.1, 0.2, 0.0], [0.1, 0.0, 0.0, 0.0], [-0.2, 0.0, 0.3, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]]).bool()
    ref = torch.tensor([[0.1, 0.0, 0.0, 0.2], [0.0, 0.3, 0.0, 0.0], [0.0, -0.1, 0.1, 0.0]])
    base = torch.tensor([[0.3, 0.0, 0.1, -0.2], [0.0, 0.05, 7.0, 7.0], [-0.1, 0.4, 0.1, 9.0]])
    full = traj(old, mask, adv=torch.tensor([1.0, -0.5, 2.0]), group=torch.tensor([0, 0, 1]))
    algo = grpo(loss_aggregation=aggregation, beta=0.1)
    algo.train_steps(full, torch.Generator())

    def run(pieces):
        new = base.clone().requires_grad_(True)
        total, norm = 0.0, 0.0
        for rows, cols in pieces:
            mb = full[rows]
            steps = torch.tensor(cols)
            t = algo.loss(mb.subset(steps), new[rows][:, cols], ref[rows][:, cols])
            t.total.backward()
            total, norm = total + t.total.item(), norm + t.normaliser
        return total / norm, new.grad / norm, norm

    one = run([([0, 1, 2], [0, 1, 2, 3])])
    cut = run([([0, 1], [0, 1]), ([0, 1], [2, 3]), ([2], [0, 1]), ([2], [2, 3])])
    assert one[2] == pytest.approx({"grpo": 3.0, "dapo": 9.0, "dr_grpo": 12.0}[aggregation], rel=1e-6)
    assert cut[0] == pytest.approx(one[0], rel=1e-6) and cut[2] == pytest.approx(one[2], rel=1e-6)
    torch.testing.assert_close(cut[1], one[1], rtol=1e-6, atol=1e-8)
    assert torch.isfinite(one[1]).all() and one[1][1, 2:].abs().sum() == 0 and one[1][2, 3] == 0


# -- clipping and KL -----------------------------------------------------------------------
def test_asymmetric_clip():
    """ε_low = 0.1, ε_high = 0.3: ρ ∈ [0.9, 1.3]. Token-mean ("dapo"), 6 entries.
    Row 0 (A = +1), log ρ = 0.3, 0.25, −0.3: ρ = 1.35 > 1.3 is clipped (term −1.3, no gradient);
    ρ = 1.284 (clipped under a symmetric 0.2) keeps its gradient −ρ; ρ = 0.741 < 0.9 with A > 0 is
    not clipped (the pessimistic bound): gradient −ρ. Row 1 (A = −1), log ρ = −0.15, −0.08, 0.1:
    ρ = 0.861 < 0.9 is clipped (term 0.9, no gradient); the others give +ρ."""
    log_ratio = torch.tensor([[0.3, 0.25, -0.3], [-0.15, -0.08, 0.1]])
    b = traj(torch.zeros(2, 3), adv=torch.tensor([1.0, -1.0]))
    new = log_ratio.clone().requires_grad_(True)
    terms = grpo(loss_aggregation="dapo", clip_range_low=0.1, clip_range_high=0.3).loss(b.subset(torch.arange(3)), new, None)
    e = math.exp
    assert terms.total.item() == pytest.approx(-1.3 - e(0.25) - e(-0.3) + 0.9 + e(-0.08) + e(0.1), rel=1e-6)
    assert terms.metric("clip_fraction") == pytest.approx(3 / 6)
    terms.total.backward()
    want = torch.tensor([[0.0, -e(0.25), -e(-0.3)], [0.0, e(-0.08), e(0.1)]])
    torch.testing.assert_close(new.grad, want, rtol=1e-6, atol=0)


def test_k3_value_and_pull_toward_reference():
    """Δ = log π_ref − log π_θ. log π_θ = 0, log π_ref = ±log 2: k3 = 2 − log 2 − 1 = 0.30685 and
    ½ + log 2 − 1 = 0.19315; ∂k3/∂log π_θ = 1 − e^Δ = −1 and +½: descending raises log π_θ where
    the reference is more likely and lowers it where it is less likely. With A = 0 the surrogate
    adds nothing, so the summed loss is β Σ k3 = 0.5 · 0.5 and its gradient β (1 − e^Δ)."""
    ref = torch.tensor([[math.log(2), -math.log(2)]])
    k3 = k3_kl(torch.zeros(1, 2), ref)
    torch.testing.assert_close(k3, torch.tensor([[1 - math.log(2), math.log(2) - 0.5]]), rtol=1e-6, atol=0)
    algo = grpo(beta=0.5, loss_aggregation="dapo")
    assert algo.needs_reference and not grpo().needs_reference
    new = torch.zeros(1, 2, requires_grad=True)
    terms = algo.loss(traj(torch.zeros(1, 2), adv=torch.zeros(1)).subset(torch.arange(2)), new, ref)
    assert terms.total.item() == pytest.approx(0.5 * (1 - math.log(2) + math.log(2) - 0.5), rel=1e-6)  # = 0.25
    assert terms.metric("kl") == pytest.approx(float(k3.mean()), rel=1e-6)
    terms.total.backward()
    torch.testing.assert_close(new.grad, torch.tensor([[-0.5, 0.25]]), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="reference"):
        algo.loss(traj(torch.zeros(1, 2), adv=torch.zeros(1)), new, None)


def test_one_step_groups_equal_ppo_clip_loss():
    """With one step per row (equal lengths), ε_low = ε_high and β = 0, the "grpo" and "dapo"
    aggregations are DDPO's ppo_clip_loss on GRPO's group advantages."""
    rewards = torch.tensor([0.1, 0.7, 0.4, 0.9, 1.0, 0.0, 0.5, 0.2])
    group = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    old = torch.tensor([[0.0], [0.1], [-0.2], [0.05], [0.0], [0.3], [0.0], [-0.1]])
    new = torch.tensor([[0.3], [0.0], [-0.1], [0.05], [-0.4], [0.3], [0.1], [0.0]])
    for aggregation in ("grpo", "dapo"):
        algo = grpo(loss_aggregation=aggregation, clip_range_low=0.2, clip_range_high=0.2)
        adv = algo.advantages(rewards, ["a"] * 8, group)
        ours = algo.loss(traj(old, adv=adv, group=group).subset(torch.tensor([0])), new, None)
        ref = ppo_clip_loss(adv.unsqueeze(1), new, old, 0.2, torch.ones(8, 1, dtype=torch.bool))
        assert ours.normaliser == ref.normaliser == 8
        assert ours.total.item() == pytest.approx(ref.total.item(), rel=1e-6)
        for name in ("approx_kl", "clip_fraction", "ratio_mean"):
            assert ours.metrics[name] == pytest.approx(ref.metrics[name], rel=1e-6)


# -- config and protocol -------------------------------------------------------------------
def test_config_units_requires_and_validation():
    c = GRPOConfig()
    c.resolve_units("token")
    assert (c.clip_range_low, c.clip_range_high) == (0.2, 0.2)
    c = GRPOConfig(clip_range_high=0.28)
    c.resolve_units("dimension_mean")
    assert (c.clip_range_low, c.clip_range_high) == (1e-4, 0.28)
    with pytest.raises(ValueError, match="log_prob_unit"):
        GRPOConfig().resolve_units("nats")
    assert GRPOConfig().requires() == frozenset() and GRPOConfig(shared_noise=True).requires() == {"shared_noise"}
    assert GRPO(GRPOConfig(shared_noise=True)).plan(0, 0, torch.Generator()).shared_noise
    for bad in ({"beta": -1.0}, {"clip_range_low": 1.0}, {"clip_range_high": 0.0}, {"max_steps_normaliser": -1},
                {"timestep_fraction": 0.0}, {"step_window": [0.5, 0.5]}, {"adv_clip_max": -1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            GRPOConfig(**bad).validate()
    # the constructor resolves unset clip ranges for the policy's unit (default: diffusion latents)
    assert (GRPO().config.clip_range_low, GRPO(unit="token").config.clip_range_high) == (1e-4, 0.2)
    assert GRPOConfig().clip_range_low is None, "the caller's config is not modified"
    assert GRPO().state_dict() == {}
    with pytest.raises(ValueError, match="no state"):
        GRPO().load_state_dict({"x": 1})


def test_train_steps_default_all_and_window():
    t = traj(torch.zeros(2, 10))
    assert grpo().train_steps(t, torch.Generator()).tolist() == [list(range(10))] * 2
    assert grpo(step_window=[0.0, 0.5]).train_steps(t, torch.Generator()).tolist() == [list(range(5))] * 2


def test_noise_window_plans_windows_and_trains_exactly_their_steps():
    """MixGRPO / Flow-GRPO-Fast sampling: the plan asks the policy for noise windows, and the
    steps trained are each row's active (stochastic) steps, not a random draw."""
    algo = grpo(noise_window=2, noise_window_starts=[0.0, 0.4], shared_noise=True)
    plan = algo.plan(0, 0, torch.Generator())
    assert (plan.noise_window, plan.noise_window_starts, plan.shared_noise) == (2, (0.0, 0.4), True)
    assert algo.config.requires() == {"shared_noise", "noise_window"}
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, 1:3] = True
    mask[1, 3:5] = True
    assert algo.train_steps(traj(torch.zeros(2, 10), mask=mask), torch.Generator()).tolist() == [[1, 2], [3, 4]]
    assert grpo().plan(0, 0, torch.Generator()).noise_window == 0
    with pytest.raises(ValueError, match="noise_window"):
        GRPOConfig(noise_window=2, timestep_fraction=0.5).validate()
    with pytest.raises(ValueError, match="noise_window_starts"):
        GRPOConfig(noise_window=2, noise_window_starts=[0.4, 0.1]).validate()
