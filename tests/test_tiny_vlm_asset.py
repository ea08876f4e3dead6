"""The shipped tiny Shapes VQA vision-language model (assets/models/tiny-vlm)."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

from genalign.policies.vlm import VLMPolicy, VLMPolicyConfig
from genalign.recipes.pretrain_vlm import chat_prompt, evaluate_vlm
from genalign.toyworld.vqa import FORMATS, QTYPES, VQA_WORDS, sample_vqa_conditions

ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "assets" / "models" / "tiny-vlm"
NEAR_TIE = 1e-3  # logits; float32 paths differ by ~1e-5 here


@pytest.fixture(scope="module")
def vlm():
    assert ASSET.is_dir(), f"{ASSET} missing; make it with genalign toyworld pretrain vlm --out {ASSET}"
    model = Qwen2VLForConditionalGeneration.from_pretrained(ASSET, local_files_only=True)
    processor = AutoProcessor.from_pretrained(ASSET, local_files_only=True)
    return model.eval(), processor


def test_asset_loads_with_plain_classes_and_covers_the_world(vlm):
    model, processor = vlm
    tok = processor.tokenizer
    assert type(processor).__name__ == "Qwen2VLProcessor" and model.dtype == torch.float32
    assert model.config.text_config.vocab_size == len(tok) and tok.eos_token == "<|im_end|>"
    text = " ".join(VQA_WORDS)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(VQA_WORDS) and tok.unk_token_id not in ids
    cond = sample_vqa_conditions("open", "colour", 1, "train", seed=0)[0]
    enc = processor(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[cond["image"]], return_tensors="pt")
    assert int((enc["input_ids"] == model.config.image_token_id).sum()) == 9  # one image token per grid cell


def test_the_policy_answers_like_the_recipe_greedy_loop(vlm):
    """VLMPolicy's greedy completion (its own KV-cache loop and positions) = transformers' generate.

    Two float paths may order a near-tie differently on another machine, so where the answers
    part, generate's top two logits at that step must be within NEAR_TIE (every word is one token)."""
    model, processor = vlm
    conds = [c for f in FORMATS for c in sample_vqa_conditions(f, "count", 2, "heldout", seed=3)]
    policy = VLMPolicy.from_pretrained(str(ASSET), VLMPolicyConfig(max_new_tokens=8))
    got = [t.strip().split() for t in policy.predict_final(policy.start(conds, 1), 0)]
    tok = processor.tokenizer
    for cond, words in zip(conds, got):
        text = chat_prompt(processor, cond["prompt"])
        enc = processor(text=[text], images=[cond["image"]], return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=8, do_sample=False, output_scores=True, return_dict_in_generate=True,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        ids = out.sequences[0, enc["input_ids"].shape[1]:].tolist()
        expected = tok.convert_ids_to_tokens([i for i in ids if i not in (tok.eos_token_id, tok.pad_token_id)])
        if words != expected:
            step = next(i for i, (a, b) in enumerate(zip([*words, None], [*expected, None])) if a != b)
            top2 = out.scores[step][0].float().topk(2).values
            assert float(top2[0] - top2[1]) < NEAR_TIE, (cond["prompt"], words, expected)
        # the policy scores generate's answer token by token as generate does (its positions, its
        # cache-free forward, its action set without the vision tokens)
        traj = policy.forward_process([cond], [" ".join(expected)])
        mine = policy.log_prob(traj, torch.arange(traj.num_steps))[0].detach()
        scores = torch.stack([sc[0].float() for sc in out.scores[: traj.num_steps]])  # [T, V]
        scores[:, policy.banned_tokens] = -torch.inf
        theirs = scores.log_softmax(-1).gather(1, traj.actions[0, :, None]).squeeze(1)
        torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=0)  # float32 paths differ by ~1e-6


def test_accuracy_has_a_floor_and_headroom(vlm):
    """Greedy in-domain yes/no answers are well above chance; open answers are far from solved."""
    model, processor = vlm
    yesno = [c for q in QTYPES for c in sample_vqa_conditions("yesno", q, 8, "train", seed=12345)]
    opened = [c for q in QTYPES for c in sample_vqa_conditions("open", q, 8, "heldout", seed=12345)]
    assert evaluate_vlm(model, processor, yesno)["accuracy"] >= 0.6
    assert evaluate_vlm(model, processor, opened)["accuracy"] <= 0.8


def test_training_log_matches_the_model_card():
    log = json.loads((ASSET / "training_log.json").read_text())
    card = (ASSET / "README.md").read_text()
    assert log["command"] in card
    for split in ("train", "heldout"):
        mean = log["evaluation"][f"{split} greedy"]["mean"]["accuracy"]
        assert f"{mean:.3f}" in card
