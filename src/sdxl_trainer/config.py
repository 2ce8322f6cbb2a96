"""Typed configuration tree: YAML file + `key.sub=value` overrides, validated as a whole.

Every problem is reported at once (field path, value, what is allowed) before any model loads.
Modules never receive this tree: the edge (main/trainer setup) passes plain arguments down.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration problem the user must fix; the message lists every problem found."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    pretrained: str = Field("builtin:tiny-base", description="builtin:tiny-base, a local diffusers folder, a single .safetensors file (with config_dir), or a Hub id when online")
    config_dir: str | None = Field(None, description="local diffusers config folder for a single-file checkpoint")
    gradient_checkpointing: bool = False


class DataSourceConfig(_Section):
    root: str = Field(description="folder of images with same-stem .txt captions (searched recursively), or metadata.jsonl at its root")
    repeats: int = Field(1, ge=1, description="times each image appears per epoch (multiplied by N of an N_name folder); encoded once")
    folder_repeats: bool = Field(True, description="kohya style: images under a top-level N_name subfolder (e.g. 10_cat) repeat N times")


class DataConfig(_Section):
    root: str | None = Field("data/demo", description="single-source shorthand for sources: [{root: ...}]; leave unset (or null) when using sources")
    sources: list[DataSourceConfig] = Field(default_factory=list, description="several folders, each {root, repeats, folder_repeats}; epoch length = sum of every image's repeats")
    resolution: int = Field(1024, ge=64, description="bucket area target: resolution**2 pixels")
    bucket_step: int = Field(64, ge=8)
    max_aspect_ratio: float = Field(4.0, ge=1.0)
    crop: Literal["center", "random"] = "center"
    min_size: int = Field(0, ge=0, description="skip images whose shorter side is below this")
    max_pixels: int = Field(178_956_970, ge=1, description="decompression-bomb limit")
    lowercase: bool = False
    underscores_to_spaces: bool = True
    missing_caption: Literal["skip", "empty"] = "skip"
    validation_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="held-out share of images for validation loss")
    no_upscale: bool = Field(False, description="images smaller than their bucket keep their own size rounded down to bucket_step multiples (extra buckets) instead of being upscaled")
    shuffle_tags: bool = Field(False, description="shuffle comma-separated tags after the first keep_tokens (baked into cache.caption_variants cached variants)")
    keep_tokens: int = Field(0, ge=0, description="the first N tags are never shuffled nor dropped (e.g. a trigger word)")
    tag_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="probability that each tag after keep_tokens is left out (baked into cache.caption_variants cached variants)")
    caption_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="probability that a sample's whole text conditioning is zeros (the SDXL pipeline's unconditional input) for classifier-free guidance")

    @model_validator(mode="before")
    @classmethod
    def _sources_replace_default_root(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("sources") and "root" not in data:
            return {**data, "root": None}  # the default root is not an extra source
        return data

    @model_validator(mode="after")
    def _resolution_on_grid(self) -> "DataConfig":
        if self.resolution % self.bucket_step:
            raise ValueError(f"resolution {self.resolution} must be a multiple of bucket_step {self.bucket_step}")
        return self

    @model_validator(mode="after")
    def _one_kind_of_source(self) -> "DataConfig":
        if self.sources and self.root:
            raise ValueError("give data.root (one folder) or data.sources (a list of {root, repeats}), not both")
        if not self.sources and not self.root:
            raise ValueError("no data given: set data.root to a folder of images, or data.sources to a list of {root, repeats}")
        return self

    def source_list(self) -> list[DataSourceConfig]:
        """data.sources, or data.root as the single source."""
        return list(self.sources) if self.sources else [DataSourceConfig(root=self.root)]


class CacheConfig(_Section):
    dir: str = Field("cache", description="where latents and text embeddings are cached")
    latent_mode: Literal["sample", "mean"] = "sample"
    batch_size: int = Field(8, ge=1)
    num_workers: int | None = Field(None, ge=0, description="image-decoding worker processes; null: CPUs - 1 (at most 8), so decoding does not starve the encoders")
    caption_variants: int = Field(8, ge=1, description="with data.shuffle_tags or data.tag_dropout: cached variants per caption (N x text entries and encode time; the model sees at most N orderings)")


class ObjectiveSection(_Section):
    prediction_type: Literal["epsilon", "v_prediction"] = "v_prediction"
    zero_terminal_snr: bool = True
    loss_weighting: Literal["none", "min_snr", "soft_min_snr", "debiased"] = "min_snr"
    snr_gamma: float = Field(5.0, gt=0)
    min_snr_floor: float = Field(0.0, ge=0.0, le=1.0)
    timestep_sampling: Literal["uniform", "logit_normal"] = "uniform"
    logit_mean: float = 0.0
    logit_std: float = Field(1.0, gt=0)
    resolution_shift: bool = False
    base_resolution: int = Field(1024, ge=64)
    noise_offset: float = Field(0.0, ge=0.0)
    loss_type: Literal["mse", "huber"] = "mse"
    huber_delta: float = Field(0.1, gt=0)


class EMAConfig(_Section):
    enabled: bool = True
    decay: float = Field(0.999, gt=0.0, lt=1.0)
    warmup: bool = Field(True, description="use the EMA warm-up schedule (decay grows with steps)")


# Memory presets for a full SDXL UNet fine-tune at 1024 px; a key the user sets wins over the
# preset. Expected use is arithmetic on 2.57e9 UNet parameters, NOT measured on a GPU yet
# (bench/gpu_sdxl.py measures it): see docs/memory.md.
PRESETS: dict[str, dict[str, Any]] = {
    "none": {},
    "24gb": {"train.mixed_precision": "bf16", "model.gradient_checkpointing": True, "train.optimizer": "adafactor",
             "train.fused_backward": True, "train.max_grad_norm": 0.0, "train.batch_size": 1},
    "48gb": {"train.mixed_precision": "bf16", "model.gradient_checkpointing": True, "train.optimizer": "adamw8bit",
             "train.batch_size": 2},
    "80gb": {"train.mixed_precision": "bf16", "model.gradient_checkpointing": False, "train.optimizer": "adamw",
             "train.batch_size": 2},
}
PRESET_DESCRIPTION = (
    "sets memory options unless given explicitly (estimates, not measured): "
    "24gb = bf16 + gradient checkpointing + adafactor + fused_backward + max_grad_norm 0 + batch 1 (~16-20 GB); "
    "48gb = bf16 + gradient checkpointing + adamw8bit + batch 2 (~30-36 GB); "
    "80gb = bf16 + adamw, no checkpointing, batch 2 (~60-75 GB)"
)


def apply_preset(tree: dict[str, Any]) -> dict[str, Any]:
    """The raw config tree with train.preset's values filled in where the user gave no value."""
    train = tree.get("train")
    preset = train.get("preset", "none") if isinstance(train, dict) else "none"
    values = PRESETS.get(preset) if isinstance(preset, str) else None
    if not values:
        return tree  # "none", or an unknown name that field validation reports
    tree = dict(tree)
    for dotted, value in values.items():
        section, key = dotted.split(".")
        node = tree.get(section, {})
        if isinstance(node, dict) and key not in node:
            tree[section] = {**node, key: value}
    return tree


