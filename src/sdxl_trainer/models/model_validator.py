"""Validation: sample images with a sampler that matches the training schedule, image grids."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
from PIL import Image, ImageDraw


def build_pipeline(components, unet: torch.nn.Module, scheduler_config: dict) -> StableDiffusionXLPipeline:
    """An SDXL pipeline around the (possibly training) UNet and an Euler sampler on the training schedule."""
    scheduler = EulerDiscreteScheduler(**scheduler_config)
    pipeline = StableDiffusionXLPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        text_encoder_2=components.text_encoder_2,
        tokenizer=components.tokenizer,
        tokenizer_2=components.tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


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
    """One image per prompt; prompt k always uses seed + k, so grids are comparable across steps."""
    images = []
    device = pipeline.unet.device
    for k, prompt in enumerate(prompts):
        generator = torch.Generator(device="cpu").manual_seed(seed + k)
        latents = torch.randn((1, pipeline.unet.config.in_channels, height // 8, width // 8), generator=generator)
        result = pipeline(
            prompt=prompt,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
            width=width,
            height=height,
            latents=latents.to(device=device, dtype=pipeline.unet.dtype),
            output_type="pil",
        )
        images.append(result.images[0])
    return images


def image_grid(rows: Sequence[Sequence[Image.Image]], row_labels: Sequence[str], column_labels: Sequence[str]) -> Image.Image:
    """A labelled grid: one row per weight set (raw, EMA), one column per prompt."""
    cell_w = max(image.width for row in rows for image in row)
    cell_h = max(image.height for row in rows for image in row)
    label_h, label_w = 14, 48
    grid = Image.new("RGB", (label_w + cell_w * len(column_labels), label_h + cell_h * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for c, label in enumerate(column_labels):
        draw.text((label_w + c * cell_w + 2, 1), label[: max(4, cell_w // 6)], fill="black")
    for r, (row, label) in enumerate(zip(rows, row_labels)):
        draw.text((2, label_h + r * cell_h + 2), label, fill="black")
        for c, image in enumerate(row):
            grid.paste(image, (label_w + c * cell_w, label_h + r * cell_h))
    return grid


def to_uint8_hwc(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.uint8)
