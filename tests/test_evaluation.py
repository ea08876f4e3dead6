"""Fixed-seed evaluation: a prompt listed twice gets new sampling seeds, not a copy of its rows."""

import torch

from genalign.evaluation import sample_and_score
from genalign.policies import StableDiffusionPolicy, StableDiffusionPolicyConfig


def test_repeated_prompts_continue_the_seed_sequence(tiny_sd_dir):
    policy = StableDiffusionPolicy.from_pretrained(
        tiny_sd_dir, StableDiffusionPolicyConfig(pretrained=tiny_sd_dir, num_steps=3)
    )
    listed, _ = sample_and_score(policy, ["a red circle", "a blue square", "a red circle"], 2, 7, None)
    once, _ = sample_and_score(policy, ["a red circle"], 4, 7, None)  # seeds 7, 8, 9, 10
    other, _ = sample_and_score(policy, ["a blue square"], 2, 7, None)
    assert listed.shape[0] == 6
    # the first listing uses seeds 7, 8; the repeat continues with 9, 10
    torch.testing.assert_close(listed[0:2], once[0:2], atol=1e-4, rtol=0)
    torch.testing.assert_close(listed[4:6], once[2:4], atol=1e-4, rtol=0)
    assert (listed[4:6] - listed[0:2]).abs().amax() > 1e-2
    # a prompt's first listing starts at the base seed wherever it stands in the list
    torch.testing.assert_close(listed[2:4], other, atol=1e-4, rtol=0)
