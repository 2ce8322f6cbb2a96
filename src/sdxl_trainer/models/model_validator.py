"""Validation: model and sampler checks against the training objective, sample grids, held-out loss.

- ``check_model`` lists every way the loaded components (and the sampler built for samples) do not
  fit each other or the training objective; ``require_valid_model`` raises ``ModelCheckError`` with
  all of them, before any data is cached or trained.
- ``build_pipeline`` / ``generate_samples`` / ``image_grid``: samples at fixed prompts and seeds.
- ``validation_loss``: the objective's per-sample loss on held-out items at fixed timesteps and
  fixed noise, so the numbers are comparable across steps and runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
from PIL import Image, ImageDraw

from sdxl_trainer.training.loss import DiffusionObjective, ObjectiveConfig
from sdxl_trainer.training.utils import unet_forward

NUM_TIME_IDS = 6  # SDXL micro-conditioning: original (h, w), crop (top, left), target (h, w)
# Steps used to see where a sampler starts; any count shows a leading spacing missing the last step.
CHECK_INFERENCE_STEPS = 25
VALIDATION_BINS = 8
# Independent of train.seed, so validation numbers compare across runs with different seeds.
VALIDATION_SEED = 20240915
# float32 alphas_cumprod of the same schedule agree to ~1e-7; diffusers stores 2**-24 for a zero last value.
ALPHAS_CUMPROD_ATOL = 1e-6
_MAX_LISTED_TENSORS = 5


class ModelCheckError(ValueError):
    """The model, or the sampler built for it, does not fit the training objective; every problem is listed."""


# ----------------------------------------------------------------------------- checks


def _scheduler(config: dict[str, Any], scheduler_class: type[EulerDiscreteScheduler] = EulerDiscreteScheduler) -> EulerDiscreteScheduler:
    # from_config accepts both a saved scheduler_config.json and DiffusionObjective.scheduler_config().
    return scheduler_class.from_config(config)


def _worst_schedule_difference(sampled: torch.Tensor, trained: torch.Tensor) -> int | None:
    """The timestep where two same-length alphas_cumprod differ most, or None when they agree."""
    difference = (sampled - trained).abs()
    worst = int(difference.argmax())
    return worst if float(difference[worst]) > ALPHAS_CUMPROD_ATOL else None


def _schedules_differ(scheduler: EulerDiscreteScheduler, objective: DiffusionObjective) -> bool:
    sampled = scheduler.alphas_cumprod.to(torch.float32)
    trained = objective.alphas_cumprod.to(torch.float32)
    return sampled.shape != trained.shape or _worst_schedule_difference(sampled, trained) is not None


def scheduler_mismatches(scheduler_config: dict[str, Any], objective_config: ObjectiveConfig, *, what: str) -> list[str]:
    """How an Euler sampler built from ``scheduler_config`` differs from the training objective.

    Empty when the sampler denoises with the trained prediction type on the trained noise schedule
    and, for zero-terminal SNR, starts from pure noise (trailing spacing).
    """
    objective = DiffusionObjective(objective_config)
    scheduler = _scheduler(scheduler_config)
    fix = "build it from DiffusionObjective(...).scheduler_config()"
    problems = []
    predicts = scheduler.config.prediction_type
    if predicts != objective_config.prediction_type:
        problems.append(
            f"{what} has prediction_type={predicts!r} but the model is trained for "
            f"{objective_config.prediction_type!r}: set prediction_type={objective_config.prediction_type!r} ({fix})"
        )
    trained = objective.alphas_cumprod.to(torch.float32)
    sampled = scheduler.alphas_cumprod.to(torch.float32)
    schedule = (
        f"beta_schedule={objective_config.beta_schedule!r}, beta_start={objective_config.beta_start}, "
        f"beta_end={objective_config.beta_end}, zero_terminal_snr={objective_config.zero_terminal_snr}"
    )
    if sampled.shape != trained.shape:
        problems.append(
            f"{what} has {sampled.shape[0]} training timesteps but the model is trained with {trained.shape[0]}: "
            f"set num_train_timesteps={trained.shape[0]} ({fix})"
        )
    else:
        worst = _worst_schedule_difference(sampled, trained)
        if worst is not None:
            problems.append(
                f"{what} uses a different noise schedule than training (alphas_cumprod at t={worst}: "
                f"{float(sampled[worst]):.6g} vs trained {float(trained[worst]):.6g}): use the trained "
                f"schedule ({schedule}; {fix})"
            )
    if objective_config.zero_terminal_snr:
        spacing = scheduler.config.timestep_spacing
        if spacing != "trailing":
            scheduler.set_timesteps(CHECK_INFERENCE_STEPS)
            first = int(scheduler.timesteps[0])
            problems.append(
                f"{what} has timestep_spacing={spacing!r} (its {CHECK_INFERENCE_STEPS}-step samples start at t={first}) "
                f"but a zero-terminal-SNR model must start sampling from pure noise at t={objective_config.num_train_timesteps - 1}: "
                "set timestep_spacing='trailing' (Lin et al. 2024, Sec. 3.3)"
            )
    return problems


def _cross_attention_problems(components) -> list[str]:
    hidden_1 = components.text_encoder.config.hidden_size
    hidden_2 = components.text_encoder_2.config.hidden_size
    expected = hidden_1 + hidden_2
    declared = components.unet.config.cross_attention_dim
    widths = list(declared) if isinstance(declared, (list, tuple)) else [declared]
    if all(width == expected for width in widths):
        return []
    return [
        f"unet.config.cross_attention_dim = {declared} but the text encoders' hidden sizes sum to {expected} "
        f"(text_encoder {hidden_1} + text_encoder_2 {hidden_2}): the UNet and the text encoders come from "
        f"different models; load all components from one SDXL folder, or build the UNet with cross_attention_dim={expected}"
    ]


def _add_embedding_problems(components) -> list[str]:
    config = components.unet.config
    if config.addition_embed_type != "text_time":
        return [
            f"unet.config.addition_embed_type = {config.addition_embed_type!r}, but SDXL conditions on the pooled text "
            "embedding and the size/crop time ids: use an SDXL UNet (addition_embed_type='text_time')"
        ]
    pooled = components.text_encoder_2.config.projection_dim
    expected = pooled + NUM_TIME_IDS * config.addition_time_embed_dim
    declared = config.projection_class_embeddings_input_dim
    if declared == expected:
        return []
    return [
        f"unet.config.projection_class_embeddings_input_dim = {declared} but the pooled text embedding "
        f"({pooled}, text_encoder_2 projection_dim) + {NUM_TIME_IDS} time ids x addition_time_embed_dim "
        f"({config.addition_time_embed_dim}) = {expected}: the UNet does not match text_encoder_2; load both from one "
        f"SDXL folder, or build the UNet with projection_class_embeddings_input_dim={expected}"
    ]


def _latent_channel_problems(components) -> list[str]:
    latent = components.vae.config.latent_channels
    unet_in, unet_out = components.unet.config.in_channels, components.unet.config.out_channels
    if latent == unet_in == unet_out:
        return []
    return [
        f"the VAE has {latent} latent channels but the UNet takes {unet_in} and predicts {unet_out}: "
        "load the VAE and the UNet from one SDXL folder"
    ]


def nonfinite_tensors(module: torch.nn.Module) -> list[tuple[str, int, int]]:
    """(name, non-finite count, size) of every floating-point parameter or buffer with NaN or inf."""
    found = []
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if not tensor.is_floating_point():
            continue
        bad = int((~torch.isfinite(tensor.detach())).sum())
        if bad:
            found.append((name, bad, tensor.numel()))
    return found


def _finite_weight_problems(components) -> list[str]:
    problems = []
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        found = nonfinite_tensors(getattr(components, part))
        if not found:
            continue
        listed = ", ".join(f"{name} ({bad} of {size})" for name, bad, size in found[:_MAX_LISTED_TENSORS])
        more = f" and {len(found) - _MAX_LISTED_TENSORS} more" if len(found) > _MAX_LISTED_TENSORS else ""
        problems.append(
            f"{part} has NaN/inf values in {len(found)} tensor(s): {listed}{more}; the weights are damaged "
            "(or saved from a diverged run): load an earlier checkpoint or the original model"
        )
    return problems


def check_model(
    components,
    objective_config: ObjectiveConfig,
    *,
    sampler_config: dict[str, Any] | None = None,
    check_weights: bool = True,
) -> list[str]:
    """Every problem of the components and of the sampler built for samples, each saying what to change.

    ``sampler_config`` defaults to the objective's own ``scheduler_config()``: the check then proves
    that the samples taken during training use the trained prediction type, schedule and spacing.
    """
    objective = DiffusionObjective(objective_config)
    if sampler_config is None:
        sampler_config = objective.scheduler_config()
    problems = [
        *_cross_attention_problems(components),
        *_add_embedding_problems(components),
        *_latent_channel_problems(components),
        *scheduler_mismatches(sampler_config, objective_config, what="the sampler built for samples"),
    ]
    if check_weights:
        problems.extend(_finite_weight_problems(components))
    return problems


def scheduler_notes(saved_config: dict[str, Any], objective_config: ObjectiveConfig) -> list[str]:
    """Info lines: how the base model's saved scheduler differs from the objective (expected for a fine-tune)."""
    differences = scheduler_mismatches(saved_config, objective_config, what="the base model's saved scheduler")
    if not differences:
        return []
    header = (
        "the base model was trained with a different sampler setup than this run trains for; expected when a "
        "fine-tune changes the objective: samples and the saved pipeline use the training objective's scheduler"
    )
    return [header, *(f"  {difference}" for difference in differences)]


