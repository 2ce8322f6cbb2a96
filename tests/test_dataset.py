from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdxl_trainer.data import dataset as dataset_module
from sdxl_trainer.data.dataset import (
    CaptionAugment,
    CaptionOptions,
    DatasetError,
    DataSource,
    caption_variants,
    epoch_items,
    load_image_rgb,
    normalize_tags,
    scan_folder,
    scan_sources,
)


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def _write(root: Path, name: str, size=(64, 48), caption: str | None = "a cat, sitting", fmt=None, **save) -> Path:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    _noise(*size).save(path, format=fmt, **save)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def _reasons(result) -> dict[str, str]:
    return {Path(s.path).name: s.reason for s in result.skipped}


# ----------------------------------------------------------------------------- captions


def test_normalize_tags():
    caption = "  Blue_Sky ,, big   dog\n  a_b,  , Red  "
    assert normalize_tags(caption, CaptionOptions()) == ("Blue Sky", "big dog", "a b", "Red")
    assert normalize_tags(caption, CaptionOptions(lowercase=True, underscores_to_spaces=False)) == (
        "blue_sky",
        "big dog",
        "a_b",
        "red",
    )
    assert normalize_tags(" , ,\n", CaptionOptions()) == ()


def test_unknown_missing_caption_policy_raises():
    with pytest.raises(ValueError, match="missing_caption"):
        CaptionOptions(missing_caption="ignore")


# ----------------------------------------------------------------------------- good folders


def test_scan_good_folder_recursive_sorted(tmp_path):
    _write(tmp_path, "b.png", size=(64, 48), caption="Dog,  running_fast ")
    _write(tmp_path, "sub/a.jpg", size=(40, 80), caption="cat")
    _write(tmp_path, "a.webp", size=(50, 50), caption="bird\n")
    (tmp_path / "notes.md").write_text("not part of the dataset")
    _write(tmp_path, ".hidden/x.png")

    result = scan_folder(tmp_path)

    assert [r.path.relative_to(tmp_path).as_posix() for r in result.records] == ["a.webp", "b.png", "sub/a.jpg"]
    assert all(r.path.is_absolute() for r in result.records)
    assert [(r.width, r.height) for r in result.records] == [(50, 50), (64, 48), (40, 80)]
    assert [r.caption for r in result.records] == ["bird", "Dog, running fast", "cat"]
    assert result.records[1].tags == ("Dog", "running fast")
    assert result.skipped == []


