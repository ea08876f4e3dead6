"""Policies: generators behind the trajectory interface. A plain dict maps types to classes."""

from genalign.policies.base import Policy
from genalign.policies.consistency import ConsistencyPolicy, ConsistencyPolicyConfig
from genalign.policies.flow_matching import FlowMatchingPolicy, FlowMatchingPolicyConfig
from genalign.policies.stable_diffusion import StableDiffusionPolicy, StableDiffusionPolicyConfig
from genalign.policies.text_lm import TextLMPolicy, TextLMPolicyConfig
from genalign.policies.video_diffusion import VideoDiffusionPolicy, VideoDiffusionPolicyConfig
from genalign.policies.vlm import VLMPolicy, VLMPolicyConfig

#: type -> (config class, policy class)
POLICIES = {
    "stable_diffusion": (StableDiffusionPolicyConfig, StableDiffusionPolicy),
    "consistency": (ConsistencyPolicyConfig, ConsistencyPolicy),
    "video_diffusion": (VideoDiffusionPolicyConfig, VideoDiffusionPolicy),
    "flow_matching": (FlowMatchingPolicyConfig, FlowMatchingPolicy),
    "text_lm": (TextLMPolicyConfig, TextLMPolicy),
    "vlm": (VLMPolicyConfig, VLMPolicy),
}

__all__ = [
    "POLICIES",
    "ConsistencyPolicy",
    "ConsistencyPolicyConfig",
    "FlowMatchingPolicy",
    "FlowMatchingPolicyConfig",
    "Policy",
    "StableDiffusionPolicy",
    "StableDiffusionPolicyConfig",
    "TextLMPolicy",
    "TextLMPolicyConfig",
    "VLMPolicy",
    "VideoDiffusionPolicy",
    "VideoDiffusionPolicyConfig",
    "VLMPolicyConfig",
]
