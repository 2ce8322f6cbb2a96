"""Loading SDXL components: the built-in tiny model, a local diffusers folder, or a Hub id.

Nothing is downloaded unless the user asked for a Hub id and the machine is online.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import huggingface_hub
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

import sdxl_trainer
from sdxl_trainer.models.tiny import TinyComponents

BUILTIN_PREFIX = "builtin:"
BUILTIN_MODELS: dict[str, Path] = {
    "tiny-base": Path(sdxl_trainer.__file__).parent / "assets" / "tiny-base",
}
BUILTIN_BUILD_COMMANDS = {"tiny-base": "python scripts/build_tiny_base.py"}

SCHEDULER_CONFIG = "scheduler_config.json"
# Subfolder of a diffusers SDXL folder -> files of which at least one must be there.
REQUIRED_FILES: dict[str, tuple[str, ...]] = {
    "unet": ("config.json",),
    "vae": ("config.json",),
    "text_encoder": ("config.json",),
    "text_encoder_2": ("config.json",),
    "tokenizer": ("tokenizer.json", "vocab.json"),
    "tokenizer_2": ("tokenizer.json", "vocab.json"),
    "scheduler": (SCHEDULER_CONFIG,),
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TRUE_VALUES = {"1", "ON", "YES", "TRUE"}


class ModelLoadError(ValueError):
    """A model could not be loaded; the message says what, where, and what to do."""


@dataclass
class SDXLComponents(TinyComponents):
    """The six SDXL parts (as the tiny model builds them) plus where they came from."""

    scheduler_config: dict[str, Any]
    source: str  # where the components came from, for logs and model cards


def hub_offline() -> bool:
    # The environment is read at call time: huggingface_hub's constant is fixed at import.
    env = os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE_VALUES
    return env or bool(huggingface_hub.constants.HF_HUB_OFFLINE)


def _resolve_builtin(name: str) -> Path:
    if name not in BUILTIN_MODELS:
        available = ", ".join(BUILTIN_PREFIX + known for known in sorted(BUILTIN_MODELS))
        raise ModelLoadError(f"unknown built-in model {BUILTIN_PREFIX + name!r}; available: {available}")
    folder = Path(BUILTIN_MODELS[name])
    if not (folder / "model_index.json").is_file():
        raise ModelLoadError(
            f"the built-in model {BUILTIN_PREFIX + name!r} has not been built yet "
            f"(no model_index.json in {folder}); build it with "
            f"`{BUILTIN_BUILD_COMMANDS.get(name, 'the build script of this model')}`"
        )
    return folder


def resolve_pretrained(pretrained: str) -> str | Path:
    """Where `pretrained` lives: a local Path (built-in or existing path) or a Hub id (str)."""
    if pretrained.startswith(BUILTIN_PREFIX):
        return _resolve_builtin(pretrained[len(BUILTIN_PREFIX) :])
    path = Path(pretrained).expanduser()
    if path.exists():
        return path
    if not _HUB_ID.match(pretrained):
        hint = ""
        if pretrained in BUILTIN_MODELS:
            hint = f"; did you mean {BUILTIN_PREFIX + pretrained!r}?"
        raise ModelLoadError(
            f"{pretrained!r} is neither an existing local path nor a Hub id (owner/name){hint}"
        )
    if hub_offline():
        raise ModelLoadError(
            f"{pretrained!r} is not a local path, and as a Hub id it cannot be fetched because "
            "HF_HUB_OFFLINE is set; pass a local diffusers folder (or a built-in such as "
            f"{BUILTIN_PREFIX}tiny-base), or unset HF_HUB_OFFLINE to download it"
        )
    return pretrained


def missing_parts(folder: Path) -> list[str]:
    """The subfolders (or their key files) that a diffusers SDXL folder lacks, as readable names."""
    missing = []
    for subfolder, alternatives in REQUIRED_FILES.items():
        if not (folder / subfolder).is_dir():
            missing.append(f"{subfolder}/")
        elif not any((folder / subfolder / name).is_file() for name in alternatives):
            missing.append(f"{subfolder}/{' or '.join(alternatives)}")
    return missing


def _check_diffusers_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise ModelLoadError(f"{folder} is not a folder")
    missing = missing_parts(folder)
    if missing:
        raise ModelLoadError(
            f"{folder} is not a complete diffusers SDXL folder: missing {', '.join(missing)}. "
            "Point to the root of a StableDiffusionXLPipeline folder (the one with model_index.json "
            "and unet/, vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/)"
        )


def _load_single_file(path: Path, *, config_dir: str | Path | None, dtype: torch.dtype, device: torch.device | str) -> SDXLComponents:
    """An original-layout SDXL .safetensors (ComfyUI/A1111 style) + a local diffusers config folder, offline."""
    from diffusers import StableDiffusionXLPipeline

    if path.suffix != ".safetensors":
        raise ModelLoadError(f"{path} is a file but not a .safetensors single-file checkpoint; pass a .safetensors file or a diffusers folder")
    if config_dir is None:
        raise ModelLoadError(
            f"{path} is a single-file checkpoint: set model.config_dir to a local diffusers SDXL folder "
            "(model_index.json, */config.json, tokenizer/, tokenizer_2/, scheduler/) that describes its architecture"
        )
    config_dir = Path(config_dir).expanduser()
    _check_diffusers_folder(config_dir)
    try:
        pipeline = StableDiffusionXLPipeline.from_single_file(
            str(path), config=str(config_dir), local_files_only=True, torch_dtype=dtype
        )
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ModelLoadError(f"could not load the single-file checkpoint {path} with the configs of {config_dir}: {err}") from err
    try:
        scheduler_config = _read_scheduler_config(config_dir, True)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not read scheduler/{SCHEDULER_CONFIG} of {config_dir}: {err}") from err
    models = {name: getattr(pipeline, name).to(device) for name in ("unet", "vae", "text_encoder", "text_encoder_2")}
    return SDXLComponents(
        **models, tokenizer=pipeline.tokenizer, tokenizer_2=pipeline.tokenizer_2, scheduler_config=scheduler_config,
        source=f"single file {path.resolve()} (configs from {config_dir.resolve()})",
    )


def _read_scheduler_config(location: str | Path, local_files_only: bool) -> dict[str, Any]:
    if isinstance(location, Path):
        config_path = location / "scheduler" / SCHEDULER_CONFIG
    else:
        config_path = huggingface_hub.hf_hub_download(
            location, SCHEDULER_CONFIG, subfolder="scheduler", local_files_only=local_files_only
        )
    with open(config_path, encoding="utf-8") as handle:
        return json.load(handle)


def load_components(
    pretrained: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    local_files_only: bool | None = None,
    config_dir: str | Path | None = None,
) -> SDXLComponents:
    """Load the SDXL components of `pretrained` (builtin:NAME, a diffusers folder, a single
    .safetensors file with `config_dir`, or a Hub id)."""
    location = resolve_pretrained(pretrained)
    if isinstance(location, Path):
        if location.is_file():
            return _load_single_file(location, config_dir=config_dir, dtype=dtype, device=device)
        _check_diffusers_folder(location)
        source = (
            f"built-in {pretrained[len(BUILTIN_PREFIX):]} ({location})"
            if pretrained.startswith(BUILTIN_PREFIX)
            else f"diffusers folder {location.resolve()}"
        )
        local_files_only = True
    else:
        source = f"Hugging Face Hub {location}"
        local_files_only = bool(local_files_only)

    common = {"local_files_only": local_files_only}
    loaders = {
        "unet": lambda: UNet2DConditionModel.from_pretrained(
            location, subfolder="unet", torch_dtype=dtype, **common
        ),
        "vae": lambda: AutoencoderKL.from_pretrained(
            location, subfolder="vae", torch_dtype=dtype, **common
        ),
        "text_encoder": lambda: CLIPTextModel.from_pretrained(
            location, subfolder="text_encoder", dtype=dtype, **common
        ),
        "text_encoder_2": lambda: CLIPTextModelWithProjection.from_pretrained(
            location, subfolder="text_encoder_2", dtype=dtype, **common
        ),
        "tokenizer": lambda: CLIPTokenizer.from_pretrained(location, subfolder="tokenizer", **common),
        "tokenizer_2": lambda: CLIPTokenizer.from_pretrained(
            location, subfolder="tokenizer_2", **common
        ),
    }
    loaded: dict[str, Any] = {}
    for name, load in loaders.items():
        try:
            loaded[name] = load()
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"could not load {name}/ of {source}: {err}") from err
    try:
        scheduler_config = _read_scheduler_config(location, local_files_only)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not read scheduler/{SCHEDULER_CONFIG} of {source}: {err}") from err

    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        loaded[name] = loaded[name].to(device)
    return SDXLComponents(**loaded, scheduler_config=scheduler_config, source=source)


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    """No gradients and eval mode (dropout off) for a module that is not trained."""
    module.requires_grad_(False)
    module.eval()
    return module


def enable_gradient_checkpointing(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """Trade compute for memory: recompute UNet activations in the backward pass."""
    unet.enable_gradient_checkpointing()
    return unet


def attention_backend(unet: torch.nn.Module) -> str:
    """The attention processors in use, named for logs (AttnProcessor2_0 is PyTorch SDPA)."""
    processors = sorted({type(processor).__name__ for processor in unet.attn_processors.values()})
    names = ", ".join(processors) or "none"
    return f"{names} (PyTorch scaled_dot_product_attention)" if processors == ["AttnProcessor2_0"] else names


def prepare_unet_for_training(
    unet: UNet2DConditionModel, *, gradient_checkpointing: bool, dtype: torch.dtype = torch.float32, compile: bool = False
) -> UNet2DConditionModel:
    """Trainable, in train mode, in `dtype` (bf16 for full-bf16 training), optionally checkpointed and compiled.

    `Module.compile` compiles the forward in place: the module, its state_dict keys and
    `save_pretrained` stay as they were.
    """
    unet.requires_grad_(True)
    unet.train()
    if gradient_checkpointing:
        enable_gradient_checkpointing(unet)
    if unet.dtype != dtype:
        unet.to(dtype=dtype)
    if compile:
        unet.compile()
    return unet
