"""Exports: a diffusers pipeline folder, and a single-file SDXL .safetensors in the original (SGM) layout.

The single file is what ComfyUI, A1111/Forge and diffusers' `from_single_file` load:

- ``model.diffusion_model.*``  the UNet (``input_blocks`` / ``middle_block`` / ``output_blocks``)
- ``first_stage_model.*``      the VAE (``encoder.down.N.block.M``, 1x1-conv attention)
- ``conditioner.embedders.0.transformer.text_model.*``  CLIP ViT-L (Hugging Face names)
- ``conditioner.embedders.1.model.*``  OpenCLIP bigG (fused q/k/v ``in_proj``, transposed
  ``text_projection``, ``ln_final``, ``positional_embedding``, ``transformer.resblocks.N``)

The key mapping is derived from each model's config (levels, layers per level, which levels have
attention, mid-block layout, number of text layers), so it holds for SDXL and for any smaller or
larger model of the same family; a weight it has no name for is an error, never dropped.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from sdxl_trainer.utils.logging import get_logger

log = get_logger("export")

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer.text_model."
OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FORMATS = ("diffusers", "single-file")
MODELSPEC_ARCHITECTURE = "stable-diffusion-xl-v1-base"

_RESNET_RENAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                   "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_RESNET_RENAMES = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION_RENAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPEN_CLIP_LAYER_RENAMES = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                            "self_attn.out_proj": "attn.out_proj"}


class ExportError(ValueError):
    """An export that cannot be done as asked; the message says why and what to do."""


def _per_level(value: Any, levels: int) -> list[int]:
    return [int(value)] * levels if isinstance(value, int) else [int(v) for v in value]


@dataclass(frozen=True)
class _Prefix:
    sgm: str
    renames: dict[str, str] | None = None  # first-component renames inside the block (resnets)


def unet_prefix_map(config: dict) -> dict[str, _Prefix]:
    """diffusers UNet2DConditionModel module prefix -> SGM prefix, following SGM's block order."""
    down_types, up_types = list(config["down_block_types"]), list(config["up_block_types"])
    levels = len(down_types)
    layers = _per_level(config["layers_per_block"], levels)
    mapping = {
        "time_embedding.linear_1.": _Prefix("time_embed.0."),
        "time_embedding.linear_2.": _Prefix("time_embed.2."),
        "add_embedding.linear_1.": _Prefix("label_emb.0.0."),
        "add_embedding.linear_2.": _Prefix("label_emb.0.2."),
        "conv_in.": _Prefix("input_blocks.0.0."),
        "conv_norm_out.": _Prefix("out.0."),
        "conv_out.": _Prefix("out.2."),
    }
    block = 1
    for level, block_type in enumerate(down_types):
        for layer in range(layers[level]):
            mapping[f"down_blocks.{level}.resnets.{layer}."] = _Prefix(f"input_blocks.{block}.0.", _RESNET_RENAMES)
            if "CrossAttn" in block_type:
                mapping[f"down_blocks.{level}.attentions.{layer}."] = _Prefix(f"input_blocks.{block}.1.")
            block += 1
        if level < levels - 1:
            mapping[f"down_blocks.{level}.downsamplers.0.conv."] = _Prefix(f"input_blocks.{block}.0.op.")
            block += 1
    mid_type = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    mid_layers = 1  # UNet2DConditionModel builds its mid block with one attention layer
    if mid_type is None:
        pass
    elif mid_type == "UNetMidBlock2DCrossAttn":
        for layer in range(mid_layers + 1):
            mapping[f"mid_block.resnets.{layer}."] = _Prefix(f"middle_block.{2 * layer}.", _RESNET_RENAMES)
        for layer in range(mid_layers):
            mapping[f"mid_block.attentions.{layer}."] = _Prefix(f"middle_block.{2 * layer + 1}.")
    elif mid_type == "UNetMidBlock2D":
        for layer in range(mid_layers + 1):
            mapping[f"mid_block.resnets.{layer}."] = _Prefix(f"middle_block.{layer}.", _RESNET_RENAMES)
    else:
        raise ExportError(f"mid_block_type {mid_type!r} has no SGM layout")
    up_layers = list(reversed(layers))
    block = 0
    for level, block_type in enumerate(up_types):
        attention = "CrossAttn" in block_type
        for layer in range(up_layers[level] + 1):
            mapping[f"up_blocks.{level}.resnets.{layer}."] = _Prefix(f"output_blocks.{block}.0.", _RESNET_RENAMES)
            if attention:
                mapping[f"up_blocks.{level}.attentions.{layer}."] = _Prefix(f"output_blocks.{block}.1.")
            if layer == up_layers[level] and level < levels - 1:
                mapping[f"up_blocks.{level}.upsamplers.0.conv."] = _Prefix(f"output_blocks.{block}.{2 if attention else 1}.conv.")
            block += 1
    return mapping


