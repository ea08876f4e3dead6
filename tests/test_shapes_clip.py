"""The Shapes World CLIP command (genalign/recipes/pretrain_clip.py): a tiny run saves a folder
that the existing open_clip loader and the clip_score / aesthetic rewards load from their
configs; the multi-positive InfoNCE loss; the synthetic aesthetic score; clear --out errors."""

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

from genalign.cli import main as cli
from genalign.configs import from_dict
from genalign.recipes.pretrain_clip import (
    CONFIG_NAME,
    HEAD_NAME,
    LOG_NAME,
    WEIGHTS_NAME,
    SceneStream,
    architecture,
    clip_loss,
    image_embeddings,
    positive_mask,
    swap_negatives,
    swap_variants,
    synthetic_aesthetic,
)
from genalign.toyworld import is_heldout, parse_prompt, render_scene
from genalign.toyworld.render import PlacedObject
from genalign.train_config import RewardSection
from rewards.aesthetic import AestheticConfig, AestheticReward, load_head
from rewards.clip_score import ClipScore, ClipScoreConfig
from rewards.open_clip_backbone import clip_preprocess, load_open_clip, load_weights_file
from rewards.registry import build_reward

TINY_ARGS = ["--steps", "3", "--minutes", "0", "--batch-size", "16", "--embed-dim", "16",
             "--vision-width", "32", "--vision-layers", "1", "--text-width", "32", "--text-layers", "1",
             "--head-width", "16", "--head-scenes", "64", "--head-steps", "20", "--eval-scenes", "32",
             "--eval-repeats", "1", "--swap-scenes", "8", "--threads", "0"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: OpenMP threads spin-waiting on a shared CPU slow these steps ~50x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("clip") / "shapes-clip"
    assert cli(["toyworld", "pretrain", "clip", "--out", str(out), "--seed", "3", *TINY_ARGS]) == 0
    return out


def test_saved_folder_loads_with_the_existing_loader_and_rewards(trained):
    assert sorted(p.name for p in trained.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME, HEAD_NAME, LOG_NAME])
    log = json.loads((trained / LOG_NAME).read_text())
    assert log["clip"]["steps"] == 3 and log["args"]["seed"] == 3 and "open_clip" in log["versions"]
    assert {(r["split"], r["tier"]) for r in log["retrieval"]} >= {("train", "mixed"), ("heldout", 4)}
    assert all(0 <= r["top1"] <= 1 and 0 < r["chance"] <= 1 for r in log["retrieval"])
    assert {(r["split"], r["attribute"]) for r in log["swaps"]} == {
        (s, a) for s in ("train", "heldout") for a in ("position", "relation", "count")}
    assert set(log["aesthetic"]["heldout"]) >= {"spearman", "pearson", "rmse"}

    config, weights = str(trained / CONFIG_NAME), str(trained / WEIGHTS_NAME)
    model, tokenizer, cfg = load_open_clip(config, weights)
    saved = load_weights_file(weights, "pretrained")
    assert {v.dtype for v in saved.values()} == {torch.float16}  # --save-dtype default
    for k, v in model.state_dict().items():
        assert v.dtype == torch.float32
        torch.testing.assert_close(v, saved[k].float())
    assert cfg["size"] == 32 and model.visual.output_dim == 16

    spec = parse_prompt("a red circle on the left")
    image = torch.from_numpy(__import__("numpy").asarray(render_scene(spec, 0)[0], dtype="float32") / 255)
    images = image.permute(2, 0, 1)[None].repeat(2, 1, 1, 1)  # [2, 3, 32, 32]
    prompts = ["a red circle on the left", "two blue squares"]
    clip_score = ClipScore(ClipScoreConfig(model=config, pretrained=weights))
    txt = F.normalize(model.encode_text(tokenizer(prompts)), dim=-1)
    cos = (image_embeddings(model, cfg, images) * txt).sum(-1)
    torch.testing.assert_close(clip_score(images, prompts).components["cosine"], cos)

    head_path = str(trained / HEAD_NAME)
    aesthetic = AestheticReward(AestheticConfig(head=head_path, model=config, pretrained=weights))
    expected = load_head(head_path, 16)(F.normalize(model.encode_image(clip_preprocess(images, cfg)), dim=-1))
    torch.testing.assert_close(aesthetic(images, prompts).scores, expected)

    # The configs written to the log validate as a YAML reward section and build as they stand.
    section = from_dict(RewardSection, {"components": list(log["reward_configs"].values())})
    summed = build_reward(section.components)(images, prompts)
    assert summed.scores.shape == (2,) and torch.isfinite(summed.scores).all()


