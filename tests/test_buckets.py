from __future__ import annotations

import json
import math
import random
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from sdxl_trainer.data.buckets import (
    Bucket,
    BucketBatchSampler,
    assign_bucket,
    assign_bucket_no_upscale,
    bucket_summary,
    bucket_table,
    crop_geometry,
    format_bucket_summary,
    format_bucket_table,
    generate_buckets,
    prepare_image,
)


@pytest.mark.parametrize("resolution", [256, 512, 1024])
def test_generated_buckets_are_sdxl_shaped(resolution):
    buckets = generate_buckets(resolution)
    area = resolution**2
    assert buckets == sorted(set(buckets))
    assert Bucket(resolution, resolution) in buckets
    for bucket in buckets:
        assert bucket.width % 64 == 0 and bucket.height % 64 == 0
        assert abs(bucket.width * bucket.height - area) <= 0.1 * area
        assert max(bucket.aspect_ratio, 1 / bucket.aspect_ratio) <= 4.0
        assert Bucket(bucket.height, bucket.width) in buckets


def test_sdxl_1024_buckets_include_the_usual_ones_and_respect_limits():
    buckets = set(generate_buckets(1024))
    for width, height in [(1152, 896), (1216, 832), (1344, 768), (768, 1344), (2048, 512)]:
        assert Bucket(width, height) in buckets
    limited = generate_buckets(1024, max_aspect_ratio=2.0, min_side=768)
    assert min(min(b.width, b.height) for b in limited) >= 768
    assert max(max(b.aspect_ratio, 1 / b.aspect_ratio) for b in limited) <= 2.0
    with pytest.raises(ValueError, match="multiple of step"):
        generate_buckets(1000)


def test_assign_bucket_nearest_log_aspect():
    buckets = [Bucket(1024, 1024), Bucket(1216, 832), Bucket(832, 1216), Bucket(1536, 640)]
    assert assign_bucket(500, 500, buckets) == Bucket(1024, 1024)
    assert assign_bucket(3000, 2000, buckets) == Bucket(1216, 832)  # 1.5 vs 1.46 / 2.4
    assert assign_bucket(2000, 3000, buckets) == Bucket(832, 1216)
    assert assign_bucket(1700, 1000, buckets) == Bucket(1216, 832)  # log-nearer than 1536x640
    assert assign_bucket(2100, 1000, buckets) == Bucket(1536, 640)
    assert assign_bucket(10_000, 10, buckets) == Bucket(1536, 640)
    for width, height in [(640, 480), (300, 900), (1000, 1001)]:
        target = math.log(width / height)
        best = min(abs(math.log(b.width / b.height) - target) for b in buckets)
        chosen = assign_bucket(width, height, buckets)
        assert math.isclose(abs(math.log(chosen.width / chosen.height) - target), best)


def test_crop_geometry_covers_bucket():
    bucket = Bucket(256, 128)
    center = crop_geometry(400, 400, bucket)
    assert (center.resized_width, center.resized_height) == (256, 256)
    assert (center.top, center.left) == (64, 0)
    rng = random.Random(0)
    tops = {crop_geometry(400, 400, bucket, "random", rng).top for _ in range(50)}
    assert len(tops) > 5 and min(tops) >= 0 and max(tops) <= 128
    with pytest.raises(ValueError, match="crop must be one of"):
        crop_geometry(400, 400, bucket, "middle")
    with pytest.raises(ValueError, match="needs an rng"):
        crop_geometry(400, 400, bucket, "random")


