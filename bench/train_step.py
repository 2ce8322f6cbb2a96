"""The trainer's step time against the bare step of the same UNet and batch (the physical limit).

Run: python bench/train_step.py [--rounds 8] [--steps 10] [--batch-size 4] [--resolution 128]
                                [--threads 1] [--ema] [--clip]

One `Trainer` (tiny SDXL, warm latent cache, CPU) is set up once. Each round times `--steps`
steps of `Trainer.train()` (sampler, cache reads, collate, noise, loss, backward, optimizer,
LR schedule, loss reduce, progress bar, logging) and then `--steps` bare steps: forward +
backward + optimizer step of the same UNet and optimizer on one batch prepared in advance.
Rounds alternate, so machine noise hits both sides alike; the figure is the median of the
per-round ratios. EMA and clipping are off by default on both sides (they are extra math, not
overhead); --ema/--clip put them in the trainer's side to show their cost.

Target: ratio <= 1.05. The last line printed is `ratio=<trainer step / bare step>`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from cache_throughput import machine_info
from sdxl_trainer.config import load_config
from sdxl_trainer.data.demo import DEMO_WORDS, write_demo_dataset
from sdxl_trainer.models.tiny import build_tiny_components, save_as_pipeline
from sdxl_trainer.training.loss import DiffusionObjective, ObjectiveConfig
from sdxl_trainer.training.trainer import Trainer
from sdxl_trainer.training.utils import unet_forward


def tiny_pipeline(folder: Path) -> Path:
    from diffusers import EulerDiscreteScheduler

    scheduler = DiffusionObjective(ObjectiveConfig()).scheduler_config()
    return save_as_pipeline(build_tiny_components(DEMO_WORDS, seed=0), EulerDiscreteScheduler(**scheduler), folder)


def make_trainer(work: Path, args: argparse.Namespace) -> Trainer:
    data = write_demo_dataset(work / "data", num_images=64, resolution=args.resolution, seed=0)
    config = load_config(None, [
        f"model.pretrained={tiny_pipeline(work / 'pipeline')}", f"data.root={data}", f"data.resolution={args.resolution}",
        f"cache.dir={work / 'cache'}", "cache.num_workers=0", f"output.dir={work / 'run'}",
        "train.device=cpu", "train.max_steps=1000000", f"train.batch_size={args.batch_size}", "train.log_every=10",
        f"train.ema.enabled={str(args.ema).lower()}", f"train.max_grad_norm={1.0 if args.clip else 0.0}",
    ])
    trainer = Trainer(config)
    trainer.setup()
    return trainer


def trainer_seconds(trainer: Trainer, steps: int) -> float:
    target = trainer.global_step + steps
    trainer.config.train.max_steps = target
    trainer.last_checkpoint_step = target  # the end-of-run checkpoint is not part of a step
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start


def bare_batch(trainer: Trainer) -> dict[str, torch.Tensor]:
    """One batch through the same objective, prepared once (noise, timesteps, target), untimed."""
    dataset, objective = trainer.dataset, trainer.objective
    batch = dataset.collate([dataset[i] for i in range(trainer.config.train.batch_size)])
    latents = batch["latents"]
    generator = torch.Generator().manual_seed(0)
    noise = objective.sample_noise(latents, generator)
    timesteps = objective.sample_timesteps(latents.shape[0], generator, device="cpu")
    return {
        "noisy": objective.add_noise(latents, noise, timesteps), "timesteps": timesteps,
        "target": objective.target(latents, noise, timesteps), "prompt_embeds": batch["prompt_embeds"],
        "pooled_prompt_embeds": batch["pooled_prompt_embeds"], "time_ids": batch["time_ids"],
    }


def bare_seconds(trainer: Trainer, batch: dict[str, torch.Tensor], steps: int) -> float:
    # The raw module and torch optimizer: accelerate's wrappers count as the trainer's overhead.
    unet, optimizer = trainer.accelerator.unwrap_model(trainer.unet), trainer.optimizer.optimizer
    start = time.perf_counter()
    for _ in range(steps):
        output = unet_forward(unet, batch["noisy"], batch["timesteps"], prompt_embeds=batch["prompt_embeds"],
                              pooled_prompt_embeds=batch["pooled_prompt_embeds"], time_ids=batch["time_ids"])
        loss = torch.nn.functional.mse_loss(output.float(), batch["target"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="steps per side per round")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is steadiest on a shared machine)")
    parser.add_argument("--ema", action="store_true", help="EMA on in the trainer (extra math, not overhead)")
    parser.add_argument("--clip", action="store_true", help="gradient clipping on in the trainer")
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    parser.add_argument("--profile", type=Path, help="write a cProfile of the trainer's rounds here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench-train-step-") as scratch:
        work = args.work or Path(scratch)
        trainer = make_trainer(work, args)
        batch = bare_batch(trainer)
        trainer_seconds(trainer, 2)  # warm-up: first-call allocations, optimizer state
        bare_seconds(trainer, batch, 2)
        profiler = None
        if args.profile:
            import cProfile

            profiler = cProfile.Profile()
        ratios, trainer_total, bare_total = [], 0.0, 0.0
        for _ in range(args.rounds):
            if profiler:
                profiler.enable()
            t = trainer_seconds(trainer, args.steps)
            if profiler:
                profiler.disable()
            b = bare_seconds(trainer, batch, args.steps)
            ratios.append(t / b)
            trainer_total += t
            bare_total += b
        if profiler:
            profiler.dump_stats(str(args.profile))

    steps = args.rounds * args.steps
    figures = {
        "machine": machine_info(),
        "batch_size": args.batch_size, "resolution": args.resolution, "rounds": args.rounds, "steps_per_round": args.steps,
        "ema": args.ema, "clip": args.clip,
        "trainer_step_ms": round(1000 * trainer_total / steps, 2), "bare_step_ms": round(1000 * bare_total / steps, 2),
        "round_ratios": [round(r, 4) for r in ratios],
    }
    print(json.dumps(figures, indent=2))
    ratio = statistics.median(ratios)
    print(f"overhead {100 * (ratio - 1):+.1f}% (target <= +5%)", file=sys.stderr)
    print(f"ratio={ratio:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