def test_clip_loss_on_hand_written_tensors():
    """With the identity as positives the loss is CLIP's: (CE(L, arange) + CE(Lᵀ, arange)) / 2
    with L = exp(t) · I Tᵀ. With image 0 matching texts 0 and 1, row 0's target is (½, ½, 0), so
    its image->text term is −½ (log p₀₀ + log p₀₁); column 1's target is (½, ½, 0) too."""
    img = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]), dim=-1)
    txt = F.normalize(torch.tensor([[1.0, 0.2], [0.5, 0.9], [-0.3, 1.0]]), dim=-1)
    t = torch.tensor(math.log(10.0))
    logits = 10.0 * img @ txt.T
    ref = (F.cross_entropy(logits, torch.arange(3)) + F.cross_entropy(logits.T, torch.arange(3))) / 2
    torch.testing.assert_close(clip_loss(img, txt, t), ref)

    pos = torch.eye(3, dtype=torch.bool)
    pos[0, 1] = True
    lp_rows, lp_cols = logits.log_softmax(1), logits.log_softmax(0)
    i2t = (-(lp_rows[0, 0] + lp_rows[0, 1]) / 2 - lp_rows[1, 1] - lp_rows[2, 2]) / 3
    t2i = (-lp_cols[0, 0] - (lp_cols[0, 1] + lp_cols[1, 1]) / 2 - lp_cols[2, 2]) / 3
    torch.testing.assert_close(clip_loss(img, txt, t, pos), (i2t + t2i) / 2)
    # An extra text that holds for no image is a negative in image->text only.
    extra = F.normalize(torch.tensor([[0.9, 0.1]]), dim=-1)
    all_txt = torch.cat([txt, extra])  # [4, 2]
    pos = torch.cat([torch.eye(3, dtype=torch.bool), torch.zeros(3, 1, dtype=torch.bool)], 1)  # [3, 4]
    wide = 10.0 * img @ all_txt.T  # [3, 4]
    ref = (F.cross_entropy(wide, torch.arange(3)) + F.cross_entropy(logits.T, torch.arange(3))) / 2
    torch.testing.assert_close(clip_loss(img, all_txt, t, pos), ref)
    # exp(t) is clamped at 100, as in CLIP
    torch.testing.assert_close(clip_loss(img, txt, torch.tensor(9.0)), clip_loss(img, txt, torch.tensor(math.log(100.0))))


def test_positive_mask_follows_check_scene():
    prompts = ["a small red circle", "a red circle", "two red circles", "a red circle on the left"]
    specs = [parse_prompt(p) for p in prompts]
    scenes = [render_scene(s, 7)[1] for s in specs]
    mask = positive_mask(specs, scenes)
    assert mask.diagonal().all()
    assert mask[0, 1] and mask[3, 1]  # any one red circle is "a red circle"
    assert not mask[1, 2] and not mask[2, 1]  # counts are exact
    assert mask[0, 3] == (scenes[0][0].x < 0.4)


