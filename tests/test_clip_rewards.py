"""CLIPScore and the LAION aesthetic predictor on a tiny open_clip built from a JSON config
(random weights, offline): formulas, batch invariance, gradients, the torch-vs-PIL
preprocessing agreement and clear errors."""

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from rewards.aesthetic import AestheticConfig, AestheticHead, AestheticReward
from rewards.clip_score import ClipScore, ClipScoreConfig
from rewards.open_clip_backbone import clip_preprocess, load_open_clip

TINY = {"embed_dim": 16, "quick_gelu": True,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    d = tmp_path_factory.mktemp("clip")
    path = d / "genalign-tiny-clip.json"
    path.write_text(json.dumps(TINY))
    torch.manual_seed(0)
    model, _, _ = load_open_clip(str(path), "")
    ckpt = d / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    return str(path), str(ckpt)


def images(n=3, size=48, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_clip_score_formula_and_clamp(tiny_clip):
    reward = ClipScore(ClipScoreConfig(model=tiny_clip[0], pretrained=tiny_clip[1]))
    x, prompts = images(), ["a red circle", "two blue squares", "a green triangle"]
    m = reward.model
    img = F.normalize(m.encode_image(clip_preprocess(x, reward.preprocess_cfg)), dim=-1)
    txt = F.normalize(m.encode_text(reward.tokenizer(prompts)), dim=-1)
    cos = (img * txt).sum(-1)
    out = reward(x, prompts)
    torch.testing.assert_close(out.scores, (100 * cos).clamp(min=0))
    torch.testing.assert_close(out.components["cosine"], cos)
    assert bool((out.scores >= 0).all())


def test_batch_invariance_and_gradient(tiny_clip):
    reward = ClipScore(ClipScoreConfig(model=tiny_clip[0], pretrained=tiny_clip[1], scale=1.0))
    x = images()
    prompts = ["a red circle"] * 3
    full = reward.cosine(x, prompts)
    single = torch.cat([reward.cosine(x[i : i + 1], prompts[:1]) for i in range(3)])
    torch.testing.assert_close(full, single, rtol=1e-4, atol=1e-5)
    x = x.clone().requires_grad_(True)
    reward.cosine(x, prompts).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0 and reward.differentiable


def test_torch_preprocessing_matches_pil(tiny_clip):
    """open_clip's PIL eval transform vs clip_preprocess on the same image: resampling
    differs slightly (PIL bicubic vs torch antialiased bicubic): mean |diff| measured ≈ 0.004
    in normalised units (48–256 px inputs); stated tolerance 0.02 (≈ 0.005 in [0, 1] pixels)."""
    import open_clip

    _, _, cfg = load_open_clip(tiny_clip[0], "")
    pil = Image.fromarray((images(1, 64)[0].permute(1, 2, 0).numpy() * 255).astype("uint8"))
    transform = open_clip.image_transform(cfg["size"], is_train=False, mean=cfg["mean"], std=cfg["std"])
    ref = transform(pil).unsqueeze(0)
    x = torch.from_numpy(__import__("numpy").asarray(pil, dtype="float32") / 255).permute(2, 0, 1).unsqueeze(0)
    ours = clip_preprocess(x, cfg)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().mean() < 0.02


def test_aesthetic_normalises_the_embedding(tiny_clip, tmp_path):
    torch.manual_seed(1)
    head = AestheticHead(16)
    assert [k for k in head.state_dict()][:2] == ["layers.0.weight", "layers.0.bias"]
    assert "layers.7.weight" in head.state_dict()  # the published key layout
    path = tmp_path / "head.safetensors"
    save_file(head.state_dict(), str(path))
    reward = AestheticReward(AestheticConfig(head=str(path), model=tiny_clip[0], pretrained=tiny_clip[1]))
    x = images()
    emb = reward.model.encode_image(clip_preprocess(x, reward.preprocess_cfg))
    expected = head.eval()(emb / emb.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(reward(x, [""] * 3).scores, expected)
    pth = tmp_path / "head.pth"
    torch.save(head.state_dict(), pth)  # the published format: a plain state dict
    again = AestheticReward(AestheticConfig(head=str(pth), model=tiny_clip[0], pretrained=tiny_clip[1]))
    torch.testing.assert_close(again(x, [""] * 3).scores, expected)


def test_clear_errors(tiny_clip, tmp_path):
    with pytest.raises(FileNotFoundError, match="'head'"):
        AestheticConfig(head=str(tmp_path / "missing.pth")).validate()
    with pytest.raises(ValueError, match="'head' is required"):
        AestheticConfig().validate()
    with pytest.raises(FileNotFoundError, match="'pretrained'"):
        ClipScore(ClipScoreConfig(model=tiny_clip[0], pretrained=str(tmp_path / "nope.safetensors")))
    with pytest.raises(ValueError, match="unknown open_clip architecture"):
        ClipScore(ClipScoreConfig(model="ViT-Q-99", pretrained=""))
    reward = ClipScore(ClipScoreConfig(model=tiny_clip[0], pretrained=tiny_clip[1]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        reward(images() * 2 - 1, ["x"] * 3)


@pytest.fixture(scope="module")
def tiny_pickscore(tmp_path_factory, tiny_tokenizer_builder):
    """A tiny transformers CLIPModel + tokenizer + image processor saved like the published one."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    d = tmp_path_factory.mktemp("pick")
    tok = tiny_tokenizer_builder(d)
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 24, "bos_token_id": 0, "eos_token_id": 1,
                     "pad_token_id": 1},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    CLIPModel(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(d)
    return str(d)


def test_pickscore_is_logit_scaled_cosine(tiny_pickscore):
    from rewards.pickscore import PickScore, PickScoreConfig

    reward = PickScore(PickScoreConfig(model=tiny_pickscore, processor=tiny_pickscore))
    x, prompts = images(), ["a red circle", "a blue square", "two circles"]
    out = reward(x, prompts)
    scale = float(reward.model.logit_scale.exp())
    torch.testing.assert_close(out.scores, scale * out.components["cosine"])
    assert scale == pytest.approx(1 / 0.07, rel=1e-4)  # CLIP's initial logit scale
    single = torch.cat([reward(x[i : i + 1], prompts[i : i + 1]).scores for i in range(3)])
    torch.testing.assert_close(out.scores, single, rtol=1e-4, atol=1e-4)
    x = x.clone().requires_grad_(True)
    reward(x, prompts).scores.sum().backward()
    assert x.grad.abs().sum() > 0
    with pytest.raises(FileNotFoundError, match="'model'"):
        PickScore(PickScoreConfig(model="./missing", processor=tiny_pickscore))


def test_hps_plain_cosine_padding_and_version(tiny_clip, tmp_path):
    """Score = cosine with no logit scale; the checkpoint's 'state_dict' (with DDP 'module.'
    prefixes) loads via weights_only; a non-square image is padded, not cropped."""
    from rewards.hps import HPSConfig, HPSReward
    from rewards.open_clip_backbone import clip_preprocess_pad

    model, tok, cfg = load_open_clip(tiny_clip[0], "")
    ckpt = tmp_path / "hps.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, ckpt)
    reward = HPSReward(HPSConfig(checkpoint=str(ckpt), version="v2.0", model=tiny_clip[0]))
    x, prompts = images(2), ["a red circle", "a blue square"]
    img = F.normalize(model.encode_image(clip_preprocess_pad(x, cfg)), dim=-1)
    txt = F.normalize(model.encode_text(tok(prompts)), dim=-1)
    out = reward(x, prompts)
    torch.testing.assert_close(out.scores, (img * txt).sum(-1))
    assert out.details[0]["hps_version"] == "v2.0"
    wide = torch.ones(1, 3, 16, 64)  # white 16×64: resized to 8×32, padded with black rows
    padded = clip_preprocess_pad(wide, cfg)
    black = (0 - torch.tensor(cfg["mean"])) / torch.tensor(cfg["std"])
    torch.testing.assert_close(padded[0, :, 0, 0], black)  # top rows are padding
    torch.testing.assert_close(padded[0, :, 16, 16], (1 - torch.tensor(cfg["mean"])) / torch.tensor(cfg["std"]), atol=1e-3, rtol=0)
    with pytest.raises(FileNotFoundError, match="'checkpoint'"):
        HPSConfig(checkpoint=str(tmp_path / "none.pt")).validate()
