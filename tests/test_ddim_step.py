"""The DDIM step kernel against diffusers' DDIMScheduler.step and the Gaussian density."""

import math

import pytest
import torch
from diffusers import DDIMScheduler

from genalign.distributions import gaussian_log_prob
from genalign.policies.ddim import DDIMConstants, ddim_std_and_eps_coef, ddim_step

EPS32 = torch.finfo(torch.float32).eps
SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def _scheduler(**overrides):
    s = DDIMScheduler(**{**SD_SCHEDULER, **overrides})
    s.set_timesteps(10)
    return s


@pytest.mark.parametrize("overrides", [{}, {"prediction_type": "v_prediction"}, {"clip_sample": True}, {"prediction_type": "sample"}])
@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_mean_matches_diffusers_step(overrides, eta):
    """With the same variance noise z, diffusers returns μ + σ z; our kernel must give the same."""
    sched = _scheduler(**overrides)
    consts = DDIMConstants.from_scheduler(sched, 10)
    g = torch.Generator().manual_seed(0)
    for t in sched.timesteps:  # every step, including the last one (ᾱ_prev = ᾱ_0, σ > 0)
        sample = torch.randn(3, 4, 8, 8, generator=g)
        model_out = torch.randn(3, 4, 8, 8, generator=g)
        noise = torch.randn(3, 4, 8, 8, generator=g)
        expected = sched.step(model_out, t, sample, eta=eta, variance_noise=noise).prev_sample
        ours = ddim_step(consts, model_out, torch.full((3,), int(t)), sample, eta)
        std = ours.std.view(-1, 1, 1, 1)
        torch.testing.assert_close(ours.mean + std * noise, expected, rtol=1e-5, atol=1e-5)


def _zero_snr_scheduler(steps):
    sched = DDIMScheduler(**{**SD_SCHEDULER, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
                             "timestep_spacing": "trailing"})
    sched.set_timesteps(steps)
    return sched


@pytest.mark.parametrize("steps", [10, 20, 25])
def test_zero_terminal_snr_first_step_is_finite_at_eta_one(steps):
    """ᾱ_T = 0 and η = 1 make 1 − ᾱ_t' − σ² exactly 0; the factored form must give exactly 0
    (not ±6e-8 from rounding), so the step puts no weight on ε and μ = √ᾱ_t' x̂0 bit for bit."""
    sched = _zero_snr_scheduler(steps)
    consts = DDIMConstants.from_scheduler(sched, steps)
    g = torch.Generator().manual_seed(0)
    sample, model_out = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.full((2,), int(sched.timesteps[0]))
    assert int(t[0]) == 999 and float(sched.alphas_cumprod[999]) == 0.0
    a_t, a_prev = consts.alphas(t)
    std, coef = ddim_std_and_eps_coef(a_t, a_prev, 1.0)
    assert coef.tolist() == [0.0, 0.0]
    # σ² = 1 − ᾱ_t' here; the two float32 roundings differ by at most a few ulp of 1.
    torch.testing.assert_close(std**2, 1 - a_prev, rtol=0, atol=4 * EPS32)
    out = ddim_step(consts, model_out, t, sample, 1.0, generator=g)
    assert torch.isfinite(out.prev_sample).all() and torch.isfinite(out.log_prob).all()
    # μ = √ᾱ_t' x̂0 + 0 · ε: the same float operations as below, so equal exactly.
    assert torch.equal(out.mean, a_prev.sqrt().view(-1, 1, 1, 1) * out.pred_original_sample)


@pytest.mark.parametrize("schedule", ["sd", "zero_snr"])
@pytest.mark.parametrize("eta", [0.3, 1.0])
def test_eps_coefficient_matches_float64_on_every_step(schedule, eta):
    """The factored ε coefficient equals √(1 − ᾱ_t' − σ_t²) computed in float64 from the same
    float32 ᾱ's. Each float32 operation errs by ≤ ½ ulp; the squared coefficient is a sum and
    product of O(1) terms (the factor (1−ᾱ_t')/(1−ᾱ_t) is ≤ 1), so its error is below 8 ε32."""
    sched = _zero_snr_scheduler(20) if schedule == "zero_snr" else _scheduler()
    consts = DDIMConstants.from_scheduler(sched, len(sched.timesteps))
    a_t, a_prev = consts.alphas(sched.timesteps.clone())
    std, coef = ddim_std_and_eps_coef(a_t, a_prev, eta)
    a, ap = a_t.double(), a_prev.double()
    var64 = eta**2 * (1 - ap) / (1 - a) * (1 - a / ap)
    torch.testing.assert_close(std.double() ** 2, var64, rtol=0, atol=8 * EPS32)
    torch.testing.assert_close(coef.double() ** 2, (1 - ap - var64).clamp(min=0), rtol=0, atol=8 * EPS32)
    assert bool((coef >= 0).all()) and bool(torch.isfinite(coef).all())


