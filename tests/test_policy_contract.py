"""The Policy protocol, checked the same way on every registered policy type.

One suite, parametrised over ``genalign.policies.POLICIES``: a policy type registered there
without a tiny build below fails ``test_suite_covers_every_registered_policy`` (and its
parametrised cases), so no policy can skip the contract. Each policy is built tiny from a
model saved by a conftest fixture and driven only through the protocol; conditions are dicts,
so a policy that stringifies them is caught (identity checks), and seeds are ints.

Tolerance: a log-prob recomputed by ``log_prob`` runs the same float32 network as the sampler
in another batch layout or operation order (a KV cache against one full forward pass; one UNet
call per step against all steps stacked), so it may differ in the last float32 bits of O(1)
activations, ~1e-6. ATOL = 1e-5 leaves a 10x margin; a wrong step, timestep, condition or
padding pairing moves a log-prob by orders of magnitude more (the update below moves them
by > 1e-3).
"""

from __future__ import annotations

import pytest
import torch

from genalign.policies import POLICIES
from genalign.policies.base import LOG_PROB_UNITS, SAMPLING_OPTIONS, Policy

ATOL = 1e-5
N = 2  # samples per condition
SEEDS = [11, 12, 13, 14]  # one per output row: 2 conditions x N


def _scene(color: tuple[int, int, int]):
    from PIL import Image

    return Image.new("RGB", (48, 48), color)


#: policy type (a "/variant" suffix: another pipeline family of the same type) -> (conftest fixture
#: with the saved tiny model, config keys, two conditions: prompts, or dicts with a prompt and
#: more, such as a VLM's image)
TINY = {
    "stable_diffusion": ("tiny_sd_dir", {"num_steps": 4, "guidance_scale": 3.0}, ["red circle", "two blue squares"]),
    "consistency": ("tiny_lcm_dir", {"num_steps": 4}, ["red circle", "two blue squares"]),
    "video_diffusion": ("tiny_video_dir", {"num_steps": 4, "guidance_scale": 3.0, "num_frames": 4},
                        ["red circle moving right", "two blue squares"]),
    "video_diffusion/animatediff": ("tiny_animatediff_dir", {"num_steps": 4, "guidance_scale": 3.0, "num_frames": 4},
                                    ["red circle moving right", "two blue squares"]),
    "flow_matching": ("tiny_sd3_dir", {"num_steps": 4, "guidance_scale": 3.0, "max_sequence_length": 4},
                      ["red circle", "two blue squares"]),
    "text_lm": ("tiny_lm_dir", {"max_new_tokens": 5}, ["w01 w02", "w03"]),
    # one question about an image, one text-only
    "vlm": ("tiny_vlm_dir", {"max_new_tokens": 5}, [{"prompt": "what color is the square ?", "image": _scene((200, 30, 30))},
                                                    "how many circles ?"]),
}


def test_suite_covers_every_registered_policy():
    assert {k.split("/")[0] for k in TINY} == set(POLICIES), "give every registered policy type a tiny build in TINY"


@pytest.fixture(scope="module", params=sorted(set(POLICIES) | set(TINY)))
def variant(request) -> str:
    """A tiny build of TINY (every registered policy type has one)."""
    if request.param not in TINY:
        pytest.fail(f"policy type {request.param!r} has no tiny build in TINY: the contract cannot skip it")
    return request.param


@pytest.fixture(scope="module")
def kind(variant) -> str:
    """The registered policy type of the build."""
    return variant.split("/")[0]


@pytest.fixture(scope="module")
def config(kind, variant, request):
    """A function giving a fresh tiny config of ``kind`` (its registered config class)."""
    fixture, keys, _ = TINY[variant]
    path = request.getfixturevalue(fixture)
    return lambda: POLICIES[kind][0](pretrained=path, **keys)


@pytest.fixture(scope="module")
def build(kind, config):
    """A function building a fresh tiny policy of ``kind`` through its registered class."""
    return lambda: POLICIES[kind][1].from_pretrained(config().pretrained, config())


@pytest.fixture(scope="module")
def conds(variant) -> list[dict]:
    """Dict conditions: nothing in a policy may turn them into strings."""
    return [{**(p if isinstance(p, dict) else {"prompt": p}), "key": f"c{i}", "answer": i} for i, p in enumerate(TINY[variant][2])]