class TrainConfig(_Section):
    max_steps: int = Field(500, ge=1)
    batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    lr_scheduler: Literal["constant", "cosine", "linear"] = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_epsilon: float = Field(1e-8, gt=0)
    weight_decay: float = Field(1e-2, ge=0)
    max_grad_norm: float = Field(1.0, ge=0, description="0 disables clipping")
    seed: int = 0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    log_every: int = Field(10, ge=1)
    validate_every: int = Field(0, ge=0, description="held-out validation loss every N steps (0: every sample.every_n_steps); always at the end when data.validation_fraction > 0")
    checkpoint_every: int = Field(0, ge=0, description="0: only at the end")
    keep_last_n: int = Field(2, ge=1)
    resume: str | None = Field(None, description="'latest' or a checkpoint path")
    resume_force: bool = Field(False, description="resume even when the config changed what the saved state means (batch size, data, model, objective, seed)")
    ema: EMAConfig = Field(default_factory=EMAConfig)
    preset: Literal["none", "24gb", "48gb", "80gb"] = Field("none", description=PRESET_DESCRIPTION)
    optimizer: Literal["adamw", "adamw8bit", "adafactor"] = Field("adamw", description="adamw; adamw8bit (bitsandbytes, CUDA only); adafactor (fixed lr, factored second moment, no momentum)")
    full_bf16: bool = Field(False, description="bf16 UNet weights without fp32 master copies; AdamW update written back with stochastic rounding (needs mixed_precision bf16, optimizer adamw)")
    fused_backward: bool = Field(False, description="step each parameter inside backward and free its gradient at once (one process; no accumulation; max_grad_norm must be 0)")
    compile: bool = Field(False, description="torch.compile the UNet (first steps are slow while it compiles)")
    noise_keying: Literal["rank", "sample"] = Field("rank", description="rank: one noise/timestep generator per process; sample: keyed by (seed, step, dataset index), so results do not depend on the number of processes")

    @model_validator(mode="after")
    def _warmup_within_run(self) -> "TrainConfig":
        if self.lr_warmup_steps > self.max_steps:
            raise ValueError(f"lr_warmup_steps {self.lr_warmup_steps} must not exceed max_steps {self.max_steps}")
        return self

    @model_validator(mode="after")
    def _memory_options_compatible(self) -> "TrainConfig":
        problems = []
        if self.fused_backward and self.gradient_accumulation_steps > 1:
            problems.append(f"fused_backward applies each update during backward, so it cannot accumulate gradients (gradient_accumulation_steps {self.gradient_accumulation_steps}); set one of them off")
        if self.fused_backward and self.max_grad_norm > 0:
            problems.append(f"fused_backward has no global gradient norm to clip (max_grad_norm {self.max_grad_norm}); set train.max_grad_norm=0 (adafactor still clips each update's RMS)")
        if self.fused_backward and self.mixed_precision == "fp16":
            problems.append("fused_backward cannot use fp16's gradient scaler (it must see every gradient before a step); use mixed_precision bf16")
        if self.full_bf16 and self.mixed_precision != "bf16":
            problems.append(f"full_bf16 needs mixed_precision bf16 (got {self.mixed_precision})")
        if self.full_bf16 and self.optimizer != "adamw":
            problems.append(f"full_bf16 supports optimizer adamw only, the stochastic-rounding AdamW (got {self.optimizer})")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class SampleConfig(_Section):
    every_n_steps: int = Field(0, ge=0, description="0: only at the end")
    prompts: list[str] = Field(default_factory=lambda: ["red circle, blue background, large", "completely black", "completely white"])
    seed: int = 0
    num_inference_steps: int = Field(20, ge=1)
    guidance_scale: float = Field(5.0, ge=0.0)
    guidance_rescale: float = Field(0.0, ge=0.0, le=1.0)
    width: int | None = Field(None, description="defaults to data.resolution")
    height: int | None = None

    @model_validator(mode="after")
    def _sizes_on_latent_grid(self) -> "SampleConfig":
        bad = [f"{side} {getattr(self, side)}" for side in ("width", "height") if getattr(self, side) is not None and getattr(self, side) % 8]
        if bad:
            raise ValueError(f"{', '.join(bad)} must be a multiple of 8 (the VAE downsamples 8x)")
        return self