def test_eps_coefficient_is_exactly_zero_from_zero_snr_at_eta_one():
    """From ᾱ_t = 0 at η = 1 the coefficient is 0 for every ᾱ_t' (whatever a machine's schedule
    rounds it to). Subtracting a rounded σ² from 1 − ᾱ_t' leaves ±6e-8 for about half of these
    values, and a positive residue would put √6e-8 ≈ 2.4e-4 on ε."""
    a_prev = torch.linspace(1e-3, 0.999, 1000)
    std, coef = ddim_std_and_eps_coef(torch.zeros(1000), a_prev, 1.0)
    assert bool((coef == 0).all())
    torch.testing.assert_close(std**2, 1 - a_prev, rtol=0, atol=4 * EPS32)


def test_eps_coefficient_edge_cases():
    """ᾱ_t' = 1 (a final step to the clean image) gives σ = 0 and coefficient 0 for any η;
    ᾱ_t = 1 (no noise at t, so ᾱ_t' = 1) gives both 0 instead of 0/0."""
    std, coef = ddim_std_and_eps_coef(torch.tensor([0.3, 0.9, 1.0]), torch.ones(3), torch.tensor([1.0, 0.5, 1.0]))
    assert std.tolist() == [0.0, 0.0, 0.0] and coef.tolist() == [0.0, 0.0, 0.0]


