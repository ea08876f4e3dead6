"""Self-certainty (KL of the next-token distribution from uniform, averaged over the response) and
Borda voting: exact values on hand-built distributions, then on the tiny LM."""

from __future__ import annotations

import math

import pytest
import torch

from genalign.guidance.self_certainty import (
    borda_select,
    borda_vote,
    certainty_from_log_probs,
    self_certainty,
    self_certainty_best_of_n,
    tagged_answer,
)
from genalign.policies.text_lm import TextLMPolicy, TextLMPolicyConfig

V = 8
# float32 log-probs of magnitude <= log(V / eps) ~ 8, averaged over V = 8 entries: rounding stays
# below 8 * 2**-23 * 8 ~ 1e-5 per step
TOL = 1e-5


def peaked(v: int, eps: float) -> tuple[torch.Tensor, float]:
    """One step's log-probs: 1 - eps on token 0, eps / (v - 1) elsewhere; and SC in closed form
    -(1/v) [log(v (1 - eps)) + (v - 1) log(v eps / (v - 1))]."""
    p = torch.full((v,), eps / (v - 1), dtype=torch.float64)
    p[0] = 1 - eps
    exact = -(math.log(v * (1 - eps)) + (v - 1) * math.log(v * eps / (v - 1))) / v
    return p.log().float(), exact


def test_uniform_gives_zero_and_peaked_gives_the_closed_form():
    uniform = torch.full((1, 3, V), -math.log(V))
    assert abs(float(certainty_from_log_probs(uniform, torch.ones(1, 3, dtype=torch.bool))[0])) < TOL
    lp, exact = peaked(V, 0.1)
    got = float(certainty_from_log_probs(lp.view(1, 1, V), torch.ones(1, 1, dtype=torch.bool))[0])
    assert exact == pytest.approx(1.6512, abs=1e-4)  # -(log 7.2 + 7 log(0.8 / 7)) / 8 = -(1.9741 - 15.1837) / 8
    assert abs(got - exact) < TOL


def test_tokens_outside_the_action_set_are_not_in_the_uniform():
    """A VLM's image placeholders are −inf: SC is that of the distribution over the other tokens."""
    p = torch.tensor([0.5, 0.25, 0.125, 0.125])
    inside = certainty_from_log_probs(p.log().view(1, 1, 4), torch.ones(1, 1, dtype=torch.bool))
    padded = torch.cat([p.log(), torch.full((3,), -torch.inf)]).view(1, 1, 7)
    outside = certainty_from_log_probs(padded, torch.ones(1, 1, dtype=torch.bool))
    exact = -(math.log(0.5) + math.log(0.25) + 2 * math.log(0.125)) / 4 - math.log(4)  # 0.3466
    assert inside.item() == pytest.approx(exact, rel=1e-6) and outside.item() == pytest.approx(exact, rel=1e-6)


def test_mean_is_over_active_tokens_only_and_padding_is_ignored():
    """Row 0: a uniform step, a peaked step, then a padding step holding NaN; row 1: no active
    step. The mean is over the 2 active steps (exact / 2): a mean over all T steps (exact / 3),
    a sum (exact), a flipped sign (-exact / 2) or masking by multiplication (NaN) all differ by
    far more than the tolerance."""
    lp, exact = peaked(V, 0.1)
    steps = torch.stack([torch.full((V,), -math.log(V)), lp, torch.full((V,), float("nan"))])
    x = torch.stack([steps, steps])  # [2, 3, V]
    mask = torch.tensor([[True, True, False], [False, False, False]])
    sc = certainty_from_log_probs(x, mask)
    assert abs(float(sc[0]) - exact / 2) < TOL
    assert sc[1] == -torch.inf
    for wrong in (exact / 3, exact, -exact / 2):
        assert abs(wrong - exact / 2) > 100 * TOL


def test_more_peaked_is_more_certain():
    values = [peaked(V, eps)[1] for eps in (0.5, 0.1, 0.01)]
    assert 0 < values[0] < values[1] < values[2]


