"""SDXL conditioning: text embeddings of both encoders and micro-conditioning time ids.

Matches diffusers' StableDiffusionXLPipeline.encode_prompt (clip_skip=None) and
_get_add_time_ids, so cached embeddings equal what the pipeline computes at inference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

Size = tuple[int, int]


@dataclass
class PromptEmbeddings:
    prompt_embeds: torch.Tensor  # [B, 77, hidden_1 + hidden_2]
    pooled_prompt_embeds: torch.Tensor  # [B, projection_dim]


def encode_prompts(
    captions: Sequence[str],
    tokenizers: tuple,
    text_encoders: tuple,
    device: torch.device | str | None = None,
) -> PromptEmbeddings:
    """Penultimate hidden states of both encoders (concatenated) and encoder 2's projected pooled output.

    Gradients are the caller's choice (wrap in torch.no_grad() for frozen encoders).
    """
    if isinstance(captions, str):
        raise TypeError("captions must be a sequence of strings, not a single string")
    if len(tokenizers) != 2 or len(text_encoders) != 2:
        raise ValueError(
            f"SDXL needs two tokenizers and two text encoders, got {len(tokenizers)} and "
            f"{len(text_encoders)}"
        )
    captions = list(captions)
    hidden_states = []
    pooled = None
    for tokenizer, text_encoder in zip(tokenizers, text_encoders):
        input_ids = tokenizer(
            captions,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        target = device if device is not None else text_encoder.device
        output = text_encoder(input_ids.to(target), output_hidden_states=True)
        hidden_states.append(output.hidden_states[-2])
        pooled = getattr(output, "text_embeds", None)
    if pooled is None:
        raise ValueError(
            "the second text encoder must be a CLIPTextModelWithProjection (it has no text_embeds)"
        )
    return PromptEmbeddings(
        prompt_embeds=torch.cat(hidden_states, dim=-1), pooled_prompt_embeds=pooled
    )


def time_ids(original_size: Size, crop_top_left: Size, target_size: Size) -> torch.Tensor:
    """SDXL micro-conditioning (Podell et al. 2023, sec. 2.2), a [6] float tensor:

    (original_h, original_w, crop_top, crop_left, target_h, target_w).
    """
    values = [*original_size, *crop_top_left, *target_size]
    if len(values) != 6:
        raise ValueError(
            f"sizes must be (h, w) pairs, got {original_size!r}, {crop_top_left!r}, {target_size!r}"
        )
    return torch.tensor(values, dtype=torch.float32)


def batch_time_ids(
    original_sizes: Sequence[Size],
    crop_top_lefts: Sequence[Size],
    target_sizes: Sequence[Size],
) -> torch.Tensor:
    """[B, 6] time ids, one row per sample."""
    if not original_sizes:
        raise ValueError("batch_time_ids needs at least one sample")
    if not len(original_sizes) == len(crop_top_lefts) == len(target_sizes):
        raise ValueError(
            f"batch sizes differ: {len(original_sizes)} original sizes, {len(crop_top_lefts)} crops, "
            f"{len(target_sizes)} target sizes"
        )
    return torch.stack(
        [time_ids(o, c, t) for o, c, t in zip(original_sizes, crop_top_lefts, target_sizes)]
    )
