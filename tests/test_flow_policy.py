"""The flow-matching kernel (Flow-GRPO's SDE, the coefficient-preserving step) and the SD3 policy."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

from genalign.policies import FlowMatchingPolicy, FlowMatchingPolicyConfig
from genalign.policies.flow_cps import cps_step
from genalign.policies.flow_sde import FlowSchedule, FlowSDEKernel, flow_sde_step

PROMPTS = ["red circle", "two blue squares"]


def schedule(sigmas: list[float]) -> FlowSchedule:
    s = torch.tensor(sigmas)
    return FlowSchedule(sigmas=s, timesteps=s[:-1] * 1000)


def test_sde_step_equals_hand_derived_values():
    """σ = 0.5 -> 0.25, a = 0.7, x = 1, v = 2: g = 0.7 √(0.5/0.5) = 0.7, Δ = −0.25,
    μ = 1 + (2 + 0.49/1 · (1 + 0.5·2))(−0.25) = 0.255, std = 0.7 · 0.5 = 0.35."""
    sch = schedule([1.0, 0.5, 0.25, 0.0])
    x, v = torch.ones(1, 1), torch.full((1, 1), 2.0)
    out = flow_sde_step(sch, v, torch.tensor([1]), x, 0.7, noise=torch.full((1, 1), 1.0))
    assert out.mean.item() == pytest.approx(0.255, abs=1e-6)
    assert out.std.item() == pytest.approx(0.35, abs=1e-6)
    assert out.prev_sample.item() == pytest.approx(0.255 + 0.35, abs=1e-6)
    # log N(μ + std; μ, std²) = −1/2 − log std − log √(2π)
    assert out.log_prob.item() == pytest.approx(-0.5 - math.log(0.35) - 0.5 * math.log(2 * math.pi), abs=1e-5)
    assert out.pred_original_sample.item() == pytest.approx(1 - 0.5 * 2, abs=1e-6)


def test_sde_first_step_takes_g_at_the_second_sigma():
    """At σ = 1, g = a √(σ / (1 − σ_1)) with σ_1 = 0.5: a √2; std = g √(1 − 0.5)."""
    sch = schedule([1.0, 0.5, 0.0])
    out = flow_sde_step(sch, torch.zeros(1, 1), torch.tensor([0]), torch.ones(1, 1), 0.7, noise=torch.zeros(1, 1))
    assert out.std.item() == pytest.approx(0.7 * math.sqrt(2) * math.sqrt(0.5), abs=1e-6)
    # μ = x + (v + g²/(2σ)(x + 0·v)) Δ = 1 + (0 + 0.98/2)(−0.5)
    assert out.mean.item() == pytest.approx(1 - 0.245, abs=1e-6)


def test_cps_step_equals_hand_derived_values():
    """σ = 0.5 -> 0.25, a = 0.5, x = 1, v = 2: x̂0 = 0, ε̂ = 2, std = 0.25 sin(π/4),
    μ = 0.75 · 0 + 0.25 cos(π/4) · 2."""
    sch = schedule([1.0, 0.5, 0.25, 0.0])
    out = cps_step(sch, torch.full((1, 1), 2.0), torch.tensor([1]), torch.ones(1, 1), 0.5, noise=torch.zeros(1, 1))
    assert out.std.item() == pytest.approx(0.25 * math.sin(math.pi / 4), abs=1e-6)
    assert out.mean.item() == pytest.approx(0.5 * math.cos(math.pi / 4), abs=1e-6)


@pytest.mark.parametrize("sde", ["flow_grpo", "cps"])
def test_deterministic_rows_equal_diffusers_euler_step(sde):
    """A row outside the noise window takes the ODE step, which is diffusers' Euler step; its
    log-prob is 0. The stochastic rows of the same batch are unaffected by the mask."""
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    kernel = FlowSDEKernel(sched, 6, 0.7, sde)
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref.set_timesteps(6)
    torch.manual_seed(0)
    x, v = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    for j in range(kernel.num_steps):
        t = kernel.timesteps[j].expand(3)
        ids = torch.full((3,), j)
        out = kernel.step(v, t, ids, x, stochastic=torch.tensor([False, True, False]), noise=torch.randn_like(x))
        ref._step_index = j
        expected = ref.step(v, ref.timesteps[j], x).prev_sample
        torch.testing.assert_close(out.prev_sample[[0, 2]], expected[[0, 2]], rtol=0, atol=1e-6)
        assert out.log_prob[[0, 2]].eq(0).all() and out.log_prob[1] != 0
        assert (out.prev_sample[1] - expected[1]).abs().max() > 1e-3


def test_sde_tends_to_the_ode_as_the_noise_level_vanishes():
    """The step leaves the ODE by a·(noise term) + a²·(drift term): at a = 1e-2 and 1e-4 the gaps
    are in the ratio 100 up to the a² part (relative 1e-2), and both vanish with a."""
    sch = FlowSchedule.from_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0), 5)
    torch.manual_seed(1)
    x, v, z = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    ode = flow_sde_step(sch, v, torch.tensor([2, 2]), x, torch.zeros(2)).prev_sample
    gaps = [(flow_sde_step(sch, v, torch.tensor([2, 2]), x, a, noise=z).prev_sample - ode).abs().max().item()
            for a in (1e-2, 1e-4)]
    assert gaps[0] < 0.1
    assert gaps[1] == pytest.approx(gaps[0] / 100, rel=0.05)


def test_cps_at_full_noise_equals_diffusers_stochastic_sampling():
    """a = 1: the coefficient-preserving step is x' = (1 − σ') x̂0 + σ' z, diffusers'
    ``stochastic_sampling`` step; the same generator draws the same z."""
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=True)
    ref.set_timesteps(5)
    sch = FlowSchedule.from_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0), 5)
    torch.manual_seed(2)
    x, v = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    ref._step_index = 1
    expected = ref.step(v, ref.timesteps[1], x, generator=torch.Generator().manual_seed(5)).prev_sample
    ours = cps_step(sch, v, torch.tensor([1]), x, 1.0, generator=torch.Generator().manual_seed(5)).prev_sample
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


def test_sde_keeps_the_odes_marginals():
    """For data x0 ~ N(0, s²) the exact velocity is known in closed form:
    v(x, σ) = E[ε − x0 | x_σ] = x (σ − (1 − σ) s²) / ((1 − σ)² s² + σ²). Sampling 40,000 scalars
    from x_1 ~ N(0, 1) with Flow-GRPO's SDE (a = 0.7) must end at std s: the score correction
    of the drift keeps every marginal (without it the sample ends at std 0.93). Tolerance: the
    Euler error of 40 steps plus a few standard errors of a std estimate (s/√(2n) = 0.002)."""
    s = 0.5
    kernel = FlowSDEKernel(FlowMatchEulerDiscreteScheduler(shift=1.0), 40, 0.7)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40_000, 1, generator=gen)

    def velocity(x, sigma):
        return x * (sigma - (1 - sigma) * s * s) / ((1 - sigma) ** 2 * s * s + sigma**2)

    for j in range(kernel.num_steps):
        sigma = float(kernel.schedule.sigmas[j])
        x = kernel.step(velocity(x, sigma), kernel.timesteps[j].expand(len(x)), torch.full((len(x),), j), x,
                        generator=gen).prev_sample
    assert abs(x.std().item() - s) < 0.02
    assert abs(x.mean().item()) < 0.01


def test_cps_step_keeps_the_paths_coefficients():
    """With exact x̂0 and ε̂ (data a point c: v(x, σ) = (x − c)/σ), every coefficient-preserving
    step lands on the straight path's marginal N((1 − σ') c, σ'²) exactly, at any noise level:
    the state's mean and std after each step match to a few standard errors (n = 40,000)."""
    c = 0.8
    kernel = FlowSDEKernel(FlowMatchEulerDiscreteScheduler(shift=3.0), 8, 0.7, "cps")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40_000, 1, generator=gen)
    for j in range(kernel.num_steps):
        sigma, nxt = (float(v) for v in kernel.schedule.sigmas[j : j + 2])
        x = kernel.step((x - c) / sigma, kernel.timesteps[j].expand(len(x)), torch.full((len(x),), j), x,
                        generator=gen).prev_sample
        assert x.std().item() == pytest.approx(nxt, rel=0.02)
        assert x.mean().item() == pytest.approx((1 - nxt) * c, abs=0.02 * nxt)
    last = float(kernel.schedule.sigmas[-2])
    assert kernel.finish(x, lambda x, t: (x - c) / last).sub(c).abs().max() < 1e-5


