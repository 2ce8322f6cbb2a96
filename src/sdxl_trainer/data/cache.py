"""The cache stage: VAE latent distributions and text conditioning, encoded once, read memory-mapped.

A cache folder holds:

- ``shard-rRRR-NNNNNN.safetensors``: the tensors. A latent entry is ``<key>/mean`` (and
  ``<key>/std`` when ``latent_mode="sample"``), already shifted and scaled so that
  ``mean + std * eps`` is the training latent; a text entry is ``<key>/prompt_embeds`` [77, D]
  and ``<key>/pooled`` [P]. A shard is written to ``<name>.tmp``, fsynced, then renamed.
- ``index.safetensors``: one columnar table of every entry (key, shard, crc32, geometry), the
  shards' sizes and the source stat cache (path -> size, mtime_ns, sha256). Numpy columns in a
  safetensors file: opening 100k entries reads a few MB and builds no per-entry Python object.
  Rewritten atomically after every shard, so a killed build resumes from its last shard.
- ``manifest.safetensors``: the dataset order (per image: latent key, one text row per caption
  variant, original caption row, repeats, bucket, tags, source path), the text table (key,
  text) and the caption table of the current build. An image is stored and listed once; its
  ``repeats`` expand it into that many dataset items when the manifest is read.
- ``report.json``: what the last build did; ``bucket_table.json``: images and epoch items per
  bucket resolution.

Captions: without augmentation every image has one text entry (its caption). With tag
shuffling/dropout it has ``caption_variants`` entries (see ``dataset.caption_variants``), one
of which :class:`CachedDataset` picks per (seed, epoch, item). Caption dropout needs no entry:
the dropped item's conditioning is all zeros, which is what diffusers' SDXL pipeline feeds as
the unconditional input (``StableDiffusionXLPipeline.encode_prompt`` with
``force_zeros_for_empty_prompt=True``, the default: ``negative_prompt_embeds =
torch.zeros_like(prompt_embeds)`` and the same for the pooled embeddings).

Multi-rank builds write ``index.rankRRR.safetensors``, ``manifest.rankRRR.safetensors`` and
``report.rankRRR.json``; ``merge_rank_indexes`` folds them into the files above.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy
import safetensors.torch
import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from sdxl_trainer.data.buckets import (
    CROP_MODES,
    Bucket,
    assign_bucket,
    assign_bucket_no_upscale,
    bucket_summary,
    crop_geometry,
    prepare_image,
)
from sdxl_trainer.data.dataset import (
    CaptionAugment,
    ImageRecord,
    SkippedFile,
    caption_variants,
    load_image_rgb,
)
from sdxl_trainer.models.conditioning import encode_prompts, time_ids
from sdxl_trainer.utils.io import fsync_path

# Bump when the meaning or layout of cached values changes: every key changes with it.
CACHE_FORMAT_VERSION = 1
INDEX_NAME = "index.safetensors"
MANIFEST_NAME = "manifest.safetensors"
REPORT_NAME = "report.json"
BUCKET_TABLE_NAME = "bucket_table.json"
LATENT_MODES = ("sample", "mean")
DEFAULT_SHARD_MAX_ENTRIES = 1024
DEFAULT_SHARD_MAX_BYTES = 256 * 2**20
# Below this many weight elements module_identity hashes every value (the SDXL VAE encoder, 34M,
# takes ~0.2 s); above it, shapes plus a strided sample of each tensor (the 695M text encoder 2
# in ~0.1 s), which can miss an edit that touches only unsampled weights.
FULL_HASH_MAX_ELEMENTS = 64_000_000
SAMPLED_VALUES_PER_TENSOR = 1024
# Only these VAE weights shape the latent distribution: a fine-tuned decoder keeps the cache.
VAE_ENCODER_PREFIXES = ("encoder.", "quant_conv.")

_FORMAT_TAG = "sdxl-trainer-cache"
_DIGEST_BYTES = 32  # keys are sha256 digests, stored raw and named in hex
_REBUILD_HINT = "run `sdxl-trainer cache CONFIG` to rebuild the damaged entries"
_SHARD_RE = re.compile(r"^shard-r(\d{3})-(\d{6})\.safetensors$")
# Config fields that describe how a module was saved or called, not what it computes.
_VOLATILE_CONFIG_KEYS = frozenset(
    {
        "transformers_version",
        "architectures",
        "dtype",
        "torch_dtype",
        "output_hidden_states",
        "output_attentions",
        "return_dict",
        "use_cache",
    }
)
# What a broken image raises while decoding: PIL reports truncation as OSError, some broken PNG
# chunks as SyntaxError, and oversized images as DecompressionBombError.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, zlib.error, Image.DecompressionBombError)


class CacheError(RuntimeError):
    """The cache is missing, incomplete or inconsistent with what is asked of it."""


class CacheCorruptError(CacheError):
    """Stored bytes do not match their checksum (or a shard cannot be read at all)."""


# ----------------------------------------------------------------------------- identities and keys


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _stable_config(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            str(k): _stable_config(v)
            for k, v in value.items()
            if not str(k).startswith("_") and k not in _VOLATILE_CONFIG_KEYS
        }
    if isinstance(value, (list, tuple)):
        return [_stable_config(v) for v in value]
    return value


def _config_json(module: torch.nn.Module) -> str:
    config = getattr(module, "config", None)
    if config is None:
        return "{}"
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.dumps(_stable_config(data), sort_keys=True, default=str)


def module_identity(
    module: torch.nn.Module,
    *,
    prefixes: tuple[str, ...] | None = None,
    full_hash_max_elements: int = FULL_HASH_MAX_ELEMENTS,
) -> str:
    """A sha256 of a module's class, config and weights (those whose names start with `prefixes`).

    Small modules (<= `full_hash_max_elements` weight elements) hash every value, so any weight
    change changes the identity. Larger ones hash every tensor's name, shape and dtype plus
    SAMPLED_VALUES_PER_TENSOR evenly strided values: a full pass over a 3B-parameter model costs
    seconds at every start, while any real fine-tune (or a different checkpoint) moves the sampled
    values. Values are hashed as float32 on the CPU, so the identity does not depend on the device.
    """
    state = [
        (name, tensor)
        for name, tensor in module.state_dict().items()
        if prefixes is None or name.startswith(prefixes)
    ]
    if not state:
        raise ValueError(f"{type(module).__name__} has no weights matching prefixes {prefixes!r}")
    full = sum(tensor.numel() for _, tensor in state) <= full_hash_max_elements
    digest = hashlib.sha256()
    digest.update(f"{type(module).__qualname__}|{'full' if full else 'sampled'}|".encode())
    digest.update(_config_json(module).encode())
    for name, tensor in state:
        digest.update(f"|{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        values = tensor.detach().reshape(-1)
        if not full and values.numel() > SAMPLED_VALUES_PER_TENSOR:
            step = (values.numel() - 1) // (SAMPLED_VALUES_PER_TENSOR - 1)
            index = torch.arange(SAMPLED_VALUES_PER_TENSOR, device=values.device) * step
            values = values[index]
        digest.update(values.to(device="cpu", dtype=torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def tokenizer_identity(tokenizer: Any) -> str:
    """A sha256 of a tokenizer's vocabulary, merges, normalisation, special tokens and max length."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        # Calling the tokenizer with padding/truncation rewrites these two fields in place.
        spec.pop("padding", None)
        spec.pop("truncation", None)
        body = json.dumps(spec, sort_keys=True)
    else:
        body = json.dumps(tokenizer.get_vocab(), sort_keys=True)
    header = json.dumps(
        {
            "class": type(tokenizer).__qualname__,
            "model_max_length": tokenizer.model_max_length,
            "padding_side": tokenizer.padding_side,
            "special_tokens": tokenizer.special_tokens_map,
        },
        sort_keys=True,
        default=str,
    )
    return _sha256_text(header + body)


