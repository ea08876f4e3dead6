"""D3PO, SePPO and B²-DiffuRL math on hand-written tensors; preference sources; the store."""

import math

import pytest
import torch

from genalign.algorithms import (
    D3PO,
    Algorithm,
    B2DiffuRL,
    B2DiffuRLConfig,
    D3POConfig,
    SePPO,
    SePPOConfig,
)
from genalign.algorithms.pairs import group_pairs, per_step_dpo_loss
from genalign.algorithms.preferences import ParetoPreference, RewardPreference, StoredPreference
from genalign.algorithms.seppo import anchor_signs
from genalign.preference_store import Comparison, PreferenceStore
from genalign.trajectory import Trajectory


def traj(group, rewards=None, k=1, **extras):
    b = len(group)
    t = Trajectory(
        conditions=[f"p{g}" for g in group], group=torch.tensor(group), states=torch.zeros(b, k, 1),
        actions=torch.zeros(b, k, 1), timesteps=torch.zeros(b, k, dtype=torch.long), log_probs=torch.zeros(b, k),
        mask=torch.ones(b, k, dtype=torch.bool), step_ids=torch.arange(k).expand(b, k).clone(), extras=extras,
    )
    if rewards is not None:
        t.rewards = torch.tensor(rewards, dtype=torch.float32)
    return t


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_all_are_algorithms():
    for algo in (D3PO(), SePPO(), B2DiffuRL()):
        assert isinstance(algo, Algorithm)


def test_group_pairs_enumerates_k_choose_2_within_groups():
    pairs = group_pairs(torch.tensor([0, 0, 0, 1, 1]))
    assert pairs.tolist() == [[0, 1], [0, 2], [1, 2], [3, 4]]  # 3 + 1 = K(K−1)/2 per group


def test_per_step_dpo_loss_hand_derived():
    """β = 0.5, ε = 0.1. Pair step 0: Δ_w = 0.05, Δ_l = −0.02 (inside the clip):
    logit = 0.5·0.07 = 0.035, L = −log σ(0.035) = 0.67575. Step 1: Δ_w = 0.3 is clipped to
    log 1.1 = 0.09531, Δ_l = 0: logit = 0.047655, L = 0.669384. Mean = 0.672567.
    dL/dΔ_w at step 0 = −β σ(−0.035) / 2 (two entries); at step 1 the clip kills the gradient."""
    dw = torch.tensor([[0.05, 0.3]], requires_grad=True)
    dl = torch.tensor([[-0.02, 0.0]], requires_grad=True)
    terms = per_step_dpo_loss(dw, dl, torch.ones(1, 2, dtype=torch.bool), beta=0.5, clip_eps=0.1)
    assert terms.normaliser == 2  # a sum over 2 active entries
    loss = terms.mean
    l0 = -math.log(sigmoid(0.035))
    l1 = -math.log(sigmoid(0.5 * math.log(1.1)))
    assert loss.item() == pytest.approx((l0 + l1) / 2, rel=1e-5)
    loss.backward()
    assert dw.grad[0, 0].item() == pytest.approx(-0.5 * sigmoid(-0.035) / 2, rel=1e-5)
    assert dw.grad[0, 1].item() == 0.0
    assert dl.grad[0, 0].item() == pytest.approx(0.5 * sigmoid(-0.035) / 2, rel=1e-5)
    assert terms.metric("ratio_clip_fraction") == pytest.approx(0.5)


def test_dpo_sign_flips_the_loser_term():
    """sign = −1: logit = β(log r_w + log r_l) -> both log-ratios are pushed up."""
    dw = torch.tensor([[0.02]], requires_grad=True)
    dl = torch.tensor([[0.04]], requires_grad=True)
    loss = per_step_dpo_loss(dw, dl, torch.ones(1, 1, dtype=torch.bool), 1.0, 0.1, sign=torch.tensor([-1.0])).total
    assert loss.item() == pytest.approx(-math.log(sigmoid(0.06)), rel=1e-6)
    loss.backward()
    assert dw.grad.item() < 0 and dl.grad.item() < 0  # descent raises both


