"""The Qwen2-VL policy beyond the shared contract: positions, images, the action set, tuning, loading.

A random tiny Qwen2-VL (conftest ``tiny_vlm_dir``), CPU, offline. Tolerances as in the contract
suite: a log-prob recomputed in another batch layout or with a KV cache against one forward pass
runs the same float32 network in another operation order, ~1e-6 apart; ATOL = 1e-5.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import yaml
from PIL import Image

from genalign.cli import main
from genalign.configs import ConfigError
from genalign.policies.unet_tuning import POLICY_FILE
from genalign.policies.vlm import VLMPolicy, VLMPolicyConfig, mrope_positions
from genalign.recipes.pretrain_vlm import PATCH, TEMPORAL_PATCH
from genalign.toyworld.vqa import IMAGE_SIZE
from genalign.train_config import TrainConfig, load_config

ATOL = 1e-5


def image(color) -> Image.Image:
    img = Image.new("RGB", (48, 48), (240, 240, 240))
    img.paste(color, (8, 8, 40, 40))
    return img


RED, BLUE = image((200, 30, 30)), image((30, 30, 200))
CONDS = [
    {"prompt": "what color is the square ?", "image": RED},
    {"prompt": "what color is the square ?", "image": BLUE},  # the same words about another image
    {"prompt": "is the left one red ?", "images": [RED, BLUE]},  # two images
    {"prompt": "how many circles ?"},  # text only
]


def make(path, **kw) -> VLMPolicy:
    return VLMPolicy.from_pretrained(path, VLMPolicyConfig(**{"max_new_tokens": 5, **kw}))


@pytest.fixture(scope="module")
def policy(tiny_vlm_dir) -> VLMPolicy:
    return make(tiny_vlm_dir)


@pytest.fixture(scope="module")
def traj(policy):
    return policy.rollout(CONDS, 2, list(range(8)))


def full_sequence(policy, traj):
    """[prompt ; response] ids and mask of each row, as ``log_prob`` feeds them."""
    ids = torch.cat([traj.extras["prompt_ids"].tensor, traj.actions], 1)
    mask = torch.cat([traj.extras["prompt_mask"].tensor, traj.mask.long()], 1)
    return ids, mask


def test_positions_equal_the_models_own_rope_index(policy, traj):
    ids, mask = full_sequence(policy, traj)
    grids = traj.extras["image_grid_thw"].values
    assert [len(g) for g in grids] == [1, 1, 1, 1, 2, 2, 0, 0]
    mine = mrope_positions(ids, mask, grids, policy.image_token_id, policy.merge)
    model = policy._base().model
    types = (ids == policy.image_token_id).int()  # text 0, image 1
    theirs, _ = model.get_rope_index(ids, types, torch.cat(list(grids)), None, mask)
    assert mine.shape == (3, *ids.shape) and torch.equal(mine, theirs)
    # a text-only row is consecutive from its first real token, the same in all three components
    text_row = mine[:, 6][:, mask[6].bool()]
    assert torch.equal(text_row, torch.arange(text_row.shape[1]).expand(3, -1))


def test_positions_reject_image_tokens_without_a_grid(policy, traj):
    ids, mask = full_sequence(policy, traj)
    empty = [torch.zeros(0, 3, dtype=torch.long)] * ids.shape[0]
    with pytest.raises(ValueError, match="image token runs"):
        mrope_positions(ids, mask, empty, policy.image_token_id, policy.merge)


def test_image_patches_travel_as_ragged_extras(traj):
    pixels = traj.extras["pixel_values"]
    sub = traj[[6, 4, 0]]
    per_image, dim = (IMAGE_SIZE // PATCH) ** 2, 3 * TEMPORAL_PATCH * PATCH * PATCH  # patches of one image, values each
    assert [tuple(v.shape) for v in sub.extras["pixel_values"].values] == [(0, dim), (2 * per_image, dim), (per_image, dim)]
    assert torch.equal(sub.extras["pixel_values"].values[2], pixels.values[0])
    cat = type(traj).cat([traj[[0]], traj[[6]]])
    assert [len(g) for g in cat.extras["image_grid_thw"].values] == [1, 0]


def test_rollout_log_probs_equal_recomputed(policy, traj):
    lp = policy.log_prob(traj, torch.arange(traj.num_steps)).detach()
    torch.testing.assert_close(lp[traj.mask], traj.log_probs[traj.mask], atol=ATOL, rtol=0)


def test_a_seed_gives_the_same_answer_alone_and_in_a_batch(policy, traj):
    for row in (0, 4, 7):  # one image, two images, text only
        alone = policy.rollout([CONDS[row // 2]], 1, [row])
        t = alone.num_steps
        assert torch.equal(alone.actions[0], traj.actions[row, :t]) and not traj.mask[row, t:].any()
        assert alone.outputs[0] == traj.outputs[row]
        torch.testing.assert_close(alone.log_probs[0], traj.log_probs[row, :t], atol=ATOL, rtol=0)


def test_seed_is_mixed_with_the_image(policy):
    """The same question about two images with one seed draws from two streams."""
    gens = policy.row_generators(CONDS[:2], 1, [5, 5])
    assert gens[0].initial_seed() != gens[1].initial_seed()
    again = policy.row_generators(CONDS[:2], 1, [5, 5])
    assert [g.initial_seed() for g in again] == [g.initial_seed() for g in gens]


def test_vision_tokens_are_outside_the_action_set(tiny_vlm_dir):
    policy = make(tiny_vlm_dir, max_new_tokens=6)
    banned = policy.banned_tokens
    tok = policy.tokenizer
    assert set(banned.tolist()) == {tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
    # make the vision tokens by far the most likely next tokens of the unmasked model
    hook = policy._base().lm_head.register_forward_hook(lambda m, i, out: out.index_add(-1, banned, torch.full_like(out[..., :len(banned)], 30.0)))
    try:
        with torch.no_grad():
            traj = policy.rollout(CONDS, 3, list(range(12)))
            p_ids, p_mask = traj.extras["prompt_ids"].tensor, traj.extras["prompt_mask"].tensor
            raw = policy.model(input_ids=p_ids, attention_mask=p_mask,
                               **policy._model_inputs(p_ids, p_mask, policy._media(traj))).logits[:, -1]
        assert raw.softmax(-1)[:, banned].sum(-1).min() > 0.99  # unmasked, the vision tokens would be drawn
        assert not torch.isin(traj.actions[traj.mask], banned).any()
        assert torch.isfinite(traj.log_probs).all()
        lp = policy.log_prob(traj, torch.arange(traj.num_steps)).detach()
        torch.testing.assert_close(lp[traj.mask], traj.log_probs[traj.mask], atol=ATOL, rtol=0)
        scores = policy.token_logits(traj)  # [B, T, V]
        assert scores.shape == (traj.batch_size, traj.num_steps, raw.shape[-1]) and scores.dtype == torch.float32
        assert torch.isneginf(scores[..., banned]).all()
        torch.testing.assert_close(scores.logsumexp(-1), torch.zeros(scores.shape[:2]), atol=ATOL, rtol=0)
        picked = scores.gather(-1, traj.actions.unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(picked[traj.mask], lp[traj.mask], atol=ATOL, rtol=0)
        greedy = policy.predict_final(traj, 0)
        assert all("image_pad" not in g for g in greedy)
    finally:
        hook.remove()


def test_lora_only_on_the_language_model(policy, tiny_vlm_dir):
    prefix = policy.vision_prefix
    assert prefix.endswith("visual")
    trainable = [n for n, p in policy.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and "language_model" in n for n in trainable)
    assert not [n for n, _ in policy.model.named_modules() if ".visual." in n and "lora" in n]
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    with_vision = make(tiny_vlm_dir, train_vision=True)
    vision = {n for n, p in with_vision.model.named_parameters() if p.requires_grad and ".visual." in n}
    assert vision and all("lora_" in n and (".qkv." in n or ".proj." in n) for n in vision)


def test_full_finetune_keeps_the_vision_tower_frozen(tiny_vlm_dir):
    policy = make(tiny_vlm_dir, finetune="full")
    vision = policy._base().get_submodule(policy.vision_prefix)
    assert not any(p.requires_grad for p in vision.parameters())
    names = {n for n, p in policy.model.named_parameters() if p.requires_grad}
    assert names and not any(".visual." in n for n in names)
    traj = policy.rollout(CONDS[:1], 2, [1, 2])
    policy.log_prob(traj, torch.arange(traj.num_steps))[traj.mask].sum().backward()
    assert all(p.grad is None for p in vision.parameters())
    assert all(p.grad is not None for p in policy.trainable_parameters())
    assert any(".visual." in n for n, p in make(tiny_vlm_dir, finetune="full", train_vision=True).model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_reference_equals_base_before_training(tiny_vlm_dir, finetune):
    policy = make(tiny_vlm_dir, finetune=finetune)
    traj = policy.rollout(CONDS, 1, [1, 2, 3, 4])
    steps = torch.arange(traj.num_steps)
    with torch.no_grad():
        lp = policy.log_prob(traj, steps)
        with policy.reference():
            ref = policy.log_prob(traj, steps)
    assert torch.equal(lp, ref)  # zero LoRA B / an untouched copy: the same function, bit for bit


def test_full_save_load_round_trip_with_processor(tiny_vlm_dir, tmp_path):
    policy = make(tiny_vlm_dir, finetune="full", trust_remote_code=True)
    traj = policy.rollout(CONDS, 1, [1, 2, 3, 4])
    opt = torch.optim.SGD(policy.trainable_parameters(), lr=0.1)
    (-policy.log_prob(traj, torch.arange(traj.num_steps))[traj.mask].mean()).backward()
    opt.step()
    policy.save_pretrained(str(tmp_path / "saved"))
    files = set(os.listdir(tmp_path / "saved"))
    assert {"tokenizer.json", "model.safetensors"} <= files and any("processor" in f for f in files)
    loaded = VLMPolicy.from_pretrained(str(tmp_path / "saved"))
    assert loaded.config.finetune == "full" and loaded.config.trust_remote_code is False  # never from a saved file
    with torch.no_grad():
        assert torch.equal(loaded.log_prob(traj, torch.arange(traj.num_steps)), policy.log_prob(traj, torch.arange(traj.num_steps)))
    assert loaded.prompt_tokens(CONDS) == policy.prompt_tokens(CONDS)


def test_saved_lora_policy_is_a_plain_peft_folder(policy, tiny_vlm_dir, tmp_path):
    from peft import PeftModel
    from transformers import Qwen2VLForConditionalGeneration

    policy.save_pretrained(str(tmp_path / "saved"))
    meta = json.loads((tmp_path / "saved" / POLICY_FILE).read_text())
    assert meta["type"] == "vlm" and meta["finetune"] == "lora"
    peft = PeftModel.from_pretrained(Qwen2VLForConditionalGeneration.from_pretrained(tiny_vlm_dir), str(tmp_path / "saved"))
    assert any("lora_A" in n for n, _ in peft.named_parameters())


def test_loads_from_a_hub_id(tiny_vlm_dir, tmp_path, monkeypatch):
    """A hub id resolves through the hub cache: the tiny model stands in a snapshot, offline."""
    import huggingface_hub.constants as hub

    commit = "0" * 40
    repo = tmp_path / "hub" / "models--tiny-org--tiny-qwen2-vl"
    shutil.copytree(tiny_vlm_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    loaded = VLMPolicy.from_pretrained("tiny-org/tiny-qwen2-vl", VLMPolicyConfig(max_new_tokens=5, revision="main"))
    assert type(loaded._base()).__name__ == "Qwen2VLForConditionalGeneration"
    local = make(tiny_vlm_dir)
    a, b = loaded.rollout(CONDS[:1], 2, [3, 4]), local.rollout(CONDS[:1], 2, [3, 4])
    assert a.outputs == b.outputs and torch.equal(a.log_probs, b.log_probs)


def write_config(tmp_path, tiny_vlm_dir, policy_extra=None) -> str:
    data = {
        "seed": 0, "output_dir": str(tmp_path / "run"),
        "policy": {"type": "vlm", "pretrained": tiny_vlm_dir, "max_new_tokens": 6, **(policy_extra or {})},
        "algorithm": {"name": "grpo"},
        "reward": {"components": [{"type": "rule", "rule": "exact"}]},
        "prompts": {"source": "shapes_vqa", "formats": ["yesno", "open"]},
        "train": {"epochs": 1, "prompts_per_epoch": 2, "samples_per_prompt": 2, "rollout_batch_size": 4, "train_batch_size": 4},
        "eval": {"prompts_per_set": 2, "samples_per_prompt": 1},
        "report": {"num_prompts": 2, "seeds": [0]},
    }
    path = tmp_path / "vlm.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_a_bad_policy_key_is_named(tiny_vlm_dir, tmp_path):
    with pytest.raises(ConfigError, match="lora_target"):
        load_config(TrainConfig, write_config(tmp_path, tiny_vlm_dir, {"lora_target": ["q_proj"]}))


def test_genalign_train_runs_grpo_on_shapes_vqa(tiny_vlm_dir, tmp_path, capsys):
    assert main(["train", write_config(tmp_path, tiny_vlm_dir)]) == 0, capsys.readouterr().err
    run = tmp_path / "run"
    assert (run / "report.html").is_file() and (run / "eval.jsonl").is_file()
    evals = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert {(e["epoch"], e["set"]) for e in evals} == {(0, "yesno"), (0, "open"), (1, "yesno"), (1, "open")}
    final = VLMPolicy.from_pretrained(str(run / "final"), VLMPolicyConfig(max_new_tokens=6))
    assert len(final.rollout(CONDS[:1], 1, [0]).outputs) == 1
