"""Algorithms: losses over trajectories. A plain dict maps config names to classes."""

from genalign.algorithms.b2diffurl import B2DiffuRL, B2DiffuRLConfig
from genalign.algorithms.base import Algorithm, LossTerms, SamplingPlan
from genalign.algorithms.d3po import D3PO, D3POConfig
from genalign.algorithms.ddpo import DDPO, DDPOConfig
from genalign.algorithms.grpo import GRPO, GRPOConfig
from genalign.algorithms.raft import RAFT, RAFTConfig
from genalign.algorithms.rejection_sft import RejectionSFT, RejectionSFTConfig
from genalign.algorithms.seppo import SePPO, SePPOConfig

#: name -> (config class, algorithm class)
ALGORITHMS = {
    "ddpo": (DDPOConfig, DDPO),
    "d3po": (D3POConfig, D3PO),
    "seppo": (SePPOConfig, SePPO),
    "b2diffurl": (B2DiffuRLConfig, B2DiffuRL),
    "grpo": (GRPOConfig, GRPO),
    "raft": (RAFTConfig, RAFT),
    "rejection_sft": (RejectionSFTConfig, RejectionSFT),
}

__all__ = [
    "ALGORITHMS", "DDPO", "D3PO", "SePPO", "B2DiffuRL", "Algorithm", "LossTerms", "SamplingPlan",
    "DDPOConfig", "D3POConfig", "SePPOConfig", "B2DiffuRLConfig", "GRPO", "GRPOConfig", "RAFT", "RAFTConfig",
    "RejectionSFT", "RejectionSFTConfig",
]
