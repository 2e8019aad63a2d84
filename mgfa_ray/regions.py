"""Stage 2 — region labels: read and validate YOLO txt box files.

A YOLO label file holds one box per line, ``class cx cy w h``: an integer class id and the box
centre, width and height normalised to [0, 1] by the image width and height. Every defect is a
:class:`LabelError` naming ``file:line``; lines whose class id is outside the configured region
classes either raise or are skipped with a warning, by policy (the paper's Cotton labels contain
three lines of class 16).
"""

from __future__ import annotations

import random
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd


class LabelError(ValueError):
    """A label file or line is invalid; the message starts with ``file:line``."""


@dataclass(frozen=True)
class Box:
    """One region box in normalised image coordinates.

    Attributes:
        cls: Region class index in [0, num_classes).
        cx, cy: Box centre, fractions of image width / height in [0, 1].
        w, h: Box width / height, fractions of image width / height in (0, 1].
        conf: Detector confidence in [0, 1]; 1.0 for hand-drawn boxes.
    """

    cls: int
    cx: float
    cy: float
    w: float
    h: float
    conf: float = 1.0


_SPLIT_SUFFIX = re.compile(r"_(train|test)$")


def parse_yolo_file(
    path: str | Path,
    *,
    num_classes: int,
    unknown_class: Literal["error", "skip"] = "error",
) -> list[Box]:
    """Parse and validate one YOLO txt label file.

    Args:
        path: The ``.txt`` file. An empty file means an image with no regions.
        num_classes: Number of region classes; valid ids are 0..num_classes-1.
        unknown_class: ``error`` raises on an id outside that range; ``skip`` drops the line and
            warns with file:line.

    Returns:
        The boxes in file order.

    Raises:
        LabelError: Wrong field count, a non-numeric field, a non-integer or negative class id, a
            coordinate outside [0, 1], a zero-size box, or (policy ``error``) an unknown class;
            the message names ``path:line``.
    """
    path = Path(path)
    boxes = []
    for lineno, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        where = f"{path}:{lineno}"
        parts = line.split()
        if len(parts) != 5:
            raise LabelError(f"{where}: expected 5 fields 'class cx cy w h', got {len(parts)}: {line!r}")
        try:
            cls = int(parts[0])
        except ValueError:
            raise LabelError(f"{where}: class id must be an integer, got {parts[0]!r}") from None
        try:
            cx, cy, w, h = (float(v) for v in parts[1:])
        except ValueError:
            raise LabelError(f"{where}: coordinates must be numbers, got {parts[1:]}") from None
        if cls < 0 or cls >= num_classes:
            msg = f"{where}: unknown region class {cls}; allowed 0..{num_classes - 1}"
            if unknown_class == "skip":
                warnings.warn(msg + " (line skipped)", stacklevel=2)
                continue
            raise LabelError(msg)
        for name, v in (("cx", cx), ("cy", cy), ("w", w), ("h", h)):
            if not 0.0 <= v <= 1.0:
                raise LabelError(f"{where}: {name}={v} outside [0, 1] (coordinates are normalised)")
        if w == 0.0 or h == 0.0:
            raise LabelError(f"{where}: zero-size box (w={w}, h={h})")
        boxes.append(Box(cls, cx, cy, w, h))
    return boxes


def index_labels(label_dir: str | Path) -> dict[str, Path]:
    """Map image_id → label file for every ``*.txt`` under ``label_dir``.

    The image_id is the file's path relative to ``label_dir`` without ``.txt``
    (``acer_campestre/ny1079-01-1``); a trailing ``_train``/``_test`` (the UFG release's naming,
    ``47_6_test.txt``) is dropped so ids match the manifest's ``47_6``.

    Raises:
        LabelError: The directory does not exist or holds no label files.
    """
    label_dir = Path(label_dir)
    if not label_dir.is_dir():
        raise LabelError(f"{label_dir}: label directory does not exist")
    out = {}
    for f in sorted(label_dir.rglob("*.txt")):
        rel = f.relative_to(label_dir).with_suffix("").as_posix()
        out[_SPLIT_SUFFIX.sub("", rel)] = f
    if not out:
        raise LabelError(f"{label_dir}: no .txt label files")
    return out


def select_annotated(
    label_files: dict[str, Path], manifest: pd.DataFrame, *, max_images: int | None, seed: int
) -> dict[str, Path]:
    """The label files the detector trains on: those of manifest images, optionally capped.

    With ``max_images`` (paper: 30 annotated Cotton80 images, 70 SoyLocal), a seeded draw of at
    most that many from the manifest's train split, so no test image is annotated; without it,
    every label file whose image is in the manifest.

    Args:
        label_files: image_id → label file, from :func:`index_labels`.
        manifest: The manifest (columns image_id, split).
        max_images: Cap on annotated images, or ``None``.
        seed: Seed of the draw.

    Returns:
        image_id → label file, sorted by image_id.

    Raises:
        LabelError: ``max_images`` is set and no train-split image has a label file.
    """
    ids = set(manifest["image_id"])
    in_manifest = {k: v for k, v in sorted(label_files.items()) if k in ids}
    if max_images is None:
        return in_manifest
    train = set(manifest.loc[manifest["split"] == "train", "image_id"])
    pool = [k for k in in_manifest if k in train]
    if not pool:
        raise LabelError("regions.max_images is set but no train-split image of the manifest has a label file")
    rng = random.Random(seed)
    chosen = sorted(rng.sample(pool, min(max_images, len(pool))))
    return {k: in_manifest[k] for k in chosen}
