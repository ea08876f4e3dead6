"""Reward names used in configs -> (config class, builder). A plain dict, nothing more."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from genalign.configs import opt
from rewards.aesthetic import AestheticConfig
from rewards.clip_score import ClipScoreConfig
from rewards.color_coverage import ColorCoverage, ColorCoverageConfig
from rewards.compose import WeightedSum
from rewards.curriculum_rewards import CurriculumReward, CurriculumRewardConfig
from rewards.hps import HPSConfig
from rewards.jpeg import JpegCompressibility, JpegConfig
from rewards.motion import (
    MotionConfig,
    MotionReward,
    TemporalConsistency,
    TemporalConsistencyConfig,
)
from rewards.pickscore import PickScoreConfig
from rewards.rules import RuleConfig, RuleVerifier
from rewards.video import PerFrameConfig
from rewards.vqa import VQAConfig


@dataclass
class ShapesVerifierConfig:
    type: Literal["shapes_verifier"] = opt("shapes_verifier", "the Shapes World verifier (a trained detector)")
    weight: float = opt(1.0, "weight (> 0) of this component in the summed reward; every reward is maximised", gt=0)
    path: str = opt("assets/models/shapes-verifier", "directory with the verifier's weights and config")
    score: Literal["strict", "partial"] = opt("strict", "strict 0/1 (all clauses hold) or partial credit (mean over clauses)")

    def validate(self) -> None:
        import os

        if not os.path.isdir(self.path):
            raise FileNotFoundError(f"'path': no verifier directory at {self.path!r}")


def _shapes_verifier(config: ShapesVerifierConfig) -> Any:
    from rewards.shapes_verifier import ShapesVerifierReward

    return ShapesVerifierReward.from_pretrained(config.path, score=config.score)


def _clip_score(config: Any) -> Any:
    from rewards.clip_score import ClipScore

    return ClipScore(config)


def _aesthetic(config: Any) -> Any:
    from rewards.aesthetic import AestheticReward

    return AestheticReward(config)


def _pickscore(config: Any) -> Any:
    from rewards.pickscore import PickScore

    return PickScore(config)


def _hps(config: Any) -> Any:
    from rewards.hps import HPSReward

    return HPSReward(config)


def _vqa(config: Any) -> Any:
    from rewards.vqa import VQAReward

    return VQAReward(config)


def _per_frame(config: PerFrameConfig) -> Any:
    from rewards.video import PerFrameReward

    return PerFrameReward(config, REWARDS[config.inner.type][1](config.inner))


REWARDS = {
    "jpeg_compressibility": (JpegConfig, JpegCompressibility),
    "jpeg_incompressibility": (JpegConfig, JpegCompressibility),
    "shapes_verifier": (ShapesVerifierConfig, _shapes_verifier),
    "rule": (RuleConfig, RuleVerifier),
    "clip_score": (ClipScoreConfig, _clip_score),
    "aesthetic": (AestheticConfig, _aesthetic),
    "pickscore": (PickScoreConfig, _pickscore),
    "hps": (HPSConfig, _hps),
    "vqa": (VQAConfig, _vqa),
    "curr_reft": (CurriculumRewardConfig, CurriculumReward),
    "motion": (MotionConfig, MotionReward),
    "temporal_consistency": (TemporalConsistencyConfig, TemporalConsistency),
    "per_frame": (PerFrameConfig, _per_frame),
    "color_coverage": (ColorCoverageConfig, ColorCoverage),
}


def build_reward(components: list[Any]) -> WeightedSum:
    """Build the weighted sum of configured components (weights from each config)."""
    models = [REWARDS[c.type][1](c) for c in components]
    return WeightedSum(models, [c.weight for c in components])