def vae_prefix_map(config: dict) -> dict[str, _Prefix]:
    """diffusers AutoencoderKL prefix -> LDM/SGM prefix (the decoder's levels are numbered from the bottom)."""
    levels = len(config["down_block_types"])
    layers = int(config["layers_per_block"])
    mapping = {
        "encoder.conv_in.": _Prefix("encoder.conv_in."),
        "encoder.conv_out.": _Prefix("encoder.conv_out."),
        "encoder.conv_norm_out.": _Prefix("encoder.norm_out."),
        "decoder.conv_in.": _Prefix("decoder.conv_in."),
        "decoder.conv_out.": _Prefix("decoder.conv_out."),
        "decoder.conv_norm_out.": _Prefix("decoder.norm_out."),
        "quant_conv.": _Prefix("quant_conv."),
        "post_quant_conv.": _Prefix("post_quant_conv."),
    }
    for part in ("encoder", "decoder"):
        for layer in range(2):
            mapping[f"{part}.mid_block.resnets.{layer}."] = _Prefix(f"{part}.mid.block_{layer + 1}.", _VAE_RESNET_RENAMES)
        mapping[f"{part}.mid_block.attentions.0."] = _Prefix(f"{part}.mid.attn_1.", _VAE_ATTENTION_RENAMES)
    for level in range(levels):
        for layer in range(layers):
            mapping[f"encoder.down_blocks.{level}.resnets.{layer}."] = _Prefix(f"encoder.down.{level}.block.{layer}.", _VAE_RESNET_RENAMES)
        mapping[f"encoder.down_blocks.{level}.downsamplers.0.conv."] = _Prefix(f"encoder.down.{level}.downsample.conv.")
        ldm_level = levels - 1 - level
        for layer in range(layers + 1):
            mapping[f"decoder.up_blocks.{level}.resnets.{layer}."] = _Prefix(f"decoder.up.{ldm_level}.block.{layer}.", _VAE_RESNET_RENAMES)
        mapping[f"decoder.up_blocks.{level}.upsamplers.0.conv."] = _Prefix(f"decoder.up.{ldm_level}.upsample.conv.")
    return mapping


def _rename_by_prefix(state_dict: dict[str, torch.Tensor], mapping: dict[str, _Prefix], what: str) -> dict[str, tuple[str, torch.Tensor]]:
    """diffusers key -> (SGM key, tensor); the longest matching module prefix wins."""
    prefixes = sorted(mapping, key=len, reverse=True)
    renamed = {}
    for key, tensor in state_dict.items():
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        if prefix is None:
            raise ExportError(f"{what} weight {key!r} has no name in the SGM layout (unsupported block in this model's config)")
        target = mapping[prefix]
        rest = key[len(prefix):]
        for old, new in (target.renames or {}).items():
            if rest.startswith(old + "."):
                rest = new + rest[len(old):]
                break
        renamed[key] = (target.sgm + rest, tensor)
    return renamed