def test_d3po_loss_uses_every_labelled_pair_and_skips_ties():
    """Group 0 rewards (1, 0, 1): pairs (0,1) w=0, (0,2) tie, (1,2) w=2. Group 1 (0, 2): w=4.
    With log π_ref = 0 and log π_θ = Δ per row: logits β(Δ_w − Δ_l)."""
    algo = D3PO(D3POConfig(beta=1.0, clip_eps=0.5))
    b = traj([0, 0, 0, 1, 1], rewards=[1.0, 0.0, 1.0, 0.0, 2.0])
    delta = torch.tensor([[0.1], [0.0], [0.2], [0.0], [-0.1]])
    terms = algo.loss(b, delta, torch.zeros(5, 1))
    expected = -math.log(sigmoid(0.1)) - math.log(sigmoid(0.2)) - math.log(sigmoid(-0.1))
    assert terms.counts == {"pairs": 3, "unlabelled_pairs": 1}
    assert terms.total.item() == pytest.approx(expected, rel=1e-6) and terms.normaliser == 3
    with pytest.raises(ValueError, match="no state"):
        algo.load_state_dict({"stats": {}})
    algo.load_state_dict(algo.state_dict())


def test_d3po_train_steps_shared_within_group():
    algo = D3PO(D3POConfig(timestep_fraction=0.5))
    b = traj([0, 0, 1, 1], k=10)
    steps = algo.train_steps(b, torch.Generator().manual_seed(0))
    assert steps.shape == (4, 5)
    assert torch.equal(steps[0], steps[1]) and torch.equal(steps[2], steps[3])


def test_pareto_preference():
    """Components: row 0 (1, 1) dominates row 1 (0, 1); rows 0 and 2 (2, 0) are incomparable."""
    b = traj([0, 0, 0], reward_components=torch.tensor([[1.0, 1.0], [0.0, 1.0], [2.0, 0.0]]))
    labels = ParetoPreference()(b, torch.tensor([[0, 1], [0, 2], [1, 2]]))
    assert labels.tolist() == [1.0, 0.0, 0.0]


def test_reward_preference_tolerance_and_nan():
    b = traj([0, 0, 0], rewards=[1.0, 0.95, float("nan")])
    pairs = torch.tensor([[0, 1], [0, 2]])
    assert RewardPreference()(b, pairs).tolist() == [1.0, 0.0]
    assert RewardPreference(tie_tolerance=0.1)(b, pairs).tolist() == [0.0, 0.0]


def test_preference_store_roundtrip_and_stored_labels(tmp_path):
    path = str(tmp_path / "prefs.sqlite")
    store = PreferenceStore(path, create=True)
    store.add([
        Comparison("a red circle", "s0-e1-r0", "s0-e1-r1", "b", "alice"),
        Comparison("a red circle", "s0-e1-r0", "s0-e1-r2", "tie", "bob"),
    ])
    assert len(store) == 2
    assert store.label("a red circle", "s0-e1-r0", "s0-e1-r1") == -1
    assert store.label("a red circle", "s0-e1-r1", "s0-e1-r0") == 1  # either order
    assert store.label("a red circle", "s0-e1-r0", "s0-e1-r2") == 0
    assert store.label("a red circle", "s0-e1-r1", "s0-e1-r2") is None
    with pytest.raises(ValueError, match="chosen"):
        store.add([Comparison("x", "a", "b", "left", "carol")])
    store.close()
    b = traj([0, 0, 0], sample_id=["s0-e1-r0", "s0-e1-r1", "s0-e1-r2"])
    b.conditions = ["a red circle"] * 3
    source = StoredPreference(path)
    labels = source(b, torch.tensor([[0, 1], [0, 2], [1, 2]]))
    assert labels.tolist() == [-1.0, 0.0, 0.0] and source.missing == 1
    with pytest.raises(FileNotFoundError, match="preference store"):
        StoredPreference(str(tmp_path / "missing.sqlite"))


