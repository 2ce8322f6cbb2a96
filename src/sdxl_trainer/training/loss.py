"""The diffusion training objective as small pure functions of tensors.

Everything here is a function of the noise schedule (``alphas_cumprod``) and the batch's tensors:
noise schedule construction, timestep and noise sampling, the forward process, the regression
target, per-timestep loss weights and the per-sample loss. Reduction over the batch is left to the
caller, so tag or caption weights can be applied explicitly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction")
LOSS_WEIGHTINGS = ("none", "min_snr", "soft_min_snr", "debiased")
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")
LOSS_TYPES = ("mse", "huber")
BETA_SCHEDULES = ("scaled_linear", "linear")

# Debiased weighting is 1/sqrt(SNR); flooring SNR here caps the weight at 1000 so SNR = 0 stays finite.
DEBIASED_MIN_SNR = 1e-6


def _unknown_name(field: str, value: object, allowed: tuple[str, ...]) -> str:
    allowed_text = ", ".join(repr(name) for name in allowed)
    return f"{field}: unknown value {value!r}; allowed values are {allowed_text}"


def _require_name(field: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(_unknown_name(field, value, allowed))


def make_betas(
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    beta_schedule: str = "scaled_linear",
) -> torch.Tensor:
    """Per-step variances beta_t in float64, the schedules SDXL and DDPM use."""
    _require_name("beta_schedule", beta_schedule, BETA_SCHEDULES)
    if beta_schedule == "linear":
        # Ho et al. 2020, "Denoising Diffusion Probabilistic Models", Sec. 4: betas linear in t.
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    # Rombach et al. 2022 (latent diffusion) "scaled_linear": sqrt(beta) linear in t, then squared.
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale betas so the last timestep has SNR exactly 0, keeping the first step's SNR.

    Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Alg. 1.
    Returns float64; ``cumprod(1 - result)[-1] == 0`` exactly (the last beta is exactly 1).
    """
    sqrt_alphas_cumprod = torch.cumprod(1.0 - betas.to(torch.float64), dim=0).sqrt()
    first = sqrt_alphas_cumprod[0].clone()
    last = sqrt_alphas_cumprod[-1].clone()
    # Lin et al. 2024 Alg. 1: shift sqrt(acp) so its last value is 0, scale so its first is unchanged.
    sqrt_alphas_cumprod = (sqrt_alphas_cumprod - last) * (first / (first - last))
    alphas_cumprod = sqrt_alphas_cumprod**2
    # Undo the cumulative product: alpha_t = acp_t / acp_{t-1}, alpha_0 = acp_0.
    alphas = torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return 1.0 - alphas


def snr_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """SNR_t = acp_t / (1 - acp_t) (Kingma et al. 2021, "Variational Diffusion Models")."""
    return alphas_cumprod / (1.0 - alphas_cumprod)


def loss_weight_from_snr(
    snr: torch.Tensor,
    loss_weighting: str,
    prediction_type: str,
    snr_gamma: float,
    min_snr_floor: float = 0.0,
) -> torch.Tensor:
    """Per-timestep weight on the loss in the prediction target's space; finite for SNR in [0, inf).

    Conversions between spaces use x0 = (x_t - sigma*eps)/alpha and x0 = alpha*x_t - sigma*v with
    alpha^2 + sigma^2 = 1, so |dx0|^2 = |d eps|^2 / SNR = |dv|^2 / (SNR + 1).
    The floor, ``max(w, min_snr_floor)``, applies to every weighting (for "none" the weight is 1).
    """
    _require_name("loss_weighting", loss_weighting, LOSS_WEIGHTINGS)
    _require_name("prediction_type", prediction_type, PREDICTION_TYPES)
    snr = snr.to(torch.float64)
    is_v = prediction_type == "v_prediction"
    if loss_weighting == "none":
        weight = torch.ones_like(snr)
    elif loss_weighting == "min_snr":
        if is_v:
            # Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy": min(SNR, g)/(SNR+1) for v.
            weight = torch.clamp(snr, max=snr_gamma) / (snr + 1.0)
        else:
            # Hang et al. 2023 min-SNR for epsilon: min(SNR, g)/SNR = min(1, g/SNR); g/0 = inf gives the SNR -> 0 limit 1.
            weight = torch.clamp(snr_gamma / snr, max=1.0)
    elif loss_weighting == "soft_min_snr":
        # Crowson et al. 2024, "Scalable High-Resolution Pixel-Space Image Synthesis with Hourglass Diffusion
        # Transformers": x0-space weight 1/(1/SNR + 1/g) = SNR*g/(SNR+g); divide by SNR (eps) or SNR+1 (v).
        if is_v:
            weight = snr * snr_gamma / ((snr + snr_gamma) * (snr + 1.0))
        else:
            weight = snr_gamma / (snr + snr_gamma)
    else:
        if is_v:
            # Yu et al. 2024, "Debias the Training of Diffusion Models": eps-space 1/sqrt(SNR) moved to v space
            # by |d eps|^2 = SNR/(SNR+1) |dv|^2, i.e. sqrt(SNR)/(SNR+1): finite everywhere, 0 at SNR = 0.
            weight = snr.sqrt() / (snr + 1.0)
        else:
            # Yu et al. 2024 debiased estimation: 1/sqrt(SNR), SNR floored so the weight is at most 1000.
            weight = torch.clamp(snr, min=DEBIASED_MIN_SNR).rsqrt()
    return torch.clamp(weight, min=min_snr_floor)