def unet_to_sgm(state_dict: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    renamed = _rename_by_prefix(state_dict, unet_prefix_map(config), "UNet")
    return {UNET_PREFIX + sgm: tensor for sgm, tensor in renamed.values()}


def vae_to_sgm(state_dict: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    out = {}
    for key, (sgm, tensor) in _rename_by_prefix(state_dict, vae_prefix_map(config), "VAE").items():
        if ".mid.attn_1." in sgm and tensor.ndim == 2:  # LDM attention is 1x1 convolutions
            tensor = tensor.reshape(*tensor.shape, 1, 1)
        out[VAE_PREFIX + sgm] = tensor
    return out


def _strip_text_model(key: str) -> str:
    # transformers >= 5.6 flattened CLIPTextModel (no `text_model.`); the projection model keeps it.
    return key.removeprefix("text_model.")


def clip_l_to_sgm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIP ViT-L (transformers CLIPTextModel): the original file keeps Hugging Face names."""
    return {CLIP_L_PREFIX + _strip_text_model(k): v for k, v in state_dict.items() if not k.endswith("position_ids")}


def open_clip_to_sgm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP bigG (transformers CLIPTextModelWithProjection) -> open_clip names."""
    flat = {_strip_text_model(k): v for k, v in state_dict.items() if not k.endswith("position_ids")}
    out: dict[str, torch.Tensor] = {}
    fixed = {
        "embeddings.token_embedding.weight": "token_embedding.weight",
        "embeddings.position_embedding.weight": "positional_embedding",
        "final_layer_norm.weight": "ln_final.weight",
        "final_layer_norm.bias": "ln_final.bias",
    }
    used = set()
    for key, name in fixed.items():
        out[OPEN_CLIP_PREFIX + name] = flat[key]
        used.add(key)
    if "text_projection.weight" in flat:
        # open_clip computes x @ text_projection: the transpose of the Linear weight.
        out[OPEN_CLIP_PREFIX + "text_projection"] = flat["text_projection.weight"].T.contiguous()
        used.add("text_projection.weight")
    layers = sorted({int(k.split(".")[2]) for k in flat if k.startswith("encoder.layers.")})
    for layer in layers:
        source = f"encoder.layers.{layer}."
        target = f"{OPEN_CLIP_PREFIX}transformer.resblocks.{layer}."
        for kind in ("weight", "bias"):
            parts = [f"{source}self_attn.{p}_proj.{kind}" for p in ("q", "k", "v")]
            out[f"{target}attn.in_proj_{kind}"] = torch.cat([flat[p] for p in parts], dim=0)
            used.update(parts)
        for key in flat:
            if not key.startswith(source) or key in used:
                continue
            rest = key[len(source):]
            for old, new in _OPEN_CLIP_LAYER_RENAMES.items():
                if rest.startswith(old + "."):
                    out[target + new + rest[len(old):]] = flat[key]
                    used.add(key)
                    break
    unknown = sorted(set(flat) - used)
    if unknown:
        raise ExportError(f"text encoder 2 weights with no open_clip name: {', '.join(unknown[:5])}")
    return out


def sdxl_single_file_state_dict(unet_state: dict, unet_config: dict, vae_state: dict, vae_config: dict,
                                text_encoder_state: dict, text_encoder_2_state: dict) -> dict[str, torch.Tensor]:
    """The four models' state dicts in the original SGM layout of one SDXL file."""
    return {
        **unet_to_sgm(unet_state, unet_config),
        **vae_to_sgm(vae_state, vae_config),
        **clip_l_to_sgm(text_encoder_state),
        **open_clip_to_sgm(text_encoder_2_state),
    }


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in module.state_dict().items()}


def _config(module) -> dict:
    return dict(module.config)


def modelspec_metadata(*, title: str, figures: dict[str, Any] | None = None, prediction_type: str | None = None,
                       resolution: int | None = None) -> dict[str, str]:
    """Header metadata: Stability's ModelSpec keys plus this trainer's figures (strings only)."""
    metadata = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": MODELSPEC_ARCHITECTURE,
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": title,
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if prediction_type is not None:
        metadata["modelspec.prediction_type"] = {"epsilon": "epsilon", "v_prediction": "v"}[prediction_type]
    if resolution is not None:
        metadata["modelspec.resolution"] = f"{resolution}x{resolution}"
    for key, value in (figures or {}).items():
        metadata[f"sdxl_trainer.{key}"] = value if isinstance(value, str) else json.dumps(value)
    return metadata


def write_single_file(components, out: Path, *, dtype: torch.dtype = torch.float32, metadata: dict[str, str] | None = None,
                      prediction_type: str | None = None, zero_terminal_snr: bool = False) -> Path:
    """Write `components` (unet, vae, text_encoder, text_encoder_2) as one SGM-layout .safetensors.

    v-prediction / zero-terminal-SNR models carry the empty marker tensors `v_pred` / `ztsnr`,
    which ComfyUI and Forge read to pick the right sampling.
    """
    state = sdxl_single_file_state_dict(
        _state(components.unet), _config(components.unet), _state(components.vae), _config(components.vae),
        _state(components.text_encoder), _state(components.text_encoder_2),
    )
    state = {k: v.detach().to("cpu", dtype=dtype if v.is_floating_point() else v.dtype).contiguous() for k, v in state.items()}
    if prediction_type == "v_prediction":
        state["v_pred"] = torch.zeros(0)
    if zero_terminal_snr:
        state["ztsnr"] = torch.zeros(0)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file(state, str(tmp), metadata=metadata)
    tmp.replace(out)
    return out


# ---------------------------------------------------------------------------- export command
@dataclass
class ExportSource:
    """What an export reads: a diffusers folder, or a checkpoint (its UNet/EMA + the run's base components)."""

    kind: str  # "diffusers" | "checkpoint"
    path: Path
    run_dir: Path | None


def resolve_export_source(source: Path, *, ema: bool | None) -> ExportSource:
    """RUN_OR_CHECKPOINT -> what to read.

    A run's final/ is used as it is (its weights are EMA when the run had EMA on) unless --ema or
    --no-ema asks for a choice; then, and for runs without final/, the run's latest checkpoint.
    """
    from sdxl_trainer.utils.checkpoint import MANIFEST, is_complete, latest_checkpoint

    source = Path(source).expanduser()
    if not source.exists():
        raise ExportError(f"{source}: no such run, checkpoint or diffusers folder")
    if (source / MANIFEST).is_file():
        if not is_complete(source):
            raise ExportError(f"{source} is an incomplete checkpoint (a file is missing or truncated); export an older one")
        return ExportSource("checkpoint", source, source.parent.parent)
    if (source / "model_index.json").is_file():
        if ema is not None:
            raise ExportError(f"{source} is a diffusers folder with one set of weights; --ema/--no-ema need a run or a checkpoint")
        return ExportSource("diffusers", source, source.parent if (source.parent / "config.yaml").is_file() else None)
    if (source / "config.yaml").is_file():
        if ema is None and (source / "final" / "model_index.json").is_file():
            return ExportSource("diffusers", source / "final", source)
        checkpoint = latest_checkpoint(source / "checkpoints")
        if checkpoint is None:
            raise ExportError(f"{source} is a run without final/ and without a complete checkpoint: nothing to export")
        return ExportSource("checkpoint", checkpoint, source)
    raise ExportError(f"{source} is neither a run folder (config.yaml), a checkpoint (manifest.json) nor a diffusers folder (model_index.json)")


def _load_source(source: ExportSource, *, ema: bool | None):
    """(components, scheduler_config, figures) of an export source; the UNet holds the chosen weights."""
    from sdxl_trainer.config import Config
    from sdxl_trainer.models.setup import load_components
    from sdxl_trainer.utils.checkpoint import EMA_FILE, checkpoint_unet_weights, read_checkpoint_meta

    figures: dict[str, Any] = {}
    if source.run_dir is not None and (source.run_dir / "summary.json").is_file():
        summary = json.loads((source.run_dir / "summary.json").read_text(encoding="utf-8"))
        figures = {k: summary[k] for k in ("steps", "images", "final_loss", "validation_loss", "base_model", "final_weights") if k in summary}
    if source.kind == "diffusers":
        components = load_components(str(source.path))
        return components, components.scheduler_config, figures
    from sdxl_trainer.training.trainer import objective_from_config

    meta = read_checkpoint_meta(source.path)
    config = Config.model_validate(meta["config"])
    use_ema = (source.path / EMA_FILE).is_file() if ema is None else ema
    components = load_components(config.model.pretrained, config_dir=config.model.config_dir)
    components.unet.load_state_dict(checkpoint_unet_weights(source.path, ema=use_ema), strict=True)
    figures.update({"steps": meta["step"], "checkpoint": source.path.name, "final_weights": "ema" if use_ema else "raw",
                    "base_model": config.model.pretrained, "config_hash": meta["config_hash"]})
    return components, objective_from_config(config).scheduler_config(), figures


def export_model(source: Path, *, fmt: str, out: Path, ema: bool | None = None, dtype: str = "fp32") -> Path:
    """`sdxl-trainer export`: a diffusers folder or one single-file SDXL .safetensors at `out`."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; allowed: {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    out = Path(out).expanduser()
    if out.exists():
        raise ExportError(f"{out} already exists; remove it or choose another --out")
    resolved = resolve_export_source(source, ema=ema)
    components, scheduler_config, figures = _load_source(resolved, ema=ema)
    torch_dtype = DTYPES[dtype]
    if fmt == "single-file":
        if out.suffix != ".safetensors":
            raise ExportError(f"--out {out}: a single-file export is a .safetensors file")
        prediction_type = scheduler_config.get("prediction_type", "epsilon")
        metadata = modelspec_metadata(title=(resolved.run_dir or resolved.path).name, figures={**figures, "dtype": dtype},
                                      prediction_type=prediction_type if prediction_type in ("epsilon", "v_prediction") else None)
        write_single_file(components, out, dtype=torch_dtype, metadata=metadata, prediction_type=prediction_type,
                          zero_terminal_snr=bool(scheduler_config.get("rescale_betas_zero_snr")))
    else:
        from sdxl_trainer.models.model_validator import build_pipeline

        pipeline = build_pipeline(components, components.unet, scheduler_config).to(dtype=torch_dtype)
        tmp = out.with_name(f".{out.name}.tmp")
        pipeline.save_pretrained(tmp, safe_serialization=True)
        tmp.rename(out)
    log.info("exported %s (%s, %s) to %s", resolved.path, fmt, dtype, out)
    return out
