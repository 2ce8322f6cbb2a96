"""The cache stage: build, read back, invalidation, corruption, kill-and-resume, skips, multi-rank."""

from __future__ import annotations

import copy
import json
from collections import Counter
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdxl_trainer.data.buckets import (
    Bucket,
    BucketBatchSampler,
    assign_bucket,
    crop_geometry,
    generate_buckets,
    prepare_image,
)
from sdxl_trainer.data.cache import (
    BUCKET_TABLE_NAME,
    INDEX_NAME,
    CacheCorruptError,
    CachedDataset,
    build_cache,
    load_index,
    merge_rank_indexes,
    module_identity,
)
from sdxl_trainer.data.dataset import (
    CaptionAugment,
    DataSource,
    caption_variants,
    load_image_rgb,
    scan_folder,
    scan_sources,
)
from sdxl_trainer.models.conditioning import encode_prompts
from sdxl_trainer.models.tiny import build_tiny_components

WORDS = ("red", "blue", "green", "circle", "square")
# (width, height, caption): three aspect ratios, five images share one caption.
IMAGES = (
    (64, 64, "red circle"),
    (100, 60, "red circle"),
    (60, 100, "red circle"),
    (70, 70, "red circle"),
    (120, 72, "red circle"),
    (64, 64, "blue square"),
    (72, 120, "green circle"),
)
BUCKETS = generate_buckets(64, step=16)


@pytest.fixture(scope="module")
def components():
    return build_tiny_components(WORDS, seed=0)


def _write_images(root: Path, images=IMAGES) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (width, height, caption) in enumerate(images):
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"img_{i:02d}.png")
        (root / f"img_{i:02d}.txt").write_text(caption, encoding="utf-8")
    return root


def _build(components, records, cache_dir, vae=None, **options):
    arguments = dict(
        cache_dir=cache_dir,
        vae=components.vae if vae is None else vae,
        tokenizers=(components.tokenizer, components.tokenizer_2),
        text_encoders=(components.text_encoder, components.text_encoder_2),
        buckets=BUCKETS,
        batch_size=4,
        num_workers=0,
        progress=False,
    )
    arguments.update(options)
    return build_cache(records, **arguments)


@pytest.fixture()
def records(tmp_path):
    return scan_folder(_write_images(tmp_path / "data")).records


def _pixels(image) -> torch.Tensor:
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)[None].float() / 127.5 - 1


