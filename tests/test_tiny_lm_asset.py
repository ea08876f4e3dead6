"""The shipped tiny Shapes QA language model (assets/models/tiny-lm)."""

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from genalign.recipes.pretrain_lm import evaluate_lm, generate
from genalign.toyworld.text_qa import WORDS, sample_conditions, target_response

ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "assets" / "models" / "tiny-lm"
TIER1_HELDOUT_FLOOR = 0.25  # the asset measures 11/32 = 0.344; chance (one of six colours) is 0.167


@pytest.fixture(scope="module")
def lm():
    assert ASSET.is_dir(), f"{ASSET} missing; make it with genalign toyworld pretrain lm --out {ASSET}"
    model = AutoModelForCausalLM.from_pretrained(ASSET, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(ASSET, local_files_only=True)
    return model.eval(), tokenizer


def test_asset_loads_with_plain_auto_classes(lm):
    model, tok = lm
    assert isinstance(model, LlamaForCausalLM) and model.dtype == torch.float32
    assert model.config.tie_word_embeddings and model.config.vocab_size == len(tok) == len(WORDS) + 4
    assert (model.config.eos_token_id, model.config.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
    assert model.generation_config.eos_token_id == tok.eos_token_id
    text = " ".join(WORDS)
    ids = tok(text)["input_ids"]
    assert len(ids) == len(WORDS) and tok.unk_token_id not in ids and tok.decode(ids) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "scene : red circle top left ."}],
                                   tokenize=False, add_generation_prompt=True)
    assert chat == "scene : red circle top left ."


def test_sampling_loop_matches_transformers_generate(lm):
    """The recipe's batched, left-padded greedy loop gives what `generate` gives one prompt at a time."""
    model, tok = lm
    conds = [c for t in (1, 3, 5) for c in sample_conditions(t, 3, "heldout", seed=7)]
    texts, ended = generate(model, tok, [c["prompt"] for c in conds], temperature=0.0, seed=0)
    for c, text, end in zip(conds, texts, ended):
        ids = tok(c["prompt"], return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:]
        assert text == tok.decode(out, skip_special_tokens=True).strip()
        assert end == (tok.eos_token_id in out.tolist())


def test_greedy_heldout_tier1_accuracy_floor(lm):
    model, tok = lm
    conds = sample_conditions(1, 32, "heldout", seed=12345)
    result = evaluate_lm(model, tok, conds, temperature=0.0)
    assert result["format"] == 1.0, result
    assert result["accuracy"] >= TIER1_HELDOUT_FLOOR, result


def test_gold_response_is_likelier_than_a_wrong_one(lm):
    """Teacher-forced: on train-split tier-1 conditions the gold colour mostly beats a wrong one."""
    model, tok = lm
    conds = sample_conditions(1, 16, "train", seed=1)

    def logp(prompt, response):
        p = tok(prompt)["input_ids"]
        r = tok(response)["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            logits = model(torch.tensor([p + r])).logits[0, len(p) - 1:-1]
        return logits.log_softmax(-1).gather(1, torch.tensor(r)[:, None]).sum().item()

    wins = 0
    for c in conds:
        wrong = "white" if c["answer"] != "white" else "red"
        wins += logp(c["prompt"], target_response(c)) > logp(c["prompt"], f"<answer> {wrong} </answer>")
    assert wins >= 12, wins


def test_training_log_matches_the_model_card():
    log = json.loads((ASSET / "training_log.json").read_text())
    card = (ASSET / "README.md").read_text()
    assert log["command"] in card and log["command"].startswith("genalign toyworld pretrain lm")
    assert f"{log['args']['steps']} steps, seed {log['args']['seed']}" in card
    assert f"batch {log['args']['batch_size']}" in card and f"lr {log['args']['lr']}" in card
    assert f"{log['parameters']:,} parameters" in card
    assert log["architecture"]["vocab_size"] == len(WORDS) + 4
    model = AutoModelForCausalLM.from_pretrained(ASSET, local_files_only=True)
    assert log["parameters"] == sum(p.numel() for p in model.parameters())
    assert log["architecture"]["num_hidden_layers"] == model.config.num_hidden_layers
    rows = {m[1]: m[2] for m in re.finditer(r"^\| (\d|\*\*mean\*\*)[^|]*\| (.*) \|$", card, flags=re.M)}
    for tier in range(1, 6):
        cells = re.findall(r"(\d\.\d{3}) \(format", rows[str(tier)])
        want = [f'{log["evaluation"][f"{s} {m}"][f"tier {tier}"]["accuracy"]:.3f}' for s in ("train", "heldout")
                for m in ("greedy", "sampled")]
        assert cells == want, tier
    assert log["loss_curve"][-1]["step"] == log["args"]["steps"]
    assert log["loss_curve"][-1]["loss"] < log["loss_curve"][0]["loss"]