def test_prepare_image_size_original_size_and_crop():
    # A 300x100 image: left third red, middle green, right third blue.
    pixels = np.zeros((100, 300, 3), dtype=np.uint8)
    pixels[:, :100, 0] = 255
    pixels[:, 100:200, 1] = 255
    pixels[:, 200:, 2] = 255
    image = Image.fromarray(pixels, "RGB")
    bucket = Bucket(128, 128)

    prepared, original_size, crop_top_left = prepare_image(image, bucket)

    assert prepared.size == (128, 128)
    assert original_size == (100, 300)  # (height, width)
    assert crop_top_left == (0, (384 - 128) // 2)  # resized to 384x128, centre crop
    centre = np.asarray(prepared)[64, 64]
    assert centre[1] > 240 and centre[0] < 15 and centre[2] < 15  # the green middle survives
    edge = np.asarray(prepared)[64, 2]
    assert edge[0] < 30  # nothing red from the left third

    prepared_odd, _, top_left = prepare_image(Image.new("RGB", (333, 517)), Bucket(192, 320))
    assert prepared_odd.size == (192, 320)
    geometry = crop_geometry(333, 517, Bucket(192, 320))
    assert top_left == (geometry.top, geometry.left)


def test_bucket_table_and_format():
    items = [Bucket(256, 256)] * 3 + [Bucket(192, 320)]
    table = bucket_table(items)
    assert table == [(Bucket(192, 320), 1), (Bucket(256, 256), 3)]
    assert format_bucket_table(table).splitlines() == ["    192x320 : 1 image", "    256x256 : 3 images"]


def test_no_upscale_bucket_is_never_larger_than_the_image():
    buckets = generate_buckets(1024)
    max_area = max(b.width * b.height for b in buckets)
    rng = random.Random(0)
    sizes = [(rng.randint(64, 3000), rng.randint(64, 3000)) for _ in range(500)]
    sizes = [(w, h) for w, h in sizes if max(w, h) / min(w, h) <= 4] + [(512, 512), (700, 1300), (1024, 1024)]
    own_size = 0
    for width, height in sizes:
        bucket = assign_bucket_no_upscale(width, height, buckets, 64)
        assert bucket.width <= width and bucket.height <= height, (width, height, bucket)
        assert bucket.width % 64 == 0 and bucket.height % 64 == 0
        assert bucket.width * bucket.height <= max_area
        standard = assign_bucket(width, height, buckets)
        if width >= standard.width and height >= standard.height:
            assert bucket == standard  # large enough: the usual bucket, downscaled as always
        else:
            own_size += 1
            assert width - bucket.width < 64 or bucket.width * bucket.height > 0.9 * max_area
    assert own_size > 50
    assert assign_bucket_no_upscale(512, 512, buckets, 64) == Bucket(512, 512)
    assert assign_bucket_no_upscale(700, 1300, buckets, 64) == Bucket(640, 1280)
    assert assign_bucket_no_upscale(40, 200, buckets, 64) == Bucket(64, 192)  # a side below one step


def test_bucket_summary_counts_images_and_items():
    per_image = [Bucket(256, 256), Bucket(256, 256), Bucket(192, 320)]
    summary = bucket_summary(per_image, [3, 1, 2])
    assert summary["images"] == 3 and summary["items"] == 6
    assert [(row["resolution"], row["images"], row["items"]) for row in summary["buckets"]] == [
        ("192x320", 1, 2),
        ("256x256", 2, 4),
    ]
    assert json.loads(json.dumps(summary)) == summary
    assert format_bucket_summary(summary).splitlines() == [
        "    192x320 : 1 image, 2 items",
        "    256x256 : 2 images, 4 items",
    ]
    with pytest.raises(ValueError):
        bucket_summary(per_image, [1])


# ----------------------------------------------------------------------------- sampler

BUCKET_IDS = [0] * 13 + [1] * 7 + [2] * 2 + [3] * 1  # sizes not multiples of the batch size


def _epoch(sampler: BucketBatchSampler) -> list[list[int]]:
    return [list(batch) for batch in sampler]


def test_sampler_one_bucket_per_batch_every_item_once():
    sampler = BucketBatchSampler(BUCKET_IDS, batch_size=4, seed=1)
    batches = _epoch(sampler)
    assert len(batches) == len(sampler) == 4 + 2 + 1 + 1
    for batch in batches:
        assert len({BUCKET_IDS[i] for i in batch}) == 1
        assert 1 <= len(batch) <= 4
    assert sorted(i for batch in batches for i in batch) == list(range(len(BUCKET_IDS)))
    assert sampler.epoch == 1  # finishing an epoch moves on


def test_sampler_is_deterministic_per_seed_and_changes_by_epoch():
    first = _epoch(BucketBatchSampler(BUCKET_IDS, 4, seed=5))
    again = _epoch(BucketBatchSampler(BUCKET_IDS, 4, seed=5))
    other = _epoch(BucketBatchSampler(BUCKET_IDS, 4, seed=6))
    sampler = BucketBatchSampler(BUCKET_IDS, 4, seed=5)
    sampler.set_epoch(1)
    next_epoch = _epoch(sampler)
    assert first == again
    assert first != other
    assert first != next_epoch
    unshuffled = _epoch(BucketBatchSampler(BUCKET_IDS, 4, shuffle=False))
    assert unshuffled[0] == [0, 1, 2, 3] and unshuffled[-1] == [22]


@pytest.mark.parametrize("stop_after", [0, 3, 8, 11, 16])  # 8 batches per epoch: mid, boundary, later
def test_sampler_resume_matches_uninterrupted(stop_after):
    uninterrupted = BucketBatchSampler(BUCKET_IDS, 4, seed=3).batches()
    expected = [next(uninterrupted) for _ in range(30)]

    interrupted = BucketBatchSampler(BUCKET_IDS, 4, seed=3)
    stream = interrupted.batches()
    head = [next(stream) for _ in range(stop_after)]
    state = json.loads(json.dumps(interrupted.state_dict()))

    resumed = BucketBatchSampler(BUCKET_IDS, 4, seed=3)
    resumed.load_state_dict(state)
    tail_stream = resumed.batches()
    tail = [next(tail_stream) for _ in range(30 - stop_after)]
    assert head + tail == expected


def test_sampler_resume_with_set_epoch_loop():
    def run(epochs, sampler, start=0):
        out = []
        for epoch in range(start, epochs):
            sampler.set_epoch(epoch)
            out.extend(sampler)
        return out

    expected = run(3, BucketBatchSampler(BUCKET_IDS, 4, seed=9))
    first = BucketBatchSampler(BUCKET_IDS, 4, seed=9)
    first.set_epoch(0)
    _epoch(first)
    first.set_epoch(1)
    iterator = iter(first)
    head = _epoch(BucketBatchSampler(BUCKET_IDS, 4, seed=9)) + [next(iterator) for _ in range(3)]
    resumed = BucketBatchSampler(BUCKET_IDS, 4, seed=9)
    resumed.load_state_dict(first.state_dict())
    assert head + run(3, resumed, start=1) == expected


def test_sampler_refuses_a_changed_setup():
    state = BucketBatchSampler(BUCKET_IDS, 4, seed=3).state_dict()
    with pytest.raises(ValueError, match="batch_size"):
        BucketBatchSampler(BUCKET_IDS, 2, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="num_items"):
        BucketBatchSampler(BUCKET_IDS[:-1], 4, seed=3).load_state_dict(state)


@pytest.mark.parametrize(("batch_size", "num_replicas"), [(4, 2), (2, 2), (3, 3)])
def test_sampler_ranks_partition_the_epoch(batch_size, num_replicas):
    ranks = [
        _epoch(BucketBatchSampler(BUCKET_IDS, batch_size, seed=2, num_replicas=num_replicas, rank=r))
        for r in range(num_replicas)
    ]
    single = _epoch(BucketBatchSampler(BUCKET_IDS, batch_size, seed=2))
    assert len({len(batches) for batches in ranks}) == 1  # equal batch counts
    assert len(ranks[0]) == math.ceil(len(single) / num_replicas)
    seen = Counter(i for batches in ranks for batch in batches for i in batch)
    assert set(seen) == set(range(len(BUCKET_IDS)))
    padding = len(ranks[0]) * num_replicas - len(single)
    assert sum(seen.values()) == len(BUCKET_IDS) + sum(len(b) for b in single[:padding])
    if padding == 0:
        assert set(seen.values()) == {1}
    for batches in ranks:
        for batch in batches:
            assert len({BUCKET_IDS[i] for i in batch}) == 1
