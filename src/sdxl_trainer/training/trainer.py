"""The training recipe: setup -> flat step loop -> outputs. One accelerate.Accelerator owns devices."""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sdxl_trainer.config import Config, dump_config
from sdxl_trainer.data.buckets import BucketBatchSampler, bucket_table, format_bucket_table, generate_buckets
from sdxl_trainer.data.cache import CachedDataset, build_cache
from sdxl_trainer.data.dataset import CaptionOptions, scan_folder
from sdxl_trainer.models.model_validator import build_pipeline, generate_samples, image_grid, to_uint8_hwc
from sdxl_trainer.models.setup import freeze, load_components
from sdxl_trainer.training.loss import DiffusionObjective, ObjectiveConfig
from sdxl_trainer.training.setup import build_accelerator, build_ema, build_lr_scheduler, build_optimizer
from sdxl_trainer.training.utils import LossHistory, NonFiniteLossError, unet_forward
from sdxl_trainer.utils.device import plan_device
from sdxl_trainer.utils.logging import TensorBoardLogger, get_logger, setup_logging
from sdxl_trainer.utils.model_card import write_model_card

log = get_logger("trainer")


@dataclass
class RunPaths:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def log_file(self) -> Path:
        return self.root / "train.log"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def final(self) -> Path:
        return self.root / "final"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"


def objective_from_config(config: Config) -> DiffusionObjective:
    section = config.objective
    return DiffusionObjective(ObjectiveConfig(**section.model_dump()))


def prepare_dataset(config: Config, components, *, device: torch.device, rank: int = 0, world_size: int = 1, barrier=None):
    """Scan the folder and build/refresh the cache; returns (CachedDataset, CacheReport, scan skipped)."""
    scan = scan_folder(
        Path(config.data.root),
        caption_options=CaptionOptions(
            lowercase=config.data.lowercase,
            underscores_to_spaces=config.data.underscores_to_spaces,
            missing_caption=config.data.missing_caption,
        ),
        min_size=config.data.min_size,
        max_aspect_ratio=config.data.max_aspect_ratio,
        max_pixels=config.data.max_pixels,
    )
    buckets = generate_buckets(config.data.resolution, step=config.data.bucket_step, max_aspect_ratio=config.data.max_aspect_ratio)
    report = build_cache(
        scan.records,
        cache_dir=Path(config.cache.dir),
        vae=components.vae,
        tokenizers=(components.tokenizer, components.tokenizer_2),
        text_encoders=(components.text_encoder, components.text_encoder_2),
        buckets=buckets,
        crop=config.data.crop,
        latent_mode=config.cache.latent_mode,
        batch_size=config.cache.batch_size,
        num_workers=config.cache.num_workers,
        device=device,
        rank=rank,
        world_size=world_size,
        barrier=barrier,
        progress=rank == 0,
        seed=config.train.seed,
        scan_skipped=scan.skipped,
    )
    dataset = CachedDataset(Path(config.cache.dir), seed=config.train.seed)
    return dataset, report, scan.skipped


def dataset_bucket_table(dataset: CachedDataset):
    buckets = dataset.buckets
    return bucket_table([buckets[i] for i in dataset.bucket_ids])


