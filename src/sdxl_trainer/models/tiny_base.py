"""Pretraining recipe for the built-in tiny SDXL base (`builtin:tiny-base`).

It reproduces SDXL 1.0's original regime in miniature so that `demo` is a real fine-tune:
1. the VAE is trained first (reconstruction + a small KL term) and its latent scaling factor is
   measured (1 / std of the latents, as SD's 0.18215 was chosen);
2. the UNet and both text encoders are then trained together from scratch with epsilon
   prediction on SDXL's scaled-linear betas, without zero-terminal SNR, with 10% of captions
   replaced by the zero embedding the SDXL pipeline uses for classifier-free guidance.
Run it with `python scripts/build_tiny_base.py` (deterministic given its seed).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, EulerDiscreteScheduler

from sdxl_trainer.data.buckets import BucketBatchSampler, assign_bucket, generate_buckets, prepare_image
from sdxl_trainer.data.dataset import load_image_rgb, scan_folder
from sdxl_trainer.data.demo import DEMO_WORDS, write_demo_dataset
from sdxl_trainer.models.conditioning import batch_time_ids, encode_prompts
from sdxl_trainer.models.tiny import VAE_SCALING_FACTOR, build_tiny_components, save_as_pipeline, tiny_vae_config
from sdxl_trainer.training.loss import DiffusionObjective, ObjectiveConfig
from sdxl_trainer.training.utils import unet_forward
from sdxl_trainer.utils.logging import get_logger

log = get_logger("tiny_base")


@dataclass(frozen=True)
class TinyBaseRecipe:
    seed: int = 0
    num_images: int = 512
    resolution: int = 256
    vae_steps: int = 2500
    vae_batch_size: int = 8
    vae_crop: int = 64
    vae_learning_rate: float = 1e-3
    vae_kl_weight: float = 1e-6
    unet_steps: int = 2500
    unet_batch_size: int = 8
    unet_learning_rate: float = 5e-4
    text_encoder_learning_rate: float = 5e-4
    caption_dropout: float = 0.1


def _image_tensor(image) -> torch.Tensor:
    """PIL RGB -> [3, H, W] in [-1, 1] (the VAE's input range)."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _as_list(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def _loss_window_mean(losses: list[float], head: bool) -> float:
    window = max(1, len(losses) // 10)
    part = losses[:window] if head else losses[-window:]
    return float(sum(part) / len(part))


def train_vae(vae, images: list[torch.Tensor], recipe: TinyBaseRecipe, generator: torch.Generator) -> dict:
    """Reconstruction (L1 + MSE) + KL on random square crops; the VAE is fully convolutional."""
    vae.train()
    vae.requires_grad_(True)
    # Start from a near-deterministic posterior (log-variance bias -6): from logvar 0 Adam needs
    # thousands of steps to shrink the noise the decoder sees, more than a CPU budget allows.
    with torch.no_grad():
        vae.quant_conv.bias[vae.config.latent_channels:].fill_(-6.0)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_learning_rate, weight_decay=0.0)
    losses = []
    crop = recipe.vae_crop
    for step in range(recipe.vae_steps):
        batch = []
        for _ in range(recipe.vae_batch_size):
            image = images[int(torch.randint(len(images), (1,), generator=generator))]
            top = int(torch.randint(image.shape[1] - crop + 1, (1,), generator=generator))
            left = int(torch.randint(image.shape[2] - crop + 1, (1,), generator=generator))
            batch.append(image[:, top:top + crop, left:left + crop])
        pixels = torch.stack(batch)
        posterior = vae.encode(pixels).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = vae.decode(latents).sample
        recon_loss = F.l1_loss(reconstruction, pixels) + F.mse_loss(reconstruction, pixels)
        # KL(q(z|x) || N(0, I)) per element (Kingma & Welling 2014).
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = recon_loss + recipe.vae_kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        losses.append(recon_loss.item())
        if (step + 1) % 100 == 0:
            log.info("vae step %d/%d reconstruction %.4f", step + 1, recipe.vae_steps, sum(losses[-100:]) / 100)
    vae.eval()
    vae.requires_grad_(False)
    return {"vae_initial_loss": _loss_window_mean(losses, True), "vae_final_loss": _loss_window_mean(losses, False)}


@torch.no_grad()
def encode_latent_distributions(vae, bucketed: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Unscaled latent mean/std per image (each image at its bucket size)."""
    out = []
    for pixels in bucketed:
        dist = vae.encode(pixels[None]).latent_dist
        out.append((dist.mean[0], dist.std[0]))
    return out


def measure_scaling_factor(distributions: list[tuple[torch.Tensor, torch.Tensor]], generator: torch.Generator) -> float:
    """1 / std of sampled latents over the dataset, so the diffusion model sees unit variance (Rombach et al. 2022, sec. G)."""
    samples = torch.cat([(mean + std * torch.randn(mean.shape, generator=generator)).flatten() for mean, std in distributions])
    return float(1.0 / samples.double().std())


def train_unet_and_text_encoders(components, data: dict, recipe: TinyBaseRecipe, generator: torch.Generator) -> dict:
    unet, te1, te2 = components.unet, components.text_encoder, components.text_encoder_2
    for module in (unet, te1, te2):
        module.train()
        module.requires_grad_(True)
    optimizer = torch.optim.AdamW(
        [
            {"params": list(unet.parameters()), "lr": recipe.unet_learning_rate},
            {"params": list(te1.parameters()) + list(te2.parameters()), "lr": recipe.text_encoder_learning_rate},
        ],
        weight_decay=1e-2,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 100))
    # SDXL 1.0's regime: epsilon, scaled-linear betas, no zero-terminal SNR, plain MSE.
    objective = DiffusionObjective(ObjectiveConfig(prediction_type="epsilon", zero_terminal_snr=False, loss_weighting="none"))
    sampler = BucketBatchSampler(data["bucket_ids"], batch_size=recipe.unet_batch_size, seed=recipe.seed)
    batches = sampler.batches()
    tokenizers = (components.tokenizer, components.tokenizer_2)
    losses = []
    for step in range(recipe.unet_steps):
        indices = next(batches)
        means = torch.stack([data["distributions"][i][0] for i in indices])
        stds = torch.stack([data["distributions"][i][1] for i in indices])
        latents = (means + stds * torch.randn(means.shape, generator=generator)) * data["scaling_factor"]
        captions = [data["captions"][i] for i in indices]
        embeddings = encode_prompts(captions, tokenizers, (te1, te2))
        keep = (torch.rand(len(indices), generator=generator) >= recipe.caption_dropout).float()
        prompt_embeds = embeddings.prompt_embeds * keep[:, None, None]
        pooled = embeddings.pooled_prompt_embeds * keep[:, None]
        time_ids = torch.stack([data["time_ids"][i] for i in indices])
        noise = objective.sample_noise(latents, generator)
        timesteps = objective.sample_timesteps(len(indices), generator, device="cpu")
        noisy = objective.add_noise(latents, noise, timesteps)
        prediction = unet_forward(unet, noisy, timesteps, prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled, time_ids=time_ids)
        loss = objective.per_sample_loss(prediction, latents, noise, timesteps).mean()
        if not torch.isfinite(loss):
            raise RuntimeError(f"tiny base pretraining diverged at step {step}: loss {loss.item()}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if (step + 1) % 100 == 0:
            log.info("unet step %d/%d loss %.4f", step + 1, recipe.unet_steps, sum(losses[-100:]) / 100)
    for module in (unet, te1, te2):
        module.eval()
        module.requires_grad_(False)
    return {"unet_initial_loss": _loss_window_mean(losses, True), "unet_final_loss": _loss_window_mean(losses, False),
            "scheduler_config": objective.scheduler_config()}


def load_reused_vae(vae_from: Path, recipe: TinyBaseRecipe) -> tuple[AutoencoderKL, dict]:
    """The frozen VAE of an earlier build and its stage figures; refused unless recipe and architecture match."""
    previous = json.loads((vae_from / "training.json").read_text(encoding="utf-8"))
    mismatched = {key: (previous["recipe"].get(key), value) for key, value in asdict(recipe).items()
                  if key.startswith("vae_") or key in ("seed", "num_images", "resolution")
                  if previous["recipe"].get(key) != value}
    if mismatched:
        raise ValueError(f"{vae_from} was built with a different VAE recipe (theirs, ours): {mismatched}")
    saved = json.loads((vae_from / "vae" / "config.json").read_text(encoding="utf-8"))
    architecture = {key: (saved.get(key), value) for key, value in tiny_vae_config().items()
                    if key != "scaling_factor" and _as_list(saved.get(key)) != _as_list(value)}
    if architecture:
        raise ValueError(f"{vae_from}/vae has a different architecture than tiny_vae_config() (theirs, ours): {architecture}")
    vae = AutoencoderKL.from_pretrained(vae_from / "vae", torch_dtype=torch.float32)
    vae.register_to_config(scaling_factor=VAE_SCALING_FACTOR)  # re-measured by the caller, as in a full build
    vae.eval().requires_grad_(False)
    figures = {key: previous["figures"][key] for key in ("vae_initial_loss", "vae_final_loss")}
    return vae, {**figures, "vae_reused": True}


def build_tiny_base(out_dir: Path, work_dir: Path, recipe: TinyBaseRecipe = TinyBaseRecipe(), *, vae_from: Path | None = None) -> dict:
    """Train the tiny base from scratch and save it as a diffusers pipeline folder with a card.

    Each stage draws from its own generator (seed, seed + 1), so ``vae_from`` (a pipeline folder built
    with the same VAE recipe) skips the VAE stage and gives the UNet stage of a full build, up to the
    float16 rounding of the stored VAE.
    """
    start = time.perf_counter()
    random.seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    data_root = write_demo_dataset(work_dir / "data", num_images=recipe.num_images, resolution=recipe.resolution, seed=recipe.seed + 1)
    scan = scan_folder(data_root)
    components = build_tiny_components(DEMO_WORDS, seed=recipe.seed)

    if vae_from is None:
        full_images = [_image_tensor(load_image_rgb(record.path)) for record in scan.records]
        figures = train_vae(components.vae, full_images, recipe, torch.Generator().manual_seed(recipe.seed))
    else:
        components.vae, figures = load_reused_vae(Path(vae_from), recipe)
    generator = torch.Generator().manual_seed(recipe.seed + 1)

    buckets = generate_buckets(recipe.resolution, step=64)
    bucket_index = {bucket: k for k, bucket in enumerate(buckets)}
    bucketed, bucket_ids, time_ids, captions = [], [], [], []
    for record in scan.records:
        bucket = assign_bucket(record.width, record.height, buckets)
        image, original_size, crop_top_left = prepare_image(load_image_rgb(record.path), bucket, crop="center")
        bucketed.append(_image_tensor(image))
        bucket_ids.append(bucket_index[bucket])
        time_ids.append(batch_time_ids([original_size], [crop_top_left], [(bucket.height, bucket.width)])[0])
        captions.append(record.caption)
    distributions = encode_latent_distributions(components.vae, bucketed)
    scaling_factor = measure_scaling_factor(distributions, generator)
    components.vae.register_to_config(scaling_factor=scaling_factor)
    log.info("measured VAE scaling factor: %.5f", scaling_factor)

    data = {"distributions": distributions, "bucket_ids": bucket_ids, "time_ids": time_ids, "captions": captions, "scaling_factor": scaling_factor}
    figures.update(train_unet_and_text_encoders(components, data, recipe, generator))
    scheduler = EulerDiscreteScheduler(**figures.pop("scheduler_config"))
    save_as_pipeline(components, scheduler, out_dir, dtype=torch.float16)

    figures.update({"vae_scaling_factor": scaling_factor, "images": len(scan.records), "wall_seconds": round(time.perf_counter() - start, 1)})
    (out_dir / "training.json").write_text(json.dumps({"recipe": asdict(recipe), "figures": figures}, indent=2) + "\n", encoding="utf-8")
    (out_dir / "README.md").write_text(_card(recipe, figures), encoding="utf-8")
    return figures


def _reuse_note(figures: dict) -> str:
    return " (UNet stage only: the VAE was reused from an earlier build of the same VAE recipe)" if figures.get("vae_reused") else ""


def _card(recipe: TinyBaseRecipe, figures: dict) -> str:
    return f"""---
license: apache-2.0
library_name: diffusers
pipeline_tag: text-to-image
tags: [stable-diffusion-xl, tiny, sdxl-trainer]
---

# builtin:tiny-base

A tiny model of the SDXL architecture family (UNet2DConditionModel with text_time conditioning,
CLIPTextModel + CLIPTextModelWithProjection, AutoencoderKL 8x), trained from scratch by
`python scripts/build_tiny_base.py` (seed {recipe.seed}) on {figures['images']} images of the
generated demo dataset, in SDXL 1.0's original regime: epsilon prediction, scaled-linear betas,
no zero-terminal SNR. Tokenizer vocabularies are built by the project from the demo words.
Weights are stored in float16.

| stage | steps | batch | first 10% loss | last 10% loss |
| --- | --- | --- | --- | --- |
| VAE (L1 + MSE reconstruction, KL {recipe.vae_kl_weight}) | {recipe.vae_steps} | {recipe.vae_batch_size} x {recipe.vae_crop}px | {figures['vae_initial_loss']:.4f} | {figures['vae_final_loss']:.4f} |
| UNet + text encoders (epsilon MSE) | {recipe.unet_steps} | {recipe.unet_batch_size} | {figures['unet_initial_loss']:.4f} | {figures['unet_final_loss']:.4f} |

Measured VAE scaling factor: {figures['vae_scaling_factor']:.5f}. Build time: {figures['wall_seconds']} s on 2 CPU cores{_reuse_note(figures)}.
"""
