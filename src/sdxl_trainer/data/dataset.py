"""Scanning a folder of images + captions into records, and loading images as RGB.

A dataset is a folder searched recursively. Captions come from ``metadata.jsonl`` at the root
(Hugging Face imagefolder convention: ``file_name`` plus ``text``, ``caption`` or ``tags``) when
it lists the image, otherwise from the same-stem ``.txt`` beside the image. Files and folders
whose name starts with ``.`` are ignored. Every image that cannot be used becomes a
:class:`SkippedFile` with a precise reason; scanning never crashes on a bad file.

Scanning reads image headers only (plus a cheap integrity check), never full pixel data.

Sources and repeats: a dataset is one or more :class:`DataSource` folders, each with a repeat
count; inside a source, a top-level subfolder named ``N_name`` (kohya style, e.g. ``10_cat``)
multiplies the repeats of every image below it by ``N``. An image with repeats ``r`` is scanned,
hashed and encoded once; the cached dataset lists it ``r`` times per epoch (each copy with its
own latent noise draw, caption variant and caption-dropout draw). Repeats therefore lengthen
the epoch (its length is the sum of all repeats) and grow the share of the image's bucket in
it; copies of one image may share a batch, since batches are drawn per bucket.

Caption variants: with ``shuffle_tags`` or ``tag_dropout`` the cache cannot hold one text
embedding per caption, so :func:`caption_variants` makes ``count`` deterministic variants of
each caption (variant k from an RNG keyed by (caption, k)); every variant is encoded once
(texts are de-duplicated) and training picks one per (seed, epoch, item). Cost: up to ``count``
times the text entries, cache size and text-encoding time; and the model sees at most ``count``
orderings/dropouts of a caption, not a fresh one each step.
"""

from __future__ import annotations

import io
import json
import logging
import os
import posixpath
import random
import re
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageCms, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
METADATA_NAME = "metadata.jsonl"
DEFAULT_MAX_PIXELS = 178_956_970  # Pillow's own hard limit (2 * Image.MAX_IMAGE_PIXELS by default)
MISSING_CAPTION_POLICIES = ("skip", "empty")
_CAPTION_KEYS = ("text", "caption", "tags")  # metadata.jsonl caption columns, first present wins


class DatasetError(ValueError):
    """The dataset cannot be used at all (no folder, or no usable image)."""


@dataclass(frozen=True)
class ImageRecord:
    path: Path  # absolute path of the image
    caption: str  # normalised caption text: ", ".join(tags)
    tags: tuple[str, ...]
    width: int  # after EXIF transpose
    height: int
    repeats: int = 1  # times the image is listed per epoch (source repeats x N of an N_name folder)


@dataclass(frozen=True)
class SkippedFile:
    path: str
    reason: str

    @property
    def category(self) -> str:
        """The reason without its details, e.g. ``missing caption file``."""
        return re.split(r":| \(", self.reason, maxsplit=1)[0].strip()


@dataclass
class ScanResult:
    records: list[ImageRecord]
    skipped: list[SkippedFile] = field(default_factory=list)

    def skip_counts(self) -> dict[str, int]:
        """How many files were skipped for each reason category, most frequent first."""
        return dict(Counter(s.category for s in self.skipped).most_common())

    def format_skip_report(self) -> str:
        """One line per skipped file, for logs."""
        return "\n".join(f"  {s.path}: {s.reason}" for s in self.skipped)


@dataclass(frozen=True)
class CaptionOptions:
    lowercase: bool = False
    underscores_to_spaces: bool = True
    # "skip": images without caption text (no caption, or an empty one) are skipped;
    # "empty": they are kept with an empty caption (unconditional training).
    missing_caption: str = "skip"

    def __post_init__(self) -> None:
        if self.missing_caption not in MISSING_CAPTION_POLICIES:
            raise ValueError(
                f"missing_caption must be one of {MISSING_CAPTION_POLICIES}, got {self.missing_caption!r}"
            )


