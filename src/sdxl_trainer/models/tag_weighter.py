"""Per-image loss weights from tag frequencies and categories, so rare concepts are not drowned out.

Formula (all in float64):

- ``count(tag)``: in how many images the tag appears (document frequency; a tag repeated in one
  caption counts once).
- ``reference_frequency``: the median over distinct tags of ``max(count, min_count)``. A tag this
  frequent gets factor 1, the same as an untagged image; the median is robust to the long tail
  of rare tags and to a few near-universal ones (``masterpiece``, ``1girl``).
- ``factor(tag) = (reference_frequency / max(count, min_count)) ** alpha * multiplier(category)``.
- ``raw(image)``: the mean of ``factor`` over the image's distinct tags; 1 for an untagged image.
- final weight: ``clamp(scale * raw, min_weight, max_weight)`` with the one ``scale`` for which
  the dataset mean of the final weights is 1. This is the fixed point of "clamp, renormalise,
  re-clamp, ..." solved directly, so BOTH the clamps and ``mean == 1`` hold exactly (up to
  float64 rounding). Such a scale exists whenever ``min_weight <= 1 <= max_weight``; other
  bounds cannot both hold and are rejected with an error (neither silently wins). The clamps
  bound the final weights the loss is multiplied by ("no image counts more than max_weight
  times the average one").

The trainer multiplies each sample's loss by its weight before the batch mean
(:func:`apply_weights`); with mean weight 1 the overall loss scale (and so the learning rate)
is unchanged in expectation.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import median

import numpy as np
import torch

from sdxl_trainer.data.dataset import CaptionOptions, normalize_tags
from sdxl_trainer.utils.logging import get_logger

log = get_logger("tag_weighter")

DEFAULT_CATEGORY = "general"
# Prefixes read as a category when a tag has no entry in the category map ("artist:foo" -> artist).
DEFAULT_CATEGORY_PREFIXES: tuple[str, ...] = ("artist", "character", "copyright", "series", "style", "meta", "rating", "general")
STATE_FORMAT = "sdxl_trainer.tag_weights"
STATE_VERSION = 1
_BISECTION_STEPS = 100  # halves log(c)'s bracket: far below float64 resolution long before this


def load_category_map(path: str | Path, caption_options: CaptionOptions = CaptionOptions()) -> dict[str, str]:
    """Read ``tag -> category`` from a JSON object or from ``tag,category`` lines.

    Tags are normalised like captions (``caption_options``: underscores to spaces, ...), so a
    map written with ``long_hair`` matches the caption tag ``long hair``. In the line format,
    blank lines and lines starting with ``#`` are ignored and the last comma splits tag from
    category.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tag category file {path} does not exist (tag_weighting.categories_file)")
    text = path.read_text(encoding="utf-8-sig")
    pairs: list[tuple[str, str, str]] = []  # (tag, category, where)
    if text.lstrip().startswith("{"):
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from error
        for tag, category in loaded.items():
            if not isinstance(category, str):
                raise ValueError(f"{path}: category of {tag!r} must be a string, got {category!r}")
            pairs.append((tag, category, f"key {tag!r}"))
    else:
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            tag, sep, category = line.rpartition(",")
            if not sep:
                raise ValueError(f"{path}:{number}: expected 'tag,category', got {line!r}")
            pairs.append((tag, category, f"line {number}"))
    mapping: dict[str, str] = {}
    for raw_tag, raw_category, where in pairs:
        tags = normalize_tags(raw_tag, caption_options)
        category = raw_category.strip()
        if len(tags) != 1 or not category:
            raise ValueError(f"{path} ({where}): need exactly one tag and a category, got {raw_tag!r} -> {raw_category!r}")
        mapping[tags[0]] = category
    return mapping


def _category_of(tag: str, categories: Mapping[str, str], prefixes: Sequence[str]) -> str:
    if tag in categories:
        return categories[tag]
    prefix, sep, rest = tag.partition(":")
    if sep and rest.strip() and prefix.strip().lower() in prefixes:
        return prefix.strip().lower()
    return DEFAULT_CATEGORY


