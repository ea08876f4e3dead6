"""Published reward models with their real weights: ranges and matched-vs-mismatched ordering.

Marked ``real_weights`` and skipped unless ``GENALIGN_REAL_WEIGHTS=1`` (they download
checkpoints of 1–4 GB; run them on a machine with a hub connection, ideally a GPU):

    GENALIGN_REAL_WEIGHTS=1 AESTHETIC_HEAD=sac+logos+ava1-l14-linearMSE.pth \\
        HPS_CHECKPOINT=HPS_v2.1_compressed.pt pytest -m real_weights tests/test_real_reward_weights.py

Each test renders Shapes World scenes at 224 px and checks that a reward scores an image
higher against its own prompt than against another scene's prompt, and that absolute scores
fall in the published ranges' neighbourhood (toy renders are not SD samples, so the ranges
are wide).
"""

import os

import pytest
import torch
from torchvision.transforms.functional import pil_to_tensor

from genalign.toyworld import parse_prompt, render

pytestmark = [
    pytest.mark.real_weights,
    pytest.mark.skipif(os.environ.get("GENALIGN_REAL_WEIGHTS") != "1", reason="needs real weights: set GENALIGN_REAL_WEIGHTS=1"),
]

PROMPTS = ["a red circle", "a blue square", "a green triangle", "two yellow circles"]


def _scenes() -> torch.Tensor:
    images = [pil_to_tensor(render(parse_prompt(p), seed=i, size=224)) for i, p in enumerate(PROMPTS)]
    return torch.stack(images).float() / 255.0  # [4, 3, 224, 224]


def _matched_beats_mismatched(reward) -> torch.Tensor:
    images = _scenes()
    matched = reward(images, PROMPTS).scores
    shifted = reward(images, PROMPTS[1:] + PROMPTS[:1]).scores
    assert (matched > shifted).float().mean() >= 0.75, (matched, shifted)
    return matched


def test_clip_score_openai_vit_l14():
    from rewards.clip_score import ClipScore, ClipScoreConfig

    scores = _matched_beats_mismatched(ClipScore(ClipScoreConfig(model="ViT-L-14-quickgelu", pretrained="openai")))
    assert ((scores > 10) & (scores < 45)).all(), scores


def test_pickscore():
    from rewards.pickscore import PickScore, PickScoreConfig

    scores = _matched_beats_mismatched(PickScore(PickScoreConfig()))
    assert ((scores > 10) & (scores < 30)).all(), scores


@pytest.mark.skipif(not os.environ.get("HPS_CHECKPOINT"), reason="set HPS_CHECKPOINT to the HPS v2.1 .pt file")
def test_hps_v21():
    from rewards.hps import HPSConfig, HPSReward

    scores = _matched_beats_mismatched(HPSReward(HPSConfig(checkpoint=os.environ["HPS_CHECKPOINT"])))
    assert ((scores > 0.1) & (scores < 0.4)).all(), scores


@pytest.mark.skipif(not os.environ.get("AESTHETIC_HEAD"), reason="set AESTHETIC_HEAD to the LAION v2 head .pth")
def test_laion_aesthetic_v2():
    from rewards.aesthetic import AestheticConfig, AestheticReward

    reward = AestheticReward(AestheticConfig(head=os.environ["AESTHETIC_HEAD"], model="ViT-L-14-quickgelu", pretrained="openai"))
    scores = reward(_scenes(), PROMPTS).scores
    assert ((scores > 1) & (scores < 9)).all(), scores  # flat toy renders: below SD-1.x's 5–6


def test_vqa_qwen2_vl():
    from rewards.vqa import VQAConfig, VQAReward

    _matched_beats_mismatched(VQAReward(VQAConfig(mode="question")))
