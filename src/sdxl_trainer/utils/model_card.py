"""Model card (README.md) with Hugging Face metadata and the run's real figures."""

from __future__ import annotations

from pathlib import Path

import yaml

CARD_TAGS = ["stable-diffusion-xl", "text-to-image", "diffusers", "sdxl-trainer"]
# The usage snippet loads this path; `utils/hub.py` points it at the repo id when pushing.
USAGE_MODEL_PATH = "final"


def _base_model_id(pretrained: str) -> str | None:
    """Only a Hub id is valid `base_model` metadata; local paths and builtin models are described in the text."""
    if pretrained.startswith("builtin:") or Path(pretrained).exists() or pretrained.count("/") != 1:
        return None
    return pretrained


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.5g}"
    return "n/a" if value is None else str(value)


def render_model_card(summary: dict, *, run_name: str, pretrained: str, license: str = "openrail++", extra_sections: list[str] | None = None,
                      samples: list[str] | None = None, resolution: int | None = None) -> str:
    """README.md text: Hub metadata, the run's figures from `summary`, sample images, a usage snippet that runs."""
    metadata = {"license": license, "library_name": "diffusers", "pipeline_tag": "text-to-image", "tags": CARD_TAGS}
    base_model = _base_model_id(pretrained)
    if base_model is not None:
        metadata["base_model"] = base_model
        metadata["base_model_relation"] = "finetune"
    front = yaml.safe_dump(metadata, sort_keys=False).strip()
    objective = f"{summary.get('prediction_type')}" + (" with zero-terminal SNR" if summary.get("zero_terminal_snr") else "")
    rows = [
        ("base model", pretrained),
        ("steps", summary.get("steps")),
        ("images", summary.get("images")),
        ("skipped files", summary.get("skipped")),
        ("buckets", ", ".join(f"{k}: {v}" for k, v in (summary.get("buckets") or {}).items()) or None),
        ("objective", objective),
        ("loss weighting", summary.get("loss_weighting")),
        ("batch size x accumulation", f"{summary.get('batch_size')} x {summary.get('gradient_accumulation_steps')}"),
        ("learning rate", summary.get("learning_rate")),
        ("EMA", summary.get("ema")),
        ("weights in this folder", summary.get("final_weights")),
        ("initial loss (first 10% of steps)", summary.get("initial_loss")),
        ("final loss (last 10% of steps)", summary.get("final_loss")),
        ("validation loss", summary.get("validation_loss")),
        ("training wall time (s)", summary.get("wall_seconds")),
    ]
    table = "\n".join(f"| {name} | {_fmt(value)} |" for name, value in rows)
    sample_paths = list(samples or [])
    if summary.get("last_sample") and summary["last_sample"] not in sample_paths:
        sample_paths.append(summary["last_sample"])
    sample_md = ""
    if sample_paths:
        images = "\n\n".join(f"![{Path(p).stem}]({p})" for p in sample_paths)
        sample_md = f"\n## Samples\n\nRows: raw and EMA weights; columns: the sample prompts (fixed seeds).\n\n{images}\n"
    single_file = summary.get("single_file")
    single_file_md = (f"\nThe same weights as one original-layout SDXL file (ComfyUI, A1111/Forge): `{single_file}`.\n"
                      if single_file else "")
    v_pred = summary.get("prediction_type") == "v_prediction"
    scheduler_note = (
        "The saved scheduler is configured for this model's objective "
        f"(prediction_type={summary.get('prediction_type')}, "
        f"rescale_betas_zero_snr={bool(summary.get('zero_terminal_snr'))}"
        + (", timestep_spacing=trailing" if summary.get("zero_terminal_snr") else "")
        + "); keep it when sampling."
    )
    size = f", height={resolution}, width={resolution}" if resolution else ""
    usage = f"""## Usage

```python
import torch
from diffusers import StableDiffusionXLPipeline

pipe = StableDiffusionXLPipeline.from_pretrained("{USAGE_MODEL_PATH}", torch_dtype=torch.float32)
image = pipe("completely black", num_inference_steps=25{size}{", guidance_rescale=0.7" if v_pred else ""}).images[0]
image.save("sample.png")
```

{scheduler_note}
{single_file_md}"""
    sections = "\n".join(extra_sections or [])
    return f"""---
{front}
---

# {run_name}

Fine-tuned with sdxl-trainer from `{pretrained}`.

## Training

| | |
| --- | --- |
{table}
{sample_md}
{usage}
{sections}"""


def _tag_weighting_section(summary: dict) -> list[str]:
    tags = summary.get("tag_weighting")
    if not tags:
        return []
    weights = tags["weights"]
    lines = ["## Tag-based loss weighting", "",
             f"Each sample's loss was multiplied by a weight from its tags' rarity (alpha {tags['alpha']}); "
             f"weights ranged {weights['min']:.3g} to {weights['max']:.3g} with mean {weights['mean']:.3g}. "
             "Per-tag counts and weights are in `tag_weights.json`.", "",
             "| most up-weighted (count, weight) | most down-weighted (count, weight) |", "| --- | --- |"]
    for up, down in zip(tags["most_upweighted"], tags["most_downweighted"]):
        lines.append(f"| {up[0]} ({up[1]}, {up[2]}) | {down[0]} ({down[1]}, {down[2]}) |")
    return ["\n".join(lines) + "\n"]


def write_model_card(run_dir: Path, *, summary: dict, config) -> Path:
    samples = [p.relative_to(run_dir).as_posix() for p in sorted((run_dir / "samples").glob("*.png"))]
    card = render_model_card(summary, run_name=run_dir.name, pretrained=config.model.pretrained, samples=samples,
                             resolution=config.data.resolution, extra_sections=_tag_weighting_section(summary))
    path = run_dir / "README.md"
    path.write_text(card, encoding="utf-8")
    return path
