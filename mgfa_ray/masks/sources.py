"""Stage 4, first half: where region boxes come from, and boxes rasterised into masks.

A box source is the trained region detector (:class:`DetectorBoxes`, paper Sec. III-A) or existing
label files (:class:`LabelBoxes`). :class:`MaskComputer` is the pure core of the mask stage —
manifest rows → shard rows (:func:`mask_rows`, schema in :mod:`mgfa_ray.masks.format`), no Ray
involved; :mod:`mgfa_ray.masks.writer` runs it per shard, in this process or on a Ray Data actor
pool.

No detection. A region class with no box above the confidence threshold (or an empty label file)
yields an all-zero channel and no boxes of that class (:func:`rasterize`). The trial's ground-truth
map for it is then all zero (:func:`mgfa_ray.train.model.gt_attention`): Eq. 7 pulls the attention map
towards zero, which for the softmax variant is a uniform map — no region, no preferred location.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from mgfa_ray.data.images import decode_rgb, image_problem
from mgfa_ray.data.regions import Box, parse_label_file, rasterize
from mgfa_ray.errors import InputError
from mgfa_ray.storage import sha256_file, sha256_json


@dataclass(frozen=True)
class DetectorBoxes:
    """Box source: the trained region detector (paper Sec. III-A).

    Attributes:
        weights: Detector weights file (``weights.pt`` of :mod:`mgfa_ray.detector.training`).
        detector_key: Id of that detector (:func:`mgfa_ray.detector.key.detector_key`).
        imgsz: Inference input size in pixels (the training size).
        conf: Confidence threshold in [0, 1] for boxes that enter the masks.
        batch_size: Images per detector call.
        device: ``cpu`` or ``cuda``.
        decode_threads: Threads decoding the next batch while the detector runs.
    """

    weights: str
    detector_key: str
    imgsz: int
    conf: float
    batch_size: int = 16
    device: str = "cpu"
    decode_threads: int = 1

    kind = "detector"

    @property
    def box_source(self) -> str:
        """Id of this box source: the detector key. Stored in every row's ``detector`` column and in
        the set's ``metadata.json`` as ``detector_key`` (on-disk names kept from before label files
        could be a box source)."""
        return self.detector_key

    def identity(self) -> dict:
        """What the boxes depend on (enters the set id): the detector key, the digest of the network's
        tensors (:func:`mgfa_ray.detector.inference.weights_digest`; not the file's bytes, which change with
        Ultralytics' save date), input size and confidence threshold."""
        from mgfa_ray.detector.inference import weights_digest

        return {"detector": self.detector_key, "weights_digest": weights_digest(self.weights), "imgsz": self.imgsz,
                "conf": self.conf}


@dataclass(frozen=True)
class LabelBoxes:
    """Box source: existing label files used as they are (YOLO txt or Pascal VOC xml).

    Attributes:
        label_files: ``(image_id, file)`` pairs, sorted (build with :meth:`create`).
        classes: Region class names; index = class id.
        unknown_class: Policy for boxes of other classes (:func:`mgfa_ray.data.regions.parse_label_file`).
        unlabelled: An image without a label file is an ``error`` or gets ``empty`` masks.
    """

    label_files: tuple[tuple[str, str], ...]
    classes: tuple[str, ...]
    unknown_class: Literal["error", "skip"] = "error"
    unlabelled: Literal["error", "empty"] = "error"

    kind = "labels"

    @classmethod
    def create(cls, label_files: Mapping[str, str | Path], *, classes: list[str],
               unknown_class: Literal["error", "skip"] = "error",
               unlabelled: Literal["error", "empty"] = "error") -> LabelBoxes:
        """From an ``image_id → file`` mapping such as :func:`mgfa_ray.data.regions.index_labels`."""
        return cls(tuple(sorted((str(k), str(v)) for k, v in label_files.items())), tuple(classes),
                   unknown_class, unlabelled)

    @property
    def box_source(self) -> str:
        """Id of this box source: ``labels-<16 hex digits>`` of the label files' content (stored as
        :attr:`DetectorBoxes.box_source` is)."""
        return "labels-" + sha256_json(self.identity())[:16]

    def identity(self) -> dict:
        """What the boxes depend on (enters the set id): class names, policies, each file's SHA-256."""
        return {"classes": list(self.classes), "unknown_class": self.unknown_class, "unlabelled": self.unlabelled,
                "files": [(i, sha256_file(p)) for i, p in self.label_files]}

    def boxes(self, image_ids: list[str], *, warn: bool = True) -> list[list[Box]]:
        """The boxes of each image.

        Raises:
            ValueError: ``unlabelled="error"`` and an image has no label file (names them).
            LabelError: A bad label line (``file:line``).
        """
        files = dict(self.label_files)
        missing = [i for i in image_ids if i not in files]
        if missing and self.unlabelled == "error":
            raise InputError(
                f"{len(missing)} manifest image(s) have no label file, e.g. {missing[:3]}; with regions.source: "
                f"labels every image needs one (or set regions.unlabelled: empty)"
            )
        with warnings.catch_warnings():
            if not warn:
                warnings.simplefilter("ignore")
            return [parse_label_file(files[i], classes=list(self.classes), unknown_class=self.unknown_class)
                    if i in files else [] for i in image_ids]


BoxSource = DetectorBoxes | LabelBoxes


def mask_rows(rows: pd.DataFrame, boxes: list[list[Box]], *, box_source: str, num_classes: int, resolution: int,
              errors: list[str | None] | None = None) -> pd.DataFrame:
    """Shard rows (schema in the module docstring) for manifest rows and their boxes.

    Args:
        rows: Manifest rows (image_id, label, split).
        boxes: Per row, its region boxes.
        box_source: Id of the box source (``BoxSource.box_source``), stored in the ``detector`` column.
        num_classes: K region classes.
        resolution: R, mask side in pixels.
        errors: Per row, ``None`` or why the image could not be decoded.

    Returns:
        One row per input row with the shard columns; ``masks`` holds K*R*R uint8 bytes.

    Raises:
        ValueError: A box's class is outside [0, K) (:func:`rasterize`).
    """
    return pd.DataFrame({
        "image_id": rows["image_id"].astype(str).to_numpy(),
        "label": rows["label"].astype("int64").to_numpy(),
        "split": rows["split"].astype(str).to_numpy(),
        "boxes": [[[float(b.cls), b.cx, b.cy, b.w, b.h, b.conf] for b in bs] for bs in boxes],
        "masks": [rasterize(bs, num_classes=num_classes, resolution=resolution).tobytes() for bs in boxes],
        "detector": [box_source] * len(rows),
        "error": errors if errors is not None else [None] * len(rows),
    })


class MaskComputer:
    """The pure core of the stage: manifest rows → shard rows, no Ray involved.

    Args:
        source: Where boxes come from (:class:`DetectorBoxes` or :class:`LabelBoxes`).
        num_classes: K region classes.
        resolution: R, mask side in pixels.
        corrupt_images: ``error`` or ``record`` (see :class:`mgfa_ray.config.MasksConfig`).
    """

    def __init__(self, source: BoxSource, *, num_classes: int, resolution: int,
                 corrupt_images: Literal["error", "record"] = "error"):
        self.source = source
        self.box_source = source.box_source  # once: for label files it hashes every file
        self.num_classes, self.resolution, self.corrupt_images = num_classes, resolution, corrupt_images
        self._model = None

    def _detect(self, paths: list[str]) -> tuple[list[list[Box]], list[str | None]]:
        from mgfa_ray.detector.inference import load_detector, predict_boxes

        src = self.source
        assert isinstance(src, DetectorBoxes)
        if self._model is None:
            self._model = load_detector(Path(src.weights), device=src.device)

        def decode(path: str) -> np.ndarray | str:
            try:
                return decode_rgb(path, max_side=2 * src.imgsz)
            except ValueError as err:
                return str(err)

        starts = range(0, len(paths), src.batch_size)
        boxes: list[list[Box]] = []
        errors: list[str | None] = []
        with ThreadPoolExecutor(max_workers=src.decode_threads) as pool:
            pending = [pool.submit(decode, p) for p in paths[: src.batch_size]]
            for start in starts:
                decoded = [f.result() for f in pending]
                nxt = paths[start + src.batch_size : start + 2 * src.batch_size]
                pending = [pool.submit(decode, p) for p in nxt]  # decode ahead while the detector runs
                good = [im for im in decoded if not isinstance(im, str)]
                found = iter(predict_boxes(self._model, good, imgsz=src.imgsz, conf=src.conf))
                for im in decoded:
                    boxes.append([] if isinstance(im, str) else next(found))
                    errors.append(im if isinstance(im, str) else None)
        return boxes, errors

    def __call__(self, rows: pd.DataFrame) -> tuple[pd.DataFrame | None, list[str]]:
        """Compute the shard rows of ``rows``.

        Args:
            rows: Manifest rows (image_id, path, label, split).

        Returns:
            ``(table, corrupt)``: the rows of the shard schema, and one message per image that
            could not be decoded. With ``corrupt_images="error"`` and any such image, ``table`` is
            ``None`` (the shard must not be written).
        """
        ids = rows["image_id"].astype(str).tolist()
        if isinstance(self.source, LabelBoxes):  # no pixels needed: the photo's first bytes and header are checked
            errors = [None if (why := image_problem(p)) is None else f"cannot decode image {p}: {why}"
                      for p in rows["path"].astype(str)]
            boxes = [[] if e else b for b, e in zip(self.source.boxes(ids, warn=False), errors)]
        else:
            boxes, errors = self._detect(rows["path"].astype(str).tolist())
        corrupt = [e for e in errors if e is not None]
        if corrupt and self.corrupt_images == "error":
            return None, corrupt
        return mask_rows(rows, boxes, box_source=self.box_source, num_classes=self.num_classes,
                         resolution=self.resolution, errors=errors), corrupt