@pytest.fixture(scope="module")
def policy(build):
    """A shared policy for the tests that do not change its weights."""
    return build()


@pytest.fixture(scope="module")
def traj(policy, conds):
    return policy.rollout(conds, N, SEEDS)


def all_steps(t) -> torch.Tensor:
    return torch.arange(t.num_steps)


def assert_same_outputs(a, b, atol: float = 0.0) -> None:
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, atol=atol, rtol=0)
    else:
        assert list(a) == list(b)


def test_declarations(kind, policy):
    cls = POLICIES[kind][1]
    assert isinstance(cls.capabilities, frozenset) and cls.capabilities <= set(SAMPLING_OPTIONS)
    assert cls.log_prob_unit in LOG_PROB_UNITS
    assert cls.step_chunk is None or (type(cls.step_chunk) is int and cls.step_chunk >= 1)
    assert isinstance(policy, Policy)


def test_rollout_rows_conditions_and_seeds(policy, conds, traj):
    b, t = len(SEEDS), traj.num_steps
    assert traj.batch_size == b and traj.group.tolist() == [0, 0, 1, 1]
    assert all(c is conds[i // N] for i, c in enumerate(traj.conditions))  # the objects, condition-major
    assert traj.mask.shape == traj.log_probs.shape == traj.step_ids.shape == (b, t) and traj.mask.dtype == torch.bool
    assert traj.mask.any(1).all() and len(traj.outputs) == b
    again = policy.rollout(conds, N, SEEDS)
    assert torch.equal(again.log_probs, traj.log_probs) and torch.equal(again.mask, traj.mask)
    assert_same_outputs(again.outputs, traj.outputs)
    other = policy.rollout(conds, N, [s + 100 for s in SEEDS])
    assert other.log_probs.shape != traj.log_probs.shape or not torch.equal(other.log_probs, traj.log_probs)


def test_rollout_log_probs_equal_recomputed_and_ratio_is_one(policy, traj):
    lp = policy.log_prob(traj, all_steps(traj))
    assert lp.shape == traj.log_probs.shape and lp.requires_grad
    m = traj.mask
    torch.testing.assert_close(lp.detach()[m], traj.log_probs[m], atol=ATOL, rtol=0)
    ratio = torch.exp(lp.detach() - traj.log_probs)[m]  # PPO's ratio before any update
    torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def updated(build, conds):
    """A fresh policy after one AdamW step on −mean log π of its own rollout's active steps."""
    policy = build()
    traj = policy.rollout(conds, N, SEEDS)
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2)
    loss = -policy.log_prob(traj, all_steps(traj))[traj.mask].mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return policy, traj


def test_update_moves_policy_not_reference(updated):
    policy, traj = updated
    m = traj.mask
    with torch.no_grad():
        moved = policy.log_prob(traj, all_steps(traj))
        with policy.reference():
            ref = policy.log_prob(traj, all_steps(traj))
    assert (moved - traj.log_probs)[m].abs().max() > 1e-3  # far beyond ATOL
    torch.testing.assert_close(ref[m], traj.log_probs[m], atol=ATOL, rtol=0)  # the reference did not move


def test_save_load_round_trip(kind, config, updated, tmp_path):
    policy, traj = updated
    policy.save_pretrained(str(tmp_path / "saved"))
    loaded = POLICIES[kind][1].from_pretrained(str(tmp_path / "saved"), config())
    with torch.no_grad():
        expected = policy.log_prob(traj, all_steps(traj))
        got = loaded.log_prob(traj, all_steps(traj))
        with loaded.reference():
            ref = loaded.log_prob(traj, all_steps(traj))
    assert torch.equal(got, expected)  # the same weights in the same network: bit for bit
    torch.testing.assert_close(ref[traj.mask], traj.log_probs[traj.mask], atol=ATOL, rtol=0)


def test_continue_from_per_row_branch_steps(policy, traj):
    b, t = traj.batch_size, traj.num_steps
    lengths = traj.mask.sum(1)
    steps = torch.minimum(torch.arange(b), lengths - 1)  # per row: 0, 1, 2, … within each row's active steps
    assert t == 1 or len(set(steps.tolist())) > 1  # rows really branch at different steps
    n = 2
    child = policy.continue_from(traj, steps, n, list(range(200, 200 + b * n)))
    parent = torch.arange(b).repeat_interleave(n)
    assert child.batch_size == b * n and child.group.tolist() == parent.tolist()
    assert child.extras["branch_step"].tolist() == steps.repeat_interleave(n).tolist()
    assert all(c is traj.conditions[p] for c, p in zip(child.conditions, parent.tolist()))
    assert len(child.outputs) == b * n
    for i, p in enumerate(parent.tolist()):
        s = int(steps[p])
        assert torch.equal(child.log_probs[i, :s], traj.log_probs[p, :s])
        assert torch.equal(child.mask[i, :s], traj.mask[p, :s])
        if traj.actions is not None:
            assert torch.equal(child.actions[i, :s], traj.actions[p, :s])
        if traj.states is not None:  # the branch starts from the parent's state before step s
            assert torch.equal(child.states[i, : s + 1], traj.states[p, : s + 1])
    new = (child.step_ids >= child.extras["branch_step"].unsqueeze(1)) & child.mask
    assert new.any(1).all()
    lp = policy.log_prob(child, all_steps(child)).detach()
    torch.testing.assert_close(lp[new], child.log_probs[new], atol=ATOL, rtol=0)


def test_start_and_steps_reproduce_rollout(policy, conds, traj):
    gens = policy.row_generators(conds, N, SEEDS)  # each row's stream, continued step by step
    part = policy.start(conds, N, gens)
    assert part.batch_size == len(SEEDS) and not part.mask.any() and part.outputs is None
    assert all(c is conds[i // N] for i, c in enumerate(part.conditions))
    for j in range(part.num_steps):
        part = policy.step(part, j, 1, gens)
    t = traj.num_steps
    assert part.outputs is not None and part.group.tolist() == list(range(len(SEEDS)))
    assert torch.equal(part.mask[:, :t], traj.mask) and not part.mask[:, t:].any()
    torch.testing.assert_close(part.log_probs[:, :t], traj.log_probs, atol=ATOL, rtol=0)
    assert_same_outputs(part.outputs, traj.outputs, atol=ATOL)


def test_step_with_candidates(policy, conds):
    b = len(SEEDS)
    part = policy.step(policy.start(conds, N, SEEDS), 0, 2, list(range(400, 400 + 2 * b)))
    assert part.batch_size == 2 * b and part.group.tolist() == torch.arange(b).repeat_interleave(2).tolist()
    assert part.mask[:, 0].all() and not part.mask[:, 1:].any()
    assert all(c is conds[i // (2 * N)] for i, c in enumerate(part.conditions))


def test_forward_process_reaches_given_outputs(policy, traj):
    b = traj.batch_size
    fp = policy.forward_process(traj.conditions, traj.outputs, list(range(300, 300 + b)))
    assert fp.batch_size == b and all(c is d for c, d in zip(fp.conditions, traj.conditions))
    assert fp.mask.shape == fp.log_probs.shape == (b, fp.num_steps) and fp.mask.any(1).all()
    assert_same_outputs(fp.outputs, traj.outputs)
    lp = policy.log_prob(fp, all_steps(fp))
    assert lp.requires_grad and torch.isfinite(lp).all()
    lp[fp.mask].sum().backward()
    params = policy.trainable_parameters()
    grads = [p.grad for p in params if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    for p in params:
        p.grad = None


def test_predict_final(policy, traj):
    assert_same_outputs(policy.predict_final(traj, traj.num_steps), traj.outputs, atol=ATOL)
    early = policy.predict_final(traj, 1)
    if isinstance(traj.outputs, torch.Tensor):
        assert early.shape == traj.outputs.shape and 0 <= early.min() and early.max() <= 1
    else:
        assert len(early) == traj.batch_size and all(isinstance(o, type(traj.outputs[0])) for o in early)


def test_undeclared_sampling_option_raises(kind, policy, conds):
    undeclared = sorted(set(SAMPLING_OPTIONS) - POLICIES[kind][1].capabilities) + ["not_an_option"]
    for name in undeclared:
        with pytest.raises(ValueError, match=name):
            policy.rollout(conds, N, SEEDS, **{name: True})
