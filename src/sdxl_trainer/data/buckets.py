"""SDXL aspect-ratio buckets: bucket generation, assignment, resize+crop, and a resumable sampler.

Every bucket has sides that are multiples of ``step`` and about ``resolution**2`` pixels. An
image goes to the bucket nearest in log aspect ratio, is resized to cover it and then cropped.
Sizes handed to SDXL's micro-conditioning are ``(height, width)`` like diffusers:
``original_size`` is the image before resizing, ``crop_top_left`` is ``(top, left)`` in the
resized image.

With ``no_upscale`` (:func:`assign_bucket_no_upscale`) an image smaller than its bucket keeps
its own size instead, rounded down to multiples of ``step``: such images form extra buckets of
their own sizes (see the bucket table), at the price of smaller, less full batches.
"""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from PIL import Image

CROP_MODES = ("center", "random")
AREA_TOLERANCE = 0.10  # a bucket's area is within 10% of resolution**2


@dataclass(frozen=True, order=True)
class Bucket:
    width: int
    height: int

    @property
    def aspect_ratio(self) -> float:
        return self.width / self.height

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


@dataclass(frozen=True)
class CropGeometry:
    resized_width: int  # the image is resized to this size (covering the bucket) ...
    resized_height: int
    top: int  # ... then cropped at (top, left) to the bucket size
    left: int


def generate_buckets(
    resolution: int = 1024,
    step: int = 64,
    min_side: int | None = None,
    max_side: int | None = None,
    max_aspect_ratio: float = 4.0,
) -> list[Bucket]:
    """All buckets with sides multiples of ``step``, sorted.

    For each width the height closest in area to ``resolution**2`` is taken; buckets whose area
    is more than 10% off, whose sides leave ``[min_side, max_side]``, or whose aspect ratio
    exceeds ``max_aspect_ratio`` are left out. The set is symmetric (portrait buckets are the
    landscape ones transposed) and holds the square ``resolution x resolution`` bucket.
    """
    if step <= 0:
        raise ValueError(f"step must be positive, got {step}")
    if resolution <= 0 or resolution % step:
        raise ValueError(f"resolution must be a positive multiple of step {step}, got {resolution}")
    if max_aspect_ratio < 1.0:
        raise ValueError(f"max_aspect_ratio must be >= 1, got {max_aspect_ratio}")
    min_side = step if min_side is None else min_side
    max_side = math.inf if max_side is None else max_side
    if not min_side <= resolution <= max_side:
        raise ValueError(
            f"min_side {min_side} and max_side {max_side} must allow the square bucket {resolution}"
        )

    area = resolution * resolution
    widest = math.sqrt(area * (1 + AREA_TOLERANCE) * max_aspect_ratio)
    buckets: set[Bucket] = set()
    width = resolution
    while width <= min(widest, max_side):
        # The two multiples of step around area/width; the closer in area wins (smaller on ties).
        low = max(step, math.floor(area / width / step) * step)
        height = min((low, low + step), key=lambda h: (abs(width * h - area), h))
        fits = (
            height <= width
            and height >= min_side
            and abs(width * height - area) <= AREA_TOLERANCE * area
            and width / height <= max_aspect_ratio
        )
        if fits:
            buckets.add(Bucket(width, height))
            buckets.add(Bucket(height, width))
        width += step
    return sorted(buckets)


def _log_aspect(width: float, height: float) -> float:
    # log(w) - log(h) is exactly antisymmetric, so mirrored buckets tie exactly.
    return math.log(width) - math.log(height)


