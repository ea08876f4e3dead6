"""Algorithms: losses over trajectories. A plain dict maps config names to classes."""

from genalign.algorithms.base import Algorithm
from genalign.algorithms.ddpo import DDPO, DDPOConfig

#: name -> (config class, algorithm class)
ALGORITHMS = {"ddpo": (DDPOConfig, DDPO)}

__all__ = ["ALGORITHMS", "DDPO", "Algorithm", "DDPOConfig"]
