from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

from sdxl_trainer.data.demo import COLORS, DEMO_WORDS, SHAPES, SIZES, write_demo_dataset

CAPTION = re.compile(r"^(\w+) (\w+), (\w+) background, (\w+)$")


def _files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def test_same_seed_gives_byte_identical_files(tmp_path):
    first = _files(write_demo_dataset(tmp_path / "a", num_images=24, resolution=64, seed=3))
    second = _files(write_demo_dataset(tmp_path / "b", num_images=24, resolution=64, seed=3))
    other_seed = _files(write_demo_dataset(tmp_path / "c", num_images=24, resolution=64, seed=4))
    assert len(first) == 2 * 24 + 1  # png + txt per image, plus the marker
    assert first == second
    assert first != other_seed


def test_captions_are_well_formed_and_solid_images_say_completely(tmp_path):
    root = write_demo_dataset(tmp_path, num_images=64, resolution=64)
    solid_colours = set()
    sizes = set()
    for image_path in sorted(root.glob("*.png")):
        caption = image_path.with_suffix(".txt").read_text(encoding="utf-8").strip()
        assert set(re.split(r"[ ,]+", caption)) <= set(DEMO_WORDS)
        pixels = np.asarray(Image.open(image_path).convert("RGB"))
        sizes.add(pixels.shape[:2])
        unique = np.unique(pixels.reshape(-1, 3), axis=0)
        if caption.startswith("completely "):
            colour = caption.removeprefix("completely ")
            assert unique.tolist() == [list(COLORS[colour])]
            solid_colours.add(colour)
            continue
        match = CAPTION.match(caption)
        assert match, caption
        colour, shape, background, size = match.groups()
        assert shape in SHAPES and size in SIZES and colour != background
        present = {tuple(c) for c in unique.tolist()}
        assert present == {COLORS[colour], COLORS[background]}
    assert solid_colours == set(COLORS)  # 16 solid images cycle through all 11 colours
    assert len(sizes) >= 3  # several aspect ratios


def test_rewrite_is_skipped_when_dataset_matches_and_redone_otherwise(tmp_path):
    write_demo_dataset(tmp_path, num_images=8, resolution=64)
    first = tmp_path / "demo_00000.png"
    first.write_bytes(b"tampered")  # untouched by an idempotent second call
    write_demo_dataset(tmp_path, num_images=8, resolution=64)
    assert first.read_bytes() == b"tampered"

    write_demo_dataset(tmp_path, num_images=4, resolution=64)  # different params: rewritten
    assert first.read_bytes().startswith(b"\x89PNG")
    assert len(list(tmp_path.glob("*.png"))) == 4