def test_forward_step_state_and_mean_follow_the_straight_path():
    kernel = FlowSDEKernel(FlowMatchEulerDiscreteScheduler(shift=3.0), 4, 0.7)
    torch.manual_seed(3)
    x0, eps = torch.randn(2, 3, 4, 4, 4), torch.randn(2, 3, 4, 4, 4)
    ids = torch.tensor([[0, 1, 2], [1, 2, 3]])
    state, mean, std = kernel.forward_step(x0, kernel.timesteps[ids], ids, eps)
    sigma = kernel.schedule.sigmas[ids].view(2, 3, 1, 1, 1)
    torch.testing.assert_close(state, (1 - sigma) * x0 + sigma * eps)
    # the step with the true velocity v = ε − x0 from that state
    out = flow_sde_step(kernel.schedule, (eps - x0)[1, 2:], ids[1, 2:], state[1, 2:], 0.7, noise=torch.zeros(1, 4, 4, 4))
    torch.testing.assert_close(mean[1, 2:], out.mean)
    assert std.shape == (2, 3, 1, 1, 1) and float(std[1, 2]) == pytest.approx(float(out.std), abs=1e-7)


def test_kernel_rejects_bad_settings():
    sched = FlowMatchEulerDiscreteScheduler()
    with pytest.raises(ValueError, match="noise_level"):
        FlowSDEKernel(sched, 4, 0.0)
    with pytest.raises(ValueError, match="noise_level"):
        FlowSDEKernel(sched, 4, 1.5, "cps")
    with pytest.raises(ValueError, match="stochastic_sampling"):
        FlowSDEKernel(FlowMatchEulerDiscreteScheduler(stochastic_sampling=True), 4, 0.7)
    with pytest.raises(ValueError, match="sde"):
        FlowSDEKernel(sched, 4, 0.7, "euler")


