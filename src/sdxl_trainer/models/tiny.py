"""The built-in tiny SDXL: same architecture family as SDXL, small enough to train on a CPU.

Everything here is made by this code: the CLIP BPE vocabulary and merges are learned from a
word list, and every model is freshly initialised from a seed. Nothing is downloaded.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
# SDXL's tokenizer_2 (OpenCLIP bigG) pads with "!" while tokenizer 1 pads with <|endoftext|>.
SDXL_TOKENIZER_2_PAD = "!"
MAX_LENGTH = 77

# Widths of the two text encoders; the UNet's cross-attention width is their sum.
TEXT_ENCODER_1_HIDDEN = 32
TEXT_ENCODER_2_HIDDEN = 64
TEXT_ENCODER_2_PROJECTION = 64
TEXT_ENCODER_LAYERS = 3
ADDITION_TIME_EMBED_DIM = 8
NUM_TIME_IDS = 6  # original (h, w), crop (top, left), target (h, w)
# SDXL's VAE scaling factor, kept until the project measures the tiny VAE's latent statistics.
VAE_SCALING_FACTOR = 0.13025

# Per-component seed offsets, so changing one config leaves the other inits unchanged.
_SEED_OFFSETS = {"unet": 0, "vae": 1, "text_encoder": 2, "text_encoder_2": 3}


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2 byte-level alphabet: each byte mapped to a printable unicode character.

    The order matters: it is the order of the first 256 vocabulary ids in CLIP (so "!" is id 0).
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    byte_values = list(printable)
    code_points = list(printable)
    shift = 0
    for byte in range(256):
        if byte not in printable:
            byte_values.append(byte)
            code_points.append(256 + shift)
            shift += 1
    return {byte: chr(code) for byte, code in zip(byte_values, code_points)}


def _base_vocab() -> dict[str, int]:
    alphabet = list(bytes_to_unicode().values())
    symbols = alphabet + [char + END_OF_WORD for char in alphabet]
    return {symbol: index for index, symbol in enumerate(symbols)}


def _with_specials(vocab: dict[str, int]) -> dict[str, int]:
    # CLIP puts the two special tokens at the very end of the vocabulary.
    out = dict(vocab)
    out[BOS_TOKEN] = len(out)
    out[EOS_TOKEN] = len(out)
    return out


def _merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    merged: list[str] = []
    index = 0
    while index < len(symbols):
        if index + 1 < len(symbols) and (symbols[index], symbols[index + 1]) == pair:
            merged.append(symbols[index] + symbols[index + 1])
            index += 2
        else:
            merged.append(symbols[index])
            index += 1
    return tuple(merged)


def _learn_merges(pieces: Iterable[str]) -> list[tuple[str, str]]:
    """Classic BPE learning, run until every piece is one symbol (so each known word is one token).

    Each distinct piece counts once; ties are broken by the pair itself, so the result is
    deterministic.
    """
    words = sorted({tuple(piece[:-1]) + (piece[-1] + END_OF_WORD,) for piece in pieces if piece})
    merges: list[tuple[str, str]] = []
    while True:
        counts: Counter[tuple[str, str]] = Counter()
        for word in words:
            counts.update(zip(word, word[1:]))
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        words = [_merge_pair(word, best) for word in words]


def _pre_tokenize(tokenizer: CLIPTokenizer, text: str) -> list[str]:
    """The byte-level pieces CLIP's BPE sees for `text` (lowercased, split into words)."""
    backend = tokenizer.backend_tokenizer
    normalized = backend.normalizer.normalize_str(text)
    return [piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str(normalized)]


def build_clip_tokenizer(
    words: Iterable[str], max_length: int = MAX_LENGTH, pad_token: str = EOS_TOKEN
) -> CLIPTokenizer:
    """A CLIP BPE tokenizer whose vocabulary and merges are learned from `words`.

    Every given word becomes a single token; any other text falls back to byte-level characters.
    """
    base_vocab = _base_vocab()
    if pad_token not in base_vocab and pad_token not in (BOS_TOKEN, EOS_TOKEN):
        raise ValueError(
            f"pad_token {pad_token!r} is not a single byte-level character or a special token"
        )
    bare = CLIPTokenizer(vocab=_with_specials(base_vocab), merges=[])
    pieces = [piece for word in words for piece in _pre_tokenize(bare, word)]
    merges = _learn_merges(pieces)

    vocab = dict(base_vocab)
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    vocab = _with_specials(vocab)
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        pad_token=pad_token,
        model_max_length=max_length,
    )


def build_tiny_tokenizers(words: Iterable[str]) -> tuple[CLIPTokenizer, CLIPTokenizer]:
    """(tokenizer, tokenizer_2) padded as SDXL's: <|endoftext|> for the first, "!" for the second."""
    words = list(words)
    return (
        build_clip_tokenizer(words, pad_token=EOS_TOKEN),
        build_clip_tokenizer(words, pad_token=SDXL_TOKENIZER_2_PAD),
    )


