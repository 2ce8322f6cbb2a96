"""VAE fine-tuning (decoder-only by default) with reconstruction + perceptual loss, and latent statistics.

Decoder-only training keeps the encoder (and ``quant_conv``) bit-identical, so latents already
cached for UNet training stay valid. Training the encoder too adds a KL term.

Loss per sample: ``reconstruction_weight * (L1 or MSE) + perceptual_weight * perceptual +
kl_weight * KL``, where KL is the posterior's KL to N(0, I) summed over latent elements and
divided by the number of pixel values, so ``kl_weight`` means what it means in the latent
diffusion VAE loss (which sums both terms over elements; 1e-6 there).

:class:`LatentStatistics` tracks per-channel latent mean and variance with Chan et al.'s
parallel update in float64 and writes the ``scaling_factor``/``shift_factor`` that would give
unit-variance latents (NovelAI Diffusion V3 report, arXiv 2409.15997, Sec. on the SDXL VAE).

Layout: :class:`VAEFinetuner` is the training state (VAE, loss, optimizer, EMA, step) with
``state_dict``/``load_state_dict``; :class:`VAEFinetuneRecipe` adds data, evaluation and
outputs; :func:`run_vae_finetune` runs it from a :class:`~sdxl_trainer.config.Config`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import random
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sdxl_trainer.config import Config, dump_config
from sdxl_trainer.data.buckets import (
    Bucket,
    BucketBatchSampler,
    assign_bucket,
    bucket_table,
    format_bucket_table,
    generate_buckets,
    prepare_image,
)
from sdxl_trainer.data.dataset import CaptionOptions, DataSource, ImageRecord, load_image_rgb, scan_sources
from sdxl_trainer.data.split import split_validation
from sdxl_trainer.models.setup import load_components
from sdxl_trainer.training.perceptual import (
    LPIPSLoss,
    build_perceptual_loss,
    load_lpips,
    psnr_per_sample,
    ssim_per_sample,
)
from sdxl_trainer.training.setup import build_accelerator, build_ema, build_optimizer
from sdxl_trainer.training.utils import NonFiniteLossError
from sdxl_trainer.utils.device import plan_device
from sdxl_trainer.utils.logging import get_logger, setup_logging

log = get_logger("vae")

RECONSTRUCTION_LOSSES = ("l1", "mse")
LATENT_MODES = ("sample", "mean")
LATENT_STATS_NAME = "latent_stats.json"
REPORT_NAME = "vae_report.json"
VAE_DIR_NAME = "vae"


def _write_json_atomic(path: Path, payload: Mapping) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            json.dump(payload, out, indent=2)
            out.write("\n")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


# ============================================================================ latent statistics


class LatentStatistics:
    """Per-channel count, mean and M2 (sum of squared deviations) of latents, in float64.

    Batches are folded in with Chan, Golub & LeVeque's (1979) pairwise update: a batch's own
    mean and M2 come from a two-pass computation in float64, then
    ``M2 = M2_a + M2_b + delta^2 * n_a * n_b / n``. Unlike summing x and x^2, this stays exact
    for latents with a large offset (mean 1e4, std 1e-2). Variances are population variances
    (divided by n): the quantity a scaling factor should normalise.
    """

    def __init__(self, channels: int) -> None:
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        self.count = 0  # elements per channel (every channel sees the same number)
        self.mean = torch.zeros(channels, dtype=torch.float64)
        self.m2 = torch.zeros(channels, dtype=torch.float64)

    @property
    def channels(self) -> int:
        return self.mean.shape[0]

    def _fold(self, count: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        if count == 0:
            return
        if self.count == 0:
            self.count, self.mean, self.m2 = count, mean.clone(), m2.clone()
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * count / total)
        self.count = total

    def update(self, latents: torch.Tensor) -> "LatentStatistics":
        """Fold in a batch [B, C, H, W] (any float dtype, any device)."""
        if latents.ndim != 4 or latents.shape[1] != self.channels:
            raise ValueError(f"latents must be [B, {self.channels}, H, W], got {list(latents.shape)}")
        flat = latents.detach().to("cpu", torch.float64).transpose(0, 1).reshape(self.channels, -1)
        if flat.shape[1] == 0:
            return self
        mean = flat.mean(dim=1)
        m2 = ((flat - mean[:, None]) ** 2).sum(dim=1)
        self._fold(flat.shape[1], mean, m2)
        return self

    def merge(self, other: "LatentStatistics") -> "LatentStatistics":
        """Fold another shard's statistics into this one (in place); returns self."""
        if other.channels != self.channels:
            raise ValueError(f"cannot merge statistics of {other.channels} channels into {self.channels}")
        self._fold(other.count, other.mean, other.m2)
        return self

    def _require_data(self) -> None:
        if self.count == 0:
            raise ValueError("no latents were added: statistics are undefined")

    @property
    def variance(self) -> torch.Tensor:
        self._require_data()
        return self.m2 / self.count

    @property
    def std(self) -> torch.Tensor:
        return self.variance.sqrt()

    @property
    def overall_mean(self) -> float:
        self._require_data()
        return float(self.mean.mean())

    @property
    def overall_variance(self) -> float:
        """Variance of all latent values pooled over channels (channels have equal counts)."""
        self._require_data()
        between = ((self.mean - self.overall_mean) ** 2).sum() * self.count
        return float((self.m2.sum() + between) / (self.count * self.channels))

    @property
    def overall_std(self) -> float:
        return math.sqrt(self.overall_variance)

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean.tolist(), "m2": self.m2.tolist()}

    def load_state_dict(self, state: Mapping) -> None:
        mean = torch.tensor(state["mean"], dtype=torch.float64)
        if mean.shape[0] != self.channels:
            raise ValueError(f"saved statistics have {mean.shape[0]} channels, expected {self.channels}")
        self.count = int(state["count"])
        self.mean = mean
        self.m2 = torch.tensor(state["m2"], dtype=torch.float64)

    def report(self, current_scaling_factor: float | None = None, num_images: int | None = None) -> dict:
        """What latent_stats.json holds: per-channel and overall statistics and suggested factors."""
        overall_std = self.overall_std
        rms = math.sqrt(self.overall_variance + self.overall_mean**2)
        return {
            "num_images": num_images,
            "values_per_channel": self.count,
            "channel_mean": self.mean.tolist(),
            "channel_std": self.std.tolist(),
            "overall_mean": self.overall_mean,
            "overall_std": overall_std,
            # (z - shift_factor) * scaling_factor has mean 0 and variance 1 (diffusers' SD3/Flux convention).
            "scaling_factor": 1.0 / overall_std,
            "shift_factor": self.overall_mean,
            # For pipelines that only scale (SDXL): z * factor has unit second moment.
            "scaling_factor_without_shift": 1.0 / rms,
            "current_scaling_factor": current_scaling_factor,
            # The same per channel, as diffusers' AutoencoderKL config keys latents_mean / latents_std.
            "latents_mean": self.mean.tolist(),
            "latents_std": self.std.tolist(),
            "state": self.state_dict(),
        }


