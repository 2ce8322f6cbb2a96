"""A deterministic synthetic dataset of coloured shapes, used by `sdxl-trainer demo` and tests.

Every image is a shape of one colour on a background of another colour, captioned with
comma-separated tags (``red circle, blue background, large``); about a quarter of the images
are a single solid colour captioned ``completely <colour>``. Colours are only named in the
caption, so a model has to read the text to get them right.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 40),
    "cyan": (40, 210, 220),
    "magenta": (210, 40, 200),
    "orange": (245, 140, 20),
    "purple": (120, 50, 170),
    "white": (250, 250, 250),
    "black": (10, 10, 10),
    "gray": (128, 128, 128),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "stripes")
SIZES: tuple[str, ...] = ("small", "large")
DEMO_WORDS: tuple[str, ...] = (*COLORS, *SHAPES, *SIZES, "background", "completely")

SOLID_EVERY = 4  # every 4th image is a solid colour
# Aspect ratios (width:height) of the demo images; sides are scaled to about resolution**2 pixels.
ASPECT_RATIOS: tuple[tuple[int, int], ...] = ((1, 1), (5, 3), (3, 5), (9, 7), (7, 9))

MARKER_NAME = ".sdxl_trainer_demo.json"
_FORMAT_VERSION = 1


def demo_caption_for(shape: str, color: str, background: str, size: str) -> str:
    """The caption of a shape image, e.g. ``red circle, blue background, large``."""
    for value, allowed in ((shape, SHAPES), (color, COLORS), (background, COLORS), (size, SIZES)):
        if value not in allowed:
            raise ValueError(f"unknown demo word {value!r}; expected one of {sorted(allowed)}")
    return f"{color} {shape}, {background} background, {size}"


def solid_caption_for(color: str) -> str:
    """The caption of a solid-colour image, e.g. ``completely black``."""
    if color not in COLORS:
        raise ValueError(f"unknown demo colour {color!r}; expected one of {sorted(COLORS)}")
    return f"completely {color}"


def demo_image_size(aspect: tuple[int, int], resolution: int) -> tuple[int, int]:
    """(width, height) with the given aspect ratio, about resolution**2 pixels, sides multiples of 8."""
    aw, ah = aspect
    unit = (resolution * resolution / (aw * ah)) ** 0.5
    return max(8, round(aw * unit / 8) * 8), max(8, round(ah * unit / 8) * 8)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    left, top, right, bottom = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([((left + right) // 2, top), (right, bottom), (left, bottom)], fill=fill)
    elif shape == "stripes":
        stripe = max(2, (right - left) // 7)
        for x in range(left, right, 2 * stripe):
            draw.rectangle((x, top, min(x + stripe - 1, right), bottom), fill=fill)
    else:
        raise ValueError(f"unknown demo shape {shape!r}; expected one of {SHAPES}")


def _make_item(index: int, rng: random.Random, resolution: int) -> tuple[Image.Image, str]:
    color_names = list(COLORS)
    width, height = demo_image_size(ASPECT_RATIOS[index % len(ASPECT_RATIOS)], resolution)
    if index % SOLID_EVERY == SOLID_EVERY - 1:
        # Cycle through the colours so every colour gets solid images.
        color = color_names[(index // SOLID_EVERY) % len(color_names)]
        return Image.new("RGB", (width, height), COLORS[color]), solid_caption_for(color)

    shape = rng.choice(SHAPES)
    color, background = rng.sample(color_names, 2)
    size = rng.choice(SIZES)
    image = Image.new("RGB", (width, height), COLORS[background])
    side = round(min(width, height) * (0.7 if size == "large" else 0.3))
    left = rng.randint(0, width - side)
    top = rng.randint(0, height - side)
    _draw_shape(ImageDraw.Draw(image), shape, (left, top, left + side - 1, top + side - 1), COLORS[color])
    return image, demo_caption_for(shape, color, background, size)


def _demo_stems(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("demo_*") if p.suffix in (".png", ".txt"))


def write_demo_dataset(root: Path, num_images: int = 256, resolution: int = 256, seed: int = 0) -> Path:
    """Write the demo dataset to ``root`` (PNG + same-stem .txt) and return ``root``.

    Same arguments give byte-identical files. If ``root`` already holds this exact dataset (its
    marker file matches and every file is present) nothing is rewritten; otherwise earlier demo
    files (``demo_*.png``/``demo_*.txt``) are replaced.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if resolution < 32:
        raise ValueError(f"resolution must be >= 32, got {resolution}")
    root = Path(root)
    params = {"version": _FORMAT_VERSION, "num_images": num_images, "resolution": resolution, "seed": seed}
    names = [f"demo_{i:05d}" for i in range(num_images)]
    marker = root / MARKER_NAME

    if marker.is_file():
        try:
            existing = json.loads(marker.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            existing = None  # a damaged marker means the dataset is rewritten
        if existing == params and all(
            (root / f"{n}.png").is_file() and (root / f"{n}.txt").is_file() for n in names
        ):
            return root

    root.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)  # the marker is written last, so an interrupted write is redone
    for stale in _demo_stems(root):
        stale.unlink()
    rng = random.Random(f"sdxl-trainer-demo/{seed}")
    for index, name in enumerate(names):
        image, caption = _make_item(index, rng, resolution)
        image.save(root / f"{name}.png", format="PNG", optimize=False, compress_level=6)
        (root / f"{name}.txt").write_text(caption + "\n", encoding="utf-8")
    marker.write_text(json.dumps(params, sort_keys=True) + "\n", encoding="utf-8")
    return root
