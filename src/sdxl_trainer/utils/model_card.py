"""Model card (README.md) with Hugging Face metadata and the run's real figures."""

from __future__ import annotations

from pathlib import Path

import yaml

CARD_TAGS = ["stable-diffusion-xl", "text-to-image", "diffusers", "sdxl-trainer"]


def _base_model_id(pretrained: str) -> str | None:
    """Only a Hub id is valid `base_model` metadata; local paths and builtin models are described in the text."""
    if pretrained.startswith("builtin:") or Path(pretrained).exists() or pretrained.count("/") != 1:
        return None
    return pretrained


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.5g}"
    return "n/a" if value is None else str(value)


def render_model_card(summary: dict, *, run_name: str, pretrained: str, license: str = "openrail++", extra_sections: list[str] | None = None) -> str:
    metadata = {"license": license, "library_name": "diffusers", "pipeline_tag": "text-to-image", "tags": CARD_TAGS}
    base_model = _base_model_id(pretrained)
    if base_model is not None:
        metadata["base_model"] = base_model
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
    sample = summary.get("last_sample")
    sample_md = f"\n## Samples\n\n![samples]({sample})\n" if sample else ""
    v_pred = summary.get("prediction_type") == "v_prediction"
    scheduler_note = (
        "The saved scheduler is configured for this model's objective "
        f"(prediction_type={summary.get('prediction_type')}, "
        f"rescale_betas_zero_snr={bool(summary.get('zero_terminal_snr'))}"
        + (", timestep_spacing=trailing" if summary.get("zero_terminal_snr") else "")
        + "); keep it when sampling."
    )
    usage = f"""## Usage

```python
import torch
from diffusers import StableDiffusionXLPipeline

pipe = StableDiffusionXLPipeline.from_pretrained("final", torch_dtype=torch.float32)
image = pipe("completely black", num_inference_steps=25{", guidance_rescale=0.7" if v_pred else ""}).images[0]
image.save("sample.png")
```

{scheduler_note}
"""
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


def write_model_card(run_dir: Path, *, summary: dict, config) -> Path:
    card = render_model_card(summary, run_name=run_dir.name, pretrained=config.model.pretrained)
    path = run_dir / "README.md"
    path.write_text(card, encoding="utf-8")
    return path
