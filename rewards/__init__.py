"""Reward models: callables that score finished outputs against their conditions."""

from rewards.base import RewardModel, RewardOutput, images_to_tensor
from rewards.compose import NonFiniteRewardError, WeightedSum
from rewards.jpeg import JpegCompressibility, JpegConfig

__all__ = [
    "JpegCompressibility",
    "JpegConfig",
    "NonFiniteRewardError",
    "RewardModel",
    "RewardOutput",
    "WeightedSum",
    "images_to_tensor",
]
