"""The shipped tiny Shapes VQA vision-language model (assets/models/tiny-vlm)."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

from genalign.policies.vlm import VLMPolicy, VLMPolicyConfig
from genalign.recipes.pretrain_vlm import evaluate_vlm, generate
from genalign.toyworld.vqa import FORMATS, QTYPES, VQA_WORDS, sample_vqa_conditions

ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "assets" / "models" / "tiny-vlm"


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
    """VLMPolicy's greedy completion (its own KV-cache loop and positions) = transformers' generate."""
    model, processor = vlm
    conds = [c for f in FORMATS for c in sample_vqa_conditions(f, "count", 2, "heldout", seed=3)]
    expected = generate(model, processor, conds, temperature=0.0, seed=0)
    policy = VLMPolicy.from_pretrained(str(ASSET), VLMPolicyConfig(max_new_tokens=8))
    start = policy.start(conds, 1)
    assert [t.strip() for t in policy.predict_final(start, 0)] == expected


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