@dataclass(frozen=True)
class CaptionAugment:
    """Tag shuffling/dropout baked into ``variants`` cached caption variants (see the module doc)."""

    shuffle_tags: bool = False
    keep_tokens: int = 0  # the first keep_tokens tags are never shuffled nor dropped
    tag_dropout: float = 0.0  # probability that each other tag is left out of a variant
    variants: int = 1

    def __post_init__(self) -> None:
        if self.keep_tokens < 0:
            raise ValueError(f"keep_tokens must be >= 0, got {self.keep_tokens}")
        if not 0.0 <= self.tag_dropout < 1.0:
            raise ValueError(f"tag_dropout must be in [0, 1), got {self.tag_dropout}")
        if self.variants < 1:
            raise ValueError(f"variants must be >= 1, got {self.variants}")

    @property
    def enabled(self) -> bool:
        return self.shuffle_tags or self.tag_dropout > 0.0

    def describe(self) -> str:
        """A stable one-line summary (recorded in the cache manifest)."""
        if not self.enabled:
            return "none"
        return (
            f"variants={self.variants},shuffle_tags={self.shuffle_tags},"
            f"keep_tokens={self.keep_tokens},tag_dropout={self.tag_dropout}"
        )


def caption_variants(tags: Sequence[str], augment: CaptionAugment) -> tuple[str, ...]:
    """The caption texts to encode for one image: ``(", ".join(tags),)`` without augmentation,
    else ``augment.variants`` texts. Variant k drops each tag after the first ``keep_tokens``
    with probability ``tag_dropout``, then shuffles the survivors (when ``shuffle_tags``), from an
    RNG keyed by (caption, k) only: identical captions give identical variants on every machine.
    """
    caption = ", ".join(tags)
    if not augment.enabled:
        return (caption,)
    kept, rest = list(tags[: augment.keep_tokens]), list(tags[augment.keep_tokens :])
    variants = []
    for k in range(augment.variants):
        rng = random.Random(f"caption-variant/{k}/{caption}")  # str seeds hash with sha512: stable
        survivors = [tag for tag in rest if rng.random() >= augment.tag_dropout]
        if augment.shuffle_tags:
            rng.shuffle(survivors)
        variants.append(", ".join(kept + survivors))
    return tuple(variants)


_TAG_SEPARATORS = re.compile(r"[,\r\n]")
_WHITESPACE = re.compile(r"\s+")


def normalize_tags(caption: str, options: CaptionOptions = CaptionOptions()) -> tuple[str, ...]:
    """Split a caption into tags on commas (and line breaks), trim, collapse whitespace.

    Optionally lowercases and turns underscores into spaces; empty tags are dropped, order and
    repeats are kept.
    """
    tags = []
    for raw in _TAG_SEPARATORS.split(caption):
        tag = raw.replace("_", " ") if options.underscores_to_spaces else raw
        tag = _WHITESPACE.sub(" ", tag).strip()
        if options.lowercase:
            tag = tag.lower()
        if tag:
            tags.append(tag)
    return tuple(tags)


# ----------------------------------------------------------------------------- image checks


class _Unusable(Exception):
    """Internal: this file cannot be used; the message is the skip reason."""


def _exif_orientation(image: Image.Image) -> int:
    # A PNG's eXIf chunk after the pixel data would need a full decode; header-only chunks suffice.
    if image.format == "PNG" and "exif" not in image.info:
        return 1
    return int(image.getexif().get(ExifTags.Base.Orientation, 1))


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise Image.DecompressionBombError(
            f"decompression bomb: {width * height} pixels > limit {max_pixels}"
        )


def _describe_integrity_error(error: BaseException) -> str:
    message = str(error) or type(error).__name__
    if isinstance(error, EOFError) or "truncat" in message.lower():
        return f"truncated image ({message})"
    return f"corrupt image ({message})"


