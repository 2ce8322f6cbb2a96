"""The training recipe: setup -> flat step loop -> outputs. One accelerate.Accelerator owns devices."""

from __future__ import annotations

import json
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sdxl_trainer.config import Config, dump_config
from sdxl_trainer.data.buckets import BucketBatchSampler, bucket_table, format_bucket_summary, generate_buckets
from sdxl_trainer.data.cache import BUCKET_TABLE_NAME, CachedDataset, build_cache
from sdxl_trainer.data.dataset import CaptionAugment, CaptionOptions, DataSource, scan_sources
from sdxl_trainer.data.split import split_validation
from sdxl_trainer.models.model_validator import (
    VALIDATION_SEED,
    build_pipeline,
    generate_samples,
    image_grid,
    require_valid_model,
    saved_scheduler_problems,
    to_uint8_hwc,
    unconditional_branch_warnings,
    validation_loss,
)
from sdxl_trainer.models.setup import attention_backend, freeze, load_components, prepare_unet_for_training
from sdxl_trainer.models.tag_weighter import apply_weights, build_tag_weighter
from sdxl_trainer.training.interrupt import StopSignals, TrainingInterrupted
from sdxl_trainer.training.loss import DiffusionObjective, ObjectiveConfig
from sdxl_trainer.training.setup import build_accelerator, build_ema, build_lr_scheduler, build_optimizer
from sdxl_trainer.training.utils import LossHistory, NonFiniteLossError, sample_keyed_noise, unet_forward, weights_fingerprint
from sdxl_trainer.utils.checkpoint import SaveRequest, capture_rng_state, check_resume, find_checkpoint, load_checkpoint, restore_training_state, save_checkpoint
from sdxl_trainer.utils.device import check_process_options, plan_device
from sdxl_trainer.utils.export import modelspec_metadata, write_single_file
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


def validation_cache_dir(config: Config) -> Path:
    return Path(config.cache.dir) / "validation"


def sampling_kwargs(config: Config) -> dict:
    """generate_samples' settings from the sample section (sizes default to data.resolution)."""
    sample = config.sample
    return dict(
        seed=sample.seed, num_inference_steps=sample.num_inference_steps,
        guidance_scale=sample.guidance_scale, guidance_rescale=sample.guidance_rescale,
        width=sample.width or config.data.resolution, height=sample.height or config.data.resolution,
    )