@dataclass(frozen=True)
class TagStatistics:
    """Tag frequencies of a dataset; images are in dataset-index order."""

    image_tags: tuple[tuple[str, ...], ...]  # distinct tags of each image, caption order
    tag_counts: dict[str, int]  # tag -> number of images with it, sorted by tag
    tag_categories: dict[str, str]  # tag -> category, sorted by tag

    @classmethod
    def from_tag_lists(
        cls,
        tag_lists: Sequence[Sequence[str]],
        categories: Mapping[str, str] | None = None,
        category_prefixes: Sequence[str] = DEFAULT_CATEGORY_PREFIXES,
    ) -> "TagStatistics":
        """Count tags over images; a tag's category comes from ``categories``, else its prefix, else general."""
        if isinstance(tag_lists, str) or any(isinstance(tags, str) for tags in tag_lists):
            raise TypeError("tag_lists must be a sequence of tag sequences (one per image), not strings")
        image_tags = tuple(tuple(dict.fromkeys(tags)) for tags in tag_lists)
        counts = Counter(tag for tags in image_tags for tag in tags)
        categories = dict(categories or {})
        prefixes = tuple(p.lower() for p in category_prefixes)
        return cls(
            image_tags=image_tags,
            tag_counts=dict(sorted(counts.items())),
            tag_categories={tag: _category_of(tag, categories, prefixes) for tag in sorted(counts)},
        )

    @property
    def num_images(self) -> int:
        return len(self.image_tags)

    def category_summary(self) -> dict[str, dict[str, int]]:
        """Per category: distinct tags and tag occurrences (images x tags)."""
        summary: dict[str, dict[str, int]] = {}
        for tag, count in self.tag_counts.items():
            entry = summary.setdefault(self.tag_categories[tag], {"tags": 0, "occurrences": 0})
            entry["tags"] += 1
            entry["occurrences"] += count
        return dict(sorted(summary.items()))


def _solve_scale(raw: np.ndarray, low: float, high: float) -> float:
    """The scale c with mean(clamp(c * raw, low, high)) == 1; needs low <= 1 <= high.

    The mean is continuous and non-decreasing in c, so bisection (in log c) finds the clamp
    pattern; c is then solved exactly on that pattern.
    """
    count = raw.shape[0]

    def mean_at(scale: float) -> float:
        return float(np.clip(scale * raw, low, high).sum() / count)

    positive = raw[raw > 0.0]
    if positive.size == 0:
        raise ValueError("every image has raw tag weight 0 (all its tags have category multiplier 0); nothing to normalise")
    lower, upper = low / float(positive.max()), high / float(positive.min())
    if mean_at(upper) < 1.0:
        raise ValueError(
            f"{count - positive.size} of {count} images have raw tag weight 0 (category multiplier 0): "
            f"even at max_weight {high} the mean weight cannot reach 1; raise max_weight or the multipliers"
        )
    for _ in range(_BISECTION_STEPS):
        middle = math.sqrt(lower * upper)
        if mean_at(middle) < 1.0:
            lower = middle
        else:
            upper = middle
    scale = upper
    # Exact solve on the clamp pattern found: the free weights take up what the clamped ones leave.
    scaled = scale * raw
    free = (scaled > low) & (scaled < high)
    if free.any():
        clamped_total = low * float((scaled <= low).sum()) + high * float((scaled >= high).sum())
        exact = (count - clamped_total) / math.fsum(raw[free].tolist())
        if bool(((exact * raw[free] >= low) & (exact * raw[free] <= high)).all()):
            scale = exact
    return scale