def _probe_image(path: Path, max_pixels: int) -> tuple[int, int]:
    """(width, height) after EXIF transpose, reading headers only; raises _Unusable with the reason."""
    try:
        with warnings.catch_warnings():
            # The limit is checked here against max_pixels; Pillow's softer warning is noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                _check_pixels(width, height, max_pixels)
                orientation = _exif_orientation(image)
                image_format = image.format
    except Image.DecompressionBombError as error:
        reason = str(error)
        raise _Unusable(reason if reason.startswith("decompression bomb") else f"decompression bomb: {reason}")
    except UnidentifiedImageError:
        raise _Unusable("not an image (cannot identify image file)")
    except PermissionError:
        raise _Unusable("permission denied")
    except (OSError, SyntaxError, EOFError, ValueError) as error:
        raise _Unusable(f"unreadable image header ({error})")

    # Integrity check on a separate open: PNG checks every chunk's CRC through IEND; JPEG is
    # decoded at 1/8 scale, which still reads all entropy-coded data. Other formats are only
    # header-checked here and fail, if damaged, when loaded.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image_format == "JPEG":
                    image.draft(image.mode, (max(1, width // 8), max(1, height // 8)))
                    image.load()
                else:
                    image.verify()
    except (OSError, SyntaxError, EOFError, ValueError) as error:
        raise _Unusable(_describe_integrity_error(error))

    if orientation in (5, 6, 7, 8):  # these orientations swap width and height
        width, height = height, width
    return width, height


def load_image_rgb(
    path: Path,
    background: tuple[int, int, int] = (255, 255, 255),
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Load an image as 8-bit RGB: EXIF orientation applied, first frame of animations/multi-page
    files, embedded ICC profile converted to sRGB, palette/grey/16-bit/float/CMYK converted, and
    any transparency composited over ``background``.

    16-bit and 32-bit integer images are scaled from 0..65535; float images are taken as 0..1.
    Raises Image.DecompressionBombError above ``max_pixels``, and Pillow's errors for bad files.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            _check_pixels(image.width, image.height, max_pixels)
            image.load()
            icc_profile = image.info.get("icc_profile")
            image = ImageOps.exif_transpose(image)
            return _to_rgb(image, background, icc_profile)


def _to_rgb(image: Image.Image, background: tuple[int, int, int], icc_profile: bytes | None) -> Image.Image:
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        pixels = np.asarray(image.convert("I"), dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "L")
    elif mode == "F":
        pixels = np.asarray(image, dtype=np.float64) * 255.0
        image = Image.fromarray(np.clip(np.rint(np.nan_to_num(pixels)), 0, 255).astype(np.uint8), "L")
    elif mode == "1":
        image = image.convert("L")

    if icc_profile and image.mode in ("RGB", "RGBA", "CMYK", "L", "LA"):
        image = _icc_to_srgb(image, icc_profile)

    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if image.mode == "RGB":
        return image.copy()
    return image.convert("RGB")


def _icc_to_srgb(image: Image.Image, icc_profile: bytes) -> Image.Image:
    """Convert from the embedded ICC profile to sRGB (keeping alpha, which the profile ignores)."""
    alpha = image.getchannel("A") if image.mode in ("RGBA", "LA") else None
    colour = image.convert({"RGBA": "RGB", "LA": "L"}.get(image.mode, image.mode))
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc_profile))
        converted = ImageCms.profileToProfile(
            colour, source, ImageCms.createProfile("sRGB"), outputMode="RGB"
        )
    except (ImageCms.PyCMSError, OSError, ValueError) as error:
        # A damaged profile should not cost the image; the plain conversion is close for most files.
        logger.warning("ignoring unusable ICC profile (%s); converting colours without it", error)
        converted = colour.convert("RGB")
    if alpha is not None:
        converted.putalpha(alpha)
    return converted


# ----------------------------------------------------------------------------- scanning


def _is_within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _walk_images(root: Path, real_root: Path, follow_outside: bool, skipped: list[SkippedFile]) -> list[Path]:
    """Every image file under root (non-hidden, known extension), as paths under ``root``."""
    found: list[Path] = []
    visited = {real_root}
    pending = [root]
    while pending:
        directory = pending.pop()
        try:
            entries = list(os.scandir(directory))
        except PermissionError:
            skipped.append(SkippedFile(str(directory), "permission denied (directory)"))
            continue
        except OSError as error:
            skipped.append(SkippedFile(str(directory), f"cannot list directory ({error.strerror})"))
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            if entry.is_dir(follow_symlinks=True):
                real = path.resolve()
                if entry.is_symlink() and not _is_within(real, real_root) and not follow_outside:
                    skipped.append(SkippedFile(str(path), f"symlink points outside the dataset root: {real}"))
                elif real in visited:
                    skipped.append(SkippedFile(str(path), f"directory already scanned via another path: {real}"))
                else:
                    visited.add(real)
                    pending.append(path)
            elif path.suffix.lower() in IMAGE_EXTENSIONS:
                found.append(path)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _check_link(path: Path, real_root: Path, follow_outside: bool) -> None:
    """Refuse symlinks that leave the root (the file itself or a linked folder above it)."""
    real = path.resolve()
    if not _is_within(real, real_root) and not follow_outside:
        raise _Unusable(f"symlink points outside the dataset root: {real}")


def _check_file(path: Path) -> None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise _Unusable("broken symlink" if path.is_symlink() else "file not found")
    except PermissionError:
        raise _Unusable("permission denied")
    if size == 0:
        raise _Unusable("0-byte file")
    if not os.access(path, os.R_OK):
        raise _Unusable("permission denied")


def _read_caption_file(caption_path: Path, real_root: Path, follow_outside: bool) -> str | None:
    """The caption text, or None when there is no caption file."""
    if not caption_path.is_file():
        return None
    if not _is_within(caption_path.resolve(), real_root) and not follow_outside:
        raise _Unusable(f"caption file {caption_path.name} is a symlink outside the dataset root")
    try:
        data = caption_path.read_bytes()
    except PermissionError:
        raise _Unusable(f"permission denied: caption file {caption_path.name}")
    except OSError as error:
        raise _Unusable(f"cannot read caption file {caption_path.name} ({error.strerror})")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise _Unusable(f"caption is not valid UTF-8 ({caption_path.name}, byte {error.start})")


@dataclass(frozen=True)
class _MetadataEntry:
    line: int
    caption: str


def _caption_from_metadata(row: dict) -> str:
    for key in _CAPTION_KEYS:
        if key not in row:
            continue
        value = row[key]
        if isinstance(value, str):
            return value
        if isinstance(value, list) and all(isinstance(tag, str) for tag in value):
            return ", ".join(value)
        raise ValueError(f"{key!r} must be a string or a list of strings, got {type(value).__name__}")
    return ""  # no caption column: treated like an empty caption


def _read_metadata(root: Path, skipped: list[SkippedFile]) -> dict[str, _MetadataEntry]:
    """metadata.jsonl rows keyed by their normalised relative path; bad rows go to ``skipped``."""
    metadata_path = root / METADATA_NAME
    if not metadata_path.is_file():
        return {}
    entries: dict[str, _MetadataEntry] = {}
    try:
        lines = metadata_path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as error:
        raise DatasetError(f"{metadata_path} is not valid UTF-8 (byte {error.start})") from error
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{METADATA_NAME}:{number}"
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("each line must be a JSON object")
            file_name = row.get("file_name")
            if not isinstance(file_name, str) or not file_name:
                raise ValueError("missing 'file_name'")
            caption = _caption_from_metadata(row)
        except ValueError as error:  # json.JSONDecodeError is a ValueError
            skipped.append(SkippedFile(where, f"invalid metadata.jsonl row ({error})"))
            continue
        relative = posixpath.normpath(file_name.replace("\\", "/"))
        if posixpath.isabs(relative) or relative == ".." or relative.startswith("../"):
            skipped.append(SkippedFile(file_name, f"metadata.jsonl path leaves the dataset root (line {number})"))
            continue
        if relative in entries:
            first = entries[relative].line
            skipped.append(SkippedFile(file_name, f"duplicate metadata.jsonl entry (line {number}, first on line {first})"))
            continue
        entries[relative] = _MetadataEntry(number, caption)
    return entries


def _summarise_failure(root: Path, skipped: list[SkippedFile]) -> str:
    counts = Counter(s.category for s in skipped)
    summary = ", ".join(f"{n} {category}" for category, n in counts.most_common())
    examples = "; ".join(f"{s.path}: {s.reason}" for s in skipped[:3])
    return (
        f"no usable images in {root}: {len(skipped)} skipped ({summary}); e.g. {examples}. "
        "Fix or remove these files, or see ScanResult.skipped for the full list."
    )


_REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")


def folder_repeat_count(relative: str) -> int | None:
    """N when the image at ``relative`` (a posix path under a source root) lies under a
    top-level ``N_name`` folder, else None. Only the top level counts, as in kohya's trainers."""
    parts = relative.split("/")
    if len(parts) < 2:
        return None
    match = _REPEAT_FOLDER.match(parts[0])
    return int(match.group(1)) if match else None


def scan_folder(
    root: Path,
    *,
    caption_options: CaptionOptions = CaptionOptions(),
    min_size: int = 0,
    max_aspect_ratio: float = 8.0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    follow_symlinks_outside: bool = False,
    repeats: int = 1,
    folder_repeats: bool = False,
) -> ScanResult:
    """Scan ``root`` recursively into image records plus a report of skipped files.

    Records are in sorted relative-path order. When images share a stem in one folder
    (``a.png`` + ``a.jpg``) and take their caption from ``a.txt``, the first in sorted order is
    kept and the others are skipped. Every record gets ``repeats``; with ``folder_repeats`` an
    image under a top-level ``N_name`` folder gets ``repeats * N`` (``0_name`` folders are
    skipped with a reason). Raises DatasetError when nothing usable is found.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    root = Path(os.path.abspath(root))
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist or is not a folder")
    real_root = root.resolve()
    skipped: list[SkippedFile] = []
    metadata = _read_metadata(root, skipped)
    images = _walk_images(root, real_root, follow_symlinks_outside, skipped)
    if not images and not skipped:
        raise DatasetError(
            f"no image files found in {root} (looked for {', '.join(IMAGE_EXTENSIONS)}, recursively)"
        )

    records: list[ImageRecord] = []
    kept_by_stem: dict[Path, Path] = {}  # parent/stem -> the accepted image that owns the .txt caption
    used_metadata: set[str] = set()
    for path in images:
        relative = path.relative_to(root).as_posix()
        entry = metadata.get(relative)
        folder_count = folder_repeat_count(relative) if folder_repeats else None
        try:
            if folder_count == 0:
                raise _Unusable(f"repeat count 0 in folder name {relative.split('/')[0]}")
            if entry is None:
                owner = kept_by_stem.get(path.with_suffix(""))
                if owner is not None:
                    raise _Unusable(f"duplicate stem: also {owner.name}")
            else:
                used_metadata.add(relative)
            _check_link(path, real_root, follow_symlinks_outside)
            _check_file(path)
            width, height = _probe_image(path, max_pixels)
            if min(width, height) < 1:
                raise _Unusable(f"image has no pixels: {width}x{height}")
            if min(width, height) < min_size:
                raise _Unusable(f"smaller than min_size {min_size}: {width}x{height}")
            aspect = max(width, height) / min(width, height)
            if aspect > max_aspect_ratio:
                raise _Unusable(f"aspect ratio {round(aspect, 2)} exceeds max {max_aspect_ratio}")
            if entry is not None:
                text = entry.caption
            else:
                text = _read_caption_file(path.with_suffix(".txt"), real_root, follow_symlinks_outside)
                if text is None and caption_options.missing_caption == "skip":
                    raise _Unusable(f"missing caption file: {path.with_suffix('.txt').name}")
            tags = normalize_tags(text or "", caption_options)
            if not tags and caption_options.missing_caption == "skip":
                raise _Unusable("empty caption")
        except _Unusable as unusable:
            skipped.append(SkippedFile(str(path), str(unusable)))
            continue
        if entry is None:
            kept_by_stem[path.with_suffix("")] = path
        record_repeats = repeats * (folder_count or 1)
        records.append(ImageRecord(path, ", ".join(tags), tags, width, height, record_repeats))

    for relative, entry in metadata.items():
        if relative in used_metadata:
            continue
        exists = (root / relative).exists()
        reason = (
            "listed in metadata.jsonl but not scanned (hidden, unsupported extension or in a skipped folder)"
            if exists
            else "listed in metadata.jsonl but file not found"
        )
        skipped.append(SkippedFile(relative, f"{reason} (line {entry.line})"))

    if not records:
        raise DatasetError(_summarise_failure(root, skipped))
    return ScanResult(records, skipped)


@dataclass(frozen=True)
class DataSource:
    """One dataset folder and how often its images appear per epoch."""

    root: Path
    repeats: int = 1
    folder_repeats: bool = True  # top-level N_name subfolders multiply repeats by N

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats} (source {self.root})")


def scan_sources(sources: Sequence[DataSource], **scan_options) -> ScanResult:
    """Scan every source (``scan_options`` as for :func:`scan_folder`) into one result.

    Records keep source order, then path order; an image listed by two sources is two records
    (one cache entry). Any source without a usable image raises DatasetError naming it.
    Logs, per source, its images and epoch items, and every ``N_name`` folder's repeats.
    """
    if not sources:
        raise DatasetError("no data sources given: set data.root or data.sources")
    records: list[ImageRecord] = []
    skipped: list[SkippedFile] = []
    for source in sources:
        result = scan_folder(
            source.root, repeats=source.repeats, folder_repeats=source.folder_repeats, **scan_options
        )
        records.extend(result.records)
        skipped.extend(result.skipped)
        items = sum(r.repeats for r in result.records)
        logger.info(
            "source %s: %d images x repeats -> %d items per epoch (%d skipped)",
            source.root, len(result.records), items, len(result.skipped),
        )
        if source.folder_repeats:
            root = Path(os.path.abspath(source.root))
            folders = Counter(
                (r.path.relative_to(root).parts[0], r.repeats)
                for r in result.records
                if folder_repeat_count(r.path.relative_to(root).as_posix()) is not None
            )
            for (folder, total), count in sorted(folders.items()):
                logger.info("  folder %s: %d images, %d repeats each (source repeats %d x folder %d)",
                            folder, count, total, source.repeats, total // source.repeats)
    return ScanResult(records, skipped)


def epoch_items(records: Sequence[ImageRecord]) -> int:
    """Items per epoch: the sum of every record's repeats."""
    return sum(record.repeats for record in records)