class TagWeightingConfig(_Section):
    enabled: bool = False
    alpha: float = Field(0.5, ge=0.0, description="weight of a tag = (reference_frequency / tag_frequency) ** alpha")
    min_weight: float = Field(0.2, gt=0.0)
    max_weight: float = Field(5.0, gt=0.0)
    min_count: int = Field(3, ge=1, description="tags seen fewer times are treated as seen this often")
    categories_file: str | None = Field(None, description="optional file mapping tag -> category (JSON object or 'tag,category' lines)")
    category_multipliers: dict[str, float] = Field(default_factory=dict, description="per-category multipliers, e.g. {artist: 1.5}")

    @model_validator(mode="after")
    def _range(self) -> "TagWeightingConfig":
        if self.min_weight > self.max_weight:
            raise ValueError(f"min_weight {self.min_weight} must not exceed max_weight {self.max_weight}")
        return self


class VAETrainConfig(_Section):
    train_encoder: bool = Field(False, description="decoder-only by default: cached latents stay valid")
    max_steps: int = Field(500, ge=1)
    batch_size: int = Field(4, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    reconstruction_loss: Literal["l1", "mse"] = "l1"
    reconstruction_weight: float = Field(1.0, ge=0)
    perceptual_loss: Literal["none", "ms_ssim", "lpips"] = "ms_ssim"
    perceptual_weight: float = Field(0.1, ge=0)
    kl_weight: float = Field(1e-6, ge=0, description="only used when train_encoder is true")
    lpips_weights: str | None = Field(None, description="local file with VGG16 + LPIPS linear-head weights")
    crop_size: int | None = Field(None, description="random square crops of this size (None: whole bucketed images)")
    held_out_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    ema_decay: float = Field(0.999, gt=0.0, lt=1.0)


class OutputConfig(_Section):
    dir: str = "runs/run"
    export_single_file: bool = Field(False, description="also write final.safetensors: one SDXL file in the original layout (ComfyUI, A1111)")


class Config(_Section):
    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        return apply_preset(data) if isinstance(data, dict) else data

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    objective: ObjectiveSection = Field(default_factory=ObjectiveSection)
    train: TrainConfig = Field(default_factory=TrainConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    tag_weighting: TagWeightingConfig = Field(default_factory=TagWeightingConfig)
    vae: VAETrainConfig = Field(default_factory=VAETrainConfig)


def _format_validation_error(error: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}): {error.error_count()} problem(s)"]
    for item in error.errors():
        path = ".".join(str(part) for part in item["loc"])
        if item["type"] == "value_error" and isinstance(item.get("input"), dict):
            lines.append(f"  - {path}: {item['ctx']['error']}")
            continue
        if item["type"] == "extra_forbidden":
            lines.append(f"  - {path}: unknown key (check spelling; `sdxl-trainer init-config` writes every key)")
            continue
        lines.append(f"  - {path} = {item.get('input')!r}: {item['msg']}")
    return "\n".join(lines)


def _parse_override(text: str) -> tuple[list[str], Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected key.sub=value (for example train.max_steps=100)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc.problem})") from exc
    return key.strip().split("."), value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = _parse_override(text)
        node = tree
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load YAML (or defaults when path is None), apply overrides, validate everything at once."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path} (write an example with `sdxl-trainer init-config > {path.name}`)")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text ({exc.reason})") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (model, data, train, ...)")
        tree = loaded
    tree = apply_overrides(tree, overrides or [])
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def example_config() -> str:
    """A commented YAML of every key with its default and description."""
    lines = ["# sdxl-trainer configuration. Every key is optional; shown with its default.",
             "# Override any key on the command line: sdxl-trainer train config.yaml train.max_steps=100"]

    def emit(model: type[BaseModel], instance: BaseModel, indent: int) -> None:
        pad = "  " * indent
        for name, field in model.model_fields.items():
            value = getattr(instance, name)
            if isinstance(value, BaseModel):
                lines.append(f"{pad}{name}:")
                emit(type(value), value, indent + 1)
                continue
            comment = f"  # {field.description}" if field.description else ""
            rendered = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
            if rendered.endswith("\n...") or rendered.endswith("..."):
                rendered = rendered.replace("\n...", "").removesuffix("...").strip()
            lines.append(f"{pad}{name}: {rendered}{comment}")

    default = Config()
    for name in Config.model_fields:
        lines.append("")
        lines.append(f"{name}:")
        section = getattr(default, name)
        emit(type(section), section, 1)
    return "\n".join(lines) + "\n"
