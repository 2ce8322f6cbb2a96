"""Command-line entry: `sdxl-trainer COMMAND ...` and `python -m sdxl_trainer COMMAND ...`.

Exit codes: 0 success, 2 bad input or configuration, 1 internal failure.
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
        "train.lr_warmup_steps=20",
        "train.log_every=20",
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
    from sdxl_trainer.models.setup import ModelLoadError
    from sdxl_trainer.utils.device import DeviceError

    return (ConfigError, DatasetError, ModelLoadError, DeviceError)


def _internal_errors() -> tuple[type[BaseException], ...]:
    from sdxl_trainer.training.utils import NonFiniteLossError

    return (NonFiniteLossError,)


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
    from sdxl_trainer.training.trainer import run_training

    config = load_config(args.config, args.overrides)
    summary = run_training(config)
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
    components = load_components(config.model.pretrained, dtype=torch.float32, device=device)
    dataset, report, _ = prepare_dataset(config, components, device=device)
    print(json.dumps({"cache_dir": config.cache.dir, "items": len(dataset), "cached": report.cached, "reused": report.reused,
                      "skipped": len(report.skipped), "report": str(Path(config.cache.dir) / "report.json")}))
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdxl-trainer", description="Fine-tune Stable Diffusion XL: v-prediction, zero-terminal SNR, cached latents.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="fine-tune the built-in tiny SDXL on the generated demo dataset (no network)")
    demo.add_argument("--output", default="runs/demo", help="run directory (default: runs/demo)")
    demo.add_argument("--steps", type=int, default=DEMO_STEPS, help=f"training steps (default: {DEMO_STEPS})")
    demo.add_argument("--images", type=int, default=256, help="demo images to generate (default: 256)")
    demo.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.learning_rate=1e-4")
    demo.set_defaults(func=cmd_demo)

    train = commands.add_parser("train", help="train with a YAML config")
    train.add_argument("config", help="YAML config (see `sdxl-trainer init-config`)")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.max_steps=100")
    train.set_defaults(func=cmd_train)

    cache = commands.add_parser("cache", help="build or refresh the latent/text-embedding cache without training")
    cache.add_argument("config")
    cache.add_argument("overrides", nargs="*", metavar="key=value")
    cache.set_defaults(func=cmd_cache)

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
