"""The held-out validation split: deterministic per file, stable when files are added or removed."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from pathlib import Path

from sdxl_trainer.data.dataset import ImageRecord

_HASH_SPACE = float(2**64)


def split_position(relative_path: str) -> float:
    """A uniform number in [0, 1) fixed by the path (relative to the dataset root, POSIX separators)."""
    digest = hashlib.sha256(f"sdxl-trainer-split|{relative_path}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / _HASH_SPACE


def split_key(path: Path, roots: Sequence[Path]) -> str:
    """The path relative to the first root holding it (so moving the dataset keeps the split), else absolute."""
    path = Path(path)
    for root in roots:
        if path.is_relative_to(root):
            return path.relative_to(root).as_posix()
    return path.as_posix()


def split_validation(
    records: Sequence[ImageRecord], roots: Path | Sequence[Path], fraction: float
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """(training, validation) records, each in the input order.

    A record is held out when the ``split_position`` of its ``split_key`` is below ``fraction``, so a
    file keeps its side whatever else is in the folder. With ``fraction > 0`` and at least two
    records, each side gets at least one record (the lowest / highest positions are moved over).
    Held-out records are listed once (repeats 1): repeats weight training, not the validation mean.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    if fraction == 0.0 or len(records) < 2:
        return list(records), []
    roots = [Path(roots)] if isinstance(roots, (str, Path)) else [Path(root) for root in roots]
    positions = [split_position(split_key(record.path, roots)) for record in records]
    held_out = {i for i, position in enumerate(positions) if position < fraction}
    order = sorted(range(len(records)), key=positions.__getitem__)
    if not held_out:
        held_out.add(order[0])
    if len(held_out) == len(records):
        held_out.discard(order[-1])
    training = [record for i, record in enumerate(records) if i not in held_out]
    validation = [_listed_once(record) for i, record in enumerate(records) if i in held_out]
    return training, validation


def _listed_once(record: ImageRecord) -> ImageRecord:
    if getattr(record, "repeats", 1) == 1:
        return record
    return dataclasses.replace(record, repeats=1)