def test_build_then_read_matches_direct_encoding(components, records, tmp_path):
    report = _build(components, records, tmp_path / "cache")
    assert (report.cached, report.reused, report.text_encoded, report.text_reused) == (7, 0, 3, 0)
    assert report.bucket_counts == {"48x80": 2, "64x64": 3, "80x48": 2}
    index = load_index(tmp_path / "cache")
    assert len(index.text_keys) == 3  # five images share "red circle": one text entry

    dataset = CachedDataset(tmp_path / "cache", seed=3)
    assert len(dataset) == len(records)
    vae = components.vae
    scale = vae.config.scaling_factor
    for i, record in enumerate(records):
        bucket = dataset.buckets[dataset.bucket_ids[i]]
        prepared, original_size, crop_top_left = prepare_image(load_image_rgb(record.path), bucket)
        with torch.no_grad():
            direct = vae.encode(_pixels(prepared)).latent_dist
        mean, std = dataset.latent_distribution(i)
        torch.testing.assert_close(mean, direct.mean[0] * scale, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(std, direct.std[0] * scale, rtol=1e-5, atol=1e-6)

        item = dataset[i]
        assert item["latents"].shape == (4, bucket.height // 8, bucket.width // 8)
        assert item["latents"].dtype == torch.float32
        expected_ids = [*original_size, *crop_top_left, bucket.height, bucket.width]
        assert item["time_ids"].tolist() == [float(v) for v in expected_ids]
        assert dataset.tags(i) == record.tags and dataset.captions[i] == record.caption
        with torch.no_grad():
            text = encode_prompts(
                [record.caption],
                (components.tokenizer, components.tokenizer_2),
                (components.text_encoder, components.text_encoder_2),
            )
        torch.testing.assert_close(item["prompt_embeds"], text.prompt_embeds[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            item["pooled_prompt_embeds"], text.pooled_prompt_embeds[0], rtol=1e-5, atol=1e-6
        )

        # The sample is mean + std * eps with eps fixed by (seed, epoch, i).
        eps = (item["latents"] - mean) / std
        assert abs(eps.mean().item()) < 0.5 and 0.5 < eps.std().item() < 1.5
        torch.testing.assert_close(dataset[i]["latents"], item["latents"], rtol=0, atol=0)
    dataset.set_epoch(1)
    assert not torch.equal(dataset[0]["latents"], CachedDataset(tmp_path / "cache", seed=3)[0]["latents"])

    first_bucket = dataset.bucket_ids[0]
    same_bucket = [i for i in range(len(dataset)) if dataset.bucket_ids[i] == first_bucket]
    batch = CachedDataset.collate([dataset[i] for i in same_bucket])
    assert batch["latents"].shape[0] == report.bucket_counts[str(dataset.buckets[first_bucket])]
    assert batch["time_ids"].shape[1] == 6 and batch["index"].dtype == torch.long


def test_mean_mode_stores_only_the_mean(components, records, tmp_path):
    _build(components, records[:2], tmp_path / "cache", latent_mode="mean")
    dataset = CachedDataset(tmp_path / "cache")
    mean, std = dataset.latent_distribution(0)
    assert std is None
    torch.testing.assert_close(dataset[0]["latents"], mean, rtol=0, atol=0)


def test_invalidation_reencodes_exactly_what_changed(components, records, tmp_path):
    cache_dir = tmp_path / "cache"
    _build(components, records, cache_dir)
    again = _build(components, records, cache_dir)
    assert (again.cached, again.reused, again.text_encoded, again.text_reused) == (0, 7, 0, 3)

    # One caption changes: that text is encoded, no latent is.
    caption_file = records[6].path.with_suffix(".txt")
    caption_file.write_text("green square", encoding="utf-8")
    records = scan_folder(records[0].path.parent).records
    changed = _build(components, records, cache_dir)
    assert (changed.cached, changed.reused, changed.text_encoded, changed.text_reused) == (0, 7, 1, 2)
    assert CachedDataset(cache_dir).captions[6] == "green square"

    # A fine-tuned decoder does not change latents; a changed encoder changes all of them.
    vae = copy.deepcopy(components.vae)
    with torch.no_grad():
        vae.decoder.conv_in.weight.add_(0.01)
    assert _build(components, records, cache_dir, vae=vae).cached == 0
    with torch.no_grad():
        vae.encoder.conv_in.weight.add_(0.01)
    new_vae = _build(components, records, cache_dir, vae=vae)
    assert (new_vae.cached, new_vae.reused, new_vae.text_encoded) == (7, 0, 0)


def test_module_identity_tracks_weights_in_both_modes(components):
    vae = copy.deepcopy(components.vae)
    full, sampled = module_identity(vae), module_identity(vae, full_hash_max_elements=0)
    assert module_identity(copy.deepcopy(vae)) == full
    with torch.no_grad():
        vae.encoder.conv_in.weight.view(-1)[0] += 1.0  # index 0 is always among the sampled values
    assert module_identity(vae) != full
    assert module_identity(vae, full_hash_max_elements=0) != sampled


def _items_in_shard(cache_dir: Path, shard: str) -> int:
    index = load_index(cache_dir)
    shard_id = index.shard_names.index(shard)
    return int((index.latent_shard == shard_id).sum() + (index.text_shard == shard_id).sum())


def _read_all(dataset: CachedDataset) -> None:
    for i in range(len(dataset)):
        dataset[i]


def test_corrupt_and_truncated_shards_are_detected_and_rebuilt(components, records, tmp_path):
    cache_dir = tmp_path / "cache"
    _build(components, records, cache_dir, shard_max_entries=3)
    shards = sorted(p.name for p in cache_dir.glob("shard-*.safetensors"))
    assert len(shards) == 4  # 3 texts + 7 latents, 3 entries a shard

    flipped, truncated = cache_dir / shards[1], cache_dir / shards[2]
    data = bytearray(flipped.read_bytes())
    data[-40] ^= 0xFF  # inside the last tensor's bytes
    flipped.write_bytes(bytes(data))
    with pytest.raises(CacheCorruptError, match=shards[1]):
        _read_all(CachedDataset(cache_dir))

    truncated_entries = _items_in_shard(cache_dir, shards[2])
    truncated.write_bytes(truncated.read_bytes()[:-100])
    dataset = CachedDataset(cache_dir)
    errors = []
    for i in range(len(dataset)):
        try:
            dataset[i]
        except CacheCorruptError as error:
            errors.append(str(error))
    assert any(shards[2] in e for e in errors) and any(shards[1] in e for e in errors)
    assert all("sdxl-trainer cache CONFIG" in e for e in errors)

    report = _build(components, records, cache_dir, shard_max_entries=3)
    assert report.corrupt_shards[shards[1]] == 1
    assert report.corrupt_shards[shards[2]] == truncated_entries
    assert report.corrupt_rebuilt == 1 + truncated_entries
    assert report.cached + report.text_encoded == report.corrupt_rebuilt
    _read_all(CachedDataset(cache_dir))  # nothing corrupt is left
    assert not truncated.exists()  # no entry references it any more
    clean = _build(components, records, cache_dir, shard_max_entries=3)
    assert (clean.corrupt_rebuilt, clean.cached, clean.text_encoded) == (0, 0, 0)


_KILLED_BUILD = """
import os, signal, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from sdxl_trainer.data import cache
from sdxl_trainer.data.buckets import generate_buckets
from sdxl_trainer.data.dataset import scan_folder
from sdxl_trainer.models.tiny import build_tiny_components

data_dir, cache_dir, moment = sys.argv[1], sys.argv[2], sys.argv[3]
write_shard = cache._write_shard_file
shards_written = []

def dying_write_shard(path, tensors):
    if shards_written and moment == "mid-shard":
        path.with_name(path.name + ".tmp").write_bytes(b"half a shard")
        os.kill(os.getpid(), signal.SIGKILL)
    size = write_shard(path, tensors)
    shards_written.append(path)
    if len(shards_written) == 2 and moment == "before-index":
        os.kill(os.getpid(), signal.SIGKILL)  # shard 2 renamed, its index never written
    return size

cache._write_shard_file = dying_write_shard
c = build_tiny_components({words!r}, seed=0)
cache.build_cache(
    scan_folder(Path(data_dir)).records, cache_dir=Path(cache_dir), vae=c.vae,
    tokenizers=(c.tokenizer, c.tokenizer_2), text_encoders=(c.text_encoder, c.text_encoder_2),
    buckets=generate_buckets(64, step=16), batch_size=4, num_workers=0, progress=False,
    shard_max_entries=4,
)
"""


@pytest.mark.parametrize("moment", ["mid-shard", "before-index"])
def test_killed_build_resumes_from_its_last_shard(components, records, tmp_path, moment):
    cache_dir = tmp_path / "cache"
    script = textwrap.dedent(_KILLED_BUILD).format(words=WORDS)
    process = subprocess.run(
        [sys.executable, "-c", script, str(records[0].path.parent), str(cache_dir), moment],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert process.returncode == -9, process.stderr
    first = load_index(cache_dir)  # the index written after shard 1: 3 texts + 1 latent
    assert (len(first.text_keys), len(first.latent_keys)) == (3, 1)
    leftovers = {p.name for p in cache_dir.iterdir()}
    assert ("shard-r000-000002.safetensors.tmp" in leftovers) == (moment == "mid-shard")
    assert ("shard-r000-000002.safetensors" in leftovers) == (moment == "before-index")

    resumed = _build(components, records, cache_dir, shard_max_entries=4)
    assert (resumed.reused, resumed.text_reused, resumed.cached, resumed.text_encoded) == (1, 3, 6, 0)
    assert resumed.corrupt_rebuilt == 0
    assert not list(cache_dir.glob("*.tmp"))
    _read_all(CachedDataset(cache_dir))

    fresh_dir = tmp_path / "fresh"
    _build(components, records, fresh_dir)
    resumed_set, fresh_set = CachedDataset(cache_dir), CachedDataset(fresh_dir)
    for i in range(len(fresh_set)):  # batches were cut differently: equal up to float rounding
        torch.testing.assert_close(resumed_set[i]["latents"], fresh_set[i]["latents"], rtol=0, atol=1e-5)
    assert not (cache_dir / "shard-r000-000002.safetensors").exists() or moment == "mid-shard"


def test_truncated_image_is_skipped_with_a_reason(components, records, tmp_path):
    data_dir = records[0].path.parent
    broken = data_dir / "broken.bmp"
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(broken)
    broken.write_bytes(broken.read_bytes()[:3000])  # the header is intact
    (data_dir / "broken.txt").write_text("blue circle", encoding="utf-8")
    records = scan_folder(data_dir).records
    assert any(r.path == broken for r in records)  # it passed the header scan

    report = _build(components, records, tmp_path / "cache", num_workers=2)
    assert [s.path for s in report.skipped] == [str(broken)]
    assert "truncated" in report.skipped[0].reason
    assert report.cached == 7 and report.items == 7
    on_disk = json.loads((tmp_path / "cache" / "report.json").read_text())
    assert {"cached", "reused", "skipped", "bucket_counts"} <= set(on_disk)
    assert on_disk["skipped"] == [{"path": str(broken), "reason": report.skipped[0].reason}]
    assert sum(on_disk["bucket_counts"].values()) == 7
    assert len(CachedDataset(tmp_path / "cache")) == 7


def test_two_ranks_merged_equal_one_rank(components, records, tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    # One image a batch, so that both builds run the very same computations: bitwise equal.
    _build(components, records, single, batch_size=1)
    reports = [_build(components, records, multi, batch_size=1, rank=r, world_size=2) for r in (0, 1)]
    partial_indexes = sorted(p.name for p in multi.glob("index*"))
    assert partial_indexes == ["index.rank000.safetensors", "index.rank001.safetensors"]
    assert sum(r.text_encoded for r in reports) == 3  # each distinct caption encoded by one rank
    merged = merge_rank_indexes(multi, world_size=2)
    assert (merged.cached, merged.items, merged.text_encoded) == (7, 7, 3)
    assert not list(multi.glob("*.rank*"))
    assert (multi / INDEX_NAME).is_file()

    one, two = CachedDataset(single), CachedDataset(multi)
    assert len(one) == len(two) and one.bucket_ids == two.bucket_ids and one.captions == two.captions
    for i in range(len(one)):
        a, b = one[i], two[i]
        assert one.tags(i) == two.tags(i) and one.source(i) == two.source(i)
        for name in ("latents", "prompt_embeds", "pooled_prompt_embeds", "time_ids"):
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    # Merged caches are reused by a later single-rank build.
    again = _build(components, records, multi)
    assert (again.cached, again.text_encoded) == (0, 0)


def test_ranks_with_a_barrier_are_merged_by_rank_zero(components, records, tmp_path):
    cache_dir = tmp_path / "cache"
    barrier = threading.Barrier(2, timeout=60)
    reports, errors = {}, []

    def run(rank: int) -> None:
        try:  # each "rank" owns its modules, as separate processes would
            reports[rank] = _build(
                copy.deepcopy(components), records, cache_dir, rank=rank, world_size=2, barrier=barrier.wait
            )
        except BaseException as error:  # re-raised in the test thread below
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    assert reports[0].cached + reports[1].cached == 7
    assert not list(cache_dir.glob("*.rank*"))
    merged = json.loads((cache_dir / "report.json").read_text())
    assert (merged["cached"], merged["items"]) == (7, 7)
    _read_all(CachedDataset(cache_dir))


# ----------------------------------------------------------------------------- repeats, captions, buckets


def _epoch_counts(dataset: CachedDataset, epoch: int = 0) -> Counter:
    """How often each image (manifest row) is drawn in one sampler epoch."""
    sampler = BucketBatchSampler(dataset.bucket_ids, batch_size=2, seed=0)
    sampler.set_epoch(epoch)
    return Counter(dataset.image_of(i) for batch in sampler for i in batch)


def test_repeat_folder_item_appears_three_times_and_is_encoded_once(components, tmp_path):
    _write_images(tmp_path / "data" / "3_x", IMAGES[:2])
    _write_images(tmp_path / "data" / "plain", IMAGES[6:7])
    records = scan_folder(tmp_path / "data", folder_repeats=True).records
    assert [r.repeats for r in records] == [3, 3, 1]
    report = _build(components, records, tmp_path / "cache")
    assert (report.cached, report.text_encoded, report.items, report.epoch_items) == (3, 2, 3, 7)
    assert len(load_index(tmp_path / "cache").latent_keys) == 3  # each image stored once

    dataset = CachedDataset(tmp_path / "cache")
    assert (len(dataset), dataset.num_images, dataset.repeats) == (7, 3, [3, 3, 1])
    for epoch in (0, 1):
        assert _epoch_counts(dataset, epoch) == {0: 3, 1: 3, 2: 1}
    copies = [i for i in range(len(dataset)) if dataset.image_of(i) == 0]
    first, second = dataset[copies[0]], dataset[copies[1]]
    torch.testing.assert_close(first["prompt_embeds"], second["prompt_embeds"], rtol=0, atol=0)
    assert not torch.equal(first["latents"], second["latents"])  # each copy draws its own noise
    assert dataset.source(copies[2]) == str(records[0].path)

    table = json.loads((tmp_path / "cache" / BUCKET_TABLE_NAME).read_text())
    assert (table["images"], table["items"]) == (3, 7)
    assert {row["resolution"]: (row["images"], row["items"]) for row in table["buckets"]} == {
        "48x80": (1, 1),
        "64x64": (1, 3),
        "80x48": (1, 3),
    }
    assert _build(components, records, tmp_path / "cache").cached == 0


def test_two_sources_with_different_repeats(components, tmp_path):
    _write_images(tmp_path / "one", IMAGES[:2])
    _write_images(tmp_path / "two", (IMAGES[2], IMAGES[6]))  # other pixels than "one"
    scan = scan_sources([DataSource(tmp_path / "one", repeats=2), DataSource(tmp_path / "two", repeats=5)])
    report = _build(components, scan.records, tmp_path / "cache")
    assert (report.cached, report.epoch_items) == (4, 14)
    dataset = CachedDataset(tmp_path / "cache")
    assert dataset.repeats == [2, 2, 5, 5] and len(dataset) == 14
    assert _epoch_counts(dataset) == {0: 2, 1: 2, 2: 5, 3: 5}
    assert dataset.captions == ["red circle"] * 9 + ["green circle"] * 5


TAGGED = (
    (64, 64, "red, circle, blue, square, green"),
    (100, 60, "red, circle, blue, square, green"),
    (60, 100, "blue, square, green"),
)


def test_caption_variants_are_cached_and_picked_per_seed_epoch_index(components, tmp_path):
    records = scan_folder(_write_images(tmp_path / "data", TAGGED)).records
    augment = CaptionAugment(shuffle_tags=True, keep_tokens=1, variants=4)
    report = _build(components, records, tmp_path / "cache", caption_augment=augment)
    variant_texts = {text for record in records for text in caption_variants(record.tags, augment)}
    assert report.text_encoded == len(variant_texts) > 2  # de-duplicated by text, not one per image
    assert len(load_index(tmp_path / "cache").text_keys) == len(variant_texts)

    dataset = CachedDataset(tmp_path / "cache", seed=5)
    assert dataset.num_variants == 4 and dataset.captions[0] == records[0].caption
    encoders = ((components.tokenizer, components.tokenizer_2), (components.text_encoder, components.text_encoder_2))
    for epoch in (0, 3):
        dataset.set_epoch(epoch)
        for i, record in enumerate(records):
            item = dataset[i]
            text = caption_variants(record.tags, augment)[item["caption_variant"]]
            assert text.split(", ")[0] == record.tags[0]
            with torch.no_grad():
                expected = encode_prompts([text], *encoders)
            torch.testing.assert_close(item["prompt_embeds"], expected.prompt_embeds[0], rtol=1e-5, atol=1e-6)

    # Resume: a fresh dataset at the same (seed, epoch) picks the same variants; epochs differ.
    choices = {(e, i): _choice(dataset, e, i) for e in range(40) for i in range(len(dataset))}
    resumed = CachedDataset(tmp_path / "cache", seed=0)
    resumed.load_state_dict({"seed": 5, "epoch": 7})
    assert resumed.text_choice(1) == choices[(7, 1)]
    assert all(_choice(resumed, e, i) == c for (e, i), c in choices.items())
    per_variant = Counter(variant for variant, _ in choices.values())
    assert set(per_variant) == {0, 1, 2, 3} and min(per_variant.values()) >= 15  # ~30 each of 120
    other_seed = CachedDataset(tmp_path / "cache", seed=6)
    assert [_choice(other_seed, e, i) for (e, i) in choices] != list(choices.values())


def _choice(dataset: CachedDataset, epoch: int, index: int) -> tuple[int, bool]:
    dataset.set_epoch(epoch)
    return dataset.text_choice(index)


def test_caption_dropout_gives_zero_conditioning_at_the_right_rate(components, records, tmp_path):
    _build(components, records[:3], tmp_path / "cache")
    with pytest.raises(ValueError, match="caption_dropout"):
        CachedDataset(tmp_path / "cache", caption_dropout=1.0)
    dataset = CachedDataset(tmp_path / "cache", seed=1, caption_dropout=0.25)
    draws = [_choice(dataset, epoch, i) for epoch in range(1000) for i in range(3)]
    rate = sum(dropped for _, dropped in draws) / len(draws)
    assert abs(rate - 0.25) < 0.03
    assert all(variant == 0 for variant, _ in draws)  # no augmentation: one text per image
    again = CachedDataset(tmp_path / "cache", seed=1, caption_dropout=0.25)
    assert [_choice(again, epoch, i) for epoch in range(1000) for i in range(3)] == draws

    epoch, i = next((e, i) for e in range(1000) for i in range(3) if draws[e * 3 + i][1])
    dataset.set_epoch(epoch)
    item = dataset[i]
    assert item["caption_dropped"]
    assert not item["prompt_embeds"].any() and not item["pooled_prompt_embeds"].any()
    assert item["prompt_embeds"].shape == CachedDataset(tmp_path / "cache")[i]["prompt_embeds"].shape
    kept_epoch = next(e for e in range(1000) if not draws[e * 3 + i][1])
    dataset.set_epoch(kept_epoch)
    assert dataset[i]["pooled_prompt_embeds"].abs().sum() > 0
    plain = CachedDataset(tmp_path / "cache")
    assert not any(_choice(plain, e, 0)[1] for e in range(200))


def test_no_upscale_small_images_keep_their_own_size(components, tmp_path):
    small = ((50, 40, "red circle"), (100, 60, "red circle"), (30, 70, "blue square"))
    records = scan_folder(_write_images(tmp_path / "data", small)).records
    report = _build(components, records, tmp_path / "cache", no_upscale=True, bucket_step=16)
    dataset = CachedDataset(tmp_path / "cache")
    for i, record in enumerate(records):
        bucket = dataset.buckets[dataset.bucket_ids[i]]
        assert bucket.width <= record.width and bucket.height <= record.height
        time_ids = dataset[i]["time_ids"].tolist()
        assert time_ids[0:2] == [record.height, record.width] and time_ids[4:6] == [bucket.height, bucket.width]
    assert [dataset.buckets[b] for b in dataset.bucket_ids] == [Bucket(48, 32), Bucket(80, 48), Bucket(16, 64)]
    assert report.bucket_counts == {"16x64": 1, "48x32": 1, "80x48": 1}
    table = json.loads((tmp_path / "cache" / BUCKET_TABLE_NAME).read_text())
    assert [row["resolution"] for row in table["buckets"]] == ["16x64", "48x32", "80x48"]
    upscaled = _build(components, records, tmp_path / "default")  # without: every image to a 64^2 bucket
    assert upscaled.bucket_counts == {"48x80": 1, "64x64": 1, "80x48": 1}


class _FixedCrop:
    """An rng stand-in for prepare_image that "draws" a given crop."""

    def __init__(self, top: int, left: int) -> None:
        self.values = [top, left]

    def randint(self, low: int, high: int) -> int:
        value = self.values.pop(0)
        assert low <= value <= high
        return value


def test_random_crop_end_to_end(components, tmp_path):
    sizes = ((100, 50, "red circle"), (50, 90, "red circle"), (64, 64, "blue square"))
    records = scan_folder(_write_images(tmp_path / "data", sizes)).records
    buckets = [assign_bucket(r.width, r.height, BUCKETS) for r in records]
    geometries = [crop_geometry(r.width, r.height, b) for r, b in zip(records, buckets)]
    spare = [g.resized_width - b.width + g.resized_height - b.height for g, b in zip(geometries, buckets)]
    assert spare[0] > 0 and spare[1] > 0 and spare[2] == 0  # the third image has nothing to crop

    crops_by_seed = {}
    for seed in (0, 1, 2):
        _build(components, records, tmp_path / f"cache{seed}", crop="random", seed=seed)
        dataset = CachedDataset(tmp_path / f"cache{seed}")
        crops_by_seed[seed] = [tuple(int(v) for v in dataset[i]["time_ids"][2:4]) for i in range(3)]
        for i, record in enumerate(records):  # the cached latent is the crop the time ids name
            bucket = dataset.buckets[dataset.bucket_ids[i]]
            prepared, _, crop = prepare_image(load_image_rgb(record.path), bucket, "random", _FixedCrop(*crops_by_seed[seed][i]))
            with torch.no_grad():
                direct = components.vae.encode(_pixels(prepared)).latent_dist.mean[0]
            scaled = direct * components.vae.config.scaling_factor
            torch.testing.assert_close(dataset.latent_distribution(i)[0], scaled, rtol=1e-5, atol=1e-6)
    assert len({tuple(crops) for crops in crops_by_seed.values()}) > 1  # the seed moves the crops

    # Deterministic per (seed, image): rebuilding with seed 0 elsewhere draws the same crops.
    _build(components, records, tmp_path / "again", crop="random", seed=0)
    again = CachedDataset(tmp_path / "again")
    assert [tuple(int(v) for v in again[i]["time_ids"][2:4]) for i in range(3)] == crops_by_seed[0]
    # The key holds the drawn crop, not the seed: a seed change re-encodes only moved crops.
    changed = _build(components, records, tmp_path / "again", crop="random", seed=1)
    moved = sum(a != b for a, b in zip(crops_by_seed[0], crops_by_seed[1]))
    assert 0 < moved < 3 and (changed.cached, changed.reused) == (moved, 3 - moved)
    assert _build(components, records, tmp_path / "again", crop="center", seed=1).cached == 3
