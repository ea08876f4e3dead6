"""Policies: generators behind the trajectory interface. A plain dict maps types to classes."""

from genalign.policies.base import Policy
from genalign.policies.stable_diffusion import StableDiffusionPolicy, StableDiffusionPolicyConfig

#: type -> (config class, policy class)
POLICIES = {"stable_diffusion": (StableDiffusionPolicyConfig, StableDiffusionPolicy)}

__all__ = ["POLICIES", "Policy", "StableDiffusionPolicy", "StableDiffusionPolicyConfig"]