def vae_identity(vae: torch.nn.Module, dtype: torch.dtype, store_dtype: torch.dtype) -> str:
    """What determines a cached latent apart from the image: encoder weights, config, dtypes, tiling."""
    weights = module_identity(vae, prefixes=VAE_ENCODER_PREFIXES)
    tiling = bool(getattr(vae, "use_tiling", False))
    return _sha256_text(f"{weights}|compute={dtype}|store={store_dtype}|tiling={tiling}")


def text_identity(
    tokenizers: Sequence[Any],
    text_encoders: Sequence[torch.nn.Module],
    dtype: torch.dtype,
    store_dtype: torch.dtype,
) -> str:
    """What determines a cached text entry apart from the caption: both encoders and tokenizers."""
    parts = [tokenizer_identity(t) for t in tokenizers] + [module_identity(m) for m in text_encoders]
    return _sha256_text("|".join([*parts, f"compute={dtype}", f"store={store_dtype}"]))


def latent_key(
    content_hash: str,
    vae_id: str,
    bucket: Bucket,
    crop: str,
    latent_mode: str,
    crop_top_left: tuple[int, int] | None = None,
) -> str:
    """The key of a latent entry. A center crop follows from the image and bucket; a random
    crop is part of the key as the drawn ``crop_top_left`` (so seeds that draw the same crop,
    e.g. for an image of its bucket's aspect ratio, share the entry)."""
    if (crop == "random") != (crop_top_left is not None):
        raise ValueError("crop_top_left must be given for crop='random', and only then")
    parts = [
        "latent",
        str(CACHE_FORMAT_VERSION),
        content_hash,
        vae_id,
        f"{bucket.width}x{bucket.height}",
        crop,
        latent_mode,
    ]
    if crop_top_left is not None:
        parts.append(f"crop={crop_top_left[0]},{crop_top_left[1]}")
    return _sha256_text("|".join(parts))


def text_key(caption: str, text_id: str) -> str:
    # The caption goes last: every field before it has a fixed width, so the join is unambiguous.
    return _sha256_text(f"text|{CACHE_FORMAT_VERSION}|{text_id}|{caption}")


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; expected one of {list(allowed)}")


# ----------------------------------------------------------------------------- checksums and files


def _crc32(tensors: Iterable[torch.Tensor]) -> int:
    crc = 0
    for tensor in tensors:
        crc = zlib.crc32(tensor.contiguous().view(torch.uint8).numpy(), crc)
    return crc


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def _write_shard_file(path: Path, tensors: dict[str, torch.Tensor]) -> int:
    """Write a shard (temp name, fsync, rename); returns its size in bytes."""
    tmp = path.with_name(path.name + ".tmp")
    safetensors.torch.save_file(tensors, str(tmp))
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)
    return path.stat().st_size


def _keys_to_array(keys: Sequence[str]) -> np.ndarray:
    """Hex keys -> uint8 [N, 32] digests."""
    if not keys:
        return np.zeros((0, _DIGEST_BYTES), dtype=np.uint8)
    return np.frombuffer(bytes.fromhex("".join(keys)), dtype=np.uint8).reshape(-1, _DIGEST_BYTES)


def _array_to_keys(array: np.ndarray) -> np.ndarray:
    """uint8 [N, 32] -> 'S32' [N], a view that numpy sorts and searches as byte strings."""
    return np.ascontiguousarray(array).view(f"S{_DIGEST_BYTES}").reshape(-1)


def _key_hex(digest: bytes) -> str:
    # numpy drops trailing NUL bytes of 'S' elements: put them back before naming the key.
    return digest.ljust(_DIGEST_BYTES, b"\0").hex()


