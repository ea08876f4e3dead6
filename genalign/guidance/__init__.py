"""Reward-guided sampling without fine-tuning, written against the Policy protocol only."""

from genalign.guidance.best_of_n import best_of_n
from genalign.guidance.self_certainty import borda_vote, self_certainty, self_certainty_best_of_n
from genalign.guidance.svdd import ComputeCounter, PMValue, select_candidates, svdd_sample

__all__ = ["ComputeCounter", "PMValue", "best_of_n", "borda_vote", "select_candidates", "self_certainty",
           "self_certainty_best_of_n", "svdd_sample"]