def test_draw_matches_diffusers_generator():
    """Drawing with a generator gives the same x_t' as diffusers with an equally seeded generator."""
    sched = _scheduler()
    consts = DDIMConstants.from_scheduler(sched, 10)
    sample, model_out = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = sched.timesteps[3]
    expected = sched.step(model_out, t, sample, eta=1.0, generator=torch.Generator().manual_seed(7)).prev_sample
    ours = ddim_step(consts, model_out, torch.full((2,), int(t)), sample, 1.0, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(ours.prev_sample, expected, rtol=1e-5, atol=1e-5)


def test_log_prob_is_closed_form_gaussian_mean_over_dims():
    """log π = mean_d [−(x−μ)²/(2σ²) − log σ − ½ log 2π]; checked against torch.distributions."""
    sched = _scheduler()
    consts = DDIMConstants.from_scheduler(sched, 10)
    sample, model_out = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.tensor([901, 501, 101, 1])  # per-row timesteps
    out = ddim_step(consts, model_out, t, sample, 1.0, generator=torch.Generator().manual_seed(1))
    normal = torch.distributions.Normal(out.mean, out.std.view(-1, 1, 1, 1))
    expected = normal.log_prob(out.prev_sample).flatten(1).mean(1)
    torch.testing.assert_close(out.log_prob, expected, rtol=1e-5, atol=1e-5)
    # scoring a given action recomputes the same value
    again = ddim_step(consts, model_out, t, sample, 1.0, prev_sample=out.prev_sample)
    torch.testing.assert_close(again.log_prob, out.log_prob)


def test_gaussian_log_prob_hand_value():
    """x = μ + σ: each dim contributes −½ − log σ − ½ log 2π."""
    mean, std = torch.zeros(1, 5), torch.full((1, 1), 2.0)
    lp = gaussian_log_prob(mean + 2.0, mean, std)
    assert lp.item() == pytest.approx(-0.5 - math.log(2.0) - 0.5 * math.log(2 * math.pi), abs=1e-6)


def test_refuses_configs_without_density():
    with pytest.raises(ValueError, match="set_alpha_to_one"):
        DDIMConstants.from_scheduler(_scheduler(set_alpha_to_one=True), 10)
    with pytest.raises(ValueError, match="thresholding"):
        DDIMConstants.from_scheduler(_scheduler(thresholding=True), 10)
    consts = DDIMConstants.from_scheduler(_scheduler(), 10)
    with pytest.raises(ValueError, match="eta"):
        ddim_step(consts, torch.zeros(1, 4, 2, 2), torch.tensor([500]), torch.zeros(1, 4, 2, 2), eta=0.0)


def test_per_row_eta_zero_is_the_deterministic_ddim_step():
    """eta = 0 rows equal DDIMScheduler's eta = 0 step and get log-prob 0; other rows are untouched."""
    sched = _scheduler()
    consts = DDIMConstants.from_scheduler(sched, 10)
    g = torch.Generator().manual_seed(3)
    t = sched.timesteps[2]
    sample, model_out = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    eta = torch.tensor([0.0, 1.0, 0.0, 1.0])
    mixed = ddim_step(consts, model_out, torch.full((4,), int(t)), sample, eta, generator=torch.Generator().manual_seed(9))
    full = ddim_step(consts, model_out, torch.full((4,), int(t)), sample, 1.0, generator=torch.Generator().manual_seed(9))
    deterministic = sched.step(model_out, t, sample, eta=0.0).prev_sample
    torch.testing.assert_close(mixed.prev_sample[[0, 2]], deterministic[[0, 2]], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed.prev_sample[[1, 3]], full.prev_sample[[1, 3]])  # same noise stream
    assert mixed.log_prob[[0, 2]].tolist() == [0.0, 0.0]
    torch.testing.assert_close(mixed.log_prob[[1, 3]], full.log_prob[[1, 3]])
    with pytest.raises(ValueError, match="deterministic"):
        ddim_step(consts, model_out, torch.full((4,), int(t)), sample, eta, prev_sample=sample)
    with pytest.raises(ValueError, match="eta must be > 0"):
        ddim_step(consts, model_out, torch.full((4,), int(t)), sample, 0.0)


def test_first_step_eta_forgets_x_T_and_leaves_later_steps_alone():
    """``first_step_eta = 1`` from ᾱ_T = 0: the first step's mean is √ᾱ_t' x̂0 whatever x_T is
    (x̂0 = −v for a v-prediction at ᾱ = 0), its σ is η = 1's; every later step, and the
    forward-process twin ``forward_step``, keeps the policy's η."""
    from genalign.policies.ddim import DDIMKernel

    sched = _zero_snr_scheduler(10)
    plain, mixed = DDIMKernel(sched, 10, 0.5), DDIMKernel(sched, 10, 0.5, first_step_eta=1.0)
    assert mixed.eta_steps.tolist() == [1.0] + [0.5] * 9
    g = torch.Generator().manual_seed(1)
    out, x_a, x_b = (torch.randn(2, 4, 3, 4, 4, generator=g) for _ in range(3))  # video-shaped latents
    t0, ids0 = mixed.timesteps[:1].expand(2), torch.zeros(2, dtype=torch.long)
    a = mixed.step(out, t0, ids0, x_a, generator=torch.Generator().manual_seed(5))
    b = mixed.step(out, t0, ids0, x_b, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.mean, b.mean) and torch.equal(a.prev_sample, b.prev_sample)
    _, a_prev = mixed.consts.alphas(t0)
    torch.testing.assert_close(a.mean, a_prev.sqrt().view(-1, 1, 1, 1, 1) * -out, rtol=0, atol=1e-6)
    assert not torch.equal(plain.step(out, t0, ids0, x_a).mean, plain.step(out, t0, ids0, x_b).mean)
    std1, _ = ddim_std_and_eps_coef(*mixed.consts.alphas(t0), 1.0)
    assert torch.equal(a.std, std1)
    t3, ids3 = mixed.timesteps[3:4].expand(2), torch.full((2,), 3)
    later = [k.step(out, t3, ids3, x_a, generator=torch.Generator().manual_seed(5)) for k in (plain, mixed)]
    assert torch.equal(later[0].prev_sample, later[1].prev_sample) and torch.equal(later[0].log_prob, later[1].log_prob)
    # deterministic rows stay deterministic at the first step too
    det = mixed.step(out, t0, ids0, x_a, stochastic=torch.tensor([False, True]))
    assert det.log_prob[0].item() == 0.0 and det.log_prob[1].item() != 0.0
    # forward_step: per-step σ follows eta_steps
    x0 = torch.randn(2, 2, 4, 3, 4, 4, generator=g)
    ts = mixed.timesteps[[0, 3]].expand(2, 2)
    _, _, sigma = mixed.forward_step(x0, ts, torch.tensor([[0, 3], [0, 3]]), torch.randn_like(x0))
    _, _, sigma_plain = plain.forward_step(x0, ts, torch.tensor([[0, 3], [0, 3]]), torch.randn_like(x0))
    assert torch.equal(sigma[:, 1], sigma_plain[:, 1]) and torch.equal(sigma[:, 0].flatten(), std1[:1].expand(2))
    with pytest.raises(ValueError, match="first_step_eta"):
        DDIMKernel(sched, 10, 0.5, first_step_eta=0.0)