def tiny_unet_config() -> dict[str, Any]:
    """SDXL's UNet layout (no attention at the top level, text_time conditioning), scaled down."""
    return {
        "sample_size": 32,  # latents of 256 px images
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "block_out_channels": (32, 64, 64),
        "layers_per_block": 2,
        # diffusers' historic name: these are numbers of heads (head width 32 here).
        "attention_head_dim": (1, 2, 2),
        "transformer_layers_per_block": [1, 1, 1],
        "norm_num_groups": 8,
        "cross_attention_dim": TEXT_ENCODER_1_HIDDEN + TEXT_ENCODER_2_HIDDEN,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": ADDITION_TIME_EMBED_DIM,
        "projection_class_embeddings_input_dim": TEXT_ENCODER_2_PROJECTION
        + NUM_TIME_IDS * ADDITION_TIME_EMBED_DIM,
    }


def tiny_vae_config() -> dict[str, Any]:
    """An AutoencoderKL with SDXL's 8x downsampling and 4 latent channels."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (16, 32, 64, 64),
        "layers_per_block": 1,
        "latent_channels": 4,
        # 4 groups, so every GroupNorm group holds several channels (SD's VAE: 32 groups of 4 or more).
        # With one channel per group a solid-colour region normalises to zero, and the decoder can only
        # recover its colour from zero-padding effects at the border: trained on 64 px crops it then
        # decoded 256 px black at brightness 0.28 instead of 0.04 (measured, see tiny_base.py).
        "norm_num_groups": 4,
        "sample_size": 256,
        "scaling_factor": VAE_SCALING_FACTOR,
    }


def tiny_text_encoder_config(tokenizer: CLIPTokenizer, *, index: int) -> dict[str, Any]:
    """Config of text encoder `index` (1: CLIP ViT-L-like, 2: OpenCLIP bigG-like with projection).

    Token ids come from `tokenizer`, so the pooled output is read at the first <|endoftext|>.
    """
    if index == 1:
        hidden, heads, act, projection = TEXT_ENCODER_1_HIDDEN, 2, "quick_gelu", TEXT_ENCODER_1_HIDDEN
    elif index == 2:
        hidden, heads, act, projection = TEXT_ENCODER_2_HIDDEN, 4, "gelu", TEXT_ENCODER_2_PROJECTION
    else:
        raise ValueError(f"text encoder index must be 1 or 2, got {index!r}")
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden,
        "intermediate_size": 4 * hidden,
        "num_hidden_layers": TEXT_ENCODER_LAYERS,
        "num_attention_heads": heads,
        "max_position_embeddings": MAX_LENGTH,
        "hidden_act": act,
        "projection_dim": projection,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


@dataclass
class TinyComponents:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModelWithProjection
    tokenizer: CLIPTokenizer
    tokenizer_2: CLIPTokenizer

    def models(self) -> dict[str, torch.nn.Module]:
        return {
            "unet": self.unet,
            "vae": self.vae,
            "text_encoder": self.text_encoder,
            "text_encoder_2": self.text_encoder_2,
        }


def _seeded(seed: int, build):
    # Forking keeps the caller's global RNG stream untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def build_tiny_components(words: Iterable[str], seed: int = 0) -> TinyComponents:
    """Fresh tiny SDXL components; identical weights for identical `words` and `seed`."""
    tokenizer, tokenizer_2 = build_tiny_tokenizers(words)
    config_1 = CLIPTextConfig(**tiny_text_encoder_config(tokenizer, index=1))
    config_2 = CLIPTextConfig(**tiny_text_encoder_config(tokenizer_2, index=2))
    return TinyComponents(
        unet=_seeded(seed + _SEED_OFFSETS["unet"], lambda: UNet2DConditionModel(**tiny_unet_config())),
        vae=_seeded(seed + _SEED_OFFSETS["vae"], lambda: AutoencoderKL(**tiny_vae_config())),
        text_encoder=_seeded(seed + _SEED_OFFSETS["text_encoder"], lambda: CLIPTextModel(config_1)),
        text_encoder_2=_seeded(
            seed + _SEED_OFFSETS["text_encoder_2"], lambda: CLIPTextModelWithProjection(config_2)
        ),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
    )


def save_as_pipeline(
    components: TinyComponents, scheduler, out_dir: Path, dtype: torch.dtype = torch.float32
) -> Path:
    """Write a diffusers StableDiffusionXLPipeline folder (model_index.json, safetensors).

    Works for any object with the six component attributes; the caller's modules are not
    modified (they are copied when a dtype conversion is needed).
    """
    out_dir = Path(out_dir)
    models = {
        name: getattr(components, name) for name in ("unet", "vae", "text_encoder", "text_encoder_2")
    }
    models = {
        name: module if module.dtype == dtype else copy.deepcopy(module).to(dtype)
        for name, module in models.items()
    }
    pipeline = StableDiffusionXLPipeline(
        **models,
        tokenizer=components.tokenizer,
        tokenizer_2=components.tokenizer_2,
        scheduler=scheduler,
    )
    pipeline.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