def _pack_strings(strings: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    encoded = [s.encode("utf-8") for s in strings]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(), offsets


def _unpack_strings(blob: np.ndarray, offsets: np.ndarray) -> list[str]:
    data = blob.tobytes()
    bounds = offsets.tolist()
    return [data[a:b].decode("utf-8") for a, b in zip(bounds[:-1], bounds[1:])]


def _read_table(path: Path, names: Sequence[str] | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Columns (all, or `names`) and metadata of an index/manifest file."""
    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
            wanted = handle.keys() if names is None else names
            columns = {name: handle.get_tensor(name) for name in wanted}
    except SafetensorError as error:
        raise CacheCorruptError(
            f"cannot read {path}: {error}; delete {path.parent} and run `sdxl-trainer cache CONFIG`"
        ) from error
    if metadata.get("format") != _FORMAT_TAG:
        raise CacheError(f"{path} is not an sdxl-trainer cache file")
    return columns, metadata


def _write_table(path: Path, columns: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    metadata = {"format": _FORMAT_TAG, "version": str(CACHE_FORMAT_VERSION), **metadata}
    _atomic_write_bytes(path, safetensors.numpy.save(columns, metadata=metadata))


# ----------------------------------------------------------------------------- the index


@dataclass(frozen=True)
class LatentEntry:
    shard: str
    crc: int
    original_size: tuple[int, int]  # (h, w) of the decoded image
    crop_top_left: tuple[int, int]  # (top, left) in the resized image
    bucket: tuple[int, int]  # (w, h)
    has_std: bool


@dataclass(frozen=True)
class TextEntry:
    shard: str
    crc: int


@dataclass(frozen=True)
class SourceStat:
    size: int
    mtime_ns: int
    sha256: str


@dataclass
class _Tables:
    """The builder's view of an index: plain dicts keyed by entry key."""

    shards: dict[str, int] = field(default_factory=dict)  # name -> size in bytes
    latents: dict[str, LatentEntry] = field(default_factory=dict)
    texts: dict[str, TextEntry] = field(default_factory=dict)
    sources: dict[str, SourceStat] = field(default_factory=dict)

    def update(self, other: _Tables) -> None:
        self.shards.update(other.shards)
        self.latents.update(other.latents)
        self.texts.update(other.texts)
        self.sources.update(other.sources)

    def referenced_shards(self) -> set[str]:
        return {e.shard for e in self.latents.values()} | {e.shard for e in self.texts.values()}


@dataclass
class CacheIndex:
    """The index as numpy columns (what training reads)."""

    shard_names: list[str]
    shard_sizes: np.ndarray  # int64 [S]
    latent_keys: np.ndarray  # 'S32' [L], sorted
    latent_shard: np.ndarray  # int32 [L], into shard_names
    latent_crc: np.ndarray  # uint32 [L]
    latent_geometry: np.ndarray  # int32 [L, 7]: orig h, w, crop top, left, bucket w, h, has_std
    text_keys: np.ndarray  # 'S32' [T], sorted
    text_shard: np.ndarray  # int32 [T]
    text_crc: np.ndarray  # uint32 [T]
    sources: dict[str, SourceStat] | None = None


_INDEX_COLUMNS = (
    "latent_key",
    "latent_shard",
    "latent_crc",
    "latent_geometry",
    "text_key",
    "text_shard",
    "text_crc",
)
_SOURCE_COLUMNS = ("source_path", "source_path_offsets", "source_size", "source_mtime_ns", "source_sha256")


def load_index(path: Path | str, *, with_sources: bool = False) -> CacheIndex:
    """Read an index file (``cache_dir/index.safetensors`` when given a folder).

    Only the entry columns are read unless `with_sources`: training never needs the stat cache.
    """
    path = Path(path)
    if path.is_dir():
        path = path / INDEX_NAME
    if not path.is_file():
        raise CacheError(f"no cache index at {path}; run `sdxl-trainer cache CONFIG` first")
    names = _INDEX_COLUMNS + (_SOURCE_COLUMNS if with_sources else ())
    columns, metadata = _read_table(path, names)
    if metadata.get("version") != str(CACHE_FORMAT_VERSION):
        raise CacheError(
            f"{path} has cache format {metadata.get('version')}, this code reads "
            f"{CACHE_FORMAT_VERSION}; run `sdxl-trainer cache CONFIG` to rebuild"
        )
    shards = json.loads(metadata["shards"])
    sources = None
    if with_sources:
        paths = _unpack_strings(columns["source_path"], columns["source_path_offsets"])
        hashes = [_key_hex(k) for k in _array_to_keys(columns["source_sha256"]).tolist()]
        sources = {
            p: SourceStat(int(s), int(m), h)
            for p, s, m, h in zip(
                paths, columns["source_size"].tolist(), columns["source_mtime_ns"].tolist(), hashes
            )
        }
    return CacheIndex(
        shard_names=list(shards),
        shard_sizes=np.asarray(list(shards.values()), dtype=np.int64),
        latent_keys=_array_to_keys(columns["latent_key"]),
        latent_shard=columns["latent_shard"],
        latent_crc=columns["latent_crc"],
        latent_geometry=columns["latent_geometry"],
        text_keys=_array_to_keys(columns["text_key"]),
        text_shard=columns["text_shard"],
        text_crc=columns["text_crc"],
        sources=sources,
    )


def _tables_from_index(index: CacheIndex) -> _Tables:
    names = index.shard_names
    latent_keys = [_key_hex(k) for k in index.latent_keys.tolist()]
    latents = {
        key: LatentEntry(
            shard=names[shard],
            crc=crc,
            original_size=(g[0], g[1]),
            crop_top_left=(g[2], g[3]),
            bucket=(g[4], g[5]),
            has_std=bool(g[6]),
        )
        for key, shard, crc, g in zip(
            latent_keys,
            index.latent_shard.tolist(),
            index.latent_crc.tolist(),
            index.latent_geometry.tolist(),
        )
    }
    texts = {
        _key_hex(k): TextEntry(shard=names[s], crc=c)
        for k, s, c in zip(index.text_keys.tolist(), index.text_shard.tolist(), index.text_crc.tolist())
    }
    return _Tables(
        shards=dict(zip(names, index.shard_sizes.tolist())),
        latents=latents,
        texts=texts,
        sources=dict(index.sources or {}),
    )


def _load_tables(path: Path) -> _Tables:
    """The builder's tables of an index file; empty when it is missing or of an older format."""
    if not path.is_file():
        return _Tables()
    _, metadata = _read_table(path, names=())
    if metadata.get("version") != str(CACHE_FORMAT_VERSION):
        return _Tables()  # every key changed with the format: nothing in it is reusable
    return _tables_from_index(load_index(path, with_sources=True))


def _write_index(tables: _Tables, path: Path) -> None:
    """Write the index atomically; only shards that entries still reference are listed.

    Entries are sorted by key, so readers find keys by binary search without sorting.
    """
    referenced = tables.referenced_shards()
    shard_names = sorted(name for name in tables.shards if name in referenced)
    shard_ids = {name: i for i, name in enumerate(shard_names)}
    latent_keys = sorted(tables.latents)
    latents = [tables.latents[key] for key in latent_keys]
    text_keys = sorted(tables.texts)
    texts = [tables.texts[key] for key in text_keys]
    source_paths = list(tables.sources)
    sources = list(tables.sources.values())
    path_blob, path_offsets = _pack_strings(source_paths)
    geometry = np.asarray(
        [(*e.original_size, *e.crop_top_left, *e.bucket, int(e.has_std)) for e in latents],
        dtype=np.int32,
    ).reshape(-1, 7)
    columns = {
        "latent_key": _keys_to_array(latent_keys),
        "latent_shard": np.asarray([shard_ids[e.shard] for e in latents], dtype=np.int32),
        "latent_crc": np.asarray([e.crc for e in latents], dtype=np.uint32),
        "latent_geometry": geometry,
        "text_key": _keys_to_array(text_keys),
        "text_shard": np.asarray([shard_ids[e.shard] for e in texts], dtype=np.int32),
        "text_crc": np.asarray([e.crc for e in texts], dtype=np.uint32),
        "source_path": path_blob,
        "source_path_offsets": path_offsets,
        "source_size": np.asarray([s.size for s in sources], dtype=np.int64),
        "source_mtime_ns": np.asarray([s.mtime_ns for s in sources], dtype=np.int64),
        "source_sha256": _keys_to_array([s.sha256 for s in sources]),
    }
    shards = json.dumps({name: tables.shards[name] for name in shard_names})
    _write_table(path, columns, {"shards": shards})


# ----------------------------------------------------------------------------- the manifest


@dataclass(frozen=True)
class ManifestItem:
    """One image of the build (listed `repeats` times per epoch by CachedDataset)."""

    position: int  # index of the record in the build's input
    latent_key: str
    text_keys: tuple[str, ...]  # one per caption variant (one when captions are not augmented)
    texts: tuple[str, ...]  # the text each of text_keys encodes
    caption: str  # the normalised caption the variants come from
    tags: tuple[str, ...]
    source: str
    bucket: tuple[int, int]  # (w, h)
    repeats: int = 1


def _write_manifest(path: Path, items: Sequence[ManifestItem], settings: dict[str, str]) -> None:
    variant_counts = {len(item.text_keys) for item in items}
    if len(variant_counts) > 1 or any(len(i.texts) != len(i.text_keys) for i in items):
        raise ValueError(f"every manifest item needs the same number of text variants, got {variant_counts}")
    variants = variant_counts.pop() if variant_counts else 1
    text_rows: dict[str, int] = {}
    texts: list[str] = []
    caption_rows: dict[str, int] = {}
    for item in items:
        for key, text in zip(item.text_keys, item.texts):
            if key not in text_rows:
                text_rows[key] = len(texts)
                texts.append(text)
        caption_rows.setdefault(item.caption, len(caption_rows))
    tag_ids: dict[str, int] = {}
    flat_tags: list[int] = []
    tag_offsets = np.zeros(len(items) + 1, dtype=np.int64)
    for i, item in enumerate(items):
        flat_tags.extend(tag_ids.setdefault(tag, len(tag_ids)) for tag in item.tags)
        tag_offsets[i + 1] = len(flat_tags)
    source_blob, source_offsets = _pack_strings([item.source for item in items])
    text_blob, text_offsets = _pack_strings(texts)
    caption_blob, caption_offsets = _pack_strings(list(caption_rows))
    vocab_blob, vocab_offsets = _pack_strings(list(tag_ids))
    item_text_rows = [[text_rows[key] for key in item.text_keys] for item in items]
    columns = {
        "item_position": np.asarray([item.position for item in items], dtype=np.int64),
        "item_latent_key": _keys_to_array([item.latent_key for item in items]),
        "item_text_rows": np.asarray(item_text_rows, dtype=np.int32).reshape(-1, variants),
        "item_caption_row": np.asarray([caption_rows[item.caption] for item in items], dtype=np.int32),
        "item_repeats": np.asarray([item.repeats for item in items], dtype=np.int32),
        "item_bucket": np.asarray([item.bucket for item in items], dtype=np.int32).reshape(-1, 2),
        "item_source": source_blob,
        "item_source_offsets": source_offsets,
        "item_tag_offsets": tag_offsets,
        "item_tag_ids": np.asarray(flat_tags, dtype=np.int32),
        "tag_vocab": vocab_blob,
        "tag_vocab_offsets": vocab_offsets,
        "text_key": _keys_to_array(list(text_rows)),
        "text_caption": text_blob,
        "text_caption_offsets": text_offsets,
        "caption": caption_blob,
        "caption_offsets": caption_offsets,
    }
    _write_table(path, columns, settings)


def read_manifest(path: Path | str) -> tuple[list[ManifestItem], dict[str, str]]:
    """All items of a manifest file as Python objects (for merging and inspection)."""
    columns, metadata = _read_table(Path(path))
    text_keys = [_key_hex(k) for k in _array_to_keys(columns["text_key"]).tolist()]
    texts = _unpack_strings(columns["text_caption"], columns["text_caption_offsets"])
    captions = _unpack_strings(columns["caption"], columns["caption_offsets"])
    vocab = _unpack_strings(columns["tag_vocab"], columns["tag_vocab_offsets"])
    sources = _unpack_strings(columns["item_source"], columns["item_source_offsets"])
    tag_offsets = columns["item_tag_offsets"].tolist()
    tag_ids = columns["item_tag_ids"].tolist()
    items = [
        ManifestItem(
            position=position,
            latent_key=_key_hex(key),
            text_keys=tuple(text_keys[row] for row in rows),
            texts=tuple(texts[row] for row in rows),
            caption=captions[caption_row],
            tags=tuple(vocab[t] for t in tag_ids[tag_offsets[i] : tag_offsets[i + 1]]),
            source=sources[i],
            bucket=(bucket[0], bucket[1]),
            repeats=repeats,
        )
        for i, (position, key, rows, caption_row, repeats, bucket) in enumerate(
            zip(
                columns["item_position"].tolist(),
                _array_to_keys(columns["item_latent_key"]).tolist(),
                columns["item_text_rows"].tolist(),
                columns["item_caption_row"].tolist(),
                columns["item_repeats"].tolist(),
                columns["item_bucket"].tolist(),
            )
        )
    ]
    settings = {k: v for k, v in metadata.items() if k not in ("format", "version")}
    return items, settings


# ----------------------------------------------------------------------------- reading shards


class _ShardReader:
    """Memory-mapped reads with checksum verification; keeps the last few shards open."""

    def __init__(self, cache_dir: Path, max_open: int = 8) -> None:
        self.cache_dir = cache_dir
        self.max_open = max_open
        self._open: OrderedDict[str, Any] = OrderedDict()

    def _handle(self, shard: str) -> Any:
        handle = self._open.get(shard)
        if handle is not None:
            self._open.move_to_end(shard)
            return handle
        handle = safe_open(str(self.cache_dir / shard), framework="pt")
        self._open[shard] = handle
        if len(self._open) > self.max_open:
            self._open.popitem(last=False)
        return handle

    def read(self, shard: str, names: Sequence[str], crc: int) -> list[torch.Tensor]:
        try:
            handle = self._handle(shard)
            tensors = [handle.get_tensor(name) for name in names]
        except (SafetensorError, OSError) as error:
            self._open.pop(shard, None)
            raise CacheCorruptError(
                f"cache shard {self.cache_dir / shard} cannot be read ({error}); {_REBUILD_HINT}"
            ) from error
        if _crc32(tensors) != crc:
            raise CacheCorruptError(
                f"checksum mismatch for entry {names[0].split('/')[0]} in cache shard "
                f"{self.cache_dir / shard}; {_REBUILD_HINT}"
            )
        return tensors

    def close(self) -> None:
        self._open.clear()

    def __getstate__(self) -> dict:
        # Open mmaps do not cross process boundaries: each DataLoader worker opens its own.
        return {"cache_dir": self.cache_dir, "max_open": self.max_open, "_open": OrderedDict()}


def _latent_names(key: str, has_std: bool) -> list[str]:
    return [f"{key}/mean", f"{key}/std"] if has_std else [f"{key}/mean"]


def _text_names(key: str) -> list[str]:
    return [f"{key}/prompt_embeds", f"{key}/pooled"]


# ----------------------------------------------------------------------------- the report


@dataclass
class CacheReport:
    cached: int = 0  # latent entries encoded by this build
    reused: int = 0  # latent entries found valid and kept
    text_encoded: int = 0
    text_reused: int = 0
    skipped: list[SkippedFile] = field(default_factory=list)
    bucket_counts: dict[str, int] = field(default_factory=dict)  # "WxH" -> images
    epoch_items: int = 0  # items per epoch: images x repeats
    corrupt_rebuilt: int = 0  # entries found damaged and encoded again
    corrupt_shards: dict[str, int] = field(default_factory=dict)  # shard -> damaged entries
    items: int = 0  # items in the manifest
    timings: dict[str, float] = field(default_factory=dict)  # seconds per build phase

    def to_json_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["skipped"] = [{"path": str(s.path), "reason": s.reason} for s in self.skipped]
        return data

    @classmethod
    def from_json_dict(cls, data: dict[str, Any]) -> CacheReport:
        data = dict(data)
        data["skipped"] = [SkippedFile(path=s["path"], reason=s["reason"]) for s in data["skipped"]]
        return cls(**data)


def _bucket_counts(items: Iterable[ManifestItem]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in items:
        name = f"{item.bucket[0]}x{item.bucket[1]}"
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def _record_items(report: CacheReport, items: Sequence[ManifestItem], cache_dir: Path | None) -> None:
    """Fill the report's item counts; with `cache_dir`, write the bucket table there."""
    report.items = len(items)
    report.epoch_items = sum(item.repeats for item in items)
    report.bucket_counts = _bucket_counts(items)
    if cache_dir is not None:
        summary = bucket_summary([Bucket(*item.bucket) for item in items], [item.repeats for item in items])
        _atomic_write_bytes(cache_dir / BUCKET_TABLE_NAME, json.dumps(summary, indent=2).encode())


# ----------------------------------------------------------------------------- building


@dataclass(frozen=True)
class _RankFiles:
    cache_dir: Path
    rank: int
    world_size: int

    def _name(self, stem: str, suffix: str) -> Path:
        if self.world_size == 1:
            return self.cache_dir / f"{stem}{suffix}"
        return self.cache_dir / f"{stem}.rank{self.rank:03d}{suffix}"

    @property
    def index(self) -> Path:
        return self._name("index", ".safetensors")

    @property
    def manifest(self) -> Path:
        return self._name("manifest", ".safetensors")

    @property
    def report(self) -> Path:
        return self._name("report", ".json")

    def owns(self, name: str) -> bool:
        """Whether this rank may delete a file of this name (the single rank owns everything)."""
        if self.world_size == 1:
            return True
        return name.startswith((f"shard-r{self.rank:03d}-", f"index.rank{self.rank:03d}.")) or (
            name.startswith((f"manifest.rank{self.rank:03d}.", f"report.rank{self.rank:03d}."))
        )


def _remove_temp_files(files: _RankFiles) -> None:
    """Half-written files of a killed build: never renamed, so never referenced."""
    for path in files.cache_dir.glob("*.tmp"):
        if files.owns(path.name):
            path.unlink()


def _remove_unreferenced_shards(cache_dir: Path, keep: set[str], owns: Callable[[str], bool]) -> None:
    for path in cache_dir.glob("shard-*.safetensors"):
        if path.name not in keep and owns(path.name):
            path.unlink()


def _next_shard_sequence(cache_dir: Path, rank: int) -> int:
    sequences = [
        int(match.group(2))
        for path in cache_dir.glob("shard-*.safetensors")
        if (match := _SHARD_RE.match(path.name)) and int(match.group(1)) == rank
    ]
    return max(sequences, default=0) + 1


class _ShardWriter:
    """Collects entries and commits them as shards; the index is rewritten after every shard."""

    def __init__(
        self,
        files: _RankFiles,
        tables: _Tables,
        max_entries: int,
        max_bytes: int,
        timings: _Timings,
    ) -> None:
        self.files = files
        self.timings = timings
        self.tables = tables
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.sequence = _next_shard_sequence(files.cache_dir, files.rank)
        self._tensors: dict[str, torch.Tensor] = {}
        self._latents: dict[str, LatentEntry] = {}
        self._texts: dict[str, TextEntry] = {}
        self._bytes = 0

    def _pending_name(self) -> str:
        return f"shard-r{self.files.rank:03d}-{self.sequence:06d}.safetensors"

    def _add(self, names: list[str], tensors: list[torch.Tensor]) -> int:
        stored = [t.to(device="cpu", copy=True).contiguous() for t in tensors]
        for name, tensor in zip(names, stored):
            self._tensors[name] = tensor
            self._bytes += tensor.numel() * tensor.element_size()
        return _crc32(stored)

    def add_latent(self, key: str, mean: torch.Tensor, std: torch.Tensor | None, geometry: dict) -> None:
        tensors = [mean] if std is None else [mean, std]
        crc = self._add(_latent_names(key, std is not None), tensors)
        self._latents[key] = LatentEntry(
            shard=self._pending_name(), crc=crc, has_std=std is not None, **geometry
        )
        self._commit_if_full()

    def add_text(self, key: str, prompt_embeds: torch.Tensor, pooled: torch.Tensor) -> None:
        crc = self._add(_text_names(key), [prompt_embeds, pooled])
        self._texts[key] = TextEntry(shard=self._pending_name(), crc=crc)
        self._commit_if_full()

    def _commit_if_full(self) -> None:
        if len(self._latents) + len(self._texts) >= self.max_entries or self._bytes >= self.max_bytes:
            self.commit()

    def commit(self) -> None:
        if not self._tensors:
            return
        name = self._pending_name()
        with self.timings("write"):
            size = _write_shard_file(self.files.cache_dir / name, self._tensors)
            self.tables.shards[name] = size
            self.tables.latents.update(self._latents)
            self.tables.texts.update(self._texts)
            _write_index(self.tables, self.files.index)
        self.sequence += 1
        self._tensors, self._latents, self._texts, self._bytes = {}, {}, {}, 0


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _content_hashes(
    paths: Sequence[str], known: Callable[[str], SourceStat | None], workers: int
) -> tuple[dict[str, SourceStat], list[SkippedFile]]:
    """sha256 of each file's bytes, reusing the stored hash when size and mtime_ns are unchanged."""
    stats: dict[str, SourceStat] = {}
    skipped: list[SkippedFile] = []
    to_hash: list[tuple[str, os.stat_result]] = []
    for path in dict.fromkeys(paths):
        try:
            stat = os.stat(path)
        except OSError as error:
            skipped.append(SkippedFile(path=path, reason=f"cannot stat: {error}"))
            continue
        previous = known(path)
        if previous is not None and (previous.size, previous.mtime_ns) == (stat.st_size, stat.st_mtime_ns):
            stats[path] = previous
        else:
            to_hash.append((path, stat))

    def hash_one(job: tuple[str, os.stat_result]) -> tuple[str, os.stat_result, str | OSError]:
        path, stat = job
        try:
            return path, stat, _file_sha256(path)
        except OSError as error:
            return path, stat, error

    # hashlib releases the GIL on large buffers, so threads overlap reading and hashing.
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for path, stat, result in pool.map(hash_one, to_hash):
            if isinstance(result, OSError):
                skipped.append(SkippedFile(path=path, reason=f"cannot read: {result}"))
            else:
                stats[path] = SourceStat(stat.st_size, stat.st_mtime_ns, result)
    return stats, skipped


def _verify_entries(
    reader: _ShardReader,
    shard_sizes: dict[str, int],
    entries: dict[str, tuple[str, list[str], int]],
) -> dict[str, str]:
    """Check each entry (key -> (shard, tensor names, crc)); returns damaged key -> shard."""
    damaged: dict[str, str] = {}
    by_shard: dict[str, list[str]] = {}
    for key, (shard, _, _) in entries.items():
        by_shard.setdefault(shard, []).append(key)
    for shard, keys in sorted(by_shard.items()):
        path = reader.cache_dir / shard
        size = path.stat().st_size if path.is_file() else -1
        if size != shard_sizes.get(shard):  # missing or truncated: nothing in it can be trusted
            damaged.update({key: shard for key in keys})
            continue
        for key in keys:
            _, names, crc = entries[key]
            try:
                reader.read(shard, names, crc)
            except CacheCorruptError:
                damaged[key] = shard
    reader.close()
    return damaged


@dataclass(frozen=True)
class _DecodeJob:
    key: str
    path: str
    bucket: tuple[int, int]  # (w, h)
    crop_seed: str
    planned_crop: tuple[int, int] | None  # the random crop in the key (None for center crops)


class _DecodeDataset(Dataset):
    """Decode, bucket-resize and crop images in DataLoader workers; failures come back as reasons."""

    def __init__(self, jobs: Sequence[_DecodeJob], crop: str) -> None:
        self.jobs = list(jobs)
        self.crop = crop

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, j: int) -> dict[str, Any]:
        job = self.jobs[j]
        bucket = Bucket(*job.bucket)
        rng = random.Random(job.crop_seed) if self.crop == "random" else None
        try:
            image = load_image_rgb(Path(job.path))
            prepared, original_size, crop_top_left = prepare_image(image, bucket, crop=self.crop, rng=rng)
        except _DECODE_ERRORS as error:
            return {"job": j, "error": f"cannot decode image: {type(error).__name__}: {error}"}
        if job.planned_crop is not None and tuple(crop_top_left) != job.planned_crop:
            return {
                "job": j,
                "error": f"decoded size {image.width}x{image.height} differs from the scanned size "
                "(the file changed during the build); run the cache build again",
            }
        pixels = torch.from_numpy(np.array(prepared, dtype=np.uint8)).permute(2, 0, 1).contiguous()
        if tuple(pixels.shape) != (3, bucket.height, bucket.width):
            raise CacheError(
                f"prepare_image returned {tuple(pixels.shape)} for bucket {bucket}; expected "
                f"(3, {bucket.height}, {bucket.width})"
            )
        return {
            "job": j,
            "pixels": pixels,
            "original_size": tuple(int(v) for v in original_size),
            "crop_top_left": tuple(int(v) for v in crop_top_left),
        }


def _collate_decoded(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return items


def _bucket_batches(jobs: Sequence[_DecodeJob], batch_size: int) -> list[list[int]]:
    """Job indices in batches of one bucket each (so a VAE batch has one image size)."""
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for j, job in enumerate(jobs):
        by_bucket.setdefault(job.bucket, []).append(j)
    return [
        members[start : start + batch_size]
        for _, members in sorted(by_bucket.items())
        for start in range(0, len(members), batch_size)
    ]


@torch.no_grad()
def _encode_latents(
    vae: torch.nn.Module, pixels: torch.Tensor, latent_mode: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Shifted and scaled mean (and std) of the latent distribution, float32."""
    dist = vae.encode(pixels).latent_dist
    scale = float(vae.config.scaling_factor)
    shift = float(vae.config.get("shift_factor") or 0.0)
    mean = (dist.mean.float() - shift) * scale
    std = dist.std.float() * scale if latent_mode == "sample" else None
    if not torch.isfinite(mean).all() or (std is not None and not torch.isfinite(std).all()):
        raise CacheError(
            "the VAE produced non-finite latents; encode in float32 (dtype=float32) or use a VAE "
            "that is stable in half precision"
        )
    return mean, std


def _place(module: torch.nn.Module, device: torch.device | str, dtype: torch.dtype) -> None:
    module.to(device=device).eval()
    # Only cast when needed: diffusers warns on every dtype cast of a VAE, even a no-op one.
    if next(module.parameters()).dtype != dtype:
        module.to(dtype=dtype)


def _record_texts(records: Sequence[ImageRecord], augment: CaptionAugment) -> list[tuple[str, ...]]:
    """The texts to encode for each record: its caption, or its caption variants."""
    if not augment.enabled:
        return [(record.caption,) for record in records]
    by_tags: dict[tuple[str, ...], tuple[str, ...]] = {}  # many images share a caption
    texts = []
    for record in records:
        tags = tuple(record.tags)
        if tags not in by_tags:
            by_tags[tags] = caption_variants(tags, augment)
        texts.append(by_tags[tags])
    return texts


class _Timings:
    """Seconds spent per build phase, accumulated (reported in report.json)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


def _encode_texts(
    texts: Sequence[tuple[str, str]],
    writer: _ShardWriter,
    tokenizers: Sequence[Any],
    text_encoders: Sequence[torch.nn.Module],
    device: torch.device | str,
    store_dtype: torch.dtype,
    batch_size: int,
) -> None:
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        with torch.no_grad():
            embeddings = encode_prompts([caption for caption, _ in chunk], tokenizers, text_encoders, device)
        for row, (_, key) in enumerate(chunk):
            writer.add_text(
                key,
                embeddings.prompt_embeds[row].to(store_dtype),
                embeddings.pooled_prompt_embeds[row].to(store_dtype),
            )


def _encode_images(
    batches: Iterable[list[dict[str, Any]]],
    jobs: Sequence[_DecodeJob],
    writer: _ShardWriter,
    vae: torch.nn.Module,
    device: torch.device | str,
    dtype: torch.dtype,
    store_dtype: torch.dtype,
    latent_mode: str,
    timings: _Timings,
    bar: tqdm,
) -> dict[str, str]:
    """Encode decoded batches into the writer; returns the keys whose image failed -> reason."""
    failed: dict[str, str] = {}
    batches = iter(batches)
    while True:
        with timings("wait_for_images"):  # ~0 when decoding is hidden behind the encoder
            batch = next(batches, None)
        if batch is None:
            return failed
        good = [item for item in batch if "error" not in item]
        failed.update({jobs[item["job"]].key: item["error"] for item in batch if "error" in item})
        if good:
            with timings("vae_encode"):
                pixels = torch.stack([item["pixels"] for item in good]).to(device, non_blocking=True)
                mean, std = _encode_latents(vae, pixels.to(dtype) / 127.5 - 1.0, latent_mode)
            for row, item in enumerate(good):
                job = jobs[item["job"]]
                geometry = {
                    "original_size": item["original_size"],
                    "crop_top_left": item["crop_top_left"],
                    "bucket": job.bucket,
                }
                std_row = None if std is None else std[row].to(store_dtype)
                writer.add_latent(job.key, mean[row].to(store_dtype), std_row, geometry)
        bar.update(len(batch))


def build_cache(
    records: Sequence[ImageRecord],
    *,
    cache_dir: Path | str,
    vae: torch.nn.Module,
    tokenizers: Sequence[Any],
    text_encoders: Sequence[torch.nn.Module],
    buckets: Sequence[Bucket],
    crop: str = "center",
    latent_mode: str = "sample",
    batch_size: int = 8,
    num_workers: int = 2,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    store_dtype: torch.dtype = torch.float32,
    shard_max_entries: int = DEFAULT_SHARD_MAX_ENTRIES,
    shard_max_bytes: int = DEFAULT_SHARD_MAX_BYTES,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] | None = None,
    verify_existing: bool = True,
    progress: bool = True,
    seed: int = 0,
    scan_skipped: Sequence[SkippedFile] = (),
    no_upscale: bool = False,
    bucket_step: int = 64,
    caption_augment: CaptionAugment = CaptionAugment(),
) -> CacheReport:
    """Encode what is missing from the cache for `records` and write the manifest and report.

    Moves `vae` and `text_encoders` to `device`/`dtype` (eval mode). Rank `rank` encodes
    records[rank::world_size] and every world_size-th distinct text. Each record is encoded
    once whatever its `repeats`. With `no_upscale`, images smaller than their bucket get a
    bucket of their own size (`assign_bucket_no_upscale`, multiples of `bucket_step`). With
    `caption_augment` enabled, each caption is encoded as `caption_augment.variants` variants.
    A random `crop` is drawn per (seed, image content, bucket) and is part of the latent key.
    The bucket table (images and items per resolution) goes to ``bucket_table.json``.
    With world_size > 1 and a `barrier`, rank 0 merges the ranks' files after all have
    finished; without a barrier the caller runs `merge_rank_indexes` once every rank is done.
    Returns this rank's report.
    Reused entries are checksum-verified first unless `verify_existing` is False (that reads
    the whole cache once). `scan_skipped` (files the scan refused) go into rank 0's report.
    """
    _check_choice("crop", crop, CROP_MODES)
    _check_choice("latent_mode", latent_mode, LATENT_MODES)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if batch_size < 1 or shard_max_entries < 1 or shard_max_bytes < 1:
        raise ValueError("batch_size, shard_max_entries and shard_max_bytes must be >= 1")
    if len(tokenizers) != 2 or len(text_encoders) != 2:
        raise ValueError("SDXL needs two tokenizers and two text encoders")
    if not buckets:
        raise ValueError("buckets is empty")
    timings = _Timings()
    started = time.perf_counter()

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    files = _RankFiles(cache_dir, rank, world_size)
    _remove_temp_files(files)
    # `own` is what this rank writes; `known` adds what it may reuse from earlier builds.
    own = _load_tables(files.index)
    known = _load_tables(cache_dir / INDEX_NAME) if world_size > 1 else own
    if world_size == 1:  # fold in the partial indexes of an interrupted multi-rank build
        for partial in sorted(cache_dir.glob("index.rank*.safetensors")):
            own.update(_load_tables(partial))
    else:
        known.update(own)

    for module in (vae, *text_encoders):
        _place(module, device, dtype)
    with timings("identity"):
        vae_id = vae_identity(vae, dtype, store_dtype)
        text_id = text_identity(tokenizers, text_encoders, dtype, store_dtype)

    # Plan: content hash -> latent key per record; which entries exist; which captions are ours.
    report = CacheReport()
    if rank == 0:
        report.skipped.extend(scan_skipped)
    positions = range(rank, len(records), world_size)
    with timings("hash"):
        stats, report.skipped = _content_hashes(
            [os.fspath(records[p].path) for p in positions], known.sources.get, num_workers
        )
    own.sources.update(stats)
    planned: list[tuple[int, str, Bucket, str, tuple[int, int] | None]] = []
    for p in positions:  # (position, latent key, bucket, crop seed, random crop)
        record = records[p]
        stat = stats.get(os.fspath(record.path))
        if stat is None:
            continue
        if no_upscale:
            bucket = assign_bucket_no_upscale(record.width, record.height, buckets, bucket_step)
        else:
            bucket = assign_bucket(record.width, record.height, buckets)
        crop_seed = f"{seed}/{stat.sha256}/{bucket}"
        drawn = None
        if crop == "random":  # drawn here from the scanned size; the decoder repeats the draw
            geometry = crop_geometry(record.width, record.height, bucket, crop, random.Random(crop_seed))
            drawn = (geometry.top, geometry.left)
        key = latent_key(stat.sha256, vae_id, bucket, crop, latent_mode, drawn)
        planned.append((p, key, bucket, crop_seed, drawn))
    record_texts = _record_texts(records, caption_augment)
    unique_texts = list(dict.fromkeys(text for texts in record_texts for text in texts))
    owned_captions = {c: text_key(c, text_id) for c in unique_texts[rank::world_size]}
    reusable = {
        key: (e.shard, _latent_names(key, e.has_std), e.crc)
        for _, key, _, _, _ in planned
        if (e := known.latents.get(key)) is not None
    }
    reusable.update(
        {
            key: (e.shard, _text_names(key), e.crc)
            for key in owned_captions.values()
            if (e := known.texts.get(key)) is not None
        }
    )

    # Verify what is reused; damaged entries are dropped and encoded again.
    damaged: dict[str, str] = {}
    if verify_existing:
        with timings("verify"):
            damaged = _verify_entries(_ShardReader(cache_dir), known.shards, reusable)
    for key, shard in damaged.items():
        report.corrupt_shards[shard] = report.corrupt_shards.get(shard, 0) + 1
        for tables in (own, known):
            tables.latents.pop(key, None)
            tables.texts.pop(key, None)
    report.corrupt_rebuilt = len(damaged)

    jobs: dict[str, _DecodeJob] = {}
    for p, key, bucket, crop_seed, drawn in planned:
        if key not in reusable or key in damaged:
            path = os.fspath(records[p].path)
            jobs.setdefault(key, _DecodeJob(key, path, (bucket.width, bucket.height), crop_seed, drawn))
    job_list = list(jobs.values())
    report.reused = len({key for _, key, _, _, _ in planned}) - len(job_list)
    texts = [(c, key) for c, key in owned_captions.items() if key not in reusable or key in damaged]
    report.text_reused = len(owned_captions) - len(texts)
    report.text_encoded = len(texts)

    # Encode: workers decode images while the text encoders, then the VAE, run.
    writer = _ShardWriter(files, own, shard_max_entries, shard_max_bytes, timings)
    loader = DataLoader(
        _DecodeDataset(job_list, crop),
        batch_sampler=_bucket_batches(job_list, batch_size),
        num_workers=num_workers if job_list else 0,
        collate_fn=_collate_decoded,
        pin_memory=torch.device(device).type == "cuda",
        prefetch_factor=4 if num_workers > 0 and job_list else None,
    )
    decoded_batches = iter(loader)  # starts the workers
    with timings("text_encode"):
        _encode_texts(texts, writer, tokenizers, text_encoders, device, store_dtype, batch_size)
    with tqdm(total=len(job_list), desc=f"cache (rank {rank})", disable=not progress) as bar:
        failed = _encode_images(
            decoded_batches, job_list, writer, vae, device, dtype, store_dtype, latent_mode, timings, bar
        )
    writer.commit()
    report.cached = len(job_list) - len(failed)

    # Record: manifest in input order, final index, report; then remove what nothing references.
    items: list[ManifestItem] = []
    for p, key, bucket, _, _ in planned:
        record = records[p]
        if key in failed:
            report.skipped.append(SkippedFile(path=os.fspath(record.path), reason=failed[key]))
            continue
        items.append(
            ManifestItem(
                position=p,
                latent_key=key,
                text_keys=tuple(text_key(text, text_id) for text in record_texts[p]),
                texts=record_texts[p],
                caption=record.caption,
                tags=tuple(record.tags),
                source=os.fspath(record.path),
                bucket=(bucket.width, bucket.height),
                repeats=record.repeats,
            )
        )
    with timings("write"):
        _write_index(own, files.index)
        settings = {
            "crop": crop,
            "latent_mode": latent_mode,
            "vae_identity": vae_id,
            "text_identity": text_id,
            "no_upscale": str(no_upscale),
            "caption_augment": caption_augment.describe(),
        }
        _write_manifest(files.manifest, items, settings)
    _record_items(report, items, cache_dir if world_size == 1 else None)
    timings.seconds["total"] = time.perf_counter() - started
    report.timings = {phase: round(seconds, 4) for phase, seconds in timings.seconds.items()}
    _atomic_write_bytes(files.report, json.dumps(report.to_json_dict(), indent=2).encode())
    if world_size == 1:
        _check_manifest_resolves(items, own, files.manifest)
        for partial in cache_dir.glob("*.rank*.*"):
            partial.unlink()
        _remove_unreferenced_shards(cache_dir, own.referenced_shards(), files.owns)
    else:
        keep = own.referenced_shards() | known.referenced_shards()
        _remove_unreferenced_shards(cache_dir, keep, files.owns)
        if barrier is not None:
            barrier()
            if rank == 0:
                merge_rank_indexes(cache_dir, world_size)
            barrier()
    return report


def _check_manifest_resolves(items: Iterable[ManifestItem], tables: _Tables, where: Path) -> None:
    for item in items:
        if item.latent_key not in tables.latents or any(k not in tables.texts for k in item.text_keys):
            raise CacheError(
                f"{where} references an entry missing from the index (item {item.source}); "
                "did every rank finish? run `sdxl-trainer cache CONFIG` again"
            )


def merge_rank_indexes(cache_dir: Path | str, world_size: int) -> CacheReport:
    """Fold every rank's partial index, manifest and report into the single-rank files.

    Run once, on one process, after all ranks finished (the caller's barrier). Removes the
    partial files and shards no entry references any more. Returns the combined report.
    """
    cache_dir = Path(cache_dir)
    tables = _load_tables(cache_dir / INDEX_NAME)
    items: list[ManifestItem] = []
    settings: dict[str, str] | None = None
    report = CacheReport()
    for rank in range(world_size):
        files = _RankFiles(cache_dir, rank, world_size)
        for path in (files.index, files.manifest, files.report):
            if not path.is_file():
                raise CacheError(f"rank {rank} has not finished its cache build: {path} is missing")
        tables.update(_load_tables(files.index))
        rank_items, rank_settings = read_manifest(files.manifest)
        if settings is not None and rank_settings != settings:
            raise CacheError(
                f"rank {rank} built its cache with different settings ({rank_settings}) than rank 0 "
                f"({settings}); build every rank with the same models and options"
            )
        settings = rank_settings
        items.extend(rank_items)
        part = CacheReport.from_json_dict(json.loads(files.report.read_text(encoding="utf-8")))
        for name in ("cached", "reused", "text_encoded", "text_reused", "corrupt_rebuilt"):
            setattr(report, name, getattr(report, name) + getattr(part, name))
        report.skipped.extend(part.skipped)
        for shard, count in part.corrupt_shards.items():
            report.corrupt_shards[shard] = report.corrupt_shards.get(shard, 0) + count
        for phase, seconds in part.timings.items():  # the slowest rank sets the wall time
            report.timings[phase] = max(report.timings.get(phase, 0.0), seconds)
    items.sort(key=lambda item: item.position)
    _check_manifest_resolves(items, tables, cache_dir / MANIFEST_NAME)
    _write_index(tables, cache_dir / INDEX_NAME)
    _write_manifest(cache_dir / MANIFEST_NAME, items, settings or {})
    _record_items(report, items, cache_dir)
    _atomic_write_bytes(cache_dir / REPORT_NAME, json.dumps(report.to_json_dict(), indent=2).encode())
    for partial in cache_dir.glob("*.rank*.*"):
        partial.unlink()
    for tmp in cache_dir.glob("*.tmp"):
        tmp.unlink()
    _remove_unreferenced_shards(cache_dir, tables.referenced_shards(), lambda name: True)
    return report


# ----------------------------------------------------------------------------- training-time reads


def _rows_of(table_keys: np.ndarray, wanted: np.ndarray, what: str, where: Path) -> np.ndarray:
    """Row of each wanted key in the sorted table_keys (both 'S32'), by binary search."""
    if len(wanted) == 0:
        return np.zeros(0, dtype=np.int64)
    if len(table_keys) == 0 or not (table_keys[1:] >= table_keys[:-1]).all():
        raise CacheCorruptError(
            f"the {what} entries of the cache index in {where} are missing or out of order; "
            "delete the folder and run `sdxl-trainer cache CONFIG`"
        )
    rows = np.searchsorted(table_keys, wanted)
    np.minimum(rows, len(table_keys) - 1, out=rows)
    for start in range(0, len(wanted), 65536):  # in chunks: no full-size temporary copy of keys
        chunk = slice(start, start + 65536)
        found = table_keys[rows[chunk]] == wanted[chunk]
        if not found.all():
            missing = _key_hex(wanted[chunk][~found][0])
            raise CacheError(
                f"the manifest in {where} references {what} entry {missing} that the index lacks; "
                "run `sdxl-trainer cache CONFIG` to rebuild"
            )
    return rows


_MANIFEST_TRAINING_COLUMNS = (
    "item_latent_key",
    "item_text_rows",
    "item_caption_row",
    "item_repeats",
    "item_bucket",
    "item_source_offsets",
    "item_tag_offsets",
    "item_tag_ids",
    "tag_vocab",
    "tag_vocab_offsets",
    "text_key",
    "caption",
    "caption_offsets",
)
_TEXT_CHOICE_STREAM = 1  # keeps the caption draws independent of the latent-noise draws


def _noise_seed(seed: int, epoch: int, index: int) -> int:
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def _text_draws(seed: int, epoch: int, index: int) -> tuple[float, int]:
    """(uniform in [0, 1) for caption dropout, uint32 for the variant choice) of one item."""
    sequence = np.random.SeedSequence([seed, epoch, index, _TEXT_CHOICE_STREAM])
    state = sequence.generate_state(2, dtype=np.uint32)
    return int(state[0]) / 2**32, int(state[1])


class CachedDataset(Dataset):
    """The cached training set: items in manifest order, tensors read memory-mapped on demand.

    An image with repeats r is r consecutive items (one cache entry). Opening reads the manifest
    and the index's entry columns only (numpy arrays, no per-item Python objects). Everything
    random about item i is drawn from (seed, epoch, i), so it is identical across runs, workers
    and resumes: its latent is mean + std * eps; its text is one of its caption variants; with
    probability `caption_dropout` its text conditioning (prompt and pooled embeddings) is all
    zeros, the unconditional input of diffusers' SDXL pipeline (force_zeros_for_empty_prompt).
    Call `set_epoch` before each epoch's DataLoader iterator is created (as with
    DistributedSampler; persistent workers would keep the old epoch).
    """

    def __init__(
        self,
        cache_dir: Path | str,
        seed: int = 0,
        max_open_shards: int = 8,
        caption_dropout: float = 0.0,
    ) -> None:
        if not 0.0 <= caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {caption_dropout}")
        self.cache_dir = Path(cache_dir)
        self.seed = seed
        self.caption_dropout = caption_dropout
        self.epoch = 0
        manifest_path = self.cache_dir / MANIFEST_NAME
        if not manifest_path.is_file():
            raise CacheError(
                f"no cache manifest at {manifest_path}; run `sdxl-trainer cache CONFIG` first"
            )
        manifest, settings = _read_table(manifest_path, _MANIFEST_TRAINING_COLUMNS)
        index = load_index(self.cache_dir)
        self.latent_mode = settings.get("latent_mode", "sample")
        repeats = manifest["item_repeats"].astype(np.int64)
        if len(repeats) and repeats.min() < 1:
            raise CacheCorruptError(f"{manifest_path} lists an image with repeats < 1; {_REBUILD_HINT}")
        # Item -> manifest row (image); repeats expand rows, never entries.
        self._row = np.repeat(np.arange(len(repeats), dtype=np.int64), repeats)

        self._latent_keys = _array_to_keys(manifest["item_latent_key"])
        latent_rows = _rows_of(index.latent_keys, self._latent_keys, "latent", self.cache_dir)
        self._latent_shard = index.latent_shard[latent_rows]
        self._latent_crc = index.latent_crc[latent_rows]
        geometry = index.latent_geometry[latent_rows]
        self._has_std = geometry[:, 6].astype(bool)
        # time ids: original (h, w), crop (top, left), target (h, w) = bucket (h, w)
        self._time_ids = np.concatenate([geometry[:, 0:4], geometry[:, 5:6], geometry[:, 4:5]], axis=1)

        self._text_rows = manifest["item_text_rows"]  # [images, variants]
        self._caption_row = manifest["item_caption_row"]
        self._text_keys = _array_to_keys(manifest["text_key"])
        text_rows = _rows_of(index.text_keys, self._text_keys, "text", self.cache_dir)
        self._text_shard = index.text_shard[text_rows]
        self._text_crc = index.text_crc[text_rows]
        self._captions = (manifest["caption"], manifest["caption_offsets"])
        self._shard_names = index.shard_names

        item_buckets = manifest["item_bucket"]
        if len(item_buckets):
            table, inverse = np.unique(item_buckets, axis=0, return_inverse=True)
            self._image_bucket_ids = inverse.reshape(-1).astype(np.int32)
        else:
            table, self._image_bucket_ids = np.zeros((0, 2), dtype=np.int32), np.zeros(0, dtype=np.int32)
        self._buckets = [Bucket(int(w), int(h)) for w, h in table.tolist()]
        self._tag_vocab = _unpack_strings(manifest["tag_vocab"], manifest["tag_vocab_offsets"])
        self._tag_offsets = manifest["item_tag_offsets"]
        self._tag_ids = manifest["item_tag_ids"]
        self._source_offsets = manifest["item_source_offsets"]  # the paths stay on disk
        self._reader = _ShardReader(self.cache_dir, max_open=max_open_shards)

    def __len__(self) -> int:
        return len(self._row)

    @property
    def num_images(self) -> int:
        """Distinct images (manifest rows); len(self) counts each image `repeats` times."""
        return len(self._latent_keys)

    @property
    def num_variants(self) -> int:
        """Caption variants per image (1 when captions are not augmented)."""
        return int(self._text_rows.shape[1])

    def image_of(self, i: int) -> int:
        """The image (manifest row) that item i lists."""
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for a dataset of {len(self)} items")
        return int(self._row[i])

    @property
    def repeats(self) -> list[int]:
        """Repeats per image (manifest row)."""
        return np.bincount(self._row, minlength=self.num_images).tolist()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])

    @property
    def buckets(self) -> list[Bucket]:
        return list(self._buckets)

    @property
    def bucket_ids(self) -> list[int]:
        """Bucket of every item (for BucketBatchSampler)."""
        return self._image_bucket_ids[self._row].tolist()

    @property
    def captions(self) -> list[str]:
        """The original (normalised) caption of every item, before any variant or dropout."""
        captions = _unpack_strings(*self._captions)
        return [captions[row] for row in self._caption_row[self._row].tolist()]

    def tags(self, i: int) -> tuple[str, ...]:
        row = self.image_of(i)
        start, stop = int(self._tag_offsets[row]), int(self._tag_offsets[row + 1])
        return tuple(self._tag_vocab[t] for t in self._tag_ids[start:stop].tolist())

    def text_choice(self, i: int) -> tuple[int, bool]:
        """(caption variant, caption dropped) of item i in the current epoch; cheap, no reads."""
        uniform, draw = _text_draws(self.seed, self.epoch, i)
        return draw % self.num_variants, uniform < self.caption_dropout

    def source(self, i: int) -> str:
        """The image file item i was encoded from (read from the manifest on demand)."""
        row = self.image_of(i)
        start, stop = int(self._source_offsets[row]), int(self._source_offsets[row + 1])
        with safe_open(str(self.cache_dir / MANIFEST_NAME), framework="numpy") as handle:
            return handle.get_slice("item_source")[start:stop].tobytes().decode("utf-8")

    def latent_distribution(self, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Item i's stored (mean, std), float32, already shifted and scaled; std is None in "mean" mode."""
        row = self.image_of(i)
        key = _key_hex(self._latent_keys[row])
        shard = self._shard_names[self._latent_shard[row]]
        names = _latent_names(key, bool(self._has_std[row]))
        tensors = [t.float() for t in self._reader.read(shard, names, int(self._latent_crc[row]))]
        return tensors[0], (tensors[1] if len(tensors) == 2 else None)

    def text_embeddings(self, image: int, variant: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds, pooled) of caption variant `variant` of image (manifest row) `image`."""
        text_row = int(self._text_rows[image, variant])
        key = _key_hex(self._text_keys[text_row])
        shard = self._shard_names[self._text_shard[text_row]]
        prompt_embeds, pooled = self._reader.read(shard, _text_names(key), int(self._text_crc[text_row]))
        return prompt_embeds.float(), pooled.float()

    def __getitem__(self, i: int) -> dict[str, Any]:
        latents, std = self.latent_distribution(i)
        if std is not None:
            generator = torch.Generator().manual_seed(_noise_seed(self.seed, self.epoch, i))
            latents = latents + std * torch.randn(latents.shape, generator=generator)
        row = int(self._row[i])
        variant, dropped = self.text_choice(i)
        prompt_embeds, pooled = self.text_embeddings(row, variant)
        if dropped:  # the pipeline's unconditional input: zeros (force_zeros_for_empty_prompt)
            prompt_embeds, pooled = torch.zeros_like(prompt_embeds), torch.zeros_like(pooled)
        t = self._time_ids[row].tolist()
        return {
            "latents": latents,
            "prompt_embeds": prompt_embeds,
            "pooled_prompt_embeds": pooled,
            "time_ids": time_ids((t[0], t[1]), (t[2], t[3]), (t[4], t[5])),
            "index": i,
            "caption_variant": variant,
            "caption_dropped": dropped,
        }

    @staticmethod
    def collate(items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        shapes = {tuple(item["latents"].shape) for item in items}
        if len(shapes) != 1:
            raise ValueError(
                f"a batch mixes latent shapes {sorted(shapes)}; "
                "batch with BucketBatchSampler(dataset.bucket_ids, ...)"
            )
        return {
            "latents": torch.stack([item["latents"] for item in items]),
            "prompt_embeds": torch.stack([item["prompt_embeds"] for item in items]),
            "pooled_prompt_embeds": torch.stack([item["pooled_prompt_embeds"] for item in items]),
            "time_ids": torch.stack([item["time_ids"] for item in items]),
            "index": torch.tensor([item["index"] for item in items], dtype=torch.long),
        }