def test_swap_variants_change_one_attribute():
    attribute, variants = swap_variants(parse_prompt("a red circle to the left of a blue square"))
    assert attribute == "relation" and [v.prompt for v in variants] == [
        "a red circle to the left of a blue square", "a red circle to the right of a blue square",
        "a red circle above a blue square", "a red circle below a blue square"]
    attribute, variants = swap_variants(parse_prompt("three green squares"))
    assert attribute == "count" and [v.prompt for v in variants] == ["two green squares", "three green squares", "four green squares"]
    assert swap_variants(parse_prompt("a red circle at the top"))[0] == "position"
    with pytest.raises(ValueError, match="tiers 2, 4 and 5"):
        swap_variants(parse_prompt("a red circle"))
    # Training negatives: never the prompt itself, never a held-out composition.
    specs = [parse_prompt(p) for p in ("a red circle above a white triangle", "a red circle", "two red circles")]
    extras = swap_negatives(specs * 50, 1.0, random.Random(0))
    assert len(extras) == 100 and not any(is_heldout(e) for e in extras)
    # "circle to the right of triangle" is the converse of the held-out "triangle left of circle"
    assert {e.prompt for e in extras[::2]} == {"a red circle to the left of a white triangle",
                                                 "a red circle below a white triangle"}
    assert swap_negatives(specs, 0.0, random.Random(0)) == []


def test_loss_decreases_on_a_fixed_batch(tmp_path):
    path = tmp_path / "arch.json"
    path.write_text(json.dumps(architecture(16, 32, 1, 4, 32, 1, 16)))
    torch.manual_seed(0)
    model, tokenizer, cfg = load_open_clip(str(path), "")
    model.train().requires_grad_(True)
    images, prompts, specs, scenes = SceneStream(0).batch(16)
    tokens, positives = tokenizer(prompts), positive_mask(specs, scenes)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = []
    for _ in range(20):
        img = F.normalize(model.encode_image(clip_preprocess(images, cfg)), dim=-1)
        txt = F.normalize(model.encode_text(tokens), dim=-1)
        loss = clip_loss(img, txt, model.logit_scale, positives)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0] and sum(losses[-5:]) < sum(losses[:5]), losses
    assert [n for n, p in model.named_parameters() if torch.equal(p, before[n])] == []


def _obj(x, y, rgb):
    return PlacedObject("circle", "red", "small", x, y, (x - 0.1, y - 0.1, x + 0.1, y + 0.1), 0.1, 0.0, rgb)


def test_synthetic_aesthetic_on_hand_made_scenes():
    assert synthetic_aesthetic([_obj(0.5, 0.5, (255, 0, 0))]) == pytest.approx(10.0)  # centred, pure hue
    assert synthetic_aesthetic([_obj(0.0, 0.0, (240, 240, 240))]) == pytest.approx(0.0)  # corner, white
    assert synthetic_aesthetic([_obj(0.5, 0.5, (128, 128, 128))]) == pytest.approx(5.0)  # centred, grey
    # saturation (max - min) / max = 0.5; half-way to a corner: centring 0.5
    assert synthetic_aesthetic([_obj(0.75, 0.75, (200, 100, 100))]) == pytest.approx(5.0)
    two = [_obj(0.5, 0.5, (255, 0, 0)), _obj(1.0, 1.0, (255, 255, 255))]  # means over objects
    assert synthetic_aesthetic(two) == pytest.approx(5.0)
    assert synthetic_aesthetic([]) == 0.0


def test_bad_out_is_a_clear_error(tmp_path, capsys):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert cli(["toyworld", "pretrain", "clip", "--out", str(a_file), *TINY_ARGS]) == 2
    assert "is a file, expected a model folder" in capsys.readouterr().err
    assert cli(["toyworld", "pretrain", "clip", "--out", str(a_file / "sub"), *TINY_ARGS]) == 2
    assert "is a file, so" in capsys.readouterr().err
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.md").write_text("keep me")
    assert cli(["toyworld", "pretrain", "clip", "--out", str(foreign), *TINY_ARGS]) == 2
    assert "refusing to replace" in capsys.readouterr().err
    assert (foreign / "notes.md").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "mine"]  # no temporary folder left
