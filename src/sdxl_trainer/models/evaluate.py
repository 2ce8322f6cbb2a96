"""The zero-terminal-SNR experiment: can the model make solid black, solid white and the demo colours?

NovelAI Diffusion V3 report (arXiv 2409.15997), Fig. 2, and Lin et al. 2024 ("Common Diffusion Noise
Schedules and Sample Steps are Flawed"): a model trained without zero terminal SNR never sees pure
noise, so its samples keep the mean of the starting noise and cannot be very dark or very bright.

Each model samples with its OWN saved scheduler config (an Euler sampler built from it): a base
trained without ZTSNR starts from its finite maximum noise with its spacing (leading for SDXL); a
ZTSNR fine-tune starts from pure noise with trailing spacing. Every prompt uses the same seeds, so
the comparison between prompts and between models is paired.

Measured: mean brightness (0..1) of ``completely black`` and ``completely white``; colour error
(Euclidean distance in 0..1 RGB between the requested solid colour and the image's mean colour) over
``completely <colour>`` for every demo colour; and the cheaper diagnostic of RESEARCH.md, the
brightness of the model's predicted clean image at the first sampler step (the terminal step).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from html import escape
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
from PIL import Image

from sdxl_trainer.data.demo import COLORS, solid_caption_for
from sdxl_trainer.models.model_validator import build_pipeline, image_grid, seeded_latents
from sdxl_trainer.models.setup import load_components
from sdxl_trainer.utils.logging import get_logger

log = get_logger("evaluate")

DIAGNOSTIC_COLORS = ("black", "white")


@dataclass(frozen=True)
class EvaluateSettings:
    seeds: int = 8
    steps: int = 25
    guidance: float = 5.0
    guidance_rescale: float = 0.0
    size: int | None = None  # pixel side; None: the UNet's native sample size

    def __post_init__(self) -> None:
        problems = []
        if self.seeds < 1:
            problems.append(f"--seeds must be >= 1, got {self.seeds}")
        if self.steps < 1:
            problems.append(f"--steps must be >= 1, got {self.steps}")
        if not (self.guidance >= 0.0 and np.isfinite(self.guidance)):
            problems.append(f"--guidance must be a finite number >= 0, got {self.guidance}")
        if not 0.0 <= self.guidance_rescale <= 1.0:
            problems.append(f"--guidance-rescale must be in [0, 1], got {self.guidance_rescale}")
        if self.size is not None and (self.size < 8 or self.size % 8):
            problems.append(f"--size must be a positive multiple of 8, got {self.size}")
        if problems:
            raise EvaluateError("; ".join(problems))


class EvaluateError(ValueError):
    """Bad evaluate arguments or model; the message says what to change."""


class FirstStepRecorder(EulerDiscreteScheduler):
    """Euler that keeps its first step's predicted clean latents, timestep and sigma."""

    first_pred_original_sample: torch.Tensor | None = None
    first_timestep: int | None = None
    first_sigma: float | None = None

    def step(self, model_output, timestep, sample, *args, **kwargs):
        first = self.step_index in (None, 0)
        output = super().step(model_output, timestep, sample, *args, **kwargs)
        if first:
            pred = output[1] if isinstance(output, tuple) else output.pred_original_sample
            self.first_pred_original_sample = pred.detach().clone()
            self.first_timestep = int(round(float(timestep)))
            self.first_sigma = float(self.sigmas[0])
        return output


# ----------------------------------------------------------------------------- metrics (pure)


def brightness(images: np.ndarray) -> np.ndarray:
    """Mean value over pixels and channels, per image: [N, H, W, 3] in 0..1 -> [N]."""
    return images.reshape(images.shape[0], -1).mean(axis=1)


def mean_colors(images: np.ndarray) -> np.ndarray:
    """Mean RGB per image: [N, H, W, 3] -> [N, 3]."""
    return images.reshape(images.shape[0], -1, images.shape[-1]).mean(axis=1)


def color_errors(images: np.ndarray, target_rgb255: tuple[int, int, int]) -> np.ndarray:
    """Euclidean distance in 0..1 RGB between each image's mean colour and the target: [N]."""
    target = np.asarray(target_rgb255, dtype=np.float64) / 255.0
    return np.linalg.norm(mean_colors(images).astype(np.float64) - target, axis=1)