def make_policy(path, **kw) -> FlowMatchingPolicy:
    keys = dict(num_steps=4, guidance_scale=3.0, max_sequence_length=4, lora_rank=4)
    keys.update(kw)
    return FlowMatchingPolicy.from_pretrained(path, FlowMatchingPolicyConfig(pretrained=path, **keys))


def test_vanishing_noise_rollout_equals_the_sd3_pipeline(tiny_sd3_dir):
    """x_1 is drawn as the pipeline draws it, guidance and the transformer call are the
    pipeline's, the VAE's shift and scale are undone: at a = 1e-7 the rollout is the pipeline's
    image for the same generators."""
    policy = make_policy(tiny_sd3_dir, noise_level=1e-7)
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir, text_encoder_3=None, tokenizer_3=None)
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    ours = policy.rollout(PROMPTS, 1, [torch.Generator().manual_seed(s) for s in (3, 4)]).outputs
    theirs = pipe(PROMPTS, num_inference_steps=4, guidance_scale=3.0, generator=gens, output_type="pt",
                  max_sequence_length=4, height=64, width=64).images
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def test_cps_finish_is_the_last_steps_x0(tiny_sd3_dir):
    policy = make_policy(tiny_sd3_dir, sde="cps", noise_level=0.5)
    traj = policy.rollout(PROMPTS, 1, [1, 2])
    assert traj.num_steps == 3 and traj.log_probs.ne(0).all()
    torch.testing.assert_close(policy.predict_final(traj, 3), traj.outputs, rtol=0, atol=1e-6)


def test_saved_lora_loads_in_plain_diffusers(tiny_sd3_dir, tmp_path):
    """The saved adapters are diffusers' SD3 LoRA format: ``pipe.load_lora_weights`` on the base
    pipeline reproduces the tuned policy's transformer output."""
    policy = make_policy(tiny_sd3_dir)
    with torch.no_grad():
        for name, p in policy.denoiser.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    policy.save_pretrained(str(tmp_path / "lora"))
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir, text_encoder_3=None, tokenizer_3=None)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    torch.manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([500.0, 250.0])
    embeds = policy.encode(PROMPTS)
    args = dict(encoder_hidden_states=embeds["prompt_embeds"], pooled_projections=embeds["pooled_prompt_embeds"])
    with torch.no_grad():
        ours = policy.denoiser(hidden_states=x, timestep=t, **args).sample
        theirs = pipe.transformer(hidden_states=x, timestep=t, **args).sample
        base = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir, text_encoder_3=None, tokenizer_3=None).transformer(
            hidden_states=x, timestep=t, **args).sample
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    assert (ours - base).abs().max() > 1e-3, "the adapters must change the output"



def test_every_adapter_gets_a_gradient(tiny_sd3_dir):
    """The last SD3 block drops its text tokens' outputs (``context_pre_only``), so a LoRA on its
    ``add_q_proj`` could never learn: the policy leaves it out, and every adapter it adds gets a
    nonzero gradient from one step's log-prob."""
    policy = make_policy(tiny_sd3_dir)
    names = [n for n, _ in policy.denoiser.named_parameters() if "lora_" in n]
    assert not any(n.startswith("transformer_blocks.1.attn.add_q_proj") for n in names)
    assert any(n.startswith("transformer_blocks.0.attn.add_q_proj") for n in names)
    with torch.no_grad():
        for n, p in policy.denoiser.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)  # B = 0 at the start would leave A without a gradient
    traj = policy.rollout(PROMPTS, 1, [1, 2])
    policy.log_prob(traj, torch.tensor([[0, 2], [1, 3]])).sum().backward()
    silent = [n for n, p in policy.denoiser.named_parameters() if "lora_" in n and (p.grad is None or p.grad.abs().max() == 0)]
    assert not silent, silent[:3]