def unconditional_branch_warnings(saved_config: dict[str, Any], objective_config: ObjectiveConfig, *, caption_dropout: float,
                                  guidance_scale: float) -> list[str]:
    """Warn when classifier-free guidance would mix two parameterisations.

    CFG extrapolates ``uncond + s * (cond - uncond)`` (Ho & Salimans 2022). A fine-tune that changes the
    prediction type or the noise schedule but never drops captions trains only the conditional branch; the
    unconditional one (zero embeddings in SDXL) keeps predicting in the base's terms, and guidance then
    extrapolates along the difference of two different targets. Measured on the demo: with
    ``data.caption_dropout`` 0 the v/ZTSNR fine-tune's colours were right at guidance 1 and wrong at 5.
    """
    if caption_dropout > 0.0 or guidance_scale <= 1.0:
        return []
    changed = []
    base = _scheduler(saved_config)
    if base.config.prediction_type != objective_config.prediction_type:
        changed.append(f"prediction type {base.config.prediction_type} -> {objective_config.prediction_type}")
    if _schedules_differ(base, DiffusionObjective(objective_config)):
        changed.append("noise schedule")
    if not changed:
        return []
    return [
        f"this run changes the base's {' and '.join(changed)} with data.caption_dropout = 0, so the "
        f"unconditional branch that classifier-free guidance (sample.guidance_scale = {guidance_scale:g}) subtracts "
        "is never trained for the new objective: set data.caption_dropout to about 0.1"
    ]


