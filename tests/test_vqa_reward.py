"""The VQA verifier reward on a tiny random Qwen2-VL built offline: the score against the
logits, batch invariance under left padding, DSG gating, the Shapes World question generator
and clear errors."""

import json
import os

import pytest
import torch
from PIL import Image
from tokenizers import AddedToken
from transformers import (
    Qwen2Tokenizer,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from genalign.configs import ConfigError, load_config
from genalign.toyworld import all_specs, parse_prompt
from genalign.toyworld.questions import scene_questions
from genalign.train_config import TrainConfig
from rewards.vqa import VQAConfig, VQAReward, gate_questions, load_question_sets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# Qwen2-VL's chat template, without the default system turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_qwen2_vl(directory) -> None:
    """A byte-level BPE tokenizer (256 bytes + merges making 'Yes', 'yes', 'No', 'no' single
    tokens + Qwen2-VL's special tokens), a 2-layer Qwen2-VL (hidden 32, vision depth 1) and an
    image processor that resizes every image to 56×56 (4 image tokens after 2×2 merging)."""
    merges = [("Y", "e"), ("Ye", "s"), ("y", "e"), ("ye", "s"), ("N", "o"), ("n", "o")]
    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    for s in SPECIAL:
        vocab[s] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tokenizer.add_tokens([AddedToken(s, special=True) for s in SPECIAL])
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=56 * 56),
        tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(), chat_template=CHAT_TEMPLATE,
    )
    ids = {s: vocab[s] for s in SPECIAL}
    torch.manual_seed(0)
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 512,
            # head_dim 16 -> 8 rotary frequencies split over (time, height, width)
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={"depth": 1, "embed_dim": 16, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    model = Qwen2VLForConditionalGeneration(config)
    with torch.no_grad():  # init std 0.02 leaves every logit ≈ 0 and P(yes) ≈ 0.5: give yes and no opposite rows
        contrast = 0.3 * torch.randn(2, 32)
        model.lm_head.weight[[vocab[w] for w in ("Yes", "yes", "No", "no")]] = torch.cat([contrast, -contrast])
    model.save_pretrained(directory)
    processor.save_pretrained(directory)


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_qwen2_vl")
    build_tiny_qwen2_vl(d)
    return str(d)


@pytest.fixture(scope="module")
def reward(tiny_vlm):
    return VQAReward(VQAConfig(model=tiny_vlm, batch_size=4))


def images(n=3, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


PROMPTS = ["a red circle", "two blue squares on the left", "a green triangle to the left of a yellow square"]


def test_score_is_the_renormalised_next_token_probability(reward):
    """p_yes = Σ_{Yes,yes} softmax(z) / Σ_{Yes,yes,No,no} softmax(z) with z the logits at the
    last position of the chat prompt (full forward, no logits_to_keep), one row at a time."""
    assert isinstance(reward.model, Qwen2VLForConditionalGeneration)
    assert reward.answer_tokens == {"yes": ["Yes", "yes"], "no": ["No", "no"]}
    tok = reward.processor.tokenizer
    yes, no = [tok.convert_tokens_to_ids(t) for t in ("Yes", "yes")], [tok.convert_tokens_to_ids(t) for t in ("No", "no")]
    x = images()
    out = reward(x, PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        question = f'Does this figure show "{prompt}"? Please answer yes or no.'
        text = reward.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
            tokenize=False, add_generation_prompt=True,
        )
        assert text.endswith("<|im_start|>assistant\n")
        pil = Image.fromarray((x[i].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())
        batch = reward.processor(text=[text], images=[pil], return_tensors="pt")
        with torch.no_grad():
            z = reward.model(**batch).logits[0, -1]  # [V]
        probs = z.softmax(-1)
        want = probs[yes].sum() / probs[yes + no].sum()
        assert out.details[i]["questions"] == [question]
        torch.testing.assert_close(out.scores[i], want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.components["yes_no_mass"][i], probs[yes + no].sum(), rtol=1e-5, atol=1e-6)
    assert out.scores.dtype == torch.float32 and out.scores.shape == (3,)
    assert not reward.differentiable
    assert len(set(out.scores.tolist())) == 3  # the image and the prompt change the score


def test_unnormalised_score_is_p_yes_over_the_vocabulary(tiny_vlm, reward):
    raw = VQAReward(VQAConfig(model=tiny_vlm, yes_tokens=["Yes"], normalize=False))
    assert raw.answer_tokens["yes"] == ["Yes"]
    x = images(1)
    p = raw(x, PROMPTS[:1]).scores
    mass = reward(x, PROMPTS[:1]).components["yes_no_mass"]
    assert 0 < float(p) < float(mass) <= 1


def test_batch_invariance_with_left_padding(reward):
    """Prompts of different lengths pad differently; rows scored one by one equal the batch."""
    x = images(4, seed=1)
    prompts = PROMPTS + ["four white triangles"]
    batched = reward(x, prompts).scores
    single = torch.cat([reward(x[i : i + 1], prompts[i : i + 1]).scores for i in range(4)])
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-5)
    pil = [Image.fromarray((x[i].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()) for i in range(4)]
    torch.testing.assert_close(reward(pil, prompts).scores, batched, rtol=0, atol=1e-5)


def test_question_set_scores_every_question(tiny_vlm):
    """Generated Shapes World questions: one forward per (image, question), grouped per row."""
    r = VQAReward(VQAConfig(model=tiny_vlm, mode="question_set", batch_size=3))
    x = images(2)
    out = r(x, PROMPTS[:2])
    questions = [q["text"] for q in scene_questions(parse_prompt(PROMPTS[1]))]
    assert out.details[1]["questions"] == questions and len(questions) == 3
    pil = Image.fromarray((x[1].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())
    p, _ = r.answer_probabilities([pil] * 3, questions)
    torch.testing.assert_close(torch.tensor(out.details[1]["p_yes"]), p, rtol=0, atol=1e-5)
    assert set(out.components) == {"yes_no_mass", "gated_fraction"}


QUESTION_SET = {"prompt": "a cat on a red sofa", "questions": [
    {"id": 1, "text": "Is there a cat?", "parents": []},
    {"id": 2, "text": "Is there a sofa?"},
    {"id": 3, "text": "Is the sofa red?", "parents": [2]},
    {"id": 4, "text": "Is the cat on the sofa?", "parents": [1, 2]},
    {"id": 5, "text": "Is the cat asleep?", "parents": [4]},
]}
# P(yes) per question, answered by a stub instead of the model.
STUB = {"Is there a cat?": 0.9, "Is there a sofa?": 0.8, "Is the sofa red?": 0.7,
        "Is the cat on the sofa?": 0.4, "Is the cat asleep?": 0.6}


@pytest.fixture
def question_file(tmp_path):
    path = tmp_path / "questions.jsonl"
    other = {"prompt": "a dog", "questions": [{"id": "a", "text": "Is there a dog?"}]}
    path.write_text(json.dumps(QUESTION_SET) + "\n\n" + json.dumps(other) + "\n")
    return str(path)


@pytest.mark.parametrize("gating, expected", [
    # threshold: q4 = 0.4 does not hold (≤ 0.5), so q5 is gated to 0; q3, q4 have parents that hold.
    ("threshold", (0.9 + 0.8 + 0.7 + 0.4 + 0.0) / 5),
    # product: q3 = 0.7·0.8, q4 = 0.4·0.9·0.8 = 0.288, q5 = 0.6·0.288
    ("product", (0.9 + 0.8 + 0.7 * 0.8 + 0.288 + 0.6 * 0.288) / 5),
])
def test_question_set_gating(tiny_vlm, question_file, monkeypatch, gating, expected):
    r = VQAReward(VQAConfig(model=tiny_vlm, mode="question_set", questions_path=question_file, gating=gating))

    def stub(images, questions):
        assert len(images) == len(questions)
        return torch.tensor([STUB.get(q, 0.5) for q in questions]), torch.ones(len(questions))

    monkeypatch.setattr(r, "answer_probabilities", stub)
    out = r(images(2), [QUESTION_SET["prompt"], "a dog"])
    assert out.scores[0].item() == pytest.approx(expected, abs=1e-6)
    assert out.scores[1].item() == pytest.approx(0.5, abs=1e-6)
    d = out.details[0]
    assert d["questions"] == [q["text"] for q in QUESTION_SET["questions"]]
    assert d["p_yes"] == pytest.approx([0.9, 0.8, 0.7, 0.4, 0.6])
    assert d["gated"] == [False, False, False, False, True]
    assert out.components["gated_fraction"].tolist() == pytest.approx([0.2, 0.0])


def test_gating_is_transitive_and_strict_at_one_half():
    qs = [{"id": 1, "text": "a", "parents": []}, {"id": 2, "text": "b", "parents": [1]},
          {"id": 3, "text": "c", "parents": [2]}]
    score, effective, gated = gate_questions(qs, [0.5, 0.9, 0.9], "threshold")
    assert effective == [0.5, 0.0, 0.0] and gated == [False, True, True] and score == pytest.approx(0.5 / 3)
    score, effective, gated = gate_questions(qs, [0.51, 0.9, 0.9], "threshold")
    assert effective == [0.51, 0.9, 0.9] and gated == [False, False, False]


def test_shapes_world_question_generator():
    def texts(prompt):
        return [(q["id"], q["text"], q["parents"]) for q in scene_questions(parse_prompt(prompt))]

    assert texts("a small red circle") == [(1, "Is there a red circle?", []), (2, "Is the red circle small?", [1])]
    assert texts("a red circle on the left") == [(1, "Is there a red circle?", []), (2, "Is the red circle on the left?", [1])]
    assert texts("a red circle and a large blue square") == [
        (1, "Is there a red circle?", []), (2, "Is there a blue square?", []), (3, "Is the blue square large?", [2])]
    assert texts("two green triangles above a yellow square") == [
        (1, "Is there a green triangle?", []), (2, "Are there exactly two green triangles?", [1]),
        (3, "Is there a yellow square?", []), (4, "Are the green triangles above the yellow square?", [1, 3])]
    assert texts("three blue squares at the bottom") == [
        (1, "Is there a blue square?", []), (2, "Are there exactly three blue squares?", [1]),
        (3, "Are the blue squares at the bottom?", [1])]
    for tier in range(1, 6):  # every grammar prompt gives a valid graph: one root per clause
        for spec in all_specs(tier)[:20]:
            qs = scene_questions(spec)
            assert sum(not q["parents"] for q in qs) == len(spec.clauses)
            assert all(p < q["id"] for q in qs for p in q["parents"])


def test_errors_name_what_is_wrong(tiny_vlm, reward, question_file, tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        VQAReward(VQAConfig(model=missing))
    with pytest.raises(ValueError, match=r"expected images in \[0, 1\], got values in \[-1"):
        reward(images(2) * 2 - 1, PROMPTS[:2])
    with pytest.raises(ValueError, match=r"shape \[B, 3, H, W\]"):
        reward(images(2)[:, :1], PROMPTS[:2])
    with pytest.raises(ValueError, match="2 images but 1 conditions"):
        reward(images(2), PROMPTS[:1])
    r = VQAReward(VQAConfig(model=tiny_vlm, mode="question_set", questions_path=question_file))
    with pytest.raises(KeyError, match="'a blue horse' has no question set in .*questions.jsonl"):
        r(images(1), ["a blue horse"])
    generated = VQAReward(VQAConfig(model=tiny_vlm, mode="question_set"))
    with pytest.raises(ValueError, match="not a known shape"):
        generated(images(1), ["a red dog"])
    with pytest.raises(ValueError, match="'yes_tokens': none of \\['Yess', 'oui'\\] is a single token"):
        VQAReward(VQAConfig(model=tiny_vlm, yes_tokens=["Yess", "oui"]))
    with pytest.raises(ValueError, match="must contain \\{prompt\\}"):
        VQAConfig(model=tiny_vlm, template="Is this good?").validate()


def test_bad_question_files_name_line_and_prompt(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"prompt": "a", "questions": [{"id": 1, "text": "x", "parents": [2]}]}) + "\n")
    with pytest.raises(ValueError, match=r"q\.jsonl:1: prompt 'a': question 1 names unknown parents \[2\]"):
        load_question_sets(str(path))
    path.write_text(json.dumps({"prompt": "b", "questions": [{"id": 1, "text": "x", "parents": [2]},
                                                             {"id": 2, "text": "y", "parents": [1]}]}) + "\n")
    with pytest.raises(ValueError, match=r"prompt 'b': parent links form a cycle"):
        load_question_sets(str(path))
    path.write_text(json.dumps({"questions": []}) + "\n")
    with pytest.raises(ValueError, match=r"q\.jsonl:1: each line needs a 'prompt'"):
        load_question_sets(str(path))


def test_config_registered_and_example_validates(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    cfg = load_config(TrainConfig, os.path.join("configs", "rewards", "vqa_example.yaml"))
    (vqa,) = [c for c in cfg.reward.components if c.type == "vqa"]
    assert vqa.model == "Qwen/Qwen2-VL-2B-Instruct" and not vqa.trust_remote_code
    base = {"policy": {"type": "stable_diffusion", "pretrained": "org/model"}, "prompts": {"source": "list", "prompts": ["a"]}}
    for bad, message in [({"mode": "questions"}, r"'reward\.components\.0\.mode' must be one of"),
                         ({"model": "./missing/vlm"}, r"no model directory at './missing/vlm'"),
                         ({"mode": "question", "questions_path": "q.jsonl"}, r"only read in mode 'question_set'")]:
        path = str(tmp_path / "vqa_bad.yaml")
        with open(path, "w") as f:
            json.dump({**base, "reward": {"components": [{"type": "vqa", **bad}]}}, f)
        with pytest.raises(ConfigError, match=message):
            load_config(TrainConfig, path)
