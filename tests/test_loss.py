"""The training objective against diffusers' schedulers and closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler, EulerDiscreteScheduler
from diffusers.training_utils import compute_snr

from sdxl_trainer.training.loss import (
    BETA_SCHEDULES,
    LOSS_WEIGHTINGS,
    PREDICTION_TYPES,
    DiffusionObjective,
    ObjectiveConfig,
    loss_weight_from_snr,
    make_betas,
    pseudo_huber,
    rescale_zero_terminal_snr,
    shift_timesteps_by_sigma,
)

T = 1000
ALL_TIMESTEPS = torch.arange(T)
ENDPOINTS = torch.tensor([0, T - 1])


def objective(**overrides) -> DiffusionObjective:
    return DiffusionObjective(ObjectiveConfig(**overrides))


def reference_scheduler(zero_terminal_snr: bool, beta_schedule: str = "scaled_linear", prediction_type: str = "v_prediction"):
    return DDPMScheduler(
        num_train_timesteps=T,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule=beta_schedule,
        prediction_type=prediction_type,
        rescale_betas_zero_snr=zero_terminal_snr,
    )


def batch(seed: int = 0, shape=(6, 4, 8, 8)):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(shape, generator=generator)
    noise = torch.randn(shape, generator=generator)
    return latents, noise


# --- schedule -------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
@pytest.mark.parametrize("zero_terminal_snr", [False, True])
def test_schedule_matches_ddpm_scheduler(beta_schedule, zero_terminal_snr):
    reference = reference_scheduler(zero_terminal_snr, beta_schedule)
    betas = make_betas(T, 0.00085, 0.012, beta_schedule)
    if zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    assert betas.dtype == torch.float64
    # diffusers builds (and rescales) in float32: 1 - acp_t/acp_{t-1} cancels, hence the absolute tolerances.
    torch.testing.assert_close(betas, reference.betas.double(), rtol=1e-5, atol=1e-5)
    ours = objective(beta_schedule=beta_schedule, zero_terminal_snr=zero_terminal_snr).alphas_cumprod
    assert ours.dtype == torch.float64 and ours.shape == (T,)
    torch.testing.assert_close(ours, reference.alphas_cumprod.double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
def test_rescale_matches_diffusers_in_float64(beta_schedule):
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr as diffusers_rescale

    betas = make_betas(T, 0.00085, 0.012, beta_schedule)
    torch.testing.assert_close(rescale_zero_terminal_snr(betas), diffusers_rescale(betas.clone()), rtol=1e-12, atol=1e-14)


def test_beta_closed_forms():
    linear = make_betas(T, 0.001, 0.02, "linear")
    assert linear[0].item() == pytest.approx(0.001, rel=1e-12)
    assert linear[-1].item() == pytest.approx(0.02, rel=1e-12)
    scaled = make_betas(T, 0.00085, 0.012, "scaled_linear")
    assert scaled[0].item() == pytest.approx(0.00085, rel=1e-12)
    assert scaled[-1].item() == pytest.approx(0.012, rel=1e-12)
    middle = ((0.00085**0.5 + 0.012**0.5) / 2) ** 2
    assert make_betas(3, 0.00085, 0.012, "scaled_linear")[1].item() == pytest.approx(middle, rel=1e-12)


def test_zero_terminal_snr_closed_forms():
    betas = make_betas()
    rescaled = rescale_zero_terminal_snr(betas)
    alphas_cumprod = torch.cumprod(1.0 - rescaled, dim=0)
    assert alphas_cumprod[-1].item() == 0.0
    assert rescaled[-1].item() == 1.0
    # Lin et al. keep the first step's SNR: acp_0 = 1 - beta_start.
    assert alphas_cumprod[0].item() == pytest.approx(1.0 - 0.00085, rel=1e-12)
    assert bool((alphas_cumprod[1:] < alphas_cumprod[:-1]).all())
    assert objective(zero_terminal_snr=True).alphas_cumprod[-1].item() == 0.0
    assert objective(zero_terminal_snr=False).alphas_cumprod[-1].item() > 0.0


@pytest.mark.parametrize("zero_terminal_snr", [False, True])
def test_snr_matches_compute_snr(zero_terminal_snr):
    ours = objective(zero_terminal_snr=zero_terminal_snr).snr(ALL_TIMESTEPS)
    reference = compute_snr(reference_scheduler(zero_terminal_snr), ALL_TIMESTEPS)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-7)


def test_snr_endpoints():
    with_ztsnr = objective(zero_terminal_snr=True)
    snr = with_ztsnr.snr(ENDPOINTS)
    assert snr[1].item() == 0.0
    assert snr[0].item() == pytest.approx((1 - 0.00085) / 0.00085, rel=1e-6)
    assert bool(torch.isfinite(with_ztsnr.snr(ALL_TIMESTEPS)).all())


# --- forward process and target --------------------------------------------------------------------


@pytest.mark.parametrize("zero_terminal_snr", [False, True])
def test_add_noise_and_velocity_match_ddpm_scheduler(zero_terminal_snr):
    latents, noise = batch()
    timesteps = torch.tensor([0, 1, 250, 500, 998, T - 1])
    reference = reference_scheduler(zero_terminal_snr)
    ours = objective(zero_terminal_snr=zero_terminal_snr)
    # Tolerance covers diffusers' float32 schedule (see test_schedule_matches_ddpm_scheduler).
    torch.testing.assert_close(
        ours.add_noise(latents, noise, timesteps), reference.add_noise(latents, noise, timesteps), rtol=1e-5, atol=5e-6
    )
    torch.testing.assert_close(
        ours.target(latents, noise, timesteps), reference.get_velocity(latents, noise, timesteps), rtol=1e-5, atol=5e-6
    )


def test_forward_process_closed_forms():
    latents, noise = batch()
    ours = objective(zero_terminal_snr=True)
    last = torch.full((latents.shape[0],), T - 1)
    first = torch.zeros(latents.shape[0], dtype=torch.long)
    # acp = 0 at the zero-terminal-SNR step: x_T is pure noise and v = -x0.
    assert torch.equal(ours.add_noise(latents, noise, last), noise)
    assert torch.equal(ours.target(latents, noise, last), -latents)
    expected = math.sqrt(1 - 0.00085) * latents + math.sqrt(0.00085) * noise
    torch.testing.assert_close(ours.add_noise(latents, noise, first), expected)
    expected_v = math.sqrt(1 - 0.00085) * noise - math.sqrt(0.00085) * latents
    torch.testing.assert_close(ours.target(latents, noise, first), expected_v)


def test_epsilon_target_is_noise_and_dtype_follows_latents():
    latents, noise = batch()
    timesteps = torch.tensor([0, 10, 100, 500, 900, 999])
    assert torch.equal(objective(prediction_type="epsilon").target(latents, noise, timesteps), noise)
    half = objective().add_noise(latents.bfloat16(), noise.bfloat16(), timesteps)
    assert half.dtype == torch.bfloat16


def test_timesteps_shape_must_match_batch():
    latents, noise = batch()
    with pytest.raises(ValueError, match="timesteps must have shape"):
        objective().add_noise(latents, noise, torch.tensor([1, 2]))


# --- loss weights ---------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_weighting", LOSS_WEIGHTINGS)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("zero_terminal_snr", [False, True])
def test_weights_finite_everywhere(loss_weighting, prediction_type, zero_terminal_snr):
    ours = objective(loss_weighting=loss_weighting, prediction_type=prediction_type, zero_terminal_snr=zero_terminal_snr)
    weights = ours.loss_weights(ALL_TIMESTEPS)
    assert weights.dtype == torch.float32 and weights.shape == (T,)
    assert bool(torch.isfinite(weights).all())
    assert bool((weights >= 0).all())


def diffusers_example_min_snr(scheduler, timesteps, gamma):
    """The weighting in diffusers' examples/text_to_image/train_text_to_image.py, written out."""
    snr = compute_snr(scheduler, timesteps)
    weights = torch.stack([snr, gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    if scheduler.config.prediction_type == "epsilon":
        return weights / snr
    return weights / (snr + 1)


@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_matches_diffusers_example(gamma):
    # Epsilon on the SDXL schedule (SNR > 0 everywhere, where the example's formula is defined).
    eps = objective(prediction_type="epsilon", zero_terminal_snr=False, snr_gamma=gamma)
    reference = diffusers_example_min_snr(reference_scheduler(False, prediction_type="epsilon"), ALL_TIMESTEPS, gamma)
    torch.testing.assert_close(eps.loss_weights(ALL_TIMESTEPS), reference, rtol=1e-5, atol=1e-7)
    # v-prediction with zero terminal SNR: defined everywhere, 0 at the last step.
    v = objective(prediction_type="v_prediction", zero_terminal_snr=True, snr_gamma=gamma)
    reference = diffusers_example_min_snr(reference_scheduler(True), ALL_TIMESTEPS, gamma)
    torch.testing.assert_close(v.loss_weights(ALL_TIMESTEPS), reference, rtol=1e-4, atol=1e-7)
    assert v.loss_weights(ENDPOINTS)[1].item() == 0.0


def test_min_snr_epsilon_limit_at_zero_snr():
    ours = objective(prediction_type="epsilon", zero_terminal_snr=True)
    reference = diffusers_example_min_snr(reference_scheduler(True, prediction_type="epsilon"), ALL_TIMESTEPS, 5.0)
    weights = ours.loss_weights(ALL_TIMESTEPS)
    # The example's 0/0 is NaN at SNR = 0; the limit min(SNR, g)/SNR -> 1 is used instead.
    assert math.isnan(reference[-1].item())
    assert weights[-1].item() == 1.0
    torch.testing.assert_close(weights[:-1], reference[:-1], rtol=1e-4, atol=1e-7)


SNRS = torch.tensor([0.0, 0.5, 5.0, 20.0], dtype=torch.float64)
GAMMA = 5.0
CLOSED_FORMS = {
    ("none", "epsilon"): [1.0, 1.0, 1.0, 1.0],
    ("none", "v_prediction"): [1.0, 1.0, 1.0, 1.0],
    ("min_snr", "epsilon"): [1.0, 1.0, 1.0, 5.0 / 20.0],
    ("min_snr", "v_prediction"): [0.0, 0.5 / 1.5, 5.0 / 6.0, 5.0 / 21.0],
    ("soft_min_snr", "epsilon"): [1.0, 5.0 / 5.5, 5.0 / 10.0, 5.0 / 25.0],
    ("soft_min_snr", "v_prediction"): [0.0, 2.5 / (5.5 * 1.5), 25.0 / (10.0 * 6.0), 100.0 / (25.0 * 21.0)],
    ("debiased", "epsilon"): [1000.0, 0.5**-0.5, 5.0**-0.5, 20.0**-0.5],
    ("debiased", "v_prediction"): [0.0, 0.5**0.5 / 1.5, 5.0**0.5 / 6.0, 20.0**0.5 / 21.0],
}


@pytest.mark.parametrize("loss_weighting, prediction_type", sorted(CLOSED_FORMS))
def test_weight_closed_forms(loss_weighting, prediction_type):
    weights = loss_weight_from_snr(SNRS, loss_weighting, prediction_type, GAMMA)
    expected = torch.tensor(CLOSED_FORMS[loss_weighting, prediction_type], dtype=torch.float64)
    torch.testing.assert_close(weights, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_soft_min_snr_lies_between_half_and_full_min_snr(prediction_type):
    snr = torch.logspace(-4, 4, 200, dtype=torch.float64)
    soft = loss_weight_from_snr(snr, "soft_min_snr", prediction_type, GAMMA)
    hard = loss_weight_from_snr(snr, "min_snr", prediction_type, GAMMA)
    assert bool((soft <= hard + 1e-12).all())
    assert bool((soft >= 0.5 * hard - 1e-12).all())


def test_debiased_epsilon_is_in_v_space_times_snr_ratio():
    snr = torch.logspace(-3, 3, 50, dtype=torch.float64)
    eps = loss_weight_from_snr(snr, "debiased", "epsilon", GAMMA)
    v = loss_weight_from_snr(snr, "debiased", "v_prediction", GAMMA)
    torch.testing.assert_close(v, eps * snr / (snr + 1))


@pytest.mark.parametrize("loss_weighting", ["min_snr", "soft_min_snr"])
def test_min_snr_floor_lifts_terminal_steps_only(loss_weighting):
    plain = objective(loss_weighting=loss_weighting, prediction_type="v_prediction", zero_terminal_snr=True)
    floored = objective(
        loss_weighting=loss_weighting, prediction_type="v_prediction", zero_terminal_snr=True, min_snr_floor=0.1
    )
    before = plain.loss_weights(ALL_TIMESTEPS)
    after = floored.loss_weights(ALL_TIMESTEPS)
    assert before[-1].item() == 0.0
    assert after[-1].item() == pytest.approx(0.1)
    assert bool((after >= 0.1 - 1e-7).all())
    above = before >= 0.1
    assert bool(above.any()) and bool((~above).any())
    torch.testing.assert_close(after[above], before[above])
    torch.testing.assert_close(after[~above], torch.full_like(after[~above], 0.1))


# --- sampling -------------------------------------------------------------------------------------


@pytest.mark.parametrize("timestep_sampling", ["uniform", "logit_normal"])
def test_timestep_sampling_range_and_determinism(timestep_sampling):
    ours = objective(timestep_sampling=timestep_sampling)
    first = ours.sample_timesteps(20000, torch.Generator().manual_seed(1), "cpu")
    again = ours.sample_timesteps(20000, torch.Generator().manual_seed(1), "cpu")
    other = ours.sample_timesteps(20000, torch.Generator().manual_seed(2), "cpu")
    assert first.dtype == torch.long and first.shape == (20000,)
    assert int(first.min()) >= 0 and int(first.max()) <= T - 1
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_uniform_covers_both_ends_evenly():
    timesteps = objective().sample_timesteps(50000, torch.Generator().manual_seed(0), "cpu")
    assert int(timesteps.min()) == 0 and int(timesteps.max()) == T - 1
    middle = ((timesteps >= 250) & (timesteps < 750)).float().mean().item()
    assert middle == pytest.approx(0.5, abs=0.02)


def test_logit_normal_concentrates_mid_range():
    timesteps = objective(timestep_sampling="logit_normal").sample_timesteps(
        50000, torch.Generator().manual_seed(0), "cpu"
    )
    middle = ((timesteps >= 250) & (timesteps <= 749)).float().mean().item()
    # P(|z| < logit(0.75)) for z ~ N(0, 1) is about 0.728.
    assert middle == pytest.approx(0.728, abs=0.02)
    assert timesteps.float().median().item() == pytest.approx(499.5, abs=10)
    shifted = objective(timestep_sampling="logit_normal", logit_mean=1.0).sample_timesteps(
        50000, torch.Generator().manual_seed(0), "cpu"
    )
    assert shifted.float().median().item() == pytest.approx((T - 1) / (1 + math.exp(-1.0)), abs=10)
    # Rounding u * (T - 1) to the nearest step lets a wide distribution reach both ends of the schedule.
    wide = objective(timestep_sampling="logit_normal", logit_std=4.0).sample_timesteps(
        20000, torch.Generator().manual_seed(0), "cpu"
    )
    assert int(wide.min()) == 0 and int(wide.max()) == T - 1


def schedule_sigmas(ours: DiffusionObjective) -> torch.Tensor:
    return ((1 - ours.alphas_cumprod) / ours.alphas_cumprod).sqrt()


def nearest_in_log_sigma(sigmas: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """Brute force: for each wanted sigma, the index of the schedule sigma nearest in log."""
    distance = (sigmas.log()[None, :] - wanted.log()[:, None]).abs()
    return distance.argmin(dim=1)


@pytest.mark.parametrize("zero_terminal_snr", [False, True])
def test_shift_doubles_sigma_to_nearest_schedule_sigma(zero_terminal_snr):
    ours = objective(zero_terminal_snr=zero_terminal_snr)
    sigmas = schedule_sigmas(ours)
    finite = ALL_TIMESTEPS[torch.isfinite(sigmas)]
    largest_finite = int(finite[-1])
    assert largest_finite == (T - 2 if zero_terminal_snr else T - 1)
    shifted = shift_timesteps_by_sigma(finite, ours.alphas_cumprod, 2.0)
    wanted = 2.0 * sigmas[finite]
    reachable = wanted <= sigmas[largest_finite]
    assert bool(reachable.any()) and bool((~reachable).any())
    # Reachable targets go to the nearest schedule sigma; the rest to the largest finite sigma (an infinite
    # sigma is never nearest to a finite one).
    assert torch.equal(shifted[reachable], nearest_in_log_sigma(sigmas[finite], wanted[reachable]))
    assert bool((shifted[~reachable] == largest_finite).all())
    # Where the schedule's sigmas are finely spaced, the shifted sigma is about twice the original.
    ratio = sigmas[shifted[reachable]] / sigmas[finite[reachable]]
    finely_spaced = (finite[reachable] > 50) & (shifted[reachable] < 900)
    assert int(finely_spaced.sum()) > 300
    assert bool(((ratio[finely_spaced] > 1.95) & (ratio[finely_spaced] < 2.05)).all())
    if zero_terminal_snr:
        assert shift_timesteps_by_sigma(torch.tensor([T - 1]), ours.alphas_cumprod, 2.0).item() == T - 1
    assert torch.equal(shift_timesteps_by_sigma(ALL_TIMESTEPS, ours.alphas_cumprod, 1.0), ALL_TIMESTEPS)


@pytest.mark.parametrize("timestep_sampling", ["uniform", "logit_normal"])
def test_sample_timesteps_with_resolution_shift(timestep_sampling):
    plain = objective(timestep_sampling=timestep_sampling)
    shifting = objective(timestep_sampling=timestep_sampling, resolution_shift=True, base_resolution=1024)

    def draw(ours, pixel_size):
        return ours.sample_timesteps(4096, torch.Generator().manual_seed(3), "cpu", pixel_size=pixel_size)

    unshifted = draw(plain, None)
    # sqrt(1024 * 4096) / 1024 = 2: twice the side length in the geometric mean.
    doubled = draw(shifting, (1024, 4096))
    assert torch.equal(doubled, shift_timesteps_by_sigma(unshifted, plain.alphas_cumprod, 2.0))
    assert bool((doubled >= unshifted).all()) and bool((doubled > unshifted).any())
    assert torch.equal(draw(shifting, (1024, 1024)), unshifted)
    assert torch.equal(draw(shifting, (512, 512)), unshifted)
    # pixel_size is ignored when the shift is off.
    assert torch.equal(draw(plain, (2048, 2048)), unshifted)
    with pytest.raises(ValueError, match="pixel_size"):
        shifting.sample_timesteps(4, torch.Generator().manual_seed(0), "cpu")


def test_sample_noise_plain_and_offset():
    latents = torch.zeros(4, 4, 16, 16, dtype=torch.bfloat16)
    plain = objective().sample_noise(latents, torch.Generator().manual_seed(5))
    assert plain.shape == latents.shape and plain.dtype == torch.bfloat16
    assert torch.equal(plain, objective().sample_noise(latents, torch.Generator().manual_seed(5)))
    expected_plain = torch.randn(latents.shape, generator=torch.Generator().manual_seed(5)).bfloat16()
    assert torch.equal(plain, expected_plain)

    latents = torch.zeros(64, 4, 16, 16)
    base = objective().sample_noise(latents, torch.Generator().manual_seed(5))
    offset_noise = objective(noise_offset=0.1).sample_noise(latents, torch.Generator().manual_seed(5))
    shift = offset_noise - base
    # The offset is constant over the spatial dims and has standard deviation noise_offset across (sample, channel).
    torch.testing.assert_close(shift, shift[:, :, :1, :1].expand_as(shift))
    assert shift[:, :, 0, 0].std().item() == pytest.approx(0.1, rel=0.2)


# --- per-sample loss ------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_per_sample_loss_mse_equals_manual(prediction_type):
    latents, noise = batch()
    timesteps = torch.tensor([0, 100, 400, 700, 998, T - 1])
    model_output = torch.randn(latents.shape, generator=torch.Generator().manual_seed(9))
    ours = objective(prediction_type=prediction_type, loss_weighting="min_snr", zero_terminal_snr=True)
    losses = ours.per_sample_loss(model_output, latents, noise, timesteps)
    assert losses.shape == (latents.shape[0],) and losses.dtype == torch.float32
    reference = reference_scheduler(True, prediction_type=prediction_type)
    target = noise if prediction_type == "epsilon" else reference.get_velocity(latents, noise, timesteps)
    weights = ours.loss_weights(timesteps)
    expected = ((model_output - target) ** 2).mean(dim=(1, 2, 3)) * weights
    torch.testing.assert_close(losses, expected, rtol=1e-5, atol=1e-7)


def test_per_sample_loss_is_float32_for_bf16_output_and_checks_shapes():
    latents, noise = batch()
    timesteps = torch.tensor([0, 100, 400, 700, 998, T - 1])
    losses = objective().per_sample_loss(latents.bfloat16(), latents, noise, timesteps)
    assert losses.dtype == torch.float32 and bool(torch.isfinite(losses).all())
    with pytest.raises(ValueError, match="same shape"):
        objective().per_sample_loss(latents[:, :3], latents, noise, timesteps)


def test_pseudo_huber_closed_forms():
    delta = 0.1
    d = torch.tensor([0.0, delta, -delta, 1e-4, 10.0], dtype=torch.float64)
    value = pseudo_huber(d, delta)
    assert value[0].item() == 0.0
    assert value[1].item() == pytest.approx(2 * delta**2 * (math.sqrt(2) - 1), rel=1e-12)
    assert value[2].item() == value[1].item()
    assert value[3].item() == pytest.approx(1e-8, rel=1e-5)  # ~ d^2 for |d| << delta, like MSE
    assert value[4].item() == pytest.approx(2 * delta * 10.0 - 2 * delta**2, rel=1e-4)  # ~ 2 delta |d| - 2 delta^2
    direct = 2 * delta**2 * (torch.sqrt(1 + (d / delta) ** 2) - 1)
    torch.testing.assert_close(value, direct, rtol=1e-10, atol=1e-15)
    # Stable in float32 where the direct form cancels to 0.
    assert pseudo_huber(torch.tensor([1e-5]), delta).item() == pytest.approx(1e-10, rel=1e-4)


def test_per_sample_loss_huber_equals_manual():
    latents, noise = batch()
    timesteps = torch.tensor([0, 100, 400, 700, 998, T - 1])
    model_output = torch.randn(latents.shape, generator=torch.Generator().manual_seed(9))
    ours = objective(loss_type="huber", huber_delta=0.3, loss_weighting="none")
    target = ours.target(latents, noise, timesteps)
    d = (model_output - target).double()
    expected = (2 * 0.3**2 * (torch.sqrt(1 + (d / 0.3) ** 2) - 1)).mean(dim=(1, 2, 3)).float()
    torch.testing.assert_close(ours.per_sample_loss(model_output, latents, noise, timesteps), expected)


# --- inference scheduler --------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_scheduler_config_with_zero_terminal_snr(prediction_type):
    ours = objective(prediction_type=prediction_type, zero_terminal_snr=True)
    config = ours.scheduler_config()
    scheduler = EulerDiscreteScheduler(**config)
    assert scheduler.config.timestep_spacing == "trailing"
    assert scheduler.config.rescale_betas_zero_snr is True
    assert scheduler.config.prediction_type == prediction_type
    # diffusers replaces acp = 0 at the last step by 2**-24 so its first sigma is finite; ours is exactly 0.
    assert scheduler.alphas_cumprod[-1].item() == 2.0**-24
    assert ours.alphas_cumprod[-1].item() == 0.0
    torch.testing.assert_close(scheduler.alphas_cumprod[:-1].double(), ours.alphas_cumprod[:-1], rtol=1e-5, atol=1e-7)
    scheduler.set_timesteps(25)
    assert int(scheduler.timesteps[0]) == T - 1


def test_scheduler_config_without_zero_terminal_snr():
    ours = objective(prediction_type="epsilon", zero_terminal_snr=False)
    config = ours.scheduler_config()
    assert config["timestep_spacing"] == "leading" and config["steps_offset"] == 1
    scheduler = EulerDiscreteScheduler(**config)
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), ours.alphas_cumprod, rtol=1e-5, atol=1e-7)
    scheduler.set_timesteps(25)
    assert int(scheduler.timesteps[0]) == 961  # SDXL's usual leading schedule with offset 1


# --- validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field", ["prediction_type", "loss_weighting", "timestep_sampling", "loss_type", "beta_schedule"]
)
def test_unknown_names_raise(field):
    with pytest.raises(ValueError) as raised:
        ObjectiveConfig(**{field: "bogus"})
    message = str(raised.value)
    assert field in message and "'bogus'" in message and "allowed values" in message


@pytest.mark.parametrize(
    "overrides",
    [
        {"snr_gamma": 0.0},
        {"logit_std": -1.0},
        {"huber_delta": 0.0},
        {"noise_offset": -0.1},
        {"min_snr_floor": -0.5},
        {"min_snr_floor": float("nan")},
        {"beta_start": 0.02, "beta_end": 0.01},
        {"num_train_timesteps": 1},
        {"base_resolution": 0},
        {"zero_terminal_snr": "yes"},
    ],
)
def test_out_of_range_values_raise(overrides):
    with pytest.raises(ValueError, match=next(iter(overrides))):
        ObjectiveConfig(**overrides)


def test_all_problems_reported_together():
    with pytest.raises(ValueError) as raised:
        ObjectiveConfig(prediction_type="x0", loss_type="l1", snr_gamma=-1.0)
    message = str(raised.value)
    assert "prediction_type" in message and "loss_type" in message and "snr_gamma" in message


def test_pure_functions_reject_unknown_names():
    with pytest.raises(ValueError, match="beta_schedule"):
        make_betas(beta_schedule="cosine")
    with pytest.raises(ValueError, match="loss_weighting"):
        loss_weight_from_snr(SNRS, "p2", "epsilon", GAMMA)
    with pytest.raises(ValueError, match="prediction_type"):
        loss_weight_from_snr(SNRS, "min_snr", "sample", GAMMA)