# ----------------------------------------------------------------------------- sampling


def resolve_model(model: str) -> str:
    """A run directory means its final/ pipeline; everything else is passed to load_components."""
    path = Path(model).expanduser()
    if path.is_dir() and not (path / "model_index.json").is_file() and (path / "final" / "model_index.json").is_file():
        return str(path / "final")
    return model


def decode_latents(pipeline: StableDiffusionXLPipeline, latents: torch.Tensor) -> np.ndarray:
    """Latents -> [N, H, W, 3] float images in 0..1, unscaled exactly as the SDXL pipeline does."""
    vae = pipeline.vae
    latents = latents.to(device=vae.device, dtype=vae.dtype)
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        channels = latents.shape[1]
        mean = torch.tensor(mean).view(1, channels, 1, 1).to(latents)
        std = torch.tensor(std).view(1, channels, 1, 1).to(latents)
        latents = latents * std / vae.config.scaling_factor + mean
    else:
        latents = latents / vae.config.scaling_factor
    with torch.no_grad():
        decoded = vae.decode(latents, return_dict=False)[0]
    return pipeline.image_processor.postprocess(decoded, output_type="np")


def _to_pil(images: np.ndarray) -> list[Image.Image]:
    return [Image.fromarray(np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)) for image in images]


def _swatch(rgb: tuple[int, int, int], size: int) -> Image.Image:
    return Image.new("RGB", (size, size), tuple(int(c) for c in rgb))


def _hex(rgb01: np.ndarray) -> str:
    return "#" + "".join(f"{int(v):02x}" for v in np.clip(np.round(np.asarray(rgb01) * 255.0), 0, 255))