def _statistics_digest(statistics: TagStatistics) -> str:
    """sha256 of every image's tags and every tag's category: detects a changed dataset on resume."""
    payload = json.dumps([statistics.image_tags, statistics.tag_categories], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class TagWeighter:
    """Per-image loss weights of one dataset (see the module docstring for the formula)."""

    def __init__(
        self,
        statistics: TagStatistics,
        *,
        alpha: float = 0.5,
        min_weight: float = 0.2,
        max_weight: float = 5.0,
        min_count: int = 3,
        category_multipliers: Mapping[str, float] | None = None,
    ) -> None:
        multipliers = dict(sorted((category_multipliers or {}).items()))
        problems = []
        if not (math.isfinite(alpha) and alpha >= 0.0):
            problems.append(f"alpha must be a finite number >= 0, got {alpha!r}")
        if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1:
            problems.append(f"min_count must be an int >= 1, got {min_count!r}")
        if not (0.0 < min_weight <= 1.0 <= max_weight < math.inf):
            problems.append(
                f"need 0 < min_weight <= 1 <= max_weight (the weights are normalised to mean 1, so a "
                f"bound on the other side of 1 could never hold), got min_weight {min_weight!r}, max_weight {max_weight!r}"
            )
        problems += [f"category multiplier {name!r} must be a finite number >= 0, got {value!r}"
                     for name, value in multipliers.items() if not (math.isfinite(value) and value >= 0.0)]
        if statistics.num_images == 0:
            problems.append("the dataset has no images")
        if problems:
            raise ValueError("invalid tag weighting:\n  " + "\n  ".join(problems))
        self.statistics = statistics
        self.alpha = float(alpha)
        self.min_weight = float(min_weight)
        self.max_weight = float(max_weight)
        self.min_count = int(min_count)
        self.category_multipliers = {name: float(value) for name, value in multipliers.items()}
        unused = sorted(set(multipliers) - set(statistics.tag_categories.values()))
        if unused:
            log.warning("tag weighting: no tag of categories %s in this dataset (known: %s)",
                        ", ".join(unused), ", ".join(sorted(set(statistics.tag_categories.values()))) or "none")
        clamped_counts = [max(count, self.min_count) for count in statistics.tag_counts.values()]
        self.reference_frequency = float(median(clamped_counts)) if clamped_counts else float(self.min_count)
        self._factors = {tag: self.tag_factor(tag) for tag in statistics.tag_counts}
        self._raw = np.array([self._raw_weight(tags) for tags in statistics.image_tags], dtype=np.float64)
        self.scale = _solve_scale(self._raw, self.min_weight, self.max_weight)
        self._weights = np.clip(self.scale * self._raw, self.min_weight, self.max_weight)

    def tag_factor(self, tag: str) -> float:
        """The tag's term before the dataset scale: (reference / max(count, min_count)) ** alpha * multiplier."""
        count = max(self.statistics.tag_counts.get(tag, 0), self.min_count)
        multiplier = self.category_multipliers.get(self.statistics.tag_categories.get(tag, DEFAULT_CATEGORY), 1.0)
        return (self.reference_frequency / count) ** self.alpha * multiplier

    def _raw_weight(self, tags: Sequence[str]) -> float:
        if not tags:
            return 1.0
        return math.fsum(self._factors[tag] for tag in tags) / len(tags)

    def __len__(self) -> int:
        return int(self._weights.shape[0])

    def weight(self, index: int) -> float:
        return float(self._weights[index])

    def weights_for_dataset(self) -> torch.Tensor:
        """Final weights [N] (float32) in dataset-index order; their float64 mean is 1."""
        return torch.from_numpy(self._weights.astype(np.float32))

    def batch_weights(self, indices: Sequence[int]) -> torch.Tensor:
        """Weights [B] (float32) of the dataset items ``indices``."""
        return torch.from_numpy(self._weights[np.asarray(indices, dtype=np.int64)].astype(np.float32))

    # ------------------------------------------------------------------ state
    def _params(self) -> dict:
        return {
            "alpha": self.alpha,
            "min_weight": self.min_weight,
            "max_weight": self.max_weight,
            "min_count": self.min_count,
            "category_multipliers": dict(self.category_multipliers),
        }

    def state_dict(self) -> dict:
        """JSON-serialisable and deterministic: params, a digest of the dataset's tags, the weights."""
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "params": self._params(),
            "num_images": len(self),
            "statistics_sha256": _statistics_digest(self.statistics),
            "reference_frequency": self.reference_frequency,
            "scale": self.scale,
            "image_weights": self._weights.tolist(),
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore the saved weights and params (a resumed run uses exactly the weights it started
        with); the dataset's tags must be the ones they were computed from."""
        if state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
            raise ValueError(f"not a tag-weights state of version {STATE_VERSION} (format {state.get('format')!r}, version {state.get('version')!r})")
        weights = np.asarray(state["image_weights"], dtype=np.float64)
        if weights.shape[0] != len(self) or int(state["num_images"]) != len(self):
            raise ValueError(f"saved tag weights are for {weights.shape[0]} images, this dataset has {len(self)}; "
                             "the dataset changed since the checkpoint")
        if state["statistics_sha256"] != _statistics_digest(self.statistics):
            raise ValueError("the dataset's tags changed since the checkpoint (tag statistics digest differs); "
                             "resume with the same captions or start a new run")
        params = dict(state["params"])
        if params != self._params():
            log.warning("tag weighting: resuming with the checkpoint's parameters %s instead of %s", params, self._params())
        self.alpha = float(params["alpha"])
        self.min_weight = float(params["min_weight"])
        self.max_weight = float(params["max_weight"])
        self.min_count = int(params["min_count"])
        self.category_multipliers = {name: float(value) for name, value in params["category_multipliers"].items()}
        self.reference_frequency = float(state["reference_frequency"])
        self._factors = {tag: self.tag_factor(tag) for tag in self.statistics.tag_counts}
        self._raw = np.array([self._raw_weight(tags) for tags in self.statistics.image_tags], dtype=np.float64)
        self.scale = float(state["scale"])
        self._weights = weights

    # ------------------------------------------------------------------ reporting
    def summary(self, top_k: int = 20) -> dict:
        """Counts and weights per tag and category, weight statistics, the most up- and down-weighted tags.

        A tag's ``weight`` is its factor times the dataset scale (what an image with only this
        tag would get before clamping); ``mean_image_weight`` is the mean final weight of the
        images that have it.
        """
        stats = self.statistics
        per_tag_weights: dict[str, list[float]] = {tag: [] for tag in stats.tag_counts}
        for tags, weight in zip(stats.image_tags, self._weights.tolist()):
            for tag in tags:
                per_tag_weights[tag].append(weight)
        tags = {
            tag: {
                "count": count,
                "category": stats.tag_categories[tag],
                "weight": self.scale * self._factors[tag],
                "mean_image_weight": math.fsum(per_tag_weights[tag]) / len(per_tag_weights[tag]),
            }
            for tag, count in sorted(stats.tag_counts.items(), key=lambda item: (-item[1], item[0]))
        }
        ranked = sorted(tags, key=lambda tag: (-tags[tag]["weight"], tags[tag]["count"], tag))

        def entry(tag: str) -> dict:
            return {"tag": tag, **tags[tag]}

        weights = self._weights.tolist()
        n = len(weights)
        mean = math.fsum(weights) / n
        categories = stats.category_summary()
        for name, values in categories.items():
            values["multiplier"] = self.category_multipliers.get(name, 1.0)
        return {
            "num_images": n,
            "num_tags": len(tags),
            "untagged_images": sum(1 for image in stats.image_tags if not image),
            "reference_frequency": self.reference_frequency,
            "scale": self.scale,
            "params": self._params(),
            "weights": {
                "mean": mean,
                "std": math.sqrt(math.fsum((w - mean) ** 2 for w in weights) / n),
                "min": min(weights),
                "max": max(weights),
                "clamped_low": sum(1 for w in weights if w <= self.min_weight),
                "clamped_high": sum(1 for w in weights if w >= self.max_weight),
            },
            "categories": categories,
            "most_upweighted": [entry(tag) for tag in ranked[:top_k]],
            "most_downweighted": [entry(tag) for tag in reversed(ranked[-top_k:])] if top_k > 0 else [],
            "tags": tags,
        }

    def save_json(self, path: str | Path, top_k: int = 20) -> Path:
        """Write ``tag_weights.json``: the summary and the state (a report written once per run)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"summary": self.summary(top_k), "state": self.state_dict()}
        path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return path


class UniformTagWeights:
    """Null object for tag_weighting.enabled = false: every weight is 1."""

    def __init__(self, num_images: int) -> None:
        self.num_images = num_images

    def __len__(self) -> int:
        return self.num_images

    def weight(self, index: int) -> float:
        return 1.0

    def weights_for_dataset(self) -> torch.Tensor:
        return torch.ones(self.num_images, dtype=torch.float32)

    def batch_weights(self, indices: Sequence[int]) -> torch.Tensor:
        return torch.ones(len(indices), dtype=torch.float32)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: Mapping) -> None:
        return None

    def save_json(self, path: str | Path, top_k: int = 20) -> None:
        return None


def build_tag_weighter(
    tag_lists: Sequence[Sequence[str]],
    *,
    enabled: bool,
    alpha: float = 0.5,
    min_weight: float = 0.2,
    max_weight: float = 5.0,
    min_count: int = 3,
    categories_file: str | Path | None = None,
    category_multipliers: Mapping[str, float] | None = None,
    caption_options: CaptionOptions = CaptionOptions(),
) -> TagWeighter | UniformTagWeights:
    """The weighter for a dataset whose item i has tags ``tag_lists[i]`` (plain arguments of the config section)."""
    if not enabled:
        return UniformTagWeights(len(tag_lists))
    categories = load_category_map(categories_file, caption_options) if categories_file else None
    return TagWeighter(
        TagStatistics.from_tag_lists(tag_lists, categories),
        alpha=alpha,
        min_weight=min_weight,
        max_weight=max_weight,
        min_count=min_count,
        category_multipliers=category_multipliers,
    )


def apply_weights(per_sample_loss: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted batch loss ``mean_i(weights_i * loss_i)``.

    Divided by the batch size, not by ``sum(weights)``: normalising per batch would cancel the
    weighting (exactly so at batch size 1); the dataset-level mean of 1 keeps the scale instead.
    """
    if per_sample_loss.ndim != 1 or weights.shape != per_sample_loss.shape:
        raise ValueError(f"need per-sample losses [B] and weights [B], got {list(per_sample_loss.shape)} and {list(weights.shape)}")
    weights = weights.detach().to(device=per_sample_loss.device, dtype=per_sample_loss.dtype)
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ValueError(f"sample weights must be finite and >= 0, got {weights.tolist()}")
    return (per_sample_loss * weights).mean()