def all_gather_latent_statistics(stats: LatentStatistics, device: torch.device | str = "cpu") -> LatentStatistics:
    """Statistics merged over all ranks (in rank order, so every rank gets the same numbers).

    Without an initialised torch.distributed process group this returns a copy of ``stats``.
    ``device`` is where the gathered tensor lives (the rank's CUDA device for NCCL).
    """
    merged = LatentStatistics(stats.channels)
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return merged.merge(stats)
    packed = torch.stack([torch.full_like(stats.mean, float(stats.count)), stats.mean, stats.m2]).to(device)
    gathered = [torch.empty_like(packed) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(gathered, packed)
    for shard in gathered:
        shard = shard.cpu()
        part = LatentStatistics(stats.channels)
        part._fold(int(shard[0, 0].item()), shard[1], shard[2])
        merged.merge(part)
    return merged


# ============================================================================ loss and model


class VAELoss(nn.Module):
    """Per-sample VAE loss terms; see the module docstring for the KL normalisation."""

    def __init__(
        self,
        *,
        reconstruction: str = "l1",
        reconstruction_weight: float = 1.0,
        perceptual: nn.Module,
        perceptual_weight: float = 0.1,
        kl_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if reconstruction not in RECONSTRUCTION_LOSSES:
            raise ValueError(f"unknown reconstruction loss {reconstruction!r}; allowed: {', '.join(RECONSTRUCTION_LOSSES)}")
        self.reconstruction = reconstruction
        self.reconstruction_weight = reconstruction_weight
        self.perceptual = perceptual
        self.perceptual_weight = perceptual_weight
        self.kl_weight = kl_weight

    def forward(
        self, reconstruction: torch.Tensor, target: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        difference = reconstruction.float() - target.float()
        elementwise = difference.abs() if self.reconstruction == "l1" else difference**2
        pixel_values = target[0].numel()
        terms = {
            "reconstruction": elementwise.flatten(1).mean(dim=1),
            "perceptual": self.perceptual(reconstruction.float(), target.float()),
            # KL(N(mean, exp(logvar)) || N(0, I)), as diffusers' DiagonalGaussianDistribution.kl().
            "kl": 0.5 * (mean.float() ** 2 + logvar.float().exp() - 1.0 - logvar.float()).flatten(1).sum(dim=1) / pixel_values,
        }
        terms["total"] = (
            self.reconstruction_weight * terms["reconstruction"]
            + self.perceptual_weight * terms["perceptual"]
            + self.kl_weight * terms["kl"]
        )
        return terms


class Autoencode(nn.Module):
    """pixels + standard-normal noise -> (reconstruction, posterior mean, posterior logvar).

    One forward call so that DDP sees the whole step; the encoder runs without gradients
    unless it is trained.
    """

    def __init__(self, vae: nn.Module, train_encoder: bool) -> None:
        super().__init__()
        self.vae = vae
        self.train_encoder = train_encoder

    def forward(self, pixels: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.set_grad_enabled(self.train_encoder and torch.is_grad_enabled()):
            posterior = self.vae.encode(pixels).latent_dist
        latents = posterior.mean + posterior.std * noise.to(posterior.mean.dtype)
        return self.vae.decode(latents).sample, posterior.mean, posterior.logvar


def trainable_modules(vae: nn.Module, train_encoder: bool) -> list[nn.Module]:
    """The decoder side (decoder, post_quant_conv), plus the encoder side when it is trained."""
    decoder_side = [vae.decoder] + ([vae.post_quant_conv] if getattr(vae, "post_quant_conv", None) is not None else [])
    if not train_encoder:
        return decoder_side
    encoder_side = [vae.encoder] + ([vae.quant_conv] if getattr(vae, "quant_conv", None) is not None else [])
    return encoder_side + decoder_side


def downsampling_factor(vae: nn.Module) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def latent_shape(vae: nn.Module, pixels: torch.Tensor) -> tuple[int, int, int, int]:
    factor = downsampling_factor(vae)
    return (pixels.shape[0], vae.config.latent_channels, pixels.shape[-2] // factor, pixels.shape[-1] // factor)


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """A CPU generator for one step: noise depends only on (seed, step, rank), so resuming needs no RNG state."""
    digest = hashlib.sha256(f"vae-step/{seed}/{step}/{rank}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little"))


class VAEFinetuner:
    """The training state of a VAE fine-tune: VAE (trained part), loss, AdamW, EMA and step.

    ``state_dict`` holds exactly what a checkpoint needs: the trained weights, the EMA, the
    optimizer and the step (the frozen encoder is the base model's and is not saved).
    """

    def __init__(
        self,
        vae: nn.Module,
        loss: VAELoss,
        *,
        accelerator,
        train_encoder: bool = False,
        learning_rate: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        ema_decay: float = 0.999,
        max_grad_norm: float = 1.0,
        seed: int = 0,
    ) -> None:
        self.accelerator = accelerator
        self.train_encoder = train_encoder
        self.max_grad_norm = max_grad_norm
        self.seed = seed
        vae.requires_grad_(False)
        modules = trainable_modules(vae, train_encoder)
        for module in modules:
            module.requires_grad_(True)
        vae.train()
        self.vae = vae
        self.loss = loss.to(accelerator.device)
        self.trained = nn.ModuleList(modules)
        optimizer = build_optimizer(self.trained.parameters(), learning_rate=learning_rate, betas=betas, eps=eps, weight_decay=weight_decay)
        self.model, self.optimizer = accelerator.prepare(Autoencode(vae, train_encoder), optimizer)
        self.ema = build_ema(self.trained, enabled=True, decay=ema_decay, warmup=True)
        self.step = 0

    def parameters(self) -> list[nn.Parameter]:
        return list(self.trained.parameters())

    def train_step(self, pixels: torch.Tensor) -> dict[str, float]:
        """One optimizer step on pixels [B, 3, H, W] in [-1, 1]; returns the batch-mean loss terms."""
        device = self.accelerator.device
        generator = step_generator(self.seed, self.step, self.accelerator.process_index)
        noise = torch.randn(latent_shape(self.vae, pixels), generator=generator)
        pixels = pixels.to(device)
        self.model.train()
        with self.accelerator.autocast():
            reconstruction, mean, logvar = self.model(pixels, noise.to(device))
        terms = self.loss(reconstruction, pixels, mean, logvar)
        total = terms["total"].mean()
        if not torch.isfinite(total):
            raise NonFiniteLossError(
                f"VAE loss is {total.item()} at step {self.step + 1} (terms: "
                + ", ".join(f"{k} {v.mean().item():.4g}" for k, v in terms.items())
                + "); nothing was saved from this step. Lower vae.learning_rate or check the images."
            )
        self.accelerator.backward(total)
        if self.max_grad_norm > 0:
            self.accelerator.clip_grad_norm_(self.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.step(self.parameters())
        self.step += 1
        return {name: value.detach().mean().item() for name, value in terms.items()}

    @contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Inside the block the VAE holds the EMA weights; the trained weights come back after."""
        self.ema.store(self.parameters())
        self.ema.copy_to(self.parameters())
        try:
            yield
        finally:
            self.ema.restore(self.parameters())

    def _trained_by_name(self) -> dict[str, nn.Parameter]:
        """The trained parameters under their AutoencoderKL names (decoder.conv_in.weight, ...)."""
        return {name: p for name, p in self.vae.named_parameters() if p.requires_grad}

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "train_encoder": self.train_encoder,
            "trained": {name: p.detach().cpu().clone() for name, p in self._trained_by_name().items()},
            "ema": copy.deepcopy(self.ema.state_dict()),
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
        }

    def load_state_dict(self, state: Mapping) -> None:
        if bool(state["train_encoder"]) != self.train_encoder:
            raise ValueError(f"checkpoint was made with train_encoder={state['train_encoder']}, this run has {self.train_encoder}")
        params = self._trained_by_name()
        saved = state["trained"]
        if set(saved) != set(params):
            difference = sorted(set(saved) ^ set(params))
            raise ValueError(f"checkpoint weights do not match this VAE (differing keys, e.g. {difference[:5]})")
        with torch.no_grad():
            for name, param in params.items():
                if saved[name].shape != param.shape:
                    raise ValueError(f"checkpoint weight {name} has shape {list(saved[name].shape)}, the VAE {list(param.shape)}")
                param.copy_(saved[name])
        self.ema.load_state_dict(state["ema"])
        self.ema.to(device=self.accelerator.device)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])


# ============================================================================ data


def image_to_tensor(image) -> torch.Tensor:
    """PIL RGB -> [3, H, W] float32 in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


@dataclass(frozen=True)
class ImageLoader:
    """Loads records as bucket-sized tensors; crops depend only on (seed, epoch, index)."""

    records: Sequence[ImageRecord]
    buckets: Sequence[Bucket]  # one per record
    crop: str = "center"
    crop_size: int | None = None
    seed: int = 0
    max_pixels: int = 178_956_970

    def load(self, index: int, epoch: int = 0, train: bool = True) -> torch.Tensor:
        rng = random.Random(f"vae-crop/{self.seed}/{epoch}/{index}")
        image = load_image_rgb(self.records[index].path, max_pixels=self.max_pixels)
        crop = self.crop if train else "center"
        prepared, _, _ = prepare_image(image, self.buckets[index], crop=crop, rng=rng if crop == "random" else None)
        tensor = image_to_tensor(prepared)
        if train and self.crop_size is not None:
            top = rng.randint(0, tensor.shape[1] - self.crop_size)
            left = rng.randint(0, tensor.shape[2] - self.crop_size)
            tensor = tensor[:, top : top + self.crop_size, left : left + self.crop_size]
        return tensor

    def batch(self, indices: Iterable[int], epoch: int) -> torch.Tensor:
        return torch.stack([self.load(i, epoch) for i in indices])


def check_crop_size(crop_size: int | None, buckets: Iterable[Bucket], factor: int) -> None:
    if crop_size is None:
        return
    problems = []
    if crop_size <= 0 or crop_size % factor:
        problems.append(f"vae.crop_size {crop_size} must be a positive multiple of {factor} (the VAE's downsampling)")
    small = sorted({str(b) for b in buckets if min(b.width, b.height) < crop_size})
    if small:
        problems.append(f"vae.crop_size {crop_size} is larger than the buckets {', '.join(small)}; lower it or raise data.resolution")
    if problems:
        raise ValueError("; ".join(problems))


# ============================================================================ evaluation


@torch.no_grad()
def evaluate_reconstruction(vae: nn.Module, images: Sequence[torch.Tensor], device: torch.device, lpips: nn.Module | None = None) -> dict[str, float]:
    """Mean PSNR/SSIM (and LPIPS) of posterior-mode reconstructions of [3, H, W] images in [-1, 1]."""
    was_training = vae.training
    vae.eval()
    scores: dict[str, list[float]] = {"psnr": [], "ssim": []} | ({"lpips": []} if lpips is not None else {})
    for image in images:
        target = image.unsqueeze(0).to(device)
        reconstruction = vae.decode(vae.encode(target).latent_dist.mode()).sample.float().clamp(-1.0, 1.0)
        scores["psnr"].append(psnr_per_sample(reconstruction, target).item())
        scores["ssim"].append(ssim_per_sample(reconstruction, target).item())
        if lpips is not None:
            scores["lpips"].append(lpips(reconstruction, target).item())
    vae.train(was_training)
    return {name: float(np.mean(values)) for name, values in scores.items()}


@torch.no_grad()
def collect_latent_statistics(
    vae: nn.Module, loader: ImageLoader, indices: Sequence[int], device: torch.device, *, latent_mode: str, seed: int
) -> LatentStatistics:
    """Statistics of the latents of ``indices`` (center crops to their buckets, as the cache makes them)."""
    if latent_mode not in LATENT_MODES:
        raise ValueError(f"unknown latent mode {latent_mode!r}; allowed: {', '.join(LATENT_MODES)}")
    stats = LatentStatistics(vae.config.latent_channels)
    was_training = vae.training
    vae.eval()
    for index in indices:
        pixels = loader.load(index, train=False).unsqueeze(0).to(device)
        posterior = vae.encode(pixels).latent_dist
        if latent_mode == "mean":
            latents = posterior.mode()
        else:
            noise = torch.randn(posterior.mean.shape, generator=step_generator(seed, index, 0))
            latents = posterior.mean + posterior.std * noise.to(posterior.mean)
        stats.update(latents)
    vae.train(was_training)
    return stats


# ============================================================================ the recipe


@dataclass(frozen=True)
class VAEFinetuneSettings:
    """Plain arguments of a VAE fine-tune, resolved from the config at the edge."""

    pretrained: str
    sources: tuple[DataSource, ...]
    output_dir: Path
    caption_options: CaptionOptions
    resolution: int
    bucket_step: int
    max_aspect_ratio: float
    crop: str
    min_size: int
    max_pixels: int
    latent_mode: str
    train_encoder: bool
    max_steps: int
    batch_size: int
    learning_rate: float
    reconstruction_loss: str
    reconstruction_weight: float
    perceptual_loss: str
    perceptual_weight: float
    kl_weight: float
    lpips_weights: str | None
    crop_size: int | None
    held_out_fraction: float
    ema_decay: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    max_grad_norm: float
    seed: int
    device: str
    mixed_precision: str
    log_every: int

    @classmethod
    def from_config(cls, config: Config) -> "VAEFinetuneSettings":
        data, vae, train = config.data, config.vae, config.train
        return cls(
            pretrained=config.model.pretrained,
            sources=tuple(DataSource(Path(source.root), source.repeats, source.folder_repeats) for source in data.source_list()),
            output_dir=Path(config.output.dir),
            # Captions are not used to train a VAE: images without one are kept.
            caption_options=CaptionOptions(lowercase=data.lowercase, underscores_to_spaces=data.underscores_to_spaces, missing_caption="empty"),
            resolution=data.resolution,
            bucket_step=data.bucket_step,
            max_aspect_ratio=data.max_aspect_ratio,
            crop=data.crop,
            min_size=data.min_size,
            max_pixels=data.max_pixels,
            latent_mode=config.cache.latent_mode,
            train_encoder=vae.train_encoder,
            max_steps=vae.max_steps,
            batch_size=vae.batch_size,
            learning_rate=vae.learning_rate,
            reconstruction_loss=vae.reconstruction_loss,
            reconstruction_weight=vae.reconstruction_weight,
            perceptual_loss=vae.perceptual_loss,
            perceptual_weight=vae.perceptual_weight,
            kl_weight=vae.kl_weight,
            lpips_weights=vae.lpips_weights,
            crop_size=vae.crop_size,
            held_out_fraction=vae.held_out_fraction,
            ema_decay=vae.ema_decay,
            betas=(train.adam_beta1, train.adam_beta2),
            eps=train.adam_epsilon,
            weight_decay=train.weight_decay,
            max_grad_norm=train.max_grad_norm,
            seed=train.seed,
            device=train.device,
            mixed_precision=train.mixed_precision,
            log_every=train.log_every,
        )


class VAEFinetuneRecipe:
    """One VAE fine-tune: ``setup()``, ``train()``, ``finish()``; ``state_dict`` covers the
    finetuner, the batch sampler and the held-out scores measured before training."""

    def __init__(self, settings: VAEFinetuneSettings, config_yaml: str | None = None) -> None:
        self.settings = settings
        self.config_yaml = config_yaml
        self.output_dir = settings.output_dir

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        s = self.settings
        # Problems that need no model are reported before anything heavy loads.
        # LPIPS is loaded once: for the loss (perceptual_loss=lpips) and for the report (weights configured).
        lpips = load_lpips(s.lpips_weights) if s.lpips_weights is not None or s.perceptual_loss == "lpips" else None
        perceptual = LPIPSLoss(lpips) if s.perceptual_loss == "lpips" else build_perceptual_loss(s.perceptual_loss)
        plan = plan_device(s.device, s.mixed_precision)
        self.accelerator = build_accelerator(plan, project_dir=str(self.output_dir))
        self.is_main = self.accelerator.is_main_process
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            if self.config_yaml is not None:
                (self.output_dir / "config.yaml").write_text(self.config_yaml, encoding="utf-8")
        setup_logging(self.output_dir / "train.log", main_process=self.is_main)
        self.device = self.accelerator.device
        log.info("VAE fine-tune in %s (device %s, %s, %d process(es))", self.output_dir, self.device,
                 "encoder + decoder" if s.train_encoder else "decoder only", self.accelerator.num_processes)

        scan = scan_sources(s.sources, caption_options=s.caption_options, min_size=s.min_size,
                            max_aspect_ratio=s.max_aspect_ratio, max_pixels=s.max_pixels)
        if scan.skipped:
            log.warning("%d file(s) skipped:\n%s", len(scan.skipped), scan.format_skip_report())
        self.records = scan.records
        train, held_out = split_validation(scan.records, [Path(os.path.abspath(x.root)) for x in s.sources], s.held_out_fraction)
        if not held_out:
            raise ValueError(f"need at least 2 images to hold some out for evaluation, found {len(scan.records)}")
        buckets = generate_buckets(s.resolution, step=s.bucket_step, max_aspect_ratio=s.max_aspect_ratio)
        train_buckets = [assign_bucket(r.width, r.height, buckets) for r in train]

        components = load_components(s.pretrained, dtype=torch.float32, device=self.device)
        log.info("model: %s", components.source)
        vae = components.vae
        del components  # only the VAE is needed
        check_crop_size(s.crop_size, train_buckets, downsampling_factor(vae))
        log.info("images: %d train, %d held out; buckets:\n%s", len(train), len(held_out), format_bucket_table(bucket_table(train_buckets)))

        # An image with repeats r is listed r times per epoch (as in UNet training), each with its own crops.
        items = [i for i, record in enumerate(train) for _ in range(record.repeats)]
        self.train_loader = ImageLoader([train[i] for i in items], [train_buckets[i] for i in items], crop=s.crop,
                                        crop_size=s.crop_size, seed=s.seed, max_pixels=s.max_pixels)
        self.held_out_loader = ImageLoader(held_out, [assign_bucket(r.width, r.height, buckets) for r in held_out], max_pixels=s.max_pixels)
        self.all_loader = ImageLoader(scan.records, [assign_bucket(r.width, r.height, buckets) for r in scan.records], max_pixels=s.max_pixels)
        self.sampler = BucketBatchSampler(
            [buckets.index(bucket) for bucket in self.train_loader.buckets], batch_size=s.batch_size, seed=s.seed,
            num_replicas=self.accelerator.num_processes, rank=self.accelerator.process_index,
        )
        loss = VAELoss(
            reconstruction=s.reconstruction_loss,
            reconstruction_weight=s.reconstruction_weight,
            perceptual=perceptual,
            perceptual_weight=s.perceptual_weight,
            kl_weight=s.kl_weight if s.train_encoder else 0.0,  # constant for a frozen encoder
        )
        self.finetuner = VAEFinetuner(
            vae, loss, accelerator=self.accelerator, train_encoder=s.train_encoder,
            learning_rate=s.learning_rate, betas=s.betas, eps=s.eps, weight_decay=s.weight_decay,
            ema_decay=s.ema_decay, max_grad_norm=s.max_grad_norm, seed=s.seed,
        )
        self.lpips = lpips.to(self.device) if lpips is not None else None
        self.held_out_images = [self.held_out_loader.load(i, train=False) for i in range(len(held_out))]
        self.before = self._evaluate() if self.is_main else {}
        if self.is_main:
            log.info("held-out before: %s", _format_scores(self.before))
        self.history: list[dict[str, float]] = []

    def _evaluate(self) -> dict[str, float]:
        return evaluate_reconstruction(self.finetuner.vae, self.held_out_images, self.device, self.lpips)

    # ------------------------------------------------------------------ loop
    def train(self) -> None:
        s = self.settings
        start = time.perf_counter()
        batches = self.sampler.batches()
        while self.finetuner.step < s.max_steps:
            indices = next(batches)
            pixels = self.train_loader.batch(indices, self.sampler.epoch)
            terms = self.finetuner.train_step(pixels)
            self.history.append(terms)
            step = self.finetuner.step
            if step % s.log_every == 0 or step == s.max_steps:
                log.info("step %d/%d loss %.5f (reconstruction %.5f, perceptual %.5f, kl %.5f)", step, s.max_steps,
                         terms["total"], terms["reconstruction"], terms["perceptual"], terms["kl"])
        self.train_seconds = time.perf_counter() - start

    # ------------------------------------------------------------------ outputs
    def finish(self) -> dict:
        """Export the EMA VAE, measure latent statistics and held-out scores, write the report."""
        s = self.settings
        finetuner = self.finetuner
        vae = self.accelerator.unwrap_model(finetuner.model).vae
        self.accelerator.wait_for_everyone()
        report: dict = {}
        with finetuner.ema_weights():
            if self.is_main:
                vae.save_pretrained(self.output_dir / VAE_DIR_NAME, safe_serialization=True)
            rank, world = self.accelerator.process_index, self.accelerator.num_processes
            shard = list(range(len(self.records)))[rank::world]
            local = collect_latent_statistics(vae, self.all_loader, shard, self.device, latent_mode=s.latent_mode, seed=s.seed)
            stats = all_gather_latent_statistics(local, self.device)
            after = self._evaluate() if self.is_main else {}
        if self.is_main:
            latent_report = stats.report(current_scaling_factor=vae.config.scaling_factor, num_images=len(self.records))
            latent_report["latent_mode"] = s.latent_mode
            _write_json_atomic(self.output_dir / LATENT_STATS_NAME, latent_report)
            report = {f"{name}_{when}": value for when, scores in (("before", self.before), ("after", after)) for name, value in scores.items()}
            tail = self.history[-max(1, len(self.history) // 10):]
            head = self.history[: max(1, len(self.history) // 10)]
            report.update({
                "steps": finetuner.step,
                "train_images": len(self.train_loader.records),  # items per epoch (repeats counted)
                "held_out_images": len(self.held_out_images),
                "train_encoder": s.train_encoder,
                "reconstruction_loss": s.reconstruction_loss,
                "perceptual_loss": s.perceptual_loss,
                "initial_loss": float(np.mean([t["total"] for t in head])) if head else None,
                "final_loss": float(np.mean([t["total"] for t in tail])) if tail else None,
                "wall_seconds": round(getattr(self, "train_seconds", 0.0), 3),
                "weights": "ema",
                "vae_dir": VAE_DIR_NAME,
                "latent_stats": LATENT_STATS_NAME,
                "suggested_scaling_factor": latent_report["scaling_factor"],
                "suggested_shift_factor": latent_report["shift_factor"],
            })
            _write_json_atomic(self.output_dir / REPORT_NAME, report)
            log.info("held-out after (EMA): %s", _format_scores(after))
            log.info("latent std %.5g -> suggested scaling_factor %.5g, shift_factor %.5g (current %.5g); wrote %s",
                     latent_report["overall_std"], latent_report["scaling_factor"], latent_report["shift_factor"],
                     vae.config.scaling_factor, self.output_dir / VAE_DIR_NAME)
        self.accelerator.wait_for_everyone()
        return report

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"finetuner": self.finetuner.state_dict(), "sampler": self.sampler.state_dict(), "before": dict(self.before)}

    def load_state_dict(self, state: Mapping) -> None:
        self.finetuner.load_state_dict(state["finetuner"])
        self.sampler.load_state_dict(state["sampler"])
        self.before = dict(state["before"])


def _format_scores(scores: Mapping[str, float]) -> str:
    return ", ".join(f"{name} {value:.4f}" for name, value in scores.items())


def run_vae_finetune(config: Config) -> dict:
    """``sdxl-trainer vae CONFIG``: fine-tune the VAE of ``config.model.pretrained`` on ``config.data.root``.

    Writes into ``config.output.dir``: ``vae/`` (EMA weights, AutoencoderKL.save_pretrained),
    ``latent_stats.json``, ``vae_report.json``, ``train.log``, ``config.yaml``. Returns the report.
    """
    recipe = VAEFinetuneRecipe(VAEFinetuneSettings.from_config(config), config_yaml=dump_config(config))
    recipe.setup()
    recipe.train()
    return recipe.finish()
