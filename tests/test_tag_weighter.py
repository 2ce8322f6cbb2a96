"""Tag-frequency loss weights: golden numbers, the mean-1 / clamp contract, state, apply_weights."""

from __future__ import annotations

import itertools
import json
import math
import random
from statistics import median

import pytest
import torch

from sdxl_trainer.models.tag_weighter import (
    DEFAULT_CATEGORY,
    TagStatistics,
    TagWeighter,
    UniformTagWeights,
    apply_weights,
    build_tag_weighter,
    load_category_map,
)


def weighter(tag_lists, **params) -> TagWeighter:
    return TagWeighter(TagStatistics.from_tag_lists(tag_lists), **params)


def random_tag_lists(seed: int, num_images: int = 300, vocabulary: int = 60) -> list[list[str]]:
    rng = random.Random(seed)
    # Zipf-like frequencies, some untagged images, some repeated tags within a caption.
    tags = [f"tag{i}" for i in range(vocabulary)]
    cumulative = list(itertools.accumulate(1.0 / (i + 1) ** 1.2 for i in range(vocabulary)))
    return [rng.choices(tags, cum_weights=cumulative, k=rng.choice([0, 1, 2, 3, 5, 8])) for _ in range(num_images)]


def test_counts_are_document_frequencies_and_categories_resolve():
    stats = TagStatistics.from_tag_lists(
        [["red", "red", "artist:bob"], ["red", "Character:alice"], ["re:zero"], []],
        categories={"red": "color"},
    )
    assert stats.num_images == 4
    assert stats.tag_counts == {"Character:alice": 1, "artist:bob": 1, "re:zero": 1, "red": 2}
    assert stats.image_tags[0] == ("red", "artist:bob")  # duplicates dropped, order kept
    assert stats.tag_categories == {
        "Character:alice": "character",
        "artist:bob": "artist",
        "re:zero": DEFAULT_CATEGORY,  # not a known prefix
        "red": "color",  # the map wins over prefixes
    }
    assert stats.category_summary()["color"] == {"tags": 1, "occurrences": 2}


def test_strings_instead_of_tag_lists_are_rejected():
    with pytest.raises(TypeError):
        TagStatistics.from_tag_lists(["red, blue"])


def test_golden_weights_without_active_clamps():
    lists = [["a"]] * 6 + [["a", "b"]] * 2 + [["c"]] + [[]]
    w = weighter(lists, alpha=0.5, min_weight=0.01, max_weight=100.0, min_count=2)
    # counts: a=8, b=2, c=1 -> clamped 8, 2, 2; reference = median(8, 2, 2) = 2
    assert w.reference_frequency == 2.0
    fa, fb, fc = (2 / 8) ** 0.5, (2 / 2) ** 0.5, (2 / 2) ** 0.5
    raw = [fa] * 6 + [(fa + fb) / 2] * 2 + [fc] + [1.0]
    scale = len(raw) / sum(raw)
    expected = [scale * r for r in raw]
    assert w.weights_for_dataset().tolist() == pytest.approx(expected, rel=1e-6)
    assert w.scale == pytest.approx(scale, rel=1e-12)
    # The untagged image gets 1 before normalisation, i.e. exactly the scale.
    assert w.weight(9) == pytest.approx(scale, rel=1e-12)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("bounds", [(0.2, 5.0), (0.5, 2.0), (0.9, 1.1), (1.0, 3.0), (0.3, 1.0)])
def test_mean_is_one_and_clamps_hold_together(seed, bounds):
    low, high = bounds
    w = weighter(random_tag_lists(seed), alpha=1.0, min_weight=low, max_weight=high, min_count=1)
    weights = [w.weight(i) for i in range(len(w))]
    assert math.fsum(weights) / len(weights) == pytest.approx(1.0, abs=1e-12)
    assert min(weights) >= low and max(weights) <= high
    assert w.weights_for_dataset().double().mean().item() == pytest.approx(1.0, abs=1e-6)
    # Unclamped weights stay proportional to the raw weights (one common scale).
    free = [(weight, w._raw[i]) for i, weight in enumerate(weights) if low < weight < high]
    for weight, raw in free:
        assert weight == pytest.approx(w.scale * raw, rel=1e-12)
    # The order of the raw weights is kept.
    order = sorted(range(len(weights)), key=lambda i: w._raw[i])
    assert all(weights[a] <= weights[b] + 1e-15 for a, b in zip(order, order[1:]))