def svg_grid(rows: list[tuple[str, tuple[int, int, int], np.ndarray]], column_labels: list[str], *, blocks: int = 4,
             cell: int = 40) -> str:
    """A small, text-only picture of an evaluation: one row per (label, target RGB, images [N, H, W, 3] in 0..1).

    Each image is shown as ``blocks`` x ``blocks`` box-averaged colours, next to its target swatch, so the
    picture can be kept in a repository and shown in a README without a binary file.
    """
    label_width, header = 150, 22
    width = label_width + cell * (1 + max(len(images) for _, _, images in rows))
    height = header + cell * len(rows) + 4
    sub = cell / blocks
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        'font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="#ffffff"/>',
    ]
    for column, text in enumerate(["target", *column_labels]):
        x = label_width + column * cell + cell / 2
        parts.append(f'<text x="{x:g}" y="15" text-anchor="middle">{escape(text)}</text>')
    for row, (text, target, images) in enumerate(rows):
        y = header + row * cell
        parts.append(f'<text x="4" y="{y + cell / 2 + 4:g}">{escape(text)}</text>')
        parts.append(f'<rect x="{label_width}" y="{y}" width="{cell - 2}" height="{cell - 2}" '
                     f'fill="{_hex(np.asarray(target) / 255.0)}" stroke="#000000"/>')
        for column, image in enumerate(images, start=1):
            h, w = image.shape[:2]
            for by in range(blocks):
                for bx in range(blocks):
                    block = image[by * h // blocks:(by + 1) * h // blocks, bx * w // blocks:(bx + 1) * w // blocks]
                    colour = _hex(block.reshape(-1, image.shape[-1]).mean(axis=0))
                    parts.append(f'<rect x="{label_width + column * cell + bx * sub:g}" y="{y + by * sub:g}" '
                                 f'width="{sub:g}" height="{sub:g}" fill="{colour}"/>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _round(values: np.ndarray | float) -> Any:
    return np.round(np.asarray(values, dtype=np.float64), 5).tolist()


@torch.no_grad()
def evaluate_model(
    model: str,
    settings: EvaluateSettings,
    out_dir: Path,
    *,
    device: torch.device | str = "cpu",
    config_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Sample every ``completely <colour>`` prompt at seeds 0..N-1; write evaluate.json, evaluate.png and evaluate.svg."""
    model = resolve_model(model)
    components = load_components(model, dtype=torch.float32, device=device, config_dir=config_dir)
    for module in (components.unet, components.vae, components.text_encoder, components.text_encoder_2):
        module.eval()
    pipeline = build_pipeline(components, components.unet, components.scheduler_config, FirstStepRecorder)
    scheduler = pipeline.scheduler
    size = settings.size or components.unet.config.sample_size * pipeline.vae_scale_factor
    seeds = list(range(settings.seeds))
    latents = seeded_latents(pipeline, seeds, size, size)
    log.info(
        "evaluating %s with its own scheduler (prediction_type=%s, timestep_spacing=%s, rescale_betas_zero_snr=%s): "
        "%d prompts x %d seeds, %d steps, guidance %g (rescale %g), %d px",
        components.source, scheduler.config.prediction_type, scheduler.config.timestep_spacing,
        scheduler.config.rescale_betas_zero_snr, len(COLORS), len(seeds), settings.steps,
        settings.guidance, settings.guidance_rescale, size,
    )

    prompts: dict[str, Any] = {}
    rows, row_labels, terminal_rows, svg_rows = [], [], {}, []
    first_step: dict[str, Any] = {}
    for color, rgb in COLORS.items():
        prompt = solid_caption_for(color)
        images = pipeline(
            prompt=prompt,
            num_images_per_prompt=len(seeds),
            latents=latents,
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance,
            guidance_rescale=settings.guidance_rescale,
            height=size,
            width=size,
            output_type="np",
        ).images
        errors = color_errors(images, rgb)
        entry = {
            "target": _round(np.asarray(rgb) / 255.0),
            "mean_color": _round(mean_colors(images).mean(axis=0)),
            "brightness": float(brightness(images).mean()),
            "color_error": float(errors.mean()),
            "per_seed": [
                {"seed": seed, "mean_color": _round(color_value), "brightness": float(bright), "color_error": float(error)}
                for seed, color_value, bright, error in zip(seeds, mean_colors(images), brightness(images), errors)
            ],
        }
        if color in DIAGNOSTIC_COLORS:
            x0_images = decode_latents(pipeline, scheduler.first_pred_original_sample)
            entry["terminal_x0_brightness"] = float(brightness(x0_images).mean())
            terminal_rows[color] = x0_images
            first_step = {"timestep": scheduler.first_timestep, "sigma": scheduler.first_sigma}
        prompts[prompt] = entry
        rows.append([_swatch(rgb, size), *_to_pil(images)])
        row_labels.append(color)
        svg_rows.append((prompt, rgb, images))
    for color in DIAGNOSTIC_COLORS:
        label = f"x0@t{first_step['timestep']} {color}"
        rows.append([_swatch(COLORS[color], size), *_to_pil(terminal_rows[color])])
        row_labels.append(label)
        svg_rows.append((label, COLORS[color], terminal_rows[color]))

    out_dir.mkdir(parents=True, exist_ok=True)
    grid_path = out_dir / "evaluate.png"
    image_grid(rows, row_labels, ["target", *(f"seed {seed}" for seed in seeds)]).save(grid_path)
    svg_path = out_dir / "evaluate.svg"
    svg_path.write_text(svg_grid(svg_rows, [f"seed {seed}" for seed in seeds]), encoding="utf-8")
    report = {
        "model": model,
        "source": components.source,
        "scheduler": {
            "prediction_type": scheduler.config.prediction_type,
            "timestep_spacing": scheduler.config.timestep_spacing,
            "rescale_betas_zero_snr": bool(scheduler.config.rescale_betas_zero_snr),
            "first_timestep": first_step["timestep"],
            "first_sigma": first_step["sigma"],
        },
        "settings": {**asdict(settings), "size": size},
        "black_brightness": prompts[solid_caption_for("black")]["brightness"],
        "white_brightness": prompts[solid_caption_for("white")]["brightness"],
        "color_error": float(np.mean([entry["color_error"] for entry in prompts.values()])),
        "terminal_x0_black_brightness": prompts[solid_caption_for("black")]["terminal_x0_brightness"],
        "terminal_x0_white_brightness": prompts[solid_caption_for("white")]["terminal_x0_brightness"],
        "prompts": prompts,
        "image": str(grid_path),
        "svg": str(svg_path),
    }
    (out_dir / "evaluate.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report