def pseudo_huber(difference: torch.Tensor, delta: float) -> torch.Tensor:
    """Elementwise 2*delta^2*(sqrt(1 + (d/delta)^2) - 1): ~d^2 (like MSE) for |d| << delta, ~2*delta*|d| beyond.

    Charbonnier et al. 1994 / Hartley & Zisserman "pseudo-Huber", as used by Song & Dhariwal 2023,
    "Improved Techniques for Training Consistency Models"; scaled by 2 so small errors match MSE.
    """
    # Same value written as 2*d^2/(sqrt(1 + (d/delta)^2) + 1), which avoids cancellation for small d.
    return 2.0 * difference**2 / (torch.sqrt(1.0 + (difference / delta) ** 2) + 1.0)


def resolution_shift_scale(pixel_size: tuple[int, int], base_resolution: int) -> float:
    """Sigma multiplier for a canvas: sqrt(H*W)/base_resolution, never below 1.

    NovelAI Diffusion V3 report (arXiv 2409.15997): a canvas of twice the side length needs
    about twice the sigma to hide the image at the same level. Canvases at or below the base size are
    not shifted down, so training stays the base model's at its native resolution.
    """
    height, width = pixel_size
    if height <= 0 or width <= 0:
        raise ValueError(f"pixel_size must be positive (height, width), got {pixel_size!r}")
    return max(1.0, math.sqrt(height * width) / base_resolution)


def shift_timesteps_by_sigma(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, scale: float) -> torch.Tensor:
    """Map each t to the t' whose schedule sigma is nearest (in log) to scale * sigma(t).

    sigma(t) = sqrt((1 - acp_t)/acp_t) is the variance-exploding noise level (Karras et al. 2022, "Elucidating
    the Design Space of Diffusion-Based Generative Models", VP-to-VE change of variables). Without zero terminal
    SNR, targets beyond the largest sigma map to T-1. With it, sigma(T-1) = inf is never nearest to a finite
    target, so those map to T-2 (the largest finite sigma), and only t = T-1 itself stays at T-1.
    """
    if scale == 1.0:
        return timesteps.clone()
    device = timesteps.device
    log_sigmas = (0.5 * torch.log((1.0 - alphas_cumprod) / alphas_cumprod)).to(torch.float64)
    last = log_sigmas.shape[0] - 1
    target = log_sigmas[timesteps.cpu()] + math.log(scale)
    upper = torch.searchsorted(log_sigmas, target).clamp(max=last)
    lower = (upper - 1).clamp(min=0)
    below_is_nearer = (target - log_sigmas[lower]) < (log_sigmas[upper] - target)
    nearest = torch.where(below_is_nearer, lower, upper)
    shifted = torch.where(target >= log_sigmas[last], torch.full_like(nearest, last), nearest)
    return shifted.to(device=device, dtype=torch.long)


