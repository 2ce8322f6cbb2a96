"""Build the built-in tiny SDXL base shipped as `builtin:tiny-base`.

    python scripts/build_tiny_base.py [--out src/sdxl_trainer/assets/tiny-base]

Deterministic given the recipe's seed; see sdxl_trainer/models/tiny_base.py for the regime.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

from sdxl_trainer.models.setup import BUILTIN_MODELS
from sdxl_trainer.models.tiny_base import TinyBaseRecipe, build_tiny_base
from sdxl_trainer.utils.logging import setup_logging


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=BUILTIN_MODELS["tiny-base"])
    parser.add_argument("--vae-steps", type=int, default=TinyBaseRecipe.vae_steps)
    parser.add_argument("--unet-steps", type=int, default=TinyBaseRecipe.unet_steps)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vae-from", type=Path, default=None,
                        help="reuse the VAE of a pipeline folder built with the same VAE recipe (skips that stage)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    setup_logging()
    recipe = TinyBaseRecipe(vae_steps=args.vae_steps, unet_steps=args.unet_steps)
    with tempfile.TemporaryDirectory() as work:
        staging = Path(work) / "model"
        figures = build_tiny_base(staging, Path(work), recipe, vae_from=args.vae_from)
        if args.out.exists():
            shutil.rmtree(args.out)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(staging, args.out)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