def assign_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket nearest to the image in log aspect ratio (first in sorted order on ties)."""
    if not buckets:
        raise ValueError("no buckets to assign to")
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    target = _log_aspect(width, height)
    return min(buckets, key=lambda b: (abs(_log_aspect(b.width, b.height) - target), b))


def assign_bucket_no_upscale(width: int, height: int, buckets: Sequence[Bucket], step: int) -> Bucket:
    """Like :func:`assign_bucket`, but never upscales: an image that does not cover its nearest
    bucket gets a bucket of its own size rounded down to multiples of ``step`` (first scaled
    down to the largest bucket area when above it, keeping its aspect ratio).

    The only upscale left: a side shorter than ``step`` is rounded up to one ``step``.
    """
    if step <= 0:
        raise ValueError(f"step must be positive, got {step}")
    bucket = assign_bucket(width, height, buckets)
    if width >= bucket.width and height >= bucket.height:
        return bucket
    max_area = max(b.width * b.height for b in buckets)
    scale = min(1.0, math.sqrt(max_area / (width * height)))
    return Bucket(
        max(step, math.floor(width * scale / step) * step),
        max(step, math.floor(height * scale / step) * step),
    )


def crop_geometry(
    width: int, height: int, bucket: Bucket, crop: str = "center", rng: random.Random | None = None
) -> CropGeometry:
    """Resize to cover the bucket (scale = max(bw/w, bh/h)), then crop ``crop`` ("center" or
    "random", which needs ``rng``)."""
    if crop not in CROP_MODES:
        raise ValueError(f"crop must be one of {CROP_MODES}, got {crop!r}")
    if crop == "random" and rng is None:
        raise ValueError("crop='random' needs an rng (random.Random) so that crops are reproducible")
    scale = max(bucket.width / width, bucket.height / height)
    resized_width = max(bucket.width, round(width * scale))
    resized_height = max(bucket.height, round(height * scale))
    spare_x = resized_width - bucket.width
    spare_y = resized_height - bucket.height
    if crop == "center":
        top, left = spare_y // 2, spare_x // 2
    else:
        top, left = rng.randint(0, spare_y), rng.randint(0, spare_x)
    return CropGeometry(resized_width, resized_height, top, left)


def prepare_image(
    image: Image.Image, bucket: Bucket, crop: str = "center", rng: random.Random | None = None
) -> tuple[Image.Image, tuple[int, int], tuple[int, int]]:
    """Resize+crop ``image`` to exactly the bucket size.

    Returns ``(image, original_size, crop_top_left)`` with ``original_size = (height, width)``
    of the input and ``crop_top_left = (top, left)`` in the resized image.
    """
    geometry = crop_geometry(image.width, image.height, bucket, crop, rng)
    scale_x = geometry.resized_width / image.width
    scale_y = geometry.resized_height / image.height
    # Resizing only the source region that survives the crop equals resize-then-crop, for less work.
    box = (
        geometry.left / scale_x,
        geometry.top / scale_y,
        (geometry.left + bucket.width) / scale_x,
        (geometry.top + bucket.height) / scale_y,
    )
    prepared = image.resize(
        (bucket.width, bucket.height), Image.Resampling.LANCZOS, box=box, reducing_gap=3.0
    )
    return prepared, (image.height, image.width), (geometry.top, geometry.left)


def bucket_table(bucket_per_item: Sequence[Bucket]) -> list[tuple[Bucket, int]]:
    """How many items each bucket holds, sorted by bucket."""
    return sorted(Counter(bucket_per_item).items())


def format_bucket_table(
    table: Sequence[tuple[Bucket, int]], items: Sequence[int] | None = None
) -> str:
    """Human-readable lines such as ``   256x256 : 123 images``; with ``items`` (per row, e.g.
    counting repeats) ``   256x256 : 123 images, 369 items``."""
    lines = []
    for row, (bucket, count) in enumerate(table):
        line = f"  {str(bucket):>9} : {count} image{'s' if count != 1 else ''}"
        if items is not None:
            line += f", {items[row]} item{'s' if items[row] != 1 else ''}"
        lines.append(line)
    return "\n".join(lines)


def bucket_summary(bucket_per_image: Sequence[Bucket], repeats: Sequence[int]) -> dict:
    """The bucket table as JSON-ready data: images and epoch items (images x repeats) per
    resolution, sorted by bucket, with totals."""
    if len(bucket_per_image) != len(repeats):
        raise ValueError(f"{len(bucket_per_image)} buckets but {len(repeats)} repeat counts")
    items: Counter[Bucket] = Counter()
    for bucket, count in zip(bucket_per_image, repeats):
        items[bucket] += int(count)
    rows = [
        {
            "resolution": str(bucket),
            "width": bucket.width,
            "height": bucket.height,
            "aspect_ratio": round(bucket.aspect_ratio, 4),
            "images": images,
            "items": items[bucket],
        }
        for bucket, images in bucket_table(bucket_per_image)
    ]
    return {"images": len(bucket_per_image), "items": sum(items.values()), "buckets": rows}


def format_bucket_summary(summary: dict) -> str:
    """:func:`format_bucket_table` lines for a :func:`bucket_summary`."""
    table = [(Bucket(row["width"], row["height"]), row["images"]) for row in summary["buckets"]]
    return format_bucket_table(table, [row["items"] for row in summary["buckets"]])


class BucketBatchSampler:
    """Batches of dataset indices, every batch from one bucket; resumable mid-epoch.

    Each epoch, with a generator seeded by ``(seed, epoch)``: the items of each bucket are
    shuffled and cut into batches of ``batch_size`` (a bucket's last batch may be smaller; no
    item is dropped and buckets are never mixed), then the order of all batches is shuffled.
    Ranks take every ``num_replicas``-th batch of that list; when the number of batches does
    not divide evenly, batches from the start of the list are repeated so that all ranks get
    the same number of batches (so a few items are seen twice in that epoch).

    Finishing an epoch's iteration moves to the next epoch. ``state_dict`` counts batches
    handed out, so call it after consuming a batch (not through a prefetching DataLoader).
    """

    def __init__(
        self,
        bucket_ids: Sequence[int],
        batch_size: int,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
    ) -> None:
        if not bucket_ids:
            raise ValueError("bucket_ids is empty: there is nothing to sample")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need 0 <= rank < num_replicas, got rank {rank}, num_replicas {num_replicas}")
        self.batch_size = batch_size
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        members: dict[int, list[int]] = defaultdict(list)
        for index, bucket_id in enumerate(bucket_ids):
            members[int(bucket_id)].append(index)
        self._members = dict(sorted(members.items()))
        self._num_items = len(bucket_ids)
        self._batches_per_epoch = sum(math.ceil(len(m) / batch_size) for m in self._members.values())
        self.epoch = 0
        self._position = 0  # batches of this epoch already handed out on this rank
        self._cached_epoch: int | None = None
        self._cached_batches: list[list[int]] = []

    def __len__(self) -> int:
        return math.ceil(self._batches_per_epoch / self.num_replicas)

    def set_epoch(self, epoch: int) -> None:
        """Move to the start of ``epoch``; if already in ``epoch`` (e.g. after load_state_dict)
        the position inside it is kept."""
        if epoch != self.epoch:
            self.epoch = epoch
            self._position = 0

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of ``epoch``."""
        if self._cached_epoch == epoch:
            return self._cached_batches
        rng = random.Random(f"bucket-batch-sampler/{self.seed}/{epoch}")
        batches: list[list[int]] = []
        for indices in self._members.values():
            order = list(indices)
            if self.shuffle:
                rng.shuffle(order)
            batches.extend(order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size))
        if self.shuffle:
            rng.shuffle(batches)
        padded_length = len(self) * self.num_replicas
        batches.extend(batches[i % len(batches)] for i in range(padded_length - len(batches)))
        self._cached_epoch = epoch
        self._cached_batches = batches[self.rank :: self.num_replicas]
        return self._cached_batches

    def __iter__(self) -> Iterator[list[int]]:
        """The rest of the current epoch; afterwards the sampler is at the next epoch's start."""
        batches = self._epoch_batches(self.epoch)
        while self._position < len(batches):
            batch = batches[self._position]
            self._position += 1
            yield list(batch)
        self.epoch += 1
        self._position = 0

    def batches(self) -> Iterator[list[int]]:
        """Batches forever, epoch after epoch; state_dict at any point resumes exactly."""
        while True:
            yield from self

    def state_dict(self) -> dict:
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "batches_yielded": self._position,
            "batch_size": self.batch_size,
            "num_replicas": self.num_replicas,
            "num_items": self._num_items,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict) -> None:
        mismatched = [
            f"{key}: saved {state.get(key)!r}, now {getattr(self, attribute)!r}"
            for key, attribute in (
                ("seed", "seed"),
                ("batch_size", "batch_size"),
                ("num_replicas", "num_replicas"),
                ("num_items", "_num_items"),
                ("shuffle", "shuffle"),
            )
            if state.get(key) != getattr(self, attribute)
        ]
        if mismatched:
            raise ValueError(
                "cannot resume the batch sampler, its setup changed (" + "; ".join(mismatched) + ")"
            )
        position = int(state["batches_yielded"])
        if not 0 <= position <= len(self):
            raise ValueError(f"saved batches_yielded {position} is outside 0..{len(self)}")
        self.epoch = int(state["epoch"])
        self._position = position