@pytest.mark.parametrize("bounds", [(1.5, 5.0), (0.2, 0.8)])
def test_bounds_that_exclude_mean_one_are_rejected(bounds):
    low, high = bounds
    with pytest.raises(ValueError, match="min_weight <= 1 <= max_weight"):
        weighter([["a"], ["b"], ["b"]], min_weight=low, max_weight=high)


def test_invalid_params_are_reported_together():
    with pytest.raises(ValueError) as error:
        weighter([["a"]], alpha=-1.0, min_count=0, category_multipliers={"artist": -2.0})
    message = str(error.value)
    assert "alpha" in message and "min_count" in message and "artist" in message


def test_all_zero_multipliers_cannot_be_normalised():
    with pytest.raises(ValueError, match="raw tag weight 0"):
        TagWeighter(TagStatistics.from_tag_lists([["artist:x"], ["artist:y"]]), category_multipliers={"artist": 0.0})


def test_imbalanced_concepts_rare_gets_upweighted_by_frequency_ratio():
    lists = [["red circle"]] * 200 + [["blue square"]] * 10
    w = weighter(lists, alpha=0.5, min_weight=0.01, max_weight=100.0)
    ratio = w.weight(205) / w.weight(0)
    assert ratio == pytest.approx(20**0.5, rel=1e-9)
    assert weighter(lists, alpha=0.0).weights_for_dataset().tolist() == [1.0] * 210


def test_min_count_floors_rare_tags():
    lists = [["common"]] * 30 + [["once"]] + [["twice"]] * 2 + [["thrice"]] * 3
    w = weighter(lists, min_count=3, min_weight=0.01, max_weight=100.0)
    assert w.weight(30) == w.weight(31) == w.weight(33)


def test_category_multiplier_scales_the_tag_term():
    lists = [["artist:a"]] * 5 + [["y"]] * 5
    plain = weighter(lists, min_weight=0.01, max_weight=100.0)
    boosted = weighter(lists, min_weight=0.01, max_weight=100.0, category_multipliers={"artist": 3.0})
    assert plain.weight(0) == pytest.approx(plain.weight(5)) == pytest.approx(1.0)
    # raw: artist image 3, other 1 -> after mean-1 normalisation 1.5 and 0.5
    assert boosted.weight(0) == pytest.approx(1.5) and boosted.weight(5) == pytest.approx(0.5)


def test_reference_frequency_is_the_median_of_floored_counts():
    lists = random_tag_lists(3)
    w = weighter(lists, min_count=4)
    counts = TagStatistics.from_tag_lists(lists).tag_counts.values()
    assert w.reference_frequency == median(max(c, 4) for c in counts)


def test_state_dict_is_json_deterministic_and_round_trips(tmp_path):
    lists = random_tag_lists(1)
    w = weighter(lists, alpha=0.7, category_multipliers={"general": 1.5})
    state = w.state_dict()
    text = json.dumps(state, sort_keys=True)
    assert text == json.dumps(weighter(lists, alpha=0.7, category_multipliers={"general": 1.5}).state_dict(), sort_keys=True)

    other = weighter(lists, alpha=0.1)
    other.load_state_dict(json.loads(text))
    assert other.weights_for_dataset().tolist() == w.weights_for_dataset().tolist()
    assert other.alpha == 0.7 and other.state_dict() == state
    assert other.summary() == w.summary()
    with pytest.raises(ValueError, match="dataset changed"):
        weighter(lists[:-1]).load_state_dict(state)
    edited = [list(tags) for tags in lists]
    edited[0] = ["a new tag"]
    with pytest.raises(ValueError, match="tags changed"):
        weighter(edited).load_state_dict(state)
    with pytest.raises(ValueError, match="version"):
        weighter(lists).load_state_dict({**state, "version": 99})

    path = w.save_json(tmp_path / "tag_weights.json")
    saved = json.loads(path.read_text(encoding="utf-8"))
    assert saved["summary"]["weights"]["mean"] == pytest.approx(1.0)
    assert saved["state"] == json.loads(text)