def test_borda_weights_by_rank_and_p_zero_is_majority():
    """Certainties 5 > 4 > 3 > 2 > 1 with answers a, b, b, c, a (N = 5).
    p = 0: a 2, b 2, c 1 -> tie, a's best sample is more certain -> sample 0, share 2/5.
    p = 1: a 5 + 1, b 4 + 3, c 2 -> b (sample 1), share 7/15.
    p = 2: a 25 + 1, b 16 + 9, c 4 -> a (sample 0), share 26/55."""
    certainty = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])
    answers = [["a", "b", "b", "c", "a"]]
    for p, idx, share in ((0.0, 0, 2 / 5), (1.0, 1, 7 / 15), (2.0, 0, 26 / 55)):
        chosen, got = borda_select(certainty, answers, p)
        assert int(chosen[0]) == idx and abs(float(got[0]) - share) < 1e-6
    # ranks follow certainty, not sample order: reversing the certainties makes sample 4 rank 1
    chosen, got = borda_select(certainty.flip(1), answers, 1.0)  # a: 5 + 1, b: 3 + 2, c: 4
    assert int(chosen[0]) == 4 and abs(float(got[0]) - 6 / 15) < 1e-6


def test_borda_skips_unanswered_samples():
    certainty = torch.tensor([[9.0, 1.0, 0.5], [3.0, 2.0, 1.0]])
    chosen, share = borda_select(certainty, [[None, "x", "y"], [None, None, None]], 1.0)
    assert chosen.tolist() == [1, 0]  # x (2 votes) beats y (1); nobody voted -> most certain
    assert share.tolist() == pytest.approx([2 / 3, 0.0])
    with pytest.raises(ValueError, match="power"):
        borda_select(certainty, [["a"] * 3] * 2, -1.0)


def test_tagged_answer_normalises():
    ans = tagged_answer()
    assert ans("<answer>  Top   LEFT. </answer>") == "top left"
    assert ans("<answer> a </answer> <answer> b </answer>") == "b"
    assert ans("no tags") is None and ans("<answer> </answer>") is None


@pytest.fixture(scope="module")
def policy(tiny_lm_dir):
    return TextLMPolicy.from_pretrained(tiny_lm_dir, TextLMPolicyConfig(max_new_tokens=6, temperature=0.7))


def test_token_logits_are_the_scored_distribution(policy):
    """[B, T, V] float32 log-probs that normalise, and whose entries at the actions are log_prob."""
    traj = policy.rollout(["w01 w02", "w03"], 2, [0, 1, 2, 3])
    logits = policy.token_logits(traj)
    assert logits.shape == (4, traj.num_steps, policy.model.config.vocab_size) and logits.dtype == torch.float32
    assert not logits.requires_grad
    m = traj.mask
    torch.testing.assert_close(logits.exp().sum(-1)[m], torch.ones(int(m.sum())), rtol=0, atol=1e-5)
    at_actions = logits.gather(-1, traj.actions.unsqueeze(-1)).squeeze(-1)
    lp = policy.log_prob(traj, torch.arange(traj.num_steps)).detach()
    torch.testing.assert_close(at_actions[m], lp[m], rtol=0, atol=1e-5)
    torch.testing.assert_close(at_actions[m], traj.log_probs[m], rtol=0, atol=1e-4)  # sampled = scored (float32 cache vs full pass)
    # self_certainty is the closed form on those distributions
    expected = [float(-(logits[b, m[b]].mean(-1) + math.log(logits.shape[-1])).mean()) for b in range(4)]
    assert self_certainty(policy, traj).tolist() == pytest.approx(expected, abs=1e-5)


def test_selection_on_the_tiny_lm(policy):
    conds = ["w01 w02", "w05"]
    seeds = list(range(10, 18))
    chosen, sc = self_certainty_best_of_n(policy, conds, 4, seeds)
    traj = policy.rollout(conds, 4, seeds)  # the same samples, scored independently
    all_sc = self_certainty(policy, traj).view(2, 4)
    best = all_sc.argmax(1)
    assert chosen.outputs == [traj.outputs[c * 4 + int(best[c])] for c in range(2)]
    torch.testing.assert_close(sc, all_sc.max(1).values)
    assert chosen.group.tolist() == [0, 1]

    def first_word(text):
        return text.split()[0] if text.split() else None

    picked, share = borda_vote(policy, conds, 4, seeds, first_word, power=0.0)
    for c in range(2):  # majority of first words; the chosen sample is the most certain of the winner
        words = [first_word(traj.outputs[c * 4 + i]) for i in range(4)]
        counts = {w: words.count(w) for w in words if w is not None}
        top = max(counts.values())
        assert first_word(picked.outputs[c]) in [w for w in counts if counts[w] == top]
        assert float(share[c]) == pytest.approx(top / sum(counts.values()))
        mates = [i for i in range(4) if words[i] == first_word(picked.outputs[c])]
        assert picked.outputs[c] == traj.outputs[c * 4 + max(mates, key=lambda i: float(all_sc[c, i]))]
