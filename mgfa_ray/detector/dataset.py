"""Step 1 (prepare) of the detector stage: the annotated photos, their seeded group-wise held-out
split or k folds, and the YOLO dataset directory built from them (see :mod:`mgfa_ray.detector.training`).
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd

from mgfa_ray.config import ConfigError, DetectorConfig
from mgfa_ray.data.regions import Box, parse_label_file
from mgfa_ray.errors import InputError
from mgfa_ray.storage import atomic_write_yaml, safe_stem


def _safe_name(image_id: str) -> str:
    """Flat, unique file stem for an image_id that may contain ``/`` or other characters."""
    return f"{safe_stem(image_id)[:80]}-{hashlib.sha1(image_id.encode()).hexdigest()[:8]}"


def holdout_split(ids: list[str], groups: dict[str, str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded group-wise split of ``ids`` into (train, holdout), both sorted and non-empty."""
    by_group: dict[str, list[str]] = {}
    for i in sorted(ids):
        by_group.setdefault(groups[i], []).append(i)
    if len(by_group) < 2:
        raise InputError(
            f"{len(ids)} annotated image(s) in {len(by_group)} photo group(s): need at least 2 groups "
            f"to hold out at least one image and train on at least one"
        )
    order = sorted(by_group)
    random.Random(seed).shuffle(order)
    target = max(1, round(fraction * len(ids)))
    holdout: list[str] = []
    for g in order[:-1]:  # the last group always trains
        if len(holdout) >= target:
            break
        holdout.extend(by_group[g])
    train = sorted(set(ids) - set(holdout))
    return train, sorted(holdout)


def _write_labels(path: Path, boxes: list[Box]) -> None:
    path.write_text("".join(f"{b.cls} {b.cx:.6f} {b.cy:.6f} {b.w:.6f} {b.h:.6f}\n" for b in boxes))


def build_dataset(root: Path, *, splits: dict[str, list[str]], image_of: dict[str, Path],
                   boxes_of: dict[str, list[Box]], region_classes: list[str]) -> Path:
    """Write a fresh YOLO dataset under ``root`` and return its ``data.yaml``."""
    if root.exists():
        shutil.rmtree(root)
    for split, ids in splits.items():
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in ids:
            src = image_of[i]
            name = _safe_name(i)
            os.symlink(src, root / "images" / split / f"{name}{src.suffix.lower()}")
            _write_labels(root / "labels" / split / f"{name}.txt", boxes_of[i])
    data = {
        "path": str(root),
        "train": "images/train",
        "val": "images/val",
        "nc": len(region_classes),
        "names": {i: n for i, n in enumerate(region_classes)},
    }
    return atomic_write_yaml(root / "data.yaml", data)


@dataclass(frozen=True)
class Annotated:
    """The annotated photos a detector trains and is evaluated on (output of :func:`prepare_annotated`).

    Attributes:
        ids: Sorted image_ids of manifest images with a label file.
        label_files: image_id → label file (only ``ids``).
        boxes_of: image_id → cleaned region boxes.
        groups: image_id → photo group (the manifest's ``group``; the image_id when absent).
        image_of: image_id → absolute image path (exists).
        region_classes: Region class names; index = class id.
    """

    ids: list[str]
    label_files: dict[str, Path]
    boxes_of: dict[str, list[Box]]
    groups: dict[str, str]
    image_of: dict[str, Path]
    region_classes: list[str]

    def count(self, ids: list[str]) -> dict[int, int]:
        """Region instances per class id in ``ids``."""
        out: dict[int, int] = {}
        for i in ids:
            for b in self.boxes_of[i]:
                out[b.cls] = out.get(b.cls, 0) + 1
        return out


def prepare_annotated(*, manifest: pd.DataFrame, label_files: dict[str, Path], region_classes: list[str],
                      cfg: DetectorConfig, unknown_class: Literal["error", "skip"] = "error") -> Annotated:
    """Step 1 (prepare): select the annotated manifest images and parse their label files.

    Raises:
        ValueError: ``region_classes`` is empty; no manifest image has a label file; an annotated
            image's file is missing; ``cfg.model`` names a ``.pt`` file that does not exist.
        LabelError: A label file has a bad line (message names ``file:line``).
    """
    if not region_classes:
        raise InputError("region_classes is empty; name at least one region class (e.g. ['vein', 'contour'])")
    ids = sorted(set(manifest["image_id"].astype(str)) & set(label_files))
    if not ids:
        raise InputError(
            f"no manifest image has a label file ({len(manifest)} manifest images, "
            f"{len(label_files)} label files); check that label ids match manifest image_ids "
            f"(e.g. manifest {manifest['image_id'].iloc[0] if len(manifest) else None!r}, "
            f"labels {next(iter(sorted(label_files)), None)!r})"
        )
    if str(cfg.model).endswith(".pt") and not Path(cfg.model).expanduser().is_file():
        raise InputError(
            f"detector model {cfg.model!r} is not a local file; offline, Ultralytics would try to "
            f"download it. Use a model YAML (e.g. 'yolo11n.yaml') or a path to an existing .pt file"
        )
    used = {i: Path(label_files[i]) for i in ids}
    boxes_of = {
        i: parse_label_file(p, classes=list(region_classes), unknown_class=unknown_class) for i, p in used.items()
    }
    rows = manifest.assign(image_id=manifest["image_id"].astype(str)).set_index("image_id")
    groups = {i: str(rows.at[i, "group"]) if "group" in rows.columns else i for i in ids}
    image_of = {i: Path(rows.at[i, "path"]).resolve() for i in ids}
    missing = [str(p) for p in image_of.values() if not p.is_file()]
    if missing:
        raise InputError(f"{len(missing)} annotated image file(s) do not exist, e.g. {missing[:3]}")
    return Annotated(ids, used, boxes_of, groups, image_of, list(region_classes))


def grouped_folds(ids: list[str], groups: dict[str, str], k: int, seed: int) -> list[list[str]]:
    """Seeded grouped k-fold partition of ``ids``: each photo group falls in exactly one fold.

    Groups are shuffled (``random.Random(seed)`` over the sorted group names) and each goes, in
    that order, to the fold holding the fewest images so far (lowest index on ties), so fold sizes
    differ by at most the largest group's size.

    Args:
        ids: image_ids to partition.
        groups: image_id → group name.
        k: Number of folds, 2 ≤ k ≤ number of groups.
        seed: Shuffle seed.

    Returns:
        ``k`` non-empty, disjoint, sorted lists of image_ids whose union is ``ids``.

    Raises:
        ConfigError: ``k`` < 2 or more than the number of groups (a ``ValueError`` too).
    """
    by_group: dict[str, list[str]] = {}
    for i in sorted(ids):
        by_group.setdefault(groups[i], []).append(i)
    if not 2 <= k <= len(by_group):
        raise ConfigError(
            f"detector.cv_folds = {k}: cross-validation needs 2 ≤ k ≤ the number of annotated photo "
            f"groups ({len(by_group)} groups in {len(ids)} annotated images); lower cv_folds or annotate more photos"
        )
    order = sorted(by_group)
    random.Random(seed).shuffle(order)
    folds: list[list[str]] = [[] for _ in range(k)]
    for g in order:
        min(folds, key=len).extend(by_group[g])  # min returns the first of equal lengths
    return [sorted(f) for f in folds]
