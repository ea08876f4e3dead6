"""TextLMPolicy on a tiny Llama built in code: sampling, log-probs, branching, references, I/O."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import (
    AutoModelForCausalLM,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from genalign.policies.base import Policy
from genalign.policies.text_lm import TextLMPolicy, TextLMPolicyConfig
from genalign.policies.unet_tuning import POLICY_FILE
from genalign.trajectory import Padded, Trajectory

PAD, BOS, EOS = 0, 1, 2  # the ids conftest.build_tiny_lm gives its special tokens
WORDS = [f"w{i:02d}" for i in range(32)] + ["user", "bot", ":"]  # fixed-width words: no word is inside another
CHAT = "{% for m in messages %}user : {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}bot :{% endif %}"
PROMPTS = ["w01 w02", "w03", {"prompt": "w04 w05 w06", "answer": 3}]
SEEDS = list(range(100, 106))  # 3 conditions x 2 samples


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory, tiny_lm_builder):
    d = tmp_path_factory.mktemp("tiny_lm")
    tiny_lm_builder(d, WORDS)
    return str(d)


def make(path, **kw) -> TextLMPolicy:
    kw.setdefault("max_new_tokens", 10)
    return TextLMPolicy.from_pretrained(path, TextLMPolicyConfig(pretrained=path, **kw))


@pytest.fixture(scope="module")
def policy(lm_dir):
    return make(lm_dir)


def all_steps(traj):
    return torch.arange(traj.num_steps)


def test_rollout_shapes_mask_padding(policy):
    assert isinstance(policy, Policy)
    assert policy.capabilities == frozenset({"shared_noise"}) and policy.log_prob_unit == "token" and policy.step_chunk is None
    traj = policy.rollout(PROMPTS, n_per_condition=2, seeds=SEEDS)
    lengths = traj.mask.sum(1)
    assert traj.batch_size == 6 and traj.num_steps == int(lengths.max()) <= 10
    assert traj.aligned is False and traj.states is None and traj.timesteps is None
    assert traj.conditions[4] is PROMPTS[2]  # the objects themselves, condition-major
    assert traj.group.tolist() == [0, 0, 1, 1, 2, 2]
    assert traj.step_ids.tolist() == [list(range(traj.num_steps))] * 6
    # mask: a prefix of each row; the last active token is EOS unless the row hit max_new_tokens
    assert torch.equal(traj.mask, torch.arange(traj.num_steps) < lengths.unsqueeze(1))
    assert (traj.actions[~traj.mask] == PAD).all() and (traj.log_probs[~traj.mask] == 0).all()
    for row, n in zip(traj.actions, lengths.tolist()):
        assert (EOS not in row[: n - 1].tolist()) and (row[n - 1] == EOS or n == 10)
    assert len(set(lengths.tolist())) > 1  # the batch really has padding
    assert (traj.log_probs[traj.mask] < 0).all()
    prompts = traj.extras["prompt_ids"]
    assert isinstance(prompts, Padded) and prompts.side == "left" and prompts.pad_value == PAD
    assert prompts.tensor[2].tolist() == [PAD, PAD, BOS, policy.tokenizer.get_vocab()["w03"]]  # "<s> w03" left-padded to 4
    assert traj.extras["prompt_mask"].tensor[2].tolist() == [0, 0, 1, 1]
    texts = [policy.tokenizer.decode(r[: int(n)].tolist(), skip_special_tokens=True) for r, n in zip(traj.actions, lengths)]
    assert traj.outputs == texts


def test_rollout_log_probs_equal_recomputed(policy):
    traj = policy.rollout(PROMPTS, n_per_condition=2, seeds=SEEDS)
    lp = policy.log_prob(traj, all_steps(traj))
    assert lp.requires_grad and lp.dtype == torch.float32
    # KV-cache vs one full forward: the same float32 math in a different order (~1e-6)
    torch.testing.assert_close(lp.detach(), traj.log_probs, atol=1e-5, rtol=0)
    # [B, K] steps gather per row
    steps = torch.tensor([[0, 1]] * 6)
    torch.testing.assert_close(policy.log_prob(traj, steps).detach(), traj.log_probs[:, :2], atol=1e-5, rtol=0)
    # a log-prob is log softmax(logits / temperature): recompute one by hand
    hot = make(policy.config.pretrained, temperature=0.7)
    traj = hot.rollout(["w03"], seeds=[1])
    ids = torch.cat([traj.extras["prompt_ids"].tensor, traj.actions], 1)
    logits = hot.model(input_ids=ids).logits[0, 1]  # predicts the first response token
    expected = torch.log_softmax(logits / 0.7, -1)[traj.actions[0, 0]]
    torch.testing.assert_close(traj.log_probs[0, 0], expected.detach(), atol=1e-5, rtol=0)


def test_same_seeds_same_samples_in_any_batch(policy):
    a = policy.rollout(PROMPTS, n_per_condition=2, seeds=SEEDS)
    b = policy.rollout(PROMPTS, n_per_condition=2, seeds=SEEDS)
    assert torch.equal(a.actions, b.actions) and a.outputs == b.outputs
    for row in range(6):  # rows 2-5 are left-padded in the batch, not alone
        alone = policy.rollout([PROMPTS[row // 2]], n_per_condition=1, seeds=[SEEDS[row]])
        n = int(alone.mask.sum())
        assert a.actions[row, :n].tolist() == alone.actions[0, :n].tolist() and int(a.mask[row].sum()) == n
        assert a.outputs[row] == alone.outputs[0]
    assert not torch.equal(a.actions[4], a.actions[5])  # different seeds, different samples


def test_top_p_recomputes_and_restricts_to_nucleus(lm_dir, policy):
    nucleus = make(lm_dir, top_p=1e-6)  # only the most likely token survives: greedy
    assert nucleus.config.recompute
    traj = nucleus.rollout(PROMPTS, n_per_condition=2, seeds=SEEDS)
    greedy = policy.predict_final(traj, 0)
    assert traj.outputs == greedy
    # the stored log-probs are the full distribution's (recomputed), not the nucleus' 0
    torch.testing.assert_close(traj.log_probs, policy.log_prob(traj, all_steps(traj)).detach(), atol=1e-5, rtol=0)
    assert (traj.log_probs[traj.mask] < 0).all()


def test_stop_strings_end_rows_and_cut_text(lm_dir, policy):
    free = policy.rollout(PROMPTS, n_per_condition=2, seeds=SEEDS)
    words = free.outputs[0].split()
    assert len(words) >= 4
    stop = f"{words[1]} {words[2]}"  # a two-token stop string: completed by the third token
    stopped = make(lm_dir, stop_strings=[stop]).rollout(PROMPTS, n_per_condition=2, seeds=SEEDS)
    for i in range(6):
        text = free.outputs[i]
        if stop in text:
            decode = policy.tokenizer.decode  # the shortest prefix whose text holds the stop string
            keep = next(k for k in range(1, 11) if stop in decode(free.actions[i, :k].tolist(), skip_special_tokens=True))
            assert int(stopped.mask[i].sum()) == keep
            assert stopped.actions[i, :keep].tolist() == free.actions[i, :keep].tolist()
            assert stopped.outputs[i] == text[: text.find(stop)]
        else:
            assert stopped.outputs[i] == text
    assert stopped.outputs[0] == f"{words[0]} "


def test_chat_template_renders_a_user_message(tmp_path, tiny_lm_builder):
    tiny_lm_builder(tmp_path, WORDS, chat_template=CHAT)
    chat = make(str(tmp_path), chat_template=True)
    traj = chat.rollout(["w03"], seeds=[0])
    vocab = chat.tokenizer.get_vocab()
    expected = [vocab[w] for w in ["user", ":", "w03", "bot", ":"]]
    assert traj.extras["prompt_ids"].tensor[0].tolist() == expected
    plain = make(str(tmp_path)).rollout(["w03"], seeds=[0])
    assert plain.extras["prompt_ids"].tensor[0].tolist() == [BOS, vocab["w03"]]


def test_chat_template_without_one_raises(lm_dir):
    with pytest.raises(ValueError, match="chat template"):
        make(lm_dir, chat_template=True)


def test_start_and_steps_reproduce_rollout(policy):
    traj = policy.rollout(PROMPTS, n_per_condition=2, seeds=SEEDS)
    gens = policy.row_generators(PROMPTS, 2, SEEDS)  # the rollout's per-row streams (seed mixed with the prompt)
    part = policy.start(PROMPTS, n_per_condition=2, seeds=gens)
    assert part.num_steps == 10 and not part.mask.any() and part.outputs is None
    for j in range(part.num_steps):
        part = policy.step(part, j, n=1, seeds=gens)
        if part.outputs is not None:
            break
    t = traj.num_steps
    assert torch.equal(part.mask[:, :t], traj.mask) and not part.mask[:, t:].any()
    assert torch.equal(part.actions[:, :t], traj.actions)
    torch.testing.assert_close(part.log_probs[:, :t], traj.log_probs, atol=1e-5, rtol=0)
    assert part.outputs == traj.outputs and part.group.tolist() == list(range(6))


def test_step_branches_candidates(policy):
    part = policy.start(["w03"], seeds=[0])
    part = policy.step(part, 0, n=3, seeds=[1, 2, 3])
    assert part.batch_size == 3 and part.group.tolist() == [0, 0, 0] and part.mask[:, 0].all()
    assert not part.mask[:, 1:].any()
    nxt = policy.step(part, 1, n=2, seeds=[4, 5, 6, 7, 8, 9])
    assert nxt.group.tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.equal(nxt.actions[:, 0], part.actions.repeat_interleave(2, 0)[:, 0])


def test_continue_from_keeps_prefixes(policy):
    traj = policy.rollout(PROMPTS, n_per_condition=2, seeds=SEEDS)
    lengths = traj.mask.sum(1)
    steps = torch.minimum(torch.tensor([0, 1, 2, 1, 3, 2]), lengths - 1)
    out = policy.continue_from(traj, steps, n=2, seeds=list(range(12)))
    assert out.batch_size == 12 and out.group.tolist() == [i for i in range(6) for _ in range(2)]
    assert torch.equal(out.extras["branch_step"], steps.repeat_interleave(2))
    assert out.conditions[9] is traj.conditions[4]
    for r in range(12):
        p, s = r // 2, int(steps[r // 2])
        assert out.actions[r, :s].tolist() == traj.actions[p, :s].tolist()
        assert torch.equal(out.log_probs[r, :s], traj.log_probs[p, :s])
        assert out.mask[r, :s].all() and 0 < int(out.mask[r].sum()) <= 10
    torch.testing.assert_close(out.log_probs, policy.log_prob(out, all_steps(out)).detach(), atol=1e-5, rtol=0)
    assert torch.equal(out.extras["prompt_ids"].tensor, traj.extras["prompt_ids"].tensor.repeat_interleave(2, 0))
    # a continuation of a seed equals the parent when it branches at step 0 with the parent's seed
    again = policy.continue_from(traj, torch.zeros(6, dtype=torch.long), n=1, seeds=SEEDS)
    assert again.outputs == traj.outputs


def test_forward_process_is_teacher_forced(policy):
    outs = ["w07 w08", "w09"]
    traj = policy.forward_process(PROMPTS[:2], outs)
    vocab = policy.tokenizer.get_vocab()
    assert traj.actions.tolist() == [[vocab["w07"], vocab["w08"], EOS], [vocab["w09"], EOS, PAD]]
    assert traj.mask.tolist() == [[True] * 3, [True, True, False]]
    assert (traj.log_probs == 0).all() and traj.outputs == outs and traj.group.tolist() == [0, 1]
    lp = policy.log_prob(traj, all_steps(traj))
    ids = torch.tensor([[BOS, vocab["w01"], vocab["w02"], vocab["w07"], vocab["w08"], EOS]])
    manual = torch.log_softmax(policy.model(input_ids=ids).logits[0, 2:5], -1).gather(-1, ids[0, 3:6, None])[:, 0]
    torch.testing.assert_close(lp[0].detach(), manual.detach(), atol=1e-5, rtol=0)
    assert lp[1, 2] == 0
    # different T from a rollout: trajectories still concatenate
    both = Trajectory.cat([traj, policy.rollout(PROMPTS[:1], seeds=[0])])
    assert both.batch_size == 3


def test_predict_final_is_greedy_generate(lm_dir, policy):
    traj = policy.rollout(PROMPTS, n_per_condition=1, seeds=SEEDS[:3])
    plain = AutoModelForCausalLM.from_pretrained(lm_dir)
    ids, mask = traj.extras["prompt_ids"].tensor, traj.extras["prompt_mask"].tensor
    gen = plain.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=10)[:, ids.shape[1]:]
    expected = [policy.tokenizer.decode(r.tolist(), skip_special_tokens=True) for r in gen]
    assert policy.predict_final(traj, 0) == expected
    assert policy.predict_final(traj, traj.num_steps) == traj.outputs
    # from a prefix: the kept tokens, then the greedy continuation of prompt + kept
    mid = policy.predict_final(traj, 1)
    first = [policy.tokenizer.decode(traj.actions[i, :1].tolist(), skip_special_tokens=True) for i in range(3)]
    assert all(m.startswith(f) for m, f in zip(mid, first))


def lora_step(policy, traj, seed=0):
    opt = torch.optim.SGD(policy.trainable_parameters(), lr=0.5)
    loss = -policy.log_prob(traj, all_steps(traj)).sum()
    loss.backward()
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_reference_is_the_starting_model(lm_dir, finetune):
    pol = make(lm_dir, finetune=finetune, lora_rank=4)
    traj = pol.rollout(PROMPTS, n_per_condition=2, seeds=SEEDS)
    before = pol.log_prob(traj, all_steps(traj)).detach()
    lora_step(pol, traj)
    after = pol.log_prob(traj, all_steps(traj)).detach()
    with pol.reference():
        ref = pol.log_prob(traj, all_steps(traj)).detach()
    assert (after - ref).abs().max() > 1e-3
    torch.testing.assert_close(ref, before, atol=1e-6, rtol=0)
    base = LlamaForCausalLM.from_pretrained(lm_dir)
    ids = torch.cat([traj.extras["prompt_ids"].tensor, traj.actions], 1)
    attn = torch.cat([traj.extras["prompt_mask"].tensor, traj.mask.long()], 1)
    with pol.reference(), torch.no_grad():
        # outside log_prob too: the reference's logits are the base model's
        inner = pol.module(input_ids=ids, attention_mask=attn).logits
    torch.testing.assert_close(inner, base(input_ids=ids, attention_mask=attn).logits.detach(), atol=1e-5, rtol=0)
    names = set(pol.trainable_state_dict())
    assert all("lora_" in n for n in names) if finetune == "lora" else len(names) == len(list(base.parameters()))


def test_lora_save_loads_with_plain_peft(lm_dir, tmp_path):
    pol = make(lm_dir, lora_rank=4)
    traj = pol.rollout(PROMPTS, n_per_condition=2, seeds=SEEDS)
    lora_step(pol, traj)
    expected = pol.log_prob(traj, all_steps(traj)).detach()
    out = tmp_path / "saved"
    pol.save_pretrained(str(out))
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    meta = json.loads((out / POLICY_FILE).read_text())
    assert meta["type"] == "text_lm" and meta["finetune"] == "lora" and meta["base"].startswith("..")
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(lm_dir), str(out))
    ids = torch.cat([traj.extras["prompt_ids"].tensor, traj.actions], 1)
    attn = torch.cat([traj.extras["prompt_mask"].tensor, traj.mask.long()], 1)
    with torch.no_grad():
        logits = plain(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp(min=0)).logits
    p = ids.shape[1] - traj.num_steps
    lp = torch.log_softmax(logits[:, p - 1 : -1], -1).gather(-1, traj.actions.unsqueeze(-1))[..., 0] * traj.mask
    torch.testing.assert_close(lp, expected, atol=1e-5, rtol=0)
    loaded = TextLMPolicy.from_pretrained(str(out))
    assert loaded.config.lora_rank == 4 and loaded.config.pretrained == lm_dir
    torch.testing.assert_close(loaded.log_prob(traj, all_steps(traj)).detach(), expected, atol=1e-6, rtol=0)
    state = pol.trainable_state_dict()
    assert set(state) == set(loaded.trainable_state_dict())
    fresh = make(lm_dir, lora_rank=4)
    fresh.load_trainable_state_dict(state)
    torch.testing.assert_close(fresh.log_prob(traj, all_steps(traj)).detach(), expected, atol=1e-6, rtol=0)


def test_full_finetune_save_load(lm_dir, tmp_path):
    pol = make(lm_dir, finetune="full")
    traj = pol.rollout(PROMPTS, n_per_condition=2, seeds=SEEDS)
    lora_step(pol, traj)
    expected = pol.log_prob(traj, all_steps(traj)).detach()
    pol.save_pretrained(str(tmp_path / "full"))
    assert (tmp_path / "full" / "model.safetensors").is_file()
    loaded = TextLMPolicy.from_pretrained(str(tmp_path / "full"))
    assert loaded.config.finetune == "full"
    torch.testing.assert_close(loaded.log_prob(traj, all_steps(traj)).detach(), expected, atol=1e-6, rtol=0)
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "full"))
    torch.testing.assert_close(plain.lm_head.weight, loaded.model.lm_head.weight.detach())


def test_trust_remote_code_is_off_unless_configured(lm_dir, tmp_path, monkeypatch):
    assert TextLMPolicyConfig().trust_remote_code is False
    seen = []
    real = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        assert kwargs.get("use_safetensors") is True
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    pol = make(lm_dir)
    pol.config.trust_remote_code = True  # a saved file asking for remote code is not obeyed
    pol.save_pretrained(str(tmp_path / "p"))
    TextLMPolicy.from_pretrained(str(tmp_path / "p"))
    make(lm_dir, trust_remote_code=True)
    assert seen == [None, None, True]


def test_bad_options_and_config(lm_dir, policy):
    policy.rollout(["w03"], n_per_condition=2, seeds=[0, 1], shared_noise=True)  # honoured by construction
    with pytest.raises(ValueError, match="noise_window"):
        policy.rollout(["w03"], seeds=[0], noise_window=object())
    with pytest.raises(ValueError, match="seeds"):
        policy.rollout(["w03"], n_per_condition=2, seeds=[0])
    for bad, key in [({"temperature": 0.0}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"max_new_tokens": 0}, "max_new_tokens")]:
        with pytest.raises(ValueError, match=key):
            TextLMPolicyConfig(pretrained=lm_dir, **bad).validate()
    with pytest.raises(FileNotFoundError, match="pretrained"):
        TextLMPolicyConfig(pretrained="./no/such/dir").validate()


def test_in_memory_model_and_global_rng(lm_dir):
    model = LlamaForCausalLM.from_pretrained(lm_dir)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(lm_dir)
    pol = TextLMPolicy(model, tokenizer, TextLMPolicyConfig(max_new_tokens=4))
    torch.manual_seed(0)
    a = pol.rollout(PROMPTS, n_per_condition=2)
    torch.manual_seed(0)
    b = pol.rollout(PROMPTS, n_per_condition=2)
    assert torch.equal(a.actions, b.actions) and a.num_steps <= 4


def test_a_seed_is_mixed_with_the_prompt():
    """Evaluation gives sample j of every condition the seed eval.seed + j. A token is drawn with one
    uniform number, so unmixed seeds made every condition's sample j share its uniforms (all 128
    samples of a yes/no evaluation set answered alike). Mixed: same seed and prompt -> the same
    stream; same seed, other prompt -> another stream."""
    from genalign.policies.text_lm import _generators

    a, b, c = _generators([1000, 1000, 1000], [[5, 6, 7], [5, 6, 8], [5, 6, 7]])
    u = [torch.rand(4, generator=g) for g in (a, b, c)]
    assert torch.equal(u[0], u[2]) and not torch.equal(u[0], u[1])