class Trainer:
    """One training run: `setup()`, `train()`, `finish()`; every state change of a step is in `train()`."""

    def __init__(self, config: Config):
        self.config = config
        self.paths = RunPaths(Path(config.output.dir))

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.config
        self.plan = plan_device(cfg.train.device, cfg.train.mixed_precision)
        self.accelerator = build_accelerator(self.plan, project_dir=str(self.paths.root))
        self.is_main = self.accelerator.is_main_process
        if self.is_main:
            self.paths.root.mkdir(parents=True, exist_ok=True)
            self.paths.config.write_text(dump_config(cfg), encoding="utf-8")
        setup_logging(self.paths.log_file, main_process=self.is_main)
        device = self.accelerator.device
        log.info("run directory: %s (device %s, mixed precision %s, %d process(es))", self.paths.root, device, self.plan.mixed_precision, self.accelerator.num_processes)
        torch.manual_seed(cfg.train.seed)

        self.components = load_components(cfg.model.pretrained, dtype=torch.float32, device=device)
        log.info("model: %s", self.components.source)
        for module in (self.components.vae, self.components.text_encoder, self.components.text_encoder_2):
            freeze(module)

        self.dataset, self.cache_report, _ = prepare_dataset(
            cfg, self.components, device=device,
            rank=self.accelerator.process_index, world_size=self.accelerator.num_processes,
            barrier=self.accelerator.wait_for_everyone,
        )
        log.info("dataset: %d images cached (%d new, %d reused), %d skipped; buckets:\n%s",
                 len(self.dataset), self.cache_report.cached, self.cache_report.reused,
                 len(self.cache_report.skipped), format_bucket_table(dataset_bucket_table(self.dataset)))
        # The frozen encoders are not needed on the accelerator once the cache is built.
        self.components.text_encoder.to("cpu")
        self.components.text_encoder_2.to("cpu")
        self.components.vae.to("cpu")

        self.sampler = BucketBatchSampler(
            self.dataset.bucket_ids, batch_size=cfg.train.batch_size, seed=cfg.train.seed,
            num_replicas=self.accelerator.num_processes, rank=self.accelerator.process_index,
        )
        self.objective = objective_from_config(cfg)

        unet = self.components.unet
        unet.requires_grad_(True)
        unet.train()
        if cfg.model.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        optimizer = build_optimizer(
            unet.parameters(), learning_rate=cfg.train.learning_rate,
            betas=(cfg.train.adam_beta1, cfg.train.adam_beta2), eps=cfg.train.adam_epsilon, weight_decay=cfg.train.weight_decay,
        )
        lr_scheduler = build_lr_scheduler(optimizer, name=cfg.train.lr_scheduler, warmup_steps=cfg.train.lr_warmup_steps, total_steps=cfg.train.max_steps)
        self.unet, self.optimizer, self.lr_scheduler = self.accelerator.prepare(unet, optimizer, lr_scheduler)
        self.ema = build_ema(self.accelerator.unwrap_model(self.unet), enabled=cfg.train.ema.enabled, decay=cfg.train.ema.decay, warmup=cfg.train.ema.warmup)
        # Per-rank generators: noise and timesteps are reproducible and differ across ranks.
        self.generator = torch.Generator(device="cpu").manual_seed(cfg.train.seed * 1000 + self.accelerator.process_index)
        self.global_step = 0
        self.history = LossHistory()
        self.tensorboard = TensorBoardLogger(self.paths.logs if self.is_main else None)

    # ------------------------------------------------------------------ loop
    def compute_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        device = self.accelerator.device
        latents = batch["latents"].to(device)
        noise = self.objective.sample_noise(latents, self.generator)
        height, width = latents.shape[-2] * 8, latents.shape[-1] * 8
        timesteps = self.objective.sample_timesteps(latents.shape[0], self.generator, device=device, pixel_size=(height, width))
        noisy = self.objective.add_noise(latents, noise, timesteps)
        with self.accelerator.autocast():
            model_output = unet_forward(
                self.unet, noisy, timesteps,
                prompt_embeds=batch["prompt_embeds"].to(device),
                pooled_prompt_embeds=batch["pooled_prompt_embeds"].to(device),
                time_ids=batch["time_ids"].to(device),
            )
        per_sample = self.objective.per_sample_loss(model_output.float(), latents, noise, timesteps)
        return per_sample.mean()

    def train(self) -> None:
        cfg = self.config
        accumulation = cfg.train.gradient_accumulation_steps
        batches = self.sampler.batches()
        progress = tqdm(total=cfg.train.max_steps, initial=self.global_step, disable=not self.is_main, desc="train", dynamic_ncols=True)
        start = time.perf_counter()
        while self.global_step < cfg.train.max_steps:
            step_loss = 0.0
            for micro_step in range(accumulation):
                indices = next(batches)
                self.dataset.set_epoch(self.sampler.epoch)
                batch = self.dataset.collate([self.dataset[i] for i in indices])
                sync = micro_step == accumulation - 1
                with self.accelerator.no_sync(self.unet) if not sync else nullcontext():
                    loss = self.compute_loss(batch)
                    if not torch.isfinite(loss):
                        raise NonFiniteLossError(f"loss is {loss.item()} at step {self.global_step + 1} (micro-step {micro_step}); "
                                                 "nothing was saved from this step. Lower train.learning_rate, enable clipping "
                                                 "(train.max_grad_norm) or check the data/cache.")
                    self.accelerator.backward(loss / accumulation)
                step_loss += loss.detach().item() / accumulation
            grad_norm = None
            if cfg.train.max_grad_norm > 0:
                grad_norm = self.accelerator.clip_grad_norm_(self.unet.parameters(), cfg.train.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.lr_scheduler.step()
            self.ema.step(self.accelerator.unwrap_model(self.unet).parameters())
            self.global_step += 1

            mean_loss = self.accelerator.reduce(torch.tensor(step_loss, device=self.accelerator.device), reduction="mean").item()
            self.history.append(mean_loss)
            progress.update(1)
            progress.set_postfix(loss=f"{mean_loss:.4f}")
            if self.global_step % cfg.train.log_every == 0 or self.global_step == cfg.train.max_steps:
                scalars = {"train/loss": mean_loss, "train/lr": self.lr_scheduler.get_last_lr()[0]}
                if grad_norm is not None:
                    scalars["train/grad_norm"] = float(grad_norm)
                self.tensorboard.scalars(scalars, self.global_step)
                log.info("step %d/%d loss %.5f lr %.3g", self.global_step, cfg.train.max_steps, mean_loss, scalars["train/lr"])
            if cfg.sample.every_n_steps and self.global_step % cfg.sample.every_n_steps == 0 and self.global_step < cfg.train.max_steps:
                self.sample()
        progress.close()
        self.train_seconds = time.perf_counter() - start

    # ------------------------------------------------------------------ outputs
    def sample(self) -> Path | None:
        """A labelled grid (raw and EMA weights) at fixed prompts and seeds, saved and logged."""
        self.accelerator.wait_for_everyone()
        if not self.is_main:
            return None
        cfg = self.config
        unet = self.accelerator.unwrap_model(self.unet)
        was_training = unet.training
        unet.eval()
        pipeline = build_pipeline(self._components_on_device(), unet, self.objective.scheduler_config())
        kwargs = dict(
            seed=cfg.sample.seed, num_inference_steps=cfg.sample.num_inference_steps,
            guidance_scale=cfg.sample.guidance_scale, guidance_rescale=cfg.sample.guidance_rescale,
            width=cfg.sample.width or cfg.data.resolution, height=cfg.sample.height or cfg.data.resolution,
        )
        rows, labels = [generate_samples(pipeline, cfg.sample.prompts, **kwargs)], ["raw"]
        if self.ema.enabled:
            self.ema.store(unet.parameters())
            self.ema.copy_to(unet.parameters())
            rows.append(generate_samples(pipeline, cfg.sample.prompts, **kwargs))
            labels.append("EMA")
            self.ema.restore(unet.parameters())
        grid = image_grid(rows, labels, cfg.sample.prompts)
        self.paths.samples.mkdir(parents=True, exist_ok=True)
        path = self.paths.samples / f"step-{self.global_step:06d}.png"
        grid.save(path)
        self.tensorboard.image("samples", to_uint8_hwc(grid), self.global_step)
        self._components_off_device()
        unet.train(was_training)
        return path

    def _components_on_device(self):
        device = self.accelerator.device
        for module in (self.components.vae, self.components.text_encoder, self.components.text_encoder_2):
            module.to(device)
        return self.components

    def _components_off_device(self) -> None:
        for module in (self.components.vae, self.components.text_encoder, self.components.text_encoder_2):
            module.to("cpu")

    def finish(self) -> dict:
        """Final samples, the final pipeline (EMA weights when EMA is on), model card, summary.json."""
        cfg = self.config
        self.accelerator.wait_for_everyone()
        summary: dict = {}
        if self.is_main:
            sample_path = self.sample()
            unet = self.accelerator.unwrap_model(self.unet)
            self.ema.store(unet.parameters())
            self.ema.copy_to(unet.parameters())
            pipeline = build_pipeline(self.components, unet, self.objective.scheduler_config())
            pipeline.save_pretrained(self.paths.final, safe_serialization=True)
            self.ema.restore(unet.parameters())
            summary = {
                "steps": self.global_step,
                "initial_loss": self.history.head_mean(),
                "final_loss": self.history.tail_mean(),
                "wall_seconds": round(self.train_seconds, 3),
                "images": len(self.dataset),
                "skipped": len(self.cache_report.skipped),
                "buckets": {f"{b.width}x{b.height}": n for b, n in dataset_bucket_table(self.dataset)},
                "batch_size": cfg.train.batch_size,
                "gradient_accumulation_steps": cfg.train.gradient_accumulation_steps,
                "learning_rate": cfg.train.learning_rate,
                "prediction_type": cfg.objective.prediction_type,
                "zero_terminal_snr": cfg.objective.zero_terminal_snr,
                "loss_weighting": cfg.objective.loss_weighting,
                "ema": cfg.train.ema.enabled,
                "base_model": cfg.model.pretrained,
                "final_weights": "ema" if self.ema.enabled else "raw",
                "last_sample": str(sample_path.relative_to(self.paths.root)) if sample_path else None,
            }
            self.paths.summary.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
            write_model_card(self.paths.root, summary=summary, config=cfg)
            log.info("final pipeline: %s", self.paths.final)
        self.tensorboard.close()
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        return summary


def run_training(config: Config) -> dict:
    trainer = Trainer(config)
    trainer.setup()
    trainer.train()
    return trainer.finish()