def test_large_dataset_is_fast_and_exact():
    lists = random_tag_lists(7, num_images=100_000, vocabulary=2_000)
    w = weighter(lists, alpha=1.0, min_weight=0.5, max_weight=2.0, min_count=1)
    weights = w.weights_for_dataset().double()
    assert weights.mean().item() == pytest.approx(1.0, abs=1e-6)
    assert weights.min().item() >= 0.5 - 1e-7 and weights.max().item() <= 2.0 + 1e-7


def test_summary_ranks_rare_tags_up_and_common_tags_down():
    lists = [["common"]] * 50 + [["mid"]] * 10 + [["rare"]] * 3
    summary = weighter(lists).summary(top_k=2)
    assert [e["tag"] for e in summary["most_upweighted"]] == ["rare", "mid"]
    assert [e["tag"] for e in summary["most_downweighted"]] == ["common", "mid"]
    assert summary["tags"]["common"]["count"] == 50
    assert list(summary["tags"]) == ["common", "mid", "rare"]  # by count, descending
    assert summary["weights"]["mean"] == pytest.approx(1.0)
    assert summary["num_images"] == 63 and summary["num_tags"] == 3


def test_apply_weights_is_the_weighted_mean_and_scales_gradients():
    losses = torch.tensor([1.0, 2.0, 4.0], requires_grad=True)
    weights = torch.tensor([0.5, 1.0, 2.0])
    total = apply_weights(losses, weights)
    assert total.item() == pytest.approx((0.5 + 2.0 + 8.0) / 3)
    total.backward()
    assert losses.grad.tolist() == pytest.approx([0.5 / 3, 1.0 / 3, 2.0 / 3])
    assert apply_weights(losses.detach(), torch.ones(3)).item() == pytest.approx(losses.detach().mean().item())
    with pytest.raises(ValueError):
        apply_weights(losses, torch.ones(2))
    with pytest.raises(ValueError):
        apply_weights(losses, torch.tensor([1.0, -1.0, 1.0]))
    with pytest.raises(ValueError):
        apply_weights(losses, torch.tensor([1.0, float("nan"), 1.0]))


def test_batch_weights_follow_dataset_indices():
    w = weighter(random_tag_lists(2))
    expected = torch.tensor([w.weight(5), w.weight(0), w.weight(5)], dtype=torch.float32)
    assert torch.equal(w.batch_weights([5, 0, 5]), expected)


def test_category_map_from_json_and_lines(tmp_path):
    as_json = tmp_path / "categories.json"
    as_json.write_text(json.dumps({"long_hair": "general", "bob_ross": "artist"}), encoding="utf-8")
    assert load_category_map(as_json) == {"long hair": "general", "bob ross": "artist"}
    as_lines = tmp_path / "categories.csv"
    as_lines.write_text("# tag,category\nlong_hair,general\n\nbob ross , artist\n", encoding="utf-8")
    assert load_category_map(as_lines) == {"long hair": "general", "bob ross": "artist"}
    bad = tmp_path / "bad.csv"
    bad.write_text("long_hair general\n", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.csv:1"):
        load_category_map(bad)
    with pytest.raises(FileNotFoundError):
        load_category_map(tmp_path / "missing.csv")


def test_build_tag_weighter_disabled_is_uniform_and_enabled_reads_categories(tmp_path):
    lists = [["bob"], ["x"], ["x"]]
    off = build_tag_weighter(lists, enabled=False)
    assert isinstance(off, UniformTagWeights)
    assert off.batch_weights([0, 2]).tolist() == [1.0, 1.0]
    categories = tmp_path / "c.csv"
    categories.write_text("bob,artist\n", encoding="utf-8")
    on = build_tag_weighter(lists, enabled=True, categories_file=categories, category_multipliers={"artist": 2.0}, min_count=1)
    assert on.statistics.tag_categories["bob"] == "artist"
    assert on.weight(0) > on.weight(1)