def test_seppo_anchor_signs():
    """Mean Δ_ref over active steps: 0.2 > 0 -> reference sample treated as winning (−1);
    −0.1 -> losing (+1); 0 (π_θ = π_ref) -> losing."""
    delta = torch.tensor([[0.3, 0.1], [-0.1, -0.1], [0.0, 0.0]])
    signs = anchor_signs(delta, torch.ones(3, 2, dtype=torch.bool), margin=0.0)
    assert signs.tolist() == [-1.0, 1.0, 1.0]


def test_seppo_loss_hand_derived():
    """Pair 0: winner Δ = 0.1, reference Δ = −0.05 (losing): logit = β(0.1 + 0.05).
    Pair 1: winner Δ = 0.0, reference Δ = 0.08 (winning): logit = β(0 + 0.08)."""
    algo = SePPO(SePPOConfig(beta=2.0, clip_eps=0.5))
    b = traj([0, 1, 0, 1], role=torch.tensor([1, 1, 0, 0]))
    lp = torch.tensor([[0.1], [0.0], [-0.05], [0.08]])
    terms = algo.loss(b, lp, torch.zeros(4, 1))
    expected = -math.log(sigmoid(2 * 0.15)) - math.log(sigmoid(2 * 0.08))
    assert terms.total.item() == pytest.approx(expected, rel=1e-6) and terms.normaliser == 2
    assert terms.metric("ref_as_winner") == pytest.approx(0.5) and terms.counts == {"pairs": 2}


def test_seppo_reference_strategies():
    g = torch.Generator().manual_seed(0)
    assert SePPO(SePPOConfig(reference="latest")).plan(5, 6, g).reference == 5
    assert SePPO(SePPOConfig(reference="initial")).plan(5, 6, g).reference == 0
    drawn = {SePPO().plan(5, 6, g).reference for _ in range(60)}
    assert drawn == set(range(6))  # uniform over all previous checkpoints


def test_b2_branch_schedule_moves_backward():
    algo = B2DiffuRL(B2DiffuRLConfig(stages=3, epochs_per_stage=2, branch_start=0.8, branch_end=0.0))
    assert [algo.branch_fraction(e) for e in range(8)] == pytest.approx([0.8, 0.8, 0.4, 0.4, 0.0, 0.0, 0.0, 0.0])


def test_b2_selects_best_and_worst_branch_beyond_threshold():
    """Rewards per branch group; batch stats (min_count large): μ = 0.5, σ = √0.125 -> z = ±√2.
    Group 0 (1, 0, 1, 0): best row 0 (first argmax), worst row 1. Group 1 all 0.5: z = 0 -> none."""
    algo = B2DiffuRL(B2DiffuRLConfig(stat_min_count=100))
    r = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.5, 0.5, 0.5, 0.5])
    adv = algo.advantages(r, ["a"] * 4 + ["b"] * 4, torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]))
    assert adv[0].item() == pytest.approx(2**0.5, abs=1e-4) and adv[1].item() == pytest.approx(-(2**0.5), abs=1e-4)
    assert torch.isnan(adv[2:]).all()


def test_b2_trains_only_steps_after_the_branch():
    b = traj([0, 0], k=10, branch_step=torch.tensor([6, 6]))
    assert B2DiffuRL().train_steps(b, torch.Generator()).tolist() == [[6, 7, 8, 9]] * 2


def test_b2_dpo_pairs_best_with_worst():
    algo = B2DiffuRL(B2DiffuRLConfig(loss="dpo", beta=1.0, clip_eps=0.5))
    b = traj([0, 0, 0])
    b.advantages = torch.tensor([1.2, -0.9, 0.0])
    terms = algo.loss(b, torch.tensor([[0.1], [-0.1], [0.0]]), torch.zeros(3, 1))
    assert terms.counts == {"pairs": 1} and terms.normaliser == 1
    assert terms.total.item() == pytest.approx(-math.log(sigmoid(0.2)), rel=1e-6)


