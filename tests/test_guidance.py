"""SVDD and best-of-N against the Policy protocol, on a tiny seeded Stable Diffusion."""

import pytest
import torch

from genalign.guidance import ComputeCounter, PMValue, best_of_n, select_candidates, svdd_sample
from genalign.policies import StableDiffusionPolicy, StableDiffusionPolicyConfig
from rewards.base import RewardOutput

PROMPTS = ["a red circle", "a blue square"]


def make_policy(path, num_steps=4):
    return StableDiffusionPolicy.from_pretrained(path, StableDiffusionPolicyConfig(pretrained=path, num_steps=num_steps))


class Brightness:
    """Hand-built reward: mean pixel value (differs between any two samples)."""

    def __call__(self, outputs, conditions):
        s = outputs.float().flatten(1).mean(1)
        return RewardOutput(scores=s, components={"brightness": s})


def gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_start_then_steps_equals_rollout(tiny_sd_dir):
    policy = make_policy(tiny_sd_dir)
    seeds = [3, 4, 5, 6]
    plain = policy.rollout(PROMPTS, 2, gens(seeds))
    own = gens(seeds)
    traj = policy.start(PROMPTS, 2, own)
    assert not traj.mask.any()
    for k in range(traj.num_steps):
        traj = policy.step(traj, k, 1, own)
    assert traj.mask.all()
    torch.testing.assert_close(traj.actions, plain.actions, rtol=0, atol=0)
    torch.testing.assert_close(traj.log_probs, plain.log_probs, rtol=0, atol=0)
    torch.testing.assert_close(traj.outputs, plain.outputs, rtol=0, atol=0)


def test_one_candidate_is_plain_sampling(tiny_sd_dir):
    policy = make_policy(tiny_sd_dir)
    seeds = [10, 11]
    out = svdd_sample(policy, PROMPTS, 1, seeds, PMValue(policy, Brightness()), num_candidates=1)
    plain = policy.rollout(PROMPTS, 1, gens(seeds))
    torch.testing.assert_close(out.outputs, plain.outputs, rtol=0, atol=0)


def test_select_candidates_argmax_and_softmax():
    v = torch.tensor([[0.1, 0.9, 0.3], [2.0, float("nan"), 1.0]])
    assert select_candidates(v, 0.0).tolist() == [1, 0]
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([select_candidates(torch.tensor([[0.0, 1.0]]), 0.5, g) for _ in range(2000)]).float()
    # softmax([0, 1] / 0.5) = [0.119, 0.881]
    assert draws.mean().item() == pytest.approx(0.881, abs=0.03)
    assert select_candidates(torch.tensor([[float("nan"), 0.0]]), 1.0, g).item() == 1


def test_svdd_pm_raises_the_value_it_follows(tiny_sd_dir):
    """With the brightness reward as value (the random tiny VAE varies it only slightly), the
    guided sample is brighter than the plain sample of the same seed for most seeds, and the
    compute is counted."""
    policy = make_policy(tiny_sd_dir)
    seeds = list(range(20, 28))
    counter = ComputeCounter()
    guided = svdd_sample(policy, PROMPTS, 4, seeds, PMValue(policy, Brightness(), counter), num_candidates=4, counter=counter)
    plain = policy.rollout(PROMPTS, 4, gens(seeds))
    b_guided = Brightness()(guided.outputs, guided.conditions).scores
    b_plain = Brightness()(plain.outputs, plain.conditions).scores
    assert b_guided.mean() > b_plain.mean()
    assert (b_guided > b_plain).float().mean() >= 0.75
    t, rows = policy.scheduler.timesteps.numel(), len(seeds)
    assert counter.model_evals == rows * 4 * t + rows * 4 * (t - 1)  # candidate steps + x̂0 predictions
    assert counter.reward_calls == rows * 4 * t
    assert counter.decoder_calls == rows * 4 * (t - 1) + rows * 4  # x̂0 previews + the finished candidates
    assert guided.conditions == plain.conditions


def test_best_of_n_picks_the_argmax(tiny_sd_dir):
    policy = make_policy(tiny_sd_dir)
    seeds = list(range(8))
    chosen, scores = best_of_n(policy, PROMPTS, 4, seeds, Brightness())
    all_ = policy.rollout(PROMPTS, 4, gens(seeds))
    b = Brightness()(all_.outputs, all_.conditions).scores.view(2, 4)
    torch.testing.assert_close(scores, b.max(1).values)
    assert chosen.batch_size == 2 and chosen.conditions == PROMPTS


def test_bad_arguments(tiny_sd_dir):
    policy = make_policy(tiny_sd_dir)
    with pytest.raises(ValueError, match="one seed per output row"):
        svdd_sample(policy, PROMPTS, 2, [0], PMValue(policy, Brightness()))
    with pytest.raises(ValueError, match="num_candidates"):
        svdd_sample(policy, PROMPTS, 1, [0, 1], PMValue(policy, Brightness()), num_candidates=0)


def test_value_function_trains_saves_and_guides(tiny_sd_dir, tmp_path):
    """MC targets from rollouts: the training loss falls well below the target variance (32
    rollouts of a random tiny model are too few to test generalisation; `genalign value`
    reports the held-out loss over whole held-out rollouts); the saved net reloads
    bit-for-bit and guides SVDD-MC without reward calls."""
    from genalign.guidance.value_model import (
        MCValue,
        ValueNet,
        ValueNetConfig,
        train_value,
        value_dataset,
    )

    torch.manual_seed(0)
    policy = make_policy(tiny_sd_dir)
    traj = policy.rollout(PROMPTS, 16, gens(range(32)))
    r = Brightness()(traj.outputs, traj.conditions).scores
    r = (r - r.mean()) / r.std()  # standardised so the loss scale is ~1
    data = value_dataset(traj, r)
    t = traj.num_steps
    assert data[0].shape[0] == 32 * (t + 1) and data[1].max() == t
    net = ValueNet(ValueNetConfig(in_channels=4, cond_dim=32, num_steps=t, width=16))
    hist = train_value(net, data, epochs=30, lr=3e-3, batch_size=64)
    assert hist["train"][-1] < 0.5 * hist["train"][0] and hist["train"][-1] < 0.8 * float(data[3].var())
    assert len(hist["heldout"]) == 31 and all(v == v for v in hist["heldout"])
    net.save(str(tmp_path / "v"))
    loaded = ValueNet.load(str(tmp_path / "v"))
    x, s, c, _, rollout = data
    assert rollout.max() == 31 and int((rollout == 0).sum()) == t + 1
    torch.testing.assert_close(loaded(x[:8], s[:8], c[:8]), net(x[:8], s[:8], c[:8]))
    counter = ComputeCounter()
    out = svdd_sample(policy, PROMPTS, 1, [0, 1], MCValue(loaded, counter), num_candidates=3, counter=counter)
    assert out.outputs.shape[0] == 2 and counter.reward_calls == 0 and counter.extra["value_calls"] == 2 * 3 * t
    assert counter.decoder_calls == 2 * 3  # only the last step's candidates are decoded
    with pytest.raises(FileNotFoundError, match="value.safetensors"):
        ValueNet.load(str(tmp_path / "missing"))
