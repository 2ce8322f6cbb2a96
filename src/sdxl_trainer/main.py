"""Command-line entry: `sdxl-trainer COMMAND ...` and `python -m sdxl_trainer COMMAND ...`.

Exit codes: 0 success, 2 bad input or configuration, 1 internal failure; a training run stopped by
SIGINT/SIGTERM saves a checkpoint and exits with 128 + the signal number (130, 143).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2

DEMO_STEPS = 400


def demo_overrides(output: Path, steps: int) -> list[str]:
    """The demo job: fine-tune the built-in tiny base (epsilon, SDXL betas) to v-prediction + ZTSNR."""
    return [
        "model.pretrained=builtin:tiny-base",
        f"data.root={output / 'data'}",
        "data.resolution=256",
        f"cache.dir={output / 'cache'}",
        f"output.dir={output}",
        f"train.max_steps={steps}",
        "train.batch_size=8",
        "train.learning_rate=3e-4",
        f"train.lr_warmup_steps={min(20, steps // 10)}",
        "train.log_every=20",
        "data.validation_fraction=0.05",
        # Classifier-free guidance subtracts the unconditional prediction: it must be trained for the new
        # objective too (see model_validator.unconditional_branch_warnings).
        "data.caption_dropout=0.1",
        # 400 steps are too few for an EMA: its average still holds weights from before the model learned
        # the pure-noise step (measured with `evaluate`: black 0.27 with EMA weights vs 0.05 raw).
        "train.ema.enabled=false",
        "objective.prediction_type=v_prediction",
        "objective.zero_terminal_snr=true",
        "objective.loss_weighting=min_snr",
        "objective.min_snr_floor=0.1",
        f"sample.every_n_steps={max(steps // 2, 1)}",
        "sample.num_inference_steps=20",
        "sample.guidance_scale=3.0",
        "sample.guidance_rescale=0.7",
    ]


def _bad_input_errors() -> tuple[type[BaseException], ...]:
    from sdxl_trainer.config import ConfigError
    from sdxl_trainer.data.dataset import DatasetError
    from sdxl_trainer.models.evaluate import EvaluateError
    from sdxl_trainer.models.model_validator import ModelCheckError
    from sdxl_trainer.models.setup import ModelLoadError
    from sdxl_trainer.training.perceptual import MissingLPIPSWeightsError
    from sdxl_trainer.utils.device import DeviceError
    from sdxl_trainer.utils.export import ExportError
    from sdxl_trainer.utils.hub import HubInputError

    return (ConfigError, DatasetError, ModelLoadError, DeviceError, ModelCheckError, EvaluateError, ExportError, HubInputError,
            MissingLPIPSWeightsError)


def _internal_errors() -> tuple[type[BaseException], ...]:
    from sdxl_trainer.training.utils import NonFiniteLossError
    from sdxl_trainer.utils.checkpoint import CheckpointError
    from sdxl_trainer.utils.hub import HubServerError

    return (NonFiniteLossError, CheckpointError, HubServerError)


def cmd_init_config(args: argparse.Namespace) -> int:
    from sdxl_trainer.config import example_config

    text = example_config()
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(text)
    return EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    from sdxl_trainer.config import load_config
    from sdxl_trainer.training.interrupt import TrainingInterrupted
    from sdxl_trainer.training.trainer import run_training

    config = load_config(args.config, args.overrides)
    try:
        summary = run_training(config)
    except TrainingInterrupted as stop:
        print(f"interrupted at step {stop.step}; resume with train.resume=latest", file=sys.stderr)
        return stop.exit_code
    if summary:
        print(json.dumps({"output": config.output.dir, **{k: summary[k] for k in ("steps", "initial_loss", "final_loss", "wall_seconds")}}))
    return EXIT_OK


def cmd_cache(args: argparse.Namespace) -> int:
    import torch

    from sdxl_trainer.config import load_config
    from sdxl_trainer.models.setup import load_components
    from sdxl_trainer.training.trainer import prepare_dataset
    from sdxl_trainer.utils.device import resolve_device
    from sdxl_trainer.utils.logging import setup_logging

    config = load_config(args.config, args.overrides)
    setup_logging()
    device = resolve_device(config.train.device)
    components = load_components(config.model.pretrained, dtype=torch.float32, device=device, config_dir=config.model.config_dir)
    dataset, report, _, validation = prepare_dataset(config, components, device=device)
    print(json.dumps({"cache_dir": config.cache.dir, "items": len(dataset), "cached": report.cached, "reused": report.reused,
                      "skipped": len(report.skipped), "report": str(Path(config.cache.dir) / "report.json"),
                      "validation_items": len(validation) if validation is not None else 0}))
    return EXIT_OK


def cmd_validate(args: argparse.Namespace) -> int:
    """Model and sampler checks, then one sample grid (samples/validate.png) without training."""
    import torch

    from sdxl_trainer.config import load_config
    from sdxl_trainer.models.model_validator import (
        build_pipeline,
        generate_samples,
        image_grid,
        require_valid_model,
        unconditional_branch_warnings,
    )
    from sdxl_trainer.models.setup import freeze, load_components
    from sdxl_trainer.training.trainer import objective_from_config, sampling_kwargs
    from sdxl_trainer.utils.device import resolve_device
    from sdxl_trainer.utils.logging import get_logger, setup_logging

    config = load_config(args.config, args.overrides)
    setup_logging()
    log = get_logger("validate")
    device = resolve_device(config.train.device)
    components = load_components(config.model.pretrained, dtype=torch.float32, device=device, config_dir=config.model.config_dir)
    objective = objective_from_config(config)
    notes = require_valid_model(components, objective.config)
    for note in notes:
        log.info("model check: %s", note)
    warnings = unconditional_branch_warnings(components.scheduler_config, objective.config,
                                             caption_dropout=config.data.caption_dropout,
                                             guidance_scale=config.sample.guidance_scale)
    for warning in warnings:
        log.warning("model check: %s", warning)
    for module in (components.unet, components.vae, components.text_encoder, components.text_encoder_2):
        freeze(module)
    # The base model's own sampler shows what it can do now; the training sampler is what samples use.
    samplers = {"training sampler": objective.scheduler_config()}
    if notes:
        samplers = {"base sampler": components.scheduler_config, **samplers}
    rows = [
        generate_samples(build_pipeline(components, components.unet, scheduler_config), config.sample.prompts, **sampling_kwargs(config))
        for scheduler_config in samplers.values()
    ]
    path = Path(config.output.dir) / "samples" / "validate.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(rows, list(samplers), config.sample.prompts).save(path)
    print(json.dumps({"ok": True, "model": components.source, "prediction_type": objective.config.prediction_type,
                      "zero_terminal_snr": objective.config.zero_terminal_snr, "notes": notes, "warnings": warnings,
                      "sample": str(path)}))
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    from sdxl_trainer.models.evaluate import EvaluateSettings, evaluate_model
    from sdxl_trainer.utils.device import resolve_device
    from sdxl_trainer.utils.logging import setup_logging

    settings = EvaluateSettings(seeds=args.seeds, steps=args.steps, guidance=args.guidance,
                                guidance_rescale=args.guidance_rescale, size=args.size)
    setup_logging()
    report = evaluate_model(args.model, settings, Path(args.out), device=resolve_device(args.device), config_dir=args.config_dir)
    print(json.dumps(report))
    return EXIT_OK


def cmd_vae(args: argparse.Namespace) -> int:
    from sdxl_trainer.config import load_config
    from sdxl_trainer.models.vae_finetuner import run_vae_finetune

    config = load_config(args.config, args.overrides)
    report = run_vae_finetune(config)
    print(json.dumps({"output": config.output.dir, **{k: v for k, v in report.items() if not isinstance(v, (dict, list))}}))
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from sdxl_trainer.config import load_config
    from sdxl_trainer.data.demo import write_demo_dataset
    from sdxl_trainer.training.trainer import run_training

    output = Path(args.output)
    config = load_config(None, demo_overrides(output, args.steps) + list(args.overrides))
    write_demo_dataset(Path(config.data.root), num_images=args.images, resolution=config.data.resolution, seed=0)
    summary = run_training(config)
    print()
    print(f"demo finished in {summary['wall_seconds']:.0f} s of training: loss {summary['initial_loss']:.4f} -> {summary['final_loss']:.4f}")
    print(f"  run directory   {output}")
    print(f"  pipeline        {output / 'final'}   (StableDiffusionXLPipeline.from_pretrained)")
    print(f"  samples         {output / 'samples'}")
    print(f"  model card      {output / 'README.md'}")
    print(f"  summary         {output / 'summary.json'}")
    print(f"  TensorBoard     tensorboard --logdir {output / 'logs'}")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from sdxl_trainer.utils.export import export_model
    from sdxl_trainer.utils.logging import setup_logging

    setup_logging()
    out = export_model(Path(args.source), fmt=args.format, out=Path(args.out), ema=args.ema, dtype=args.dtype)
    print(json.dumps({"output": str(out), "format": args.format, "dtype": args.dtype}))
    return EXIT_OK


def cmd_push(args: argparse.Namespace) -> int:
    from sdxl_trainer.utils.hub import push_run
    from sdxl_trainer.utils.logging import setup_logging

    setup_logging()
    url = push_run(Path(args.run), args.repo_id, private=args.private, include_state=args.include_state)
    print(json.dumps({"repo_id": args.repo_id, "commit": url}))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdxl-trainer", description="Fine-tune Stable Diffusion XL: v-prediction, zero-terminal SNR, cached latents.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_config_command(name: str, help_text: str, func) -> None:
        command = commands.add_parser(name, help=help_text)
        command.add_argument("config", help="YAML config (see `sdxl-trainer init-config`)")
        command.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.max_steps=100")
        command.set_defaults(func=func)

    demo = commands.add_parser("demo", help="fine-tune the built-in tiny SDXL on the generated demo dataset (no network)")
    demo.add_argument("--output", default="runs/demo", help="run directory (default: runs/demo)")
    demo.add_argument("--steps", type=int, default=DEMO_STEPS, help=f"training steps (default: {DEMO_STEPS})")
    demo.add_argument("--images", type=int, default=256, help="demo images to generate (default: 256)")
    demo.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.learning_rate=1e-4")
    demo.set_defaults(func=cmd_demo)

    add_config_command("train", "train with a YAML config", cmd_train)

    add_config_command("cache", "build or refresh the latent/text-embedding cache without training", cmd_cache)

    add_config_command("validate", "check the model and sampler against the config, write one sample grid (no training)", cmd_validate)

    evaluate = commands.add_parser("evaluate", help="the ZTSNR experiment: black/white brightness and colour fidelity of solid-colour prompts")
    evaluate.add_argument("model", help="a run directory or its final/, a diffusers SDXL folder, or builtin:tiny-base")
    evaluate.add_argument("--out", default="evaluate", help="folder for evaluate.json and evaluate.png (default: ./evaluate)")
    evaluate.add_argument("--seeds", type=int, default=8, help="seeds 0..N-1 per prompt (default: 8)")
    evaluate.add_argument("--steps", type=int, default=25, help="sampler steps (default: 25)")
    evaluate.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (default: 5)")
    evaluate.add_argument("--guidance-rescale", type=float, default=0.0, help="guidance rescale, Lin et al. 2024 (default: 0)")
    evaluate.add_argument("--size", type=int, default=None, help="image side in pixels (default: the UNet's native size)")
    evaluate.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    evaluate.add_argument("--config-dir", default=None, help="local diffusers config folder when MODEL is a single .safetensors file")
    evaluate.set_defaults(func=cmd_evaluate)

    export = commands.add_parser("export", help="write a diffusers folder or a single-file SDXL .safetensors (ComfyUI/A1111 layout) from a run or checkpoint")
    export.add_argument("source", metavar="RUN_OR_CHECKPOINT", help="a run folder, a checkpoints/step-NNNNNN folder, or a diffusers folder")
    export.add_argument("--format", required=True, choices=("diffusers", "single-file"))
    export.add_argument("--out", required=True, help="output folder (diffusers) or .safetensors file (single-file)")
    weights = export.add_mutually_exclusive_group()
    weights.add_argument("--ema", dest="ema", action="store_true", default=None, help="EMA weights (default: EMA when the run had it)")
    weights.add_argument("--no-ema", dest="ema", action="store_false", help="the raw (non-EMA) weights of the latest checkpoint")
    export.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    export.set_defaults(func=cmd_export)

    push = commands.add_parser("push", help="upload a run (final/ pipeline, README.md, samples) to the Hugging Face Hub")
    push.add_argument("run", help="run folder")
    push.add_argument("--repo-id", required=True, help="owner/name on the Hub")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--include-state", action="store_true", help="also upload the latest checkpoint, logs/, config.yaml, summary.json, train.log")
    push.set_defaults(func=cmd_push)

    add_config_command("vae", "fine-tune the VAE (decoder by default) with reconstruction + perceptual loss; writes vae/, latent_stats.json, vae_report.json", cmd_vae)

    init = commands.add_parser("init-config", help="write a commented example config (stdout, or --out FILE)")
    init.add_argument("--out", help="file to write instead of stdout")
    init.set_defaults(func=cmd_init_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except _bad_input_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except _internal_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