def test_folder_targets(tmp_path):
    """imagefolder layout: metadata.jsonl lines {file_name, prompt}; the seed picks among a
    prompt's images; unknown prompts and broken metadata fail with the file and line."""
    import json

    from PIL import Image

    from genalign.targets import FolderTargets

    for name, colour in (("r0.png", (255, 0, 0)), ("r1.png", (0, 0, 255)), ("g.png", (0, 255, 0))):
        Image.new("RGB", (16, 16), colour).save(tmp_path / name)
    rows = [{"file_name": "r0.png", "prompt": "red"}, {"file_name": "r1.png", "prompt": "red"}, {"file_name": "g.png", "prompt": "green"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    targets = FolderTargets(str(tmp_path))
    out = targets(["red", "red", "green"], [0, 1, 5], size=8)
    assert out.shape == (3, 3, 8, 8)
    assert out[0, 0].mean() == pytest.approx(1.0) and out[1, 2].mean() == pytest.approx(1.0)
    assert out[2, 1].mean() == pytest.approx(1.0)
    with pytest.raises(KeyError, match="no target image for prompt 'blue'"):
        targets(["blue"], [0], size=8)
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "missing.png", "prompt": "x"}))
    with pytest.raises(FileNotFoundError, match="metadata.jsonl:1"):
        FolderTargets(str(tmp_path))


def test_shapes_world_targets_satisfy_their_prompt():
    from genalign.targets import ShapesWorldTargets
    from genalign.toyworld import check_scene, parse_prompt, render_scene

    out = ShapesWorldTargets()(["two blue circles"], [3], size=32)
    image, objects = render_scene(parse_prompt("two blue circles"), seed=3, size=32)
    assert out.shape == (1, 3, 32, 32) and check_scene(parse_prompt("two blue circles"), objects).strict
    assert torch.allclose(out[0].permute(1, 2, 0) * 255, torch.tensor(list(image.getdata()), dtype=torch.float32).view(32, 32, 3))


def test_b2_threshold_keeps_only_branches_that_stand_out():
    """Batch statistics (min_count large) over (0, 10, 5, 5.2): μ = 5.05, σ = 3.5373. Group 0:
    z = (−1.4277, 1.4000), beyond ±0.5 -> both trained. Group 1: z = (−0.0141, 0.0424): its
    best-vs-worst gap is below the threshold -> neither row is trained (NaN)."""
    algo = B2DiffuRL(B2DiffuRLConfig(stat_min_count=100, select_threshold=0.5))
    adv = algo.advantages(torch.tensor([0.0, 10.0, 5.0, 5.2]), ["a", "a", "b", "b"], torch.tensor([0, 0, 1, 1]))
    sigma = math.sqrt(((0 - 5.05) ** 2 + (10 - 5.05) ** 2 + 0.05**2 + 0.15**2) / 4) + 1e-6
    assert adv[0].item() == pytest.approx(-5.05 / sigma, rel=1e-5)
    assert adv[1].item() == pytest.approx(4.95 / sigma, rel=1e-5)
    assert torch.isnan(adv[2:]).all(), "a group below the threshold trains no row"


def test_d3po_noise_window_plans_it_and_trains_only_its_steps():
    algo = D3PO(D3POConfig(noise_window=2, noise_window_starts=[0.0, 0.4]))
    plan = algo.plan(0, 0, torch.Generator())
    assert (plan.noise_window, plan.noise_window_starts, plan.shared_noise) == (2, (0.0, 0.4), True)
    assert algo.config.requires() == {"shared_noise", "noise_window"}
    b = traj([0, 0, 1, 1], k=6)
    b.mask = torch.zeros(4, 6, dtype=torch.bool)
    b.mask[:2, 1:3] = True  # group 0's window
    b.mask[2:, 3:5] = True  # group 1's window
    assert algo.train_steps(b, torch.Generator()).tolist() == [[1, 2], [1, 2], [3, 4], [3, 4]]
    assert D3PO().plan(0, 0, torch.Generator()).noise_window == 0 and D3POConfig().requires() == {"shared_noise"}
    with pytest.raises(ValueError, match="noise_window"):
        D3POConfig(noise_window=2, timestep_fraction=0.5).validate()