def test_metadata_jsonl_captions_and_escape_refused(tmp_path, monkeypatch):
    dataset = tmp_path / "data"
    _write(dataset, "img/one.png", caption=None)
    _write(dataset, "two.png", caption="ignored, because metadata wins")
    _write(dataset, "three.png", caption=None)
    outside = _write(tmp_path, "outside.png", caption=None)
    rows = [
        {"file_name": "img/one.png", "text": "a, b"},
        {"file_name": "two.png", "tags": ["x_y", "z"]},
        {"file_name": "three.png", "tags": "p, q"},
        {"file_name": "../outside.png", "text": "escape"},
        {"file_name": str(outside), "text": "absolute"},
        {"file_name": "missing.png", "text": "gone"},
        "not an object",
    ]
    (dataset / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    opened = []
    real_open = dataset_module.Image.open

    def recording_open(path, *args, **kwargs):
        opened.append(Path(path).resolve())
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(dataset_module.Image, "open", recording_open)
    result = scan_folder(dataset)

    assert outside.resolve() not in opened and len(opened) > 0
    by_name = {r.path.name: r for r in result.records}
    assert set(by_name) == {"one.png", "two.png", "three.png"}
    assert by_name["one.png"].caption == "a, b"
    assert by_name["two.png"].tags == ("x y", "z")
    assert by_name["three.png"].tags == ("p", "q")
    reasons = {s.path: s.reason for s in result.skipped}
    assert reasons["../outside.png"].startswith("metadata.jsonl path leaves the dataset root")
    assert reasons[str(outside)].startswith("metadata.jsonl path leaves the dataset root")
    assert reasons["missing.png"].startswith("listed in metadata.jsonl but file not found")
    assert reasons["metadata.jsonl:7"].startswith("invalid metadata.jsonl row")
    assert reasons["metadata.jsonl:8"].startswith("invalid metadata.jsonl row")
    assert all("outside.png" not in str(r.path) for r in result.records)


# ----------------------------------------------------------------------------- bad inputs


def _truncated(fmt: str) -> bytes:
    buffer = io.BytesIO()
    _noise(64, 64).save(buffer, format=fmt)
    data = buffer.getvalue()
    return data[: len(data) // 2]


def test_bad_inputs_are_skipped_with_precise_reasons(tmp_path):
    good = _write(tmp_path, "good.png")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "empty.txt").write_text("x")
    (tmp_path / "text.png").write_text("just some text")
    (tmp_path / "text.txt").write_text("x")
    (tmp_path / "trunc.png").write_bytes(_truncated("PNG"))
    (tmp_path / "trunc.txt").write_text("x")
    (tmp_path / "trunc_jpeg.jpg").write_bytes(_truncated("JPEG"))
    (tmp_path / "trunc_jpeg.txt").write_text("x")
    _write(tmp_path, "tiny.png", size=(20, 16))
    _write(tmp_path, "wide.png", size=(360, 30))
    _write(tmp_path, "nocaption.png", caption=None)
    _write(tmp_path, "blank.png", caption="  ,  \n")
    _write(tmp_path, "latin1.png", caption=None)
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    _write(tmp_path, "dup.jpg", caption="dup")
    _write(tmp_path, "dup.png", caption=None)

    result = scan_folder(tmp_path, min_size=24, max_aspect_ratio=8.0)

    assert [r.path for r in result.records] == [tmp_path / "dup.jpg", good]
    reasons = _reasons(result)
    assert reasons == {
        "empty.png": "0-byte file",
        "text.png": "not an image (cannot identify image file)",
        "trunc.png": reasons["trunc.png"],
        "trunc_jpeg.jpg": reasons["trunc_jpeg.jpg"],
        "tiny.png": "smaller than min_size 24: 20x16",
        "wide.png": "aspect ratio 12.0 exceeds max 8.0",
        "nocaption.png": "missing caption file: nocaption.txt",
        "blank.png": "empty caption",
        "latin1.png": reasons["latin1.png"],
        "dup.png": "duplicate stem: also dup.jpg",
    }
    assert reasons["trunc.png"].startswith("truncated image")
    assert reasons["trunc_jpeg.jpg"].startswith("truncated image")
    assert reasons["latin1.png"].startswith("caption is not valid UTF-8")
    assert result.skip_counts()["truncated image"] == 2


def test_decompression_bomb_limit(tmp_path):
    _write(tmp_path, "big.png", size=(64, 64))
    _write(tmp_path, "small.png", size=(30, 30))
    result = scan_folder(tmp_path, max_pixels=1000)
    assert [r.path.name for r in result.records] == ["small.png"]
    assert _reasons(result) == {"big.png": "decompression bomb: 4096 pixels > limit 1000"}
    with pytest.raises(Image.DecompressionBombError):
        load_image_rgb(tmp_path / "big.png", max_pixels=1000)


def test_missing_caption_policy_empty_keeps_images(tmp_path):
    _write(tmp_path, "nocaption.png", caption=None)
    _write(tmp_path, "blank.png", caption=" ")
    result = scan_folder(tmp_path, caption_options=CaptionOptions(missing_caption="empty"))
    assert [(r.path.name, r.caption, r.tags) for r in result.records] == [
        ("blank.png", "", ()),
        ("nocaption.png", "", ()),
    ]
    with pytest.raises(DatasetError, match="2 skipped"):
        scan_folder(tmp_path)


def test_symlinks_outside_root_are_refused_unless_allowed(tmp_path):
    outside = tmp_path / "outside"
    _write(outside, "o.png", caption="outside file")
    _write(outside, "folder/f.png", caption="outside folder")
    root = tmp_path / "root"
    _write(root, "in.png")
    (root / "link.png").symlink_to(outside / "o.png")
    (root / "link.txt").write_text("linked")
    (root / "linked_folder").symlink_to(outside / "folder")
    (root / "inside_link.png").symlink_to(root / "in.png")
    (root / "inside_link.txt").write_text("alias")

    refused = scan_folder(root)
    assert [r.path.name for r in refused.records] == ["in.png", "inside_link.png"]
    reasons = _reasons(refused)
    assert reasons["link.png"].startswith("symlink points outside the dataset root")
    assert reasons["linked_folder"].startswith("symlink points outside the dataset root")

    allowed = scan_folder(root, follow_symlinks_outside=True)
    assert [r.path.relative_to(root).as_posix() for r in allowed.records] == [
        "in.png",
        "inside_link.png",
        "link.png",
        "linked_folder/f.png",
    ]
    assert allowed.skipped == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read files without permission")
def test_permission_denied(tmp_path):
    _write(tmp_path, "good.png")
    locked = _write(tmp_path, "locked.png")
    locked.chmod(0o000)
    try:
        result = scan_folder(tmp_path)
    finally:
        locked.chmod(0o644)
    assert _reasons(result) == {"locked.png": "permission denied"}


def test_empty_or_unusable_dataset_raises(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        scan_folder(tmp_path / "nope")
    with pytest.raises(DatasetError, match="no image files found"):
        scan_folder(tmp_path)
    (tmp_path / "a.png").write_text("text")
    _write(tmp_path, "b.png", caption=None)
    _write(tmp_path, "c.png", caption=None)
    with pytest.raises(DatasetError) as error:
        scan_folder(tmp_path)
    message = str(error.value)
    assert "no usable images" in message and "3 skipped" in message
    assert "2 missing caption file" in message and "1 not an image" in message


# ----------------------------------------------------------------------------- orientation and modes


def test_exif_rotation_transposes_size(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise
    source = Image.new("RGB", (60, 30), (255, 0, 0))
    source.paste((0, 0, 255), (0, 0, 10, 30))  # a blue band on the left edge
    for name in ("rot_jpeg.jpg", "rot_png.png"):
        source.save(tmp_path / name, exif=exif, quality=95)
        (tmp_path / name).with_suffix(".txt").write_text("rotated")
    _write(tmp_path, "upright.png", size=(60, 30))

    result = scan_folder(tmp_path)
    assert [(r.path.name, r.width, r.height) for r in result.records] == [
        ("rot_jpeg.jpg", 30, 60),
        ("rot_png.png", 30, 60),
        ("upright.png", 60, 30),
    ]
    for record in result.records[:2]:
        image = load_image_rgb(record.path)
        assert image.size == (30, 60)
        top = np.asarray(image)[2, 15]  # the left band is at the top after rotating clockwise
        assert top[2] > 200 and top[0] < 60


def _solid(mode: str, value) -> Image.Image:
    return Image.new(mode, (8, 8), value)


@pytest.mark.parametrize(
    ("make", "save_format", "expected"),
    [
        (lambda: _solid("RGBA", (255, 0, 0, 0)), "PNG", (0, 128, 0)),  # transparent -> background
        (lambda: _solid("RGBA", (255, 0, 0, 255)), "PNG", (255, 0, 0)),
        (lambda: _solid("RGBA", (255, 0, 0, 128)), "PNG", (128, 64, 0)),
        (lambda: _solid("LA", (200, 0)), "PNG", (0, 128, 0)),
        (lambda: _solid("L", 77), "PNG", (77, 77, 77)),
        (lambda: _solid("1", 1), "PNG", (255, 255, 255)),
        (lambda: _solid("I;16", 65535), "PNG", (255, 255, 255)),
        (lambda: _solid("I;16", 257 * 100), "PNG", (100, 100, 100)),
        (lambda: _solid("I", 257 * 40), "TIFF", (40, 40, 40)),
        (lambda: _solid("F", 0.5), "TIFF", (128, 128, 128)),
        (lambda: _solid("CMYK", (0, 255, 255, 0)), "JPEG", (255, 0, 0)),
        (lambda: _solid("CMYK", (0, 0, 0, 255)), "TIFF", (0, 0, 0)),
        (lambda: _solid("RGB", (10, 20, 30)).convert("P", palette=Image.Palette.ADAPTIVE), "GIF", (10, 20, 30)),
    ],
)
def test_load_image_rgb_converts_modes(tmp_path, make, save_format, expected):
    path = tmp_path / f"image.{save_format.lower()}"
    make().save(path, format=save_format)
    image = load_image_rgb(path, background=(0, 128, 0))
    assert image.mode == "RGB" and image.size == (8, 8)
    assert np.abs(np.asarray(image, dtype=int) - np.array(expected)).max() <= 3


def test_load_image_rgb_palette_transparency_and_first_frame(tmp_path):
    frame0 = Image.new("P", (8, 8), 1)
    frame0.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    frame1 = Image.new("P", (8, 8), 0)
    frame1.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    path = tmp_path / "anim.gif"
    frame0.save(path, save_all=True, append_images=[frame1])
    assert load_image_rgb(path).getpixel((0, 0)) == (0, 0, 255)

    transparent = Image.new("P", (8, 8), 1)
    transparent.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    transparent.save(tmp_path / "t.png", transparency=1)
    assert load_image_rgb(tmp_path / "t.png", background=(9, 9, 9)).getpixel((0, 0)) == (9, 9, 9)


def test_load_image_rgb_applies_icc_profile(tmp_path):
    from PIL import ImageCms

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    _noise(16, 16).save(tmp_path / "tagged.png", icc_profile=srgb)
    tagged = np.asarray(load_image_rgb(tmp_path / "tagged.png"), dtype=int)
    assert np.abs(tagged - np.asarray(_noise(16, 16), dtype=int)).max() <= 2


# ----------------------------------------------------------------------------- sources and repeats


def _repeats_by_name(records) -> dict[str, int]:
    return {r.path.name: r.repeats for r in records}


def test_kohya_repeat_folders_set_repeats(tmp_path):
    _write(tmp_path, "3_x/a.png")
    _write(tmp_path, "3_x/sub/b.png")
    _write(tmp_path, "plain/c.png")
    _write(tmp_path, "0_off/d.png")
    _write(tmp_path, "deep/5_y/f.png")  # only top-level folders count
    _write(tmp_path, "e.png")
    result = scan_folder(tmp_path, folder_repeats=True)
    assert _repeats_by_name(result.records) == {"a.png": 3, "b.png": 3, "c.png": 1, "f.png": 1, "e.png": 1}
    assert "repeat count 0 in folder name 0_off" in _reasons(result)["d.png"]
    assert epoch_items(result.records) == 9

    plain = scan_folder(tmp_path)  # folder names mean nothing unless asked
    assert set(_repeats_by_name(plain.records).values()) == {1} and len(plain.records) == 6
    doubled = scan_folder(tmp_path, repeats=2, folder_repeats=True)
    assert _repeats_by_name(doubled.records)["a.png"] == 6 and _repeats_by_name(doubled.records)["e.png"] == 2


def test_two_sources_with_their_own_repeats(tmp_path):
    _write(tmp_path / "one", "10_cat/a.png")
    _write(tmp_path / "one", "b.png")
    _write(tmp_path / "two", "c.png")
    _write(tmp_path / "two", "4_dog/d.png")
    result = scan_sources(
        [DataSource(tmp_path / "one", repeats=2), DataSource(tmp_path / "two", repeats=3, folder_repeats=False)]
    )
    assert [r.path.name for r in result.records] == ["a.png", "b.png", "d.png", "c.png"]
    assert _repeats_by_name(result.records) == {"a.png": 20, "b.png": 2, "d.png": 3, "c.png": 3}
    assert epoch_items(result.records) == 28

    with pytest.raises(ValueError, match="repeats"):
        DataSource(tmp_path / "one", repeats=0)
    with pytest.raises(DatasetError, match="no data sources"):
        scan_sources([])
    with pytest.raises(DatasetError, match="missing does not exist"):
        scan_sources([DataSource(tmp_path / "one"), DataSource(tmp_path / "missing")])


def test_config_sources_or_root_and_both_missing():
    from sdxl_trainer.config import ConfigError, load_config

    default = load_config(None)
    assert [(s.root, s.repeats) for s in default.data.source_list()] == [("data/demo", 1)]
    config = load_config(None, ["data.sources=[{root: a, repeats: 3}, {root: b, folder_repeats: false}]"])
    assert config.data.root is None
    assert [(s.root, s.repeats, s.folder_repeats) for s in config.data.source_list()] == [
        ("a", 3, True),
        ("b", 1, False),
    ]
    with pytest.raises(ConfigError, match="no data given: set data.root .* or data.sources"):
        load_config(None, ["data.root=null"])
    with pytest.raises(ConfigError, match="not both"):
        load_config(None, ["data.root=x", "data.sources=[{root: a}]"])
    with pytest.raises(ConfigError, match="repeats"):
        load_config(None, ["data.sources=[{root: a, repeats: 0}]"])


# ----------------------------------------------------------------------------- caption variants

TAGS = ("trigger", "style", *(f"tag {i}" for i in range(8)))


def test_caption_variants_keep_tokens_fixed_and_deterministic():
    assert caption_variants(TAGS, CaptionAugment(variants=5)) == (", ".join(TAGS),)  # nothing to vary

    augment = CaptionAugment(shuffle_tags=True, keep_tokens=2, variants=8)
    variants = caption_variants(TAGS, augment)
    assert len(variants) == 8 and len(set(variants)) > 1
    for text in variants:
        tags = text.split(", ")
        assert tags[:2] == ["trigger", "style"] and sorted(tags[2:]) == sorted(TAGS[2:])
    assert caption_variants(TAGS, augment) == variants  # keyed by (caption, k): same every call
    assert caption_variants(TAGS, CaptionAugment(shuffle_tags=True, keep_tokens=2, variants=3)) == variants[:3]
    assert caption_variants(TAGS[:-1], augment) != variants[:9]

    with pytest.raises(ValueError, match="tag_dropout"):
        CaptionAugment(tag_dropout=1.0)
    with pytest.raises(ValueError, match="keep_tokens"):
        CaptionAugment(keep_tokens=-1)


def test_tag_dropout_rate_spares_kept_tags():
    tags = ("keep me", *(f"t{i}" for i in range(20)))
    augment = CaptionAugment(tag_dropout=0.3, keep_tokens=1, variants=400)
    variants = caption_variants(tags, augment)
    kept = [text.split(", ") for text in variants]
    assert all(parts[0] == "keep me" for parts in kept)
    dropped = sum(20 - (len(parts) - 1) for parts in kept) / (20 * 400)
    assert abs(dropped - 0.3) < 0.03
    # Without shuffling the survivors keep their order.
    assert all(parts[1:] == sorted(parts[1:], key=lambda t: int(t[1:])) for parts in kept)