def prepare_dataset(config: Config, components, *, device: torch.device, rank: int = 0, world_size: int = 1, barrier=None):
    """Scan the folder, split off data.validation_fraction, build/refresh both caches.

    Returns (CachedDataset, CacheReport, scan skipped, validation CachedDataset or None); the
    held-out images live in their own cache folder (validation_cache_dir) and are never trained on.
    """
    sources = [DataSource(Path(s.root), s.repeats, s.folder_repeats) for s in config.data.source_list()]
    scan = scan_sources(
        sources,
        caption_options=CaptionOptions(
            lowercase=config.data.lowercase,
            underscores_to_spaces=config.data.underscores_to_spaces,
            missing_caption=config.data.missing_caption,
        ),
        min_size=config.data.min_size,
        max_aspect_ratio=config.data.max_aspect_ratio,
        max_pixels=config.data.max_pixels,
    )
    train_records, validation_records = split_validation(
        scan.records, [Path(os.path.abspath(s.root)) for s in sources], config.data.validation_fraction
    )
    buckets = generate_buckets(config.data.resolution, step=config.data.bucket_step, max_aspect_ratio=config.data.max_aspect_ratio)
    encoding = dict(
        vae=components.vae,
        tokenizers=(components.tokenizer, components.tokenizer_2),
        text_encoders=(components.text_encoder, components.text_encoder_2),
        buckets=buckets,
        crop=config.data.crop,
        latent_mode=config.cache.latent_mode,
        batch_size=config.cache.batch_size,
        num_workers=config.cache.num_workers if config.cache.num_workers is not None else min(8, max(1, (os.cpu_count() or 2) - 1)),
        device=device,
        rank=rank,
        world_size=world_size,
        barrier=barrier,
        progress=rank == 0,
        seed=config.train.seed,
        no_upscale=config.data.no_upscale,
        bucket_step=config.data.bucket_step,
    )
    # Tag shuffle/dropout variants are for training only: validation encodes the plain captions.
    caption_augment = CaptionAugment(
        shuffle_tags=config.data.shuffle_tags, keep_tokens=config.data.keep_tokens,
        tag_dropout=config.data.tag_dropout, variants=config.cache.caption_variants,
    )
    report = build_cache(train_records, cache_dir=Path(config.cache.dir), scan_skipped=scan.skipped,
                         caption_augment=caption_augment, **encoding)
    table_path = Path(config.cache.dir) / BUCKET_TABLE_NAME
    if rank == 0 and table_path.is_file():
        log.info("bucket table (%s):\n%s", table_path, format_bucket_summary(json.loads(table_path.read_text(encoding="utf-8"))))
    dataset = CachedDataset(Path(config.cache.dir), seed=config.train.seed, caption_dropout=config.data.caption_dropout)
    validation = None
    if validation_records:
        build_cache(validation_records, cache_dir=validation_cache_dir(config), **encoding)
        # A fixed seed and epoch: the held-out latents are the same draw at every validation.
        validation = CachedDataset(validation_cache_dir(config), seed=VALIDATION_SEED)
    return dataset, report, scan.skipped, validation


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
        self.plan = plan_device(cfg.train.device, cfg.train.mixed_precision, optimizer=cfg.train.optimizer, full_bf16=cfg.train.full_bf16)
        self.accelerator = build_accelerator(self.plan, project_dir=str(self.paths.root))
        check_process_options(self.accelerator.num_processes, fused_backward=cfg.train.fused_backward)
        self.is_main = self.accelerator.is_main_process
        # A refused resume stops here (exit 2), before config.yaml is overwritten or anything loads.
        self.resume_from = find_checkpoint(cfg.train.resume, self.paths.checkpoints) if cfg.train.resume else None
        if self.resume_from is not None:
            check_resume(self.resume_from, cfg.model_dump(mode="json"), force=cfg.train.resume_force, max_steps=cfg.train.max_steps)
        if self.is_main:
            self.paths.root.mkdir(parents=True, exist_ok=True)
            self.paths.config.write_text(dump_config(cfg), encoding="utf-8")
        setup_logging(self.paths.log_file, main_process=self.is_main)
        device = self.accelerator.device
        log.info("run directory: %s (device %s, mixed precision %s, %d process(es))", self.paths.root, device, self.plan.mixed_precision, self.accelerator.num_processes)
        torch.manual_seed(cfg.train.seed)

        self.components = load_components(cfg.model.pretrained, dtype=torch.float32, device=device, config_dir=cfg.model.config_dir)
        log.info("model: %s", self.components.source)
        self.objective = objective_from_config(cfg)
        # Before anything is cached: a model that cannot train or sample correctly stops here (exit 2).
        for note in require_valid_model(self.components, self.objective.config):
            log.info("model check: %s", note)
        for warning in unconditional_branch_warnings(self.components.scheduler_config, self.objective.config,
                                                     caption_dropout=cfg.data.caption_dropout,
                                                     guidance_scale=cfg.sample.guidance_scale):
            log.warning("model check: %s", warning)
        for module in (self.components.vae, self.components.text_encoder, self.components.text_encoder_2):
            freeze(module)

        self.dataset, self.cache_report, _, self.validation_dataset = prepare_dataset(
            cfg, self.components, device=device,
            rank=self.accelerator.process_index, world_size=self.accelerator.num_processes,
            barrier=self.accelerator.wait_for_everyone,
        )
        log.info("dataset: %d images cached (%d new, %d reused), %d items per epoch (with repeats), %d skipped",
                 self.dataset.num_images, self.cache_report.cached, self.cache_report.reused,
                 len(self.dataset), len(self.cache_report.skipped))
        if self.validation_dataset is not None:
            log.info("validation: %d held-out images (data.validation_fraction=%g), cached in %s",
                     len(self.validation_dataset), cfg.data.validation_fraction, validation_cache_dir(cfg))
        # The frozen encoders are not needed on the accelerator once the cache is built.
        self.components.text_encoder.to("cpu")
        self.components.text_encoder_2.to("cpu")
        self.components.vae.to("cpu")

        tags = cfg.tag_weighting
        # Statistics over epoch items: a repeated image counts as often as the model sees it.
        self.tag_weighter = build_tag_weighter(
            [self.dataset.tags(i) for i in range(len(self.dataset))], enabled=tags.enabled, alpha=tags.alpha,
            min_weight=tags.min_weight, max_weight=tags.max_weight, min_count=tags.min_count,
            categories_file=tags.categories_file, category_multipliers=tags.category_multipliers,
            caption_options=CaptionOptions(lowercase=cfg.data.lowercase, underscores_to_spaces=cfg.data.underscores_to_spaces),
        )
        if tags.enabled and self.is_main:
            self.tag_weighter.save_json(self.paths.root / "tag_weights.json")
            log.info("tag weighting: per-item weights in %s", self.paths.root / "tag_weights.json")

        self.sampler = BucketBatchSampler(
            self.dataset.bucket_ids, batch_size=cfg.train.batch_size, seed=cfg.train.seed,
            num_replicas=self.accelerator.num_processes, rank=self.accelerator.process_index,
        )

        unet = prepare_unet_for_training(self.components.unet, gradient_checkpointing=cfg.model.gradient_checkpointing,
                                         dtype=self.plan.train_dtype, compile=cfg.train.compile)
        log.info("unet: attention %s, weights %s, gradient checkpointing %s, compile %s; optimizer %s%s",
                 attention_backend(unet), str(self.plan.train_dtype).removeprefix("torch."), cfg.model.gradient_checkpointing,
                 cfg.train.compile, cfg.train.optimizer, " (fused into backward)" if cfg.train.fused_backward else "")
        optimizer = build_optimizer(
            unet.parameters(), learning_rate=cfg.train.learning_rate,
            betas=(cfg.train.adam_beta1, cfg.train.adam_beta2), eps=cfg.train.adam_epsilon, weight_decay=cfg.train.weight_decay,
            name=cfg.train.optimizer, full_bf16=cfg.train.full_bf16, fused_backward=cfg.train.fused_backward, seed=cfg.train.seed,
        )
        lr_scheduler = build_lr_scheduler(optimizer, name=cfg.train.lr_scheduler, warmup_steps=cfg.train.lr_warmup_steps, total_steps=cfg.train.max_steps)
        self.unet, self.optimizer, self.lr_scheduler = self.accelerator.prepare(unet, optimizer, lr_scheduler)
        self.ema = build_ema(self.accelerator.unwrap_model(self.unet), enabled=cfg.train.ema.enabled, decay=cfg.train.ema.decay, warmup=cfg.train.ema.warmup)
        # Per-rank generators: noise and timesteps are reproducible and differ across ranks.
        self.generator = torch.Generator(device="cpu").manual_seed(cfg.train.seed * 1000 + self.accelerator.process_index)
        self.global_step = 0
        self.history = LossHistory()
        self.tensorboard = TensorBoardLogger(self.paths.logs if self.is_main else None)
        self.stop_signals = StopSignals()
        self.last_checkpoint_step: int | None = None
        if self.resume_from is not None:
            self.resume(self.resume_from)

    # ------------------------------------------------------------------ loop
    def compute_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        device = self.accelerator.device
        latents = batch["latents"].to(device)
        height, width = latents.shape[-2] * 8, latents.shape[-1] * 8
        if self.config.train.noise_keying == "sample":
            noise, timesteps = sample_keyed_noise(self.objective, latents, batch["index"].tolist(), seed=self.config.train.seed,
                                                  step=self.global_step, device=device, pixel_size=(height, width))
        else:
            noise = self.objective.sample_noise(latents, self.generator)
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
        return apply_weights(per_sample, self.tag_weighter.batch_weights(batch["index"].tolist()))

    def train(self) -> None:
        cfg = self.config
        accumulation = cfg.train.gradient_accumulation_steps
        batches = self.sampler.batches()
        progress = tqdm(total=cfg.train.max_steps, initial=self.global_step, disable=not self.is_main, desc="train", dynamic_ncols=True)
        raw_unet = self.accelerator.unwrap_model(self.unet)  # once: unwrapping walks the module tree (~3 ms)
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
            self.ema.step(raw_unet.parameters())
            self.global_step += 1

            mean_loss = self.accelerator.reduce(torch.tensor(step_loss, device=self.accelerator.device), reduction="mean").item()
            self.history.append(mean_loss)
            progress.update(1)
            progress.set_postfix(loss=f"{mean_loss:.4f}", refresh=False)  # update() redraws at most every 0.1 s
            if self.global_step % cfg.train.log_every == 0 or self.global_step == cfg.train.max_steps:
                scalars = {"train/loss": mean_loss, "train/lr": self.lr_scheduler.get_last_lr()[0]}
                if grad_norm is not None:
                    scalars["train/grad_norm"] = float(grad_norm)
                self.tensorboard.scalars(scalars, self.global_step)
                log.info("step %d/%d loss %.5f lr %.3g", self.global_step, cfg.train.max_steps, mean_loss, scalars["train/lr"])
            if cfg.sample.every_n_steps and self.global_step % cfg.sample.every_n_steps == 0 and self.global_step < cfg.train.max_steps:
                self.sample()
            validate_every = cfg.train.validate_every or cfg.sample.every_n_steps
            if validate_every and self.global_step % validate_every == 0 and self.global_step < cfg.train.max_steps:
                self.validate()
            if cfg.train.checkpoint_every and self.global_step % cfg.train.checkpoint_every == 0:
                self.save_checkpoint()
            signum = self._stop_signal()
            if signum:
                if self.last_checkpoint_step != self.global_step:
                    self.save_checkpoint()
                progress.close()
                raise TrainingInterrupted(self.global_step, signum)
        if self.last_checkpoint_step != self.global_step:
            self.save_checkpoint()
        progress.close()
        self.train_seconds = time.perf_counter() - start

    # ------------------------------------------------------------------ checkpoints
    def _stateful_objects(self) -> dict:
        """Everything besides UNet, EMA and RNGs whose state a checkpoint holds, by name."""
        objects = {"optimizer": self.optimizer, "lr_scheduler": self.lr_scheduler, "sampler": self.sampler,
                   "dataset": self.dataset, "loss_history": self.history}
        tag_weighter = getattr(self, "tag_weighter", None)
        if tag_weighter is not None:
            objects["tag_weighter"] = tag_weighter
        if self.accelerator.scaler is not None:
            objects["grad_scaler"] = self.accelerator.scaler
        return objects

    def save_checkpoint(self) -> Path | None:
        """The full training state of this step (every rank's RNG), written atomically by the main process."""
        from accelerate.utils import gather_object

        rng = capture_rng_state(self.generator)
        rng_states = gather_object([rng]) if self.accelerator.num_processes > 1 else [rng]
        path = None
        if self.is_main:
            request = SaveRequest(
                step=self.global_step, epoch=self.sampler.epoch, unet=self.accelerator.unwrap_model(self.unet), ema=self.ema,
                objects=self._stateful_objects(), rng_states=rng_states,
                config_tree=self.config.model_dump(mode="json"), config_yaml=dump_config(self.config),
            )
            path = save_checkpoint(self.paths.checkpoints, request, keep_last_n=self.config.train.keep_last_n)
        self.last_checkpoint_step = self.global_step
        self.accelerator.wait_for_everyone()
        return path

    def resume(self, folder: Path) -> None:
        checkpoint = load_checkpoint(folder)
        restore_training_state(checkpoint, unet=self.accelerator.unwrap_model(self.unet), ema=self.ema, objects=self._stateful_objects(),
                               generator=self.generator, rank=self.accelerator.process_index)
        self.global_step = checkpoint.step
        self.last_checkpoint_step = checkpoint.step
        log.info("resumed from %s: step %d, epoch %d", folder, checkpoint.step, checkpoint.epoch)

    def _stop_signal(self) -> int:
        """The signal that asked this run to stop (0: none); all ranks agree, so all stop at the same step."""
        signum = self.stop_signals.signum
        if self.accelerator.num_processes > 1:
            signum = int(self.accelerator.gather(torch.tensor([signum], device=self.accelerator.device)).max().item())
        return signum

    def _rank_fingerprints(self) -> list[str]:
        """Every rank's UNet weights digest (all ranks call this); differing digests mean the replicas diverged."""
        from accelerate.utils import gather_object

        fingerprint = weights_fingerprint(self.accelerator.unwrap_model(self.unet))
        fingerprints = gather_object([fingerprint]) if self.accelerator.num_processes > 1 else [fingerprint]
        if len(set(fingerprints)) > 1:
            log.error("the UNet weights differ across ranks after training (fingerprints %s): the replicas diverged", fingerprints)
        return fingerprints

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
        kwargs = sampling_kwargs(cfg)
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

    def validate(self) -> dict | None:
        """Held-out loss at fixed timesteps and noise, raw and EMA weights; logged per timestep bin.

        Returns {"raw": ValidationLoss, "ema": ...} (EMA only when on), or None without a held-out split.
        """
        self.accelerator.wait_for_everyone()
        if not self.is_main or self.validation_dataset is None:
            return None
        unet = self.accelerator.unwrap_model(self.unet)
        results = {"raw": self._validation_loss(unet)}
        if self.ema.enabled:
            self.ema.store(unet.parameters())
            self.ema.copy_to(unet.parameters())
            results["ema"] = self._validation_loss(unet)
            self.ema.restore(unet.parameters())
        for label, result in results.items():
            self.tensorboard.scalars(result.scalars(f"validation/{label}"), self.global_step)
            log.info("validation (%s weights) at step %d: %s", label, self.global_step, result.describe())
        return results

    def _validation_loss(self, unet):
        return validation_loss(unet, self.validation_dataset, self.objective, device=self.accelerator.device, autocast=self.accelerator.autocast)

    def _export_single_file(self, summary: dict) -> Path:
        """final.safetensors: the weights of final/ (EMA when on) as one original-layout SDXL file."""
        cfg = self.config
        figures = {k: summary[k] for k in ("steps", "images", "final_loss", "prediction_type", "zero_terminal_snr", "final_weights", "base_model")}
        metadata = modelspec_metadata(title=self.paths.root.name, figures=figures, prediction_type=cfg.objective.prediction_type,
                                      resolution=cfg.data.resolution)
        unet = self.accelerator.unwrap_model(self.unet)
        self.ema.store(unet.parameters())
        self.ema.copy_to(unet.parameters())
        path = write_single_file(self.components, self.paths.root / "final.safetensors", metadata=metadata,
                                 prediction_type=cfg.objective.prediction_type, zero_terminal_snr=cfg.objective.zero_terminal_snr)
        self.ema.restore(unet.parameters())
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
        fingerprints = self._rank_fingerprints()
        # Every rank enters these two (they synchronise); only the main process does the work.
        sample_path = self.sample()
        validation = self.validate()
        if self.is_main:
            unet = self.accelerator.unwrap_model(self.unet)
            self.ema.store(unet.parameters())
            self.ema.copy_to(unet.parameters())
            pipeline = build_pipeline(self.components, unet, self.objective.scheduler_config())
            pipeline.save_pretrained(self.paths.final, safe_serialization=True)
            self.ema.restore(unet.parameters())
            mismatches = saved_scheduler_problems(self.paths.final, self.objective.config)
            if mismatches:
                raise RuntimeError("the saved pipeline's scheduler does not match training: " + "; ".join(mismatches))
            summary = {
                "steps": self.global_step,
                "initial_loss": self.history.head_mean(),
                "final_loss": self.history.tail_mean(),
                "wall_seconds": round(self.train_seconds, 3),
                "images": self.dataset.num_images,
                "epoch_items": len(self.dataset),
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
                "processes": self.accelerator.num_processes,
                "rank_weight_fingerprints": fingerprints,
            }
            if cfg.tag_weighting.enabled:
                tag_summary = self.tag_weighter.summary(top_k=5)
                summary["tag_weighting"] = {
                    "alpha": cfg.tag_weighting.alpha, "weights": tag_summary["weights"],
                    "most_upweighted": [(e["tag"], e["count"], round(e["weight"], 4)) for e in tag_summary["most_upweighted"]],
                    "most_downweighted": [(e["tag"], e["count"], round(e["weight"], 4)) for e in tag_summary["most_downweighted"]],
                }
            if validation is not None:
                # The loss of the weights in final/ (EMA when on), on the held-out split.
                summary["validation_loss"] = validation["ema" if self.ema.enabled else "raw"].loss
                summary["validation"] = {label: result.to_json_dict() for label, result in validation.items()}
            if cfg.output.export_single_file:
                summary["single_file"] = str(self._export_single_file(summary).relative_to(self.paths.root))
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
    with trainer.stop_signals:
        trainer.train()
    return trainer.finish()