def require_valid_model(components, objective_config: ObjectiveConfig, **kwargs) -> list[str]:
    """check_model, raising ModelCheckError listing every problem; returns the info notes otherwise."""
    problems = check_model(components, objective_config, **kwargs)
    if problems:
        raise ModelCheckError(
            f"the model does not fit the training configuration ({len(problems)} problem(s)):\n  - "
            + "\n  - ".join(problems)
        )
    return scheduler_notes(components.scheduler_config, objective_config)


def saved_scheduler_problems(pipeline_dir: Path, objective_config: ObjectiveConfig) -> list[str]:
    """How a saved pipeline's scheduler differs from the objective it was trained with."""
    config = EulerDiscreteScheduler.load_config(Path(pipeline_dir) / "scheduler")
    return scheduler_mismatches(config, objective_config, what=f"the scheduler saved in {pipeline_dir}")


# ----------------------------------------------------------------------------- samples


def build_pipeline(
    components,
    unet: torch.nn.Module,
    scheduler_config: dict,
    scheduler_class: type[EulerDiscreteScheduler] = EulerDiscreteScheduler,
) -> StableDiffusionXLPipeline:
    """An SDXL pipeline around the (possibly training) UNet and an Euler sampler from ``scheduler_config``."""
    pipeline = StableDiffusionXLPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        text_encoder_2=components.text_encoder_2,
        tokenizer=components.tokenizer,
        tokenizer_2=components.tokenizer_2,
        unet=unet,
        scheduler=_scheduler(scheduler_config, scheduler_class),
        add_watermarker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def seeded_latents(pipeline: StableDiffusionXLPipeline, seeds: Sequence[int], height: int, width: int) -> torch.Tensor:
    """Unit gaussian starting latents [len(seeds), C, h, w], one CPU generator per seed (device-independent)."""
    shape = (pipeline.unet.config.in_channels, height // pipeline.vae_scale_factor, width // pipeline.vae_scale_factor)
    latents = [torch.randn(shape, generator=torch.Generator(device="cpu").manual_seed(seed)) for seed in seeds]
    return torch.stack(latents).to(device=pipeline.unet.device, dtype=pipeline.unet.dtype)


@torch.no_grad()
def generate_samples(
    pipeline: StableDiffusionXLPipeline,
    prompts: Sequence[str],
    *,
    seed: int,
    num_inference_steps: int,
    guidance_scale: float,
    guidance_rescale: float,
    width: int,
    height: int,
) -> list[Image.Image]:
    """One image per prompt; prompt k always uses seed + k, so grids are comparable across steps.

    Classifier-free guidance with guidance rescale (Lin et al. 2024, Sec. 3.4) is the pipeline's
    own: it is applied when guidance_scale > 1 and guidance_rescale > 0.
    """
    images = []
    for k, prompt in enumerate(prompts):
        result = pipeline(
            prompt=prompt,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
            width=width,
            height=height,
            latents=seeded_latents(pipeline, [seed + k], height, width),
            # Only a stochastic sampler draws from it; seeded so such a sampler stays reproducible.
            generator=torch.Generator(device="cpu").manual_seed(seed + k),
            output_type="pil",
        )
        images.append(result.images[0])
    return images


def image_grid(rows: Sequence[Sequence[Image.Image]], row_labels: Sequence[str], column_labels: Sequence[str]) -> Image.Image:
    """A labelled grid: one row per label (weights, prompt), one column per label (prompt, seed)."""
    cell_w = max(image.width for row in rows for image in row)
    cell_h = max(image.height for row in rows for image in row)
    char_w = 6  # PIL's default bitmap font
    label_h = 14
    label_w = max(48, char_w * max((len(label) for label in row_labels), default=0) + 6)
    grid = Image.new("RGB", (label_w + cell_w * len(column_labels), label_h + cell_h * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for c, label in enumerate(column_labels):
        draw.text((label_w + c * cell_w + 2, 1), label[: max(4, cell_w // char_w)], fill="black")
    for r, (row, label) in enumerate(zip(rows, row_labels)):
        draw.text((2, label_h + r * cell_h + 2), label, fill="black")
        for c, image in enumerate(row):
            grid.paste(image, (label_w + c * cell_w, label_h + r * cell_h))
    return grid


def to_uint8_hwc(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


# ----------------------------------------------------------------------------- validation loss


def validation_timesteps(num_train_timesteps: int, bins: int = VALIDATION_BINS) -> torch.Tensor:
    """``bins`` evenly spaced timesteps from 0 to T-1 (the last is the zero-SNR step under ZTSNR)."""
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    return torch.linspace(0, num_train_timesteps - 1, bins, dtype=torch.float64).round().long()


@dataclass(frozen=True)
class ValidationLoss:
    """Held-out loss per fixed timestep (mean over items), with and without the objective's weights."""

    timesteps: tuple[int, ...]
    unweighted: tuple[float, ...]
    weighted: tuple[float, ...]
    items: int

    @property
    def loss(self) -> float:
        """The training objective's loss (weighted), averaged over the timestep bins."""
        return sum(self.weighted) / len(self.weighted)

    @property
    def loss_unweighted(self) -> float:
        return sum(self.unweighted) / len(self.unweighted)

    def scalars(self, prefix: str) -> dict[str, float]:
        values = {f"{prefix}/loss": self.loss, f"{prefix}/loss_unweighted": self.loss_unweighted}
        for t, unweighted, weighted in zip(self.timesteps, self.unweighted, self.weighted):
            values[f"{prefix}/unweighted/t{t:04d}"] = unweighted
            values[f"{prefix}/weighted/t{t:04d}"] = weighted
        return values

    def describe(self) -> str:
        bins = ", ".join(f"t{t}={u:.5f}" for t, u in zip(self.timesteps, self.unweighted))
        return f"loss {self.loss:.5f} (unweighted {self.loss_unweighted:.5f}) on {self.items} item(s); unweighted per timestep: {bins}"

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "loss": self.loss,
            "loss_unweighted": self.loss_unweighted,
            "items": self.items,
            "by_timestep": {
                str(t): {"unweighted": u, "weighted": w} for t, u, w in zip(self.timesteps, self.unweighted, self.weighted)
            },
        }


@torch.no_grad()
def validation_loss(
    unet: torch.nn.Module,
    dataset,
    objective: DiffusionObjective,
    *,
    device: torch.device | str,
    seed: int = VALIDATION_SEED,
    bins: int = VALIDATION_BINS,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> ValidationLoss:
    """The objective's per-sample loss on every item of ``dataset`` at fixed timesteps and fixed noise.

    Item i is noised at every timestep with gaussian noise from its own generator (seed, i), which
    is independent of the training RNG: the same weights give the same numbers at any step and in
    any run. The loss type (MSE/Huber) is the objective's; noise offset and timestep shifting are
    training-time sampling choices and are left out, so runs that differ in them stay comparable.
    """
    if len(dataset) == 0:
        raise ValueError("the validation dataset is empty")
    timesteps = validation_timesteps(objective.config.num_train_timesteps, bins).to(device)
    unweighted_objective = DiffusionObjective(replace(objective.config, loss_weighting="none", min_snr_floor=0.0))
    weights = objective.loss_weights(timesteps).double().cpu()
    totals = torch.zeros(bins, dtype=torch.float64)
    was_training = unet.training
    unet.eval()
    try:
        for i in range(len(dataset)):
            item = dataset[i]
            latents = item["latents"].unsqueeze(0).expand(bins, *item["latents"].shape).to(device)
            generator = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + i)
            noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(device=device, dtype=latents.dtype)
            noisy = objective.add_noise(latents, noise, timesteps)
            with autocast():
                output = unet_forward(
                    unet, noisy, timesteps,
                    prompt_embeds=item["prompt_embeds"].unsqueeze(0).expand(bins, -1, -1).to(device),
                    pooled_prompt_embeds=item["pooled_prompt_embeds"].unsqueeze(0).expand(bins, -1).to(device),
                    time_ids=item["time_ids"].unsqueeze(0).expand(bins, -1).to(device),
                )
            totals += unweighted_objective.per_sample_loss(output.float(), latents, noise, timesteps).double().cpu()
    finally:
        unet.train(was_training)
    unweighted = totals / len(dataset)
    return ValidationLoss(
        timesteps=tuple(int(t) for t in timesteps.tolist()),
        unweighted=tuple(float(v) for v in unweighted),
        weighted=tuple(float(v) for v in unweighted * weights),
        items=len(dataset),
    )