def _per_sample(table: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Gather a float64 CPU table at per-sample timesteps, cast to like's dtype, shaped [B, 1, ..., 1]."""
    if timesteps.ndim != 1 or timesteps.shape[0] != like.shape[0]:
        raise ValueError(f"timesteps must have shape [{like.shape[0]}], got {list(timesteps.shape)}")
    values = table[timesteps.cpu()].to(like.dtype).to(like.device)
    return values.reshape(-1, *([1] * (like.ndim - 1)))


@dataclass(frozen=True)
class ObjectiveConfig:
    prediction_type: str = "v_prediction"
    zero_terminal_snr: bool = True
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    loss_weighting: str = "min_snr"
    snr_gamma: float = 5.0
    timestep_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    resolution_shift: bool = False  # shift timesteps towards high noise for canvases larger than base_resolution
    base_resolution: int = 1024  # pixel side length at which the shift is 1
    noise_offset: float = 0.0
    loss_type: str = "mse"
    huber_delta: float = 0.1
    min_snr_floor: float = 0.0  # lower bound on every loss weight; > 0 keeps terminal (SNR ~ 0) steps trained

    def __post_init__(self) -> None:
        problems = []
        for field, allowed in (
            ("prediction_type", PREDICTION_TYPES),
            ("beta_schedule", BETA_SCHEDULES),
            ("loss_weighting", LOSS_WEIGHTINGS),
            ("timestep_sampling", TIMESTEP_SAMPLINGS),
            ("loss_type", LOSS_TYPES),
        ):
            if getattr(self, field) not in allowed:
                problems.append(_unknown_name(field, getattr(self, field), allowed))
        for field in ("zero_terminal_snr", "resolution_shift"):
            if not isinstance(getattr(self, field), bool):
                problems.append(f"{field}: must be a bool, got {getattr(self, field)!r}")
        for field, lowest in (("num_train_timesteps", 2), ("base_resolution", 1)):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
                problems.append(f"{field}: must be an int >= {lowest}, got {value!r}")
        for field, bound_text, in_range in (
            ("beta_start", "in (0, 1)", lambda v: 0.0 < v < 1.0),
            ("beta_end", "in (0, 1)", lambda v: 0.0 < v < 1.0),
            ("snr_gamma", "> 0", lambda v: v > 0.0),
            ("logit_mean", "", lambda v: True),
            ("logit_std", "> 0", lambda v: v > 0.0),
            ("noise_offset", ">= 0", lambda v: v >= 0.0),
            ("huber_delta", "> 0", lambda v: v > 0.0),
            ("min_snr_floor", ">= 0", lambda v: v >= 0.0),
        ):
            value = getattr(self, field)
            is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not (is_number and math.isfinite(value) and in_range(value)):
                problems.append(f"{field}: must be a finite number {bound_text}".rstrip() + f", got {value!r}")
        betas_valid = not any(problem.startswith(("beta_start", "beta_end")) for problem in problems)
        if betas_valid and self.beta_start >= self.beta_end:
            problems.append(f"beta_start ({self.beta_start!r}) must be < beta_end ({self.beta_end!r})")
        if problems:
            raise ValueError("invalid ObjectiveConfig:\n  " + "\n  ".join(problems))


class DiffusionObjective:
    """The training objective for one noise schedule and prediction type; stateless after construction."""

    def __init__(self, config: ObjectiveConfig):
        self.config = config
        betas = make_betas(config.num_train_timesteps, config.beta_start, config.beta_end, config.beta_schedule)
        if config.zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self._sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self._sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self._snr = snr_from_alphas_cumprod(self.alphas_cumprod)

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        """SNR per timestep, float32 on timesteps' device; exactly 0 at a zero-terminal-SNR last step."""
        return self._snr[timesteps.cpu()].to(torch.float32).to(timesteps.device)

    def sample_timesteps(
        self,
        batch_size: int,
        generator: torch.Generator,
        device: torch.device | str,
        pixel_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """One timestep per sample in [0, T-1], drawn from ``generator`` (then resolution-shifted if enabled)."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        config = self.config
        last = config.num_train_timesteps - 1
        rng_device = generator.device
        _require_name("timestep_sampling", config.timestep_sampling, TIMESTEP_SAMPLINGS)
        if config.timestep_sampling == "uniform":
            timesteps = torch.randint(0, last + 1, (batch_size,), generator=generator, device=rng_device)
        else:
            normal = torch.randn(batch_size, generator=generator, device=rng_device, dtype=torch.float64)
            # Esser et al. 2024, "Scaling Rectified Flow Transformers" (SD3), Sec. 3.1: u = sigmoid(N(m, s)).
            fraction = torch.sigmoid(config.logit_mean + config.logit_std * normal)
            timesteps = torch.round(fraction * last).long()
        timesteps = timesteps.cpu()
        if config.resolution_shift:
            if pixel_size is None:
                raise ValueError("resolution_shift is enabled: sample_timesteps needs pixel_size=(height, width)")
            scale = resolution_shift_scale(pixel_size, config.base_resolution)
            timesteps = shift_timesteps_by_sigma(timesteps, self.alphas_cumprod, scale)
        return timesteps.to(device)

    def sample_noise(self, latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Standard gaussian like latents, plus noise_offset * a per-sample, per-channel gaussian shift."""
        rng_device = generator.device
        noise = torch.randn(latents.shape, generator=generator, device=rng_device, dtype=torch.float32)
        if self.config.noise_offset > 0.0:
            offset_shape = (latents.shape[0], latents.shape[1]) + (1,) * (latents.ndim - 2)
            offset = torch.randn(offset_shape, generator=generator, device=rng_device, dtype=torch.float32)
            # Guttenberg 2023, "Diffusion with Offset Noise": a per-channel constant lets the model move the mean.
            noise = noise + self.config.noise_offset * offset
        return noise.to(device=latents.device, dtype=latents.dtype)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(acp_t) x0 + sqrt(1 - acp_t) eps (Ho et al. 2020, Eq. 4), coefficients from float64."""
        signal = _per_sample(self._sqrt_alphas_cumprod, timesteps, latents)
        noise_scale = _per_sample(self._sqrt_one_minus_alphas_cumprod, timesteps, latents)
        return signal * latents + noise_scale * noise

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the model regresses to: eps, or v = sqrt(acp_t) eps - sqrt(1 - acp_t) x0."""
        _require_name("prediction_type", self.config.prediction_type, PREDICTION_TYPES)
        if self.config.prediction_type == "epsilon":
            return noise
        signal = _per_sample(self._sqrt_alphas_cumprod, timesteps, latents)
        noise_scale = _per_sample(self._sqrt_one_minus_alphas_cumprod, timesteps, latents)
        # Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models", Sec. 4: v-parameterisation.
        return signal * noise - noise_scale * latents

    def loss_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Per-sample loss weights [B], float32 on timesteps' device, finite for every timestep."""
        config = self.config
        weights = loss_weight_from_snr(
            self._snr[timesteps.cpu()],
            config.loss_weighting,
            config.prediction_type,
            config.snr_gamma,
            config.min_snr_floor,
        )
        return weights.to(torch.float32).to(timesteps.device)

    def per_sample_loss(
        self,
        model_output: torch.Tensor,
        latents: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
    ) -> torch.Tensor:
        """Weighted per-sample loss [B] in float32: elementwise loss, mean over non-batch dims, times weights."""
        if model_output.shape != latents.shape or noise.shape != latents.shape:
            raise ValueError(
                f"model_output {list(model_output.shape)}, latents {list(latents.shape)} and "
                f"noise {list(noise.shape)} must have the same shape"
            )
        target = self.target(latents, noise, timesteps)
        difference = model_output.float() - target.float()
        _require_name("loss_type", self.config.loss_type, LOSS_TYPES)
        if self.config.loss_type == "mse":
            elementwise = difference**2
        else:
            elementwise = pseudo_huber(difference, self.config.huber_delta)
        per_sample = elementwise.mean(dim=tuple(range(1, elementwise.ndim)))
        return per_sample * self.loss_weights(timesteps).to(per_sample.device)

    def scheduler_config(self) -> dict:
        """Keyword arguments for diffusers' EulerDiscreteScheduler so inference uses the training schedule."""
        config = self.config
        # Lin et al. 2024, Sec. 3.3: with zero terminal SNR, sampling must start at the last step ("trailing").
        spacing = "trailing" if config.zero_terminal_snr else "leading"
        return {
            "num_train_timesteps": config.num_train_timesteps,
            "beta_start": config.beta_start,
            "beta_end": config.beta_end,
            "beta_schedule": config.beta_schedule,
            "prediction_type": config.prediction_type,
            "rescale_betas_zero_snr": config.zero_terminal_snr,
            "timestep_spacing": spacing,
            "steps_offset": 0 if config.zero_terminal_snr else 1,
        }
