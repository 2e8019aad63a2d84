"""Stage 4 — ground-truth region masks precomputed by Ray Data into Parquet shards.

Pipeline: manifest rows → ``map_batches`` over an actor pool of :class:`MaskPredictor` (each actor
loads the detector once; one GPU per actor when ``gpus_per_actor`` > 0, CPU otherwise) → decode →
detector boxes → per-region masks → ``write_parquet`` into a temporary directory → validation →
``metadata.json`` → one rename publishes the mask set. A crash leaves only a hidden ``.tmp-*``
directory; a rerun finds the published set by its id and skips the work.

A mask set lives in ``<out_root>/<set_id>/`` where ``set_id`` hashes everything the masks depend
on (detector key, manifest hash, resolution, confidence threshold, input size, region classes,
schema version): another detector or manifest gives another set, never a mix.

Shard schema (``*.parquet``, one row per manifest image; readable by plain pyarrow):

==============  ====================  ==========================================================
column          Arrow type            meaning
==============  ====================  ==========================================================
image_id        string                manifest image_id
label           int64                 class index
split           string                ``train`` | ``val`` | ``test``
boxes           list<list<double>>    detected boxes ``[region_class, cx, cy, w, h, conf]``,
                                      normalised to [0, 1] by image width/height
masks           binary                uint8 array (K, R, R) in C order, values {0, 1}: channel k
                                      is the union of region class k's boxes; K and R are in
                                      ``metadata.json`` (``region_classes``, ``mask_resolution``)
detector        string                detector key of the model that produced the boxes
==============  ====================  ==========================================================

A region kind with no box above the confidence threshold yields an all-zero channel; the trial's
ground-truth map for it is then all zero (see :func:`mgfa_ray.model.gt_attention`).

``metadata.json``: schema_version, set_id, detector_key, detector_weights_sha256, manifest_hash,
mask_resolution, region_classes, conf, imgsz, rows, rows_per_shard {file: rows}, summary
(per region class: fraction of images with a box, mean mask coverage; mean boxes per image).
"""

from __future__ import annotations

import json
import math
import uuid
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from .config import DetectorConfig, MasksConfig
from .io import atomic_write_json, publish_dir, sha256_file, sha256_json
from .regions import Box

SCHEMA_VERSION = 1
METADATA = "metadata.json"


def rasterize(boxes: list[Box], *, num_classes: int, resolution: int) -> np.ndarray:
    """Union of each region class's boxes as a binary mask.

    A pixel is set when it overlaps the box at all, so a thin vein box keeps at least one pixel
    of width. Box edges outside the image are clipped.

    Args:
        boxes: Boxes in normalised coordinates (see :class:`mgfa_ray.regions.Box`).
        num_classes: K, the number of region classes (channels).
        resolution: R, the mask side in pixels.

    Returns:
        uint8 array (K, R, R) with values {0, 1}; row index is y (top to bottom).

    Raises:
        ValueError: A box's class is outside [0, K).
    """
    out = np.zeros((num_classes, resolution, resolution), dtype=np.uint8)
    for b in boxes:
        if not 0 <= b.cls < num_classes:
            raise ValueError(f"box class {b.cls} outside [0, {num_classes})")
        x0 = max(0, math.floor((b.cx - b.w / 2) * resolution))
        x1 = min(resolution, max(x0 + 1, math.ceil((b.cx + b.w / 2) * resolution)))
        y0 = max(0, math.floor((b.cy - b.h / 2) * resolution))
        y1 = min(resolution, max(y0 + 1, math.ceil((b.cy + b.h / 2) * resolution)))
        out[b.cls, y0:y1, x0:x1] = 1
    return out


def decode_rgb(path: str, *, max_side: int | None = None) -> np.ndarray:
    """Decode an image file to an (H, W, 3) uint8 RGB array.

    Args:
        path: Image file.
        max_side: If given, let the JPEG decoder shrink by a power of two while both sides stay
            >= ``max_side`` (``PIL.Image.draft``); normalised boxes are unaffected.

    Raises:
        ValueError: The file is missing or cannot be decoded (the message names it).
    """
    try:
        with Image.open(path) as img:
            if max_side is not None:
                img.draft("RGB", (max_side, max_side))
            return np.asarray(img.convert("RGB"))
    except (OSError, SyntaxError) as err:
        raise ValueError(f"cannot decode image {path}: {err}") from None


class MaskPredictor:
    """Batch function for Ray Data's actor pool (or a plain call): manifest rows → mask rows.

    Args:
        weights: Detector weights file (``weights.pt`` of the detector stage).
        detector_key: Id of that detector, written to every row.
        imgsz: Detector input size in pixels.
        conf: Confidence threshold in [0, 1] for boxes that enter the masks.
        num_classes: K region classes.
        resolution: R, mask side in pixels.
        device: ``cpu`` or ``cuda``.
    """

    def __init__(self, *, weights: str, detector_key: str, imgsz: int, conf: float,
                 num_classes: int, resolution: int, device: str = "cpu"):
        from .detector import load_detector

        self.model = load_detector(Path(weights), device=device)
        self.detector_key = detector_key
        self.imgsz, self.conf = imgsz, conf
        self.num_classes, self.resolution = num_classes, resolution

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        """Rows with image_id, path, label, split → rows of the shard schema (module docstring)."""
        from .detector import predict_boxes

        images = [decode_rgb(p, max_side=2 * self.imgsz) for p in batch["path"]]
        detections = predict_boxes(self.model, images, imgsz=self.imgsz, conf=self.conf)
        return mask_rows(batch, detections, detector_key=self.detector_key,
                         num_classes=self.num_classes, resolution=self.resolution)


def mask_rows(batch: pd.DataFrame, boxes: list[list[Box]], *, detector_key: str, num_classes: int,
              resolution: int) -> pd.DataFrame:
    """Shard rows (schema in the module docstring) for manifest rows and their boxes.

    Args:
        batch: Manifest rows (image_id, label, split).
        boxes: Per row, its region boxes.
        detector_key: Id of the box source, stored in the ``detector`` column.
        num_classes: K region classes.
        resolution: R, mask side in pixels.
    """
    return pd.DataFrame({
        "image_id": batch["image_id"].astype(str).to_numpy(),
        "label": batch["label"].astype("int64").to_numpy(),
        "split": batch["split"].astype(str).to_numpy(),
        "boxes": [[[float(b.cls), b.cx, b.cy, b.w, b.h, b.conf] for b in bs] for bs in boxes],
        "masks": [rasterize(bs, num_classes=num_classes, resolution=resolution).tobytes() for bs in boxes],
        "detector": [detector_key] * len(batch),
    })


def mask_set_id(*, detector_key: str, manifest_hash: str, region_classes: list[str],
                detector: DetectorConfig, masks: MasksConfig) -> str:
    """16-hex-digit id of a mask set from everything its content depends on."""
    return sha256_json({
        "schema": SCHEMA_VERSION, "detector": detector_key, "manifest": manifest_hash,
        "regions": region_classes, "resolution": masks.resolution, "conf": detector.conf,
        "imgsz": detector.imgsz,
    })[:16]


def _shards(set_dir: Path) -> list[Path]:
    return sorted(set_dir.glob("*.parquet"))


def _summary(table: pd.DataFrame, region_classes: list[str], resolution: int) -> dict:
    k = len(region_classes)
    masks = np.stack([np.frombuffer(b, np.uint8) for b in table["masks"]]).reshape(-1, k, resolution, resolution)
    coverage = masks.reshape(len(masks), k, -1).mean(-1)
    return {
        "mean_boxes_per_image": float(np.mean([len(b) for b in table["boxes"]])),
        "per_class": {
            name: {
                "images_with_region": float((coverage[:, i] > 0).mean()),
                "mean_coverage": float(coverage[:, i].mean()),
            }
            for i, name in enumerate(region_classes)
        },
    }


def build_mask_set(
    *,
    manifest: pd.DataFrame,
    manifest_hash: str,
    weights: Path,
    detector_key: str,
    region_classes: list[str],
    detector: DetectorConfig,
    cfg: MasksConfig,
    out_root: Path,
) -> Path:
    """Run the detector over every manifest image with Ray Data and publish a mask set.

    Requires a running Ray (``ray.init``). Skips all work when the set already exists.

    Args:
        manifest: Manifest table (columns of :mod:`mgfa_ray.manifest`).
        manifest_hash: :func:`mgfa_ray.manifest.manifest_hash` of it.
        weights: Detector weights file.
        detector_key: Detector id (:func:`mgfa_ray.detector.detector_key`).
        region_classes: Region class names, in mask-channel order.
        detector: Detector settings (input size, confidence threshold).
        cfg: Mask settings (resolution, batch size, actors, shard size).
        out_root: Directory holding mask sets.

    Returns:
        The published mask set directory ``out_root/<set_id>``.

    Raises:
        RuntimeError: The written shards do not hold exactly one row per manifest image.
    """
    import ray.data
    from ray.data import ActorPoolStrategy

    set_id = mask_set_id(detector_key=detector_key, manifest_hash=manifest_hash,
                         region_classes=region_classes, detector=detector, masks=cfg)
    final = Path(out_root) / set_id
    if (final / METADATA).is_file():
        return final
    tmp = Path(out_root) / f".{set_id}.tmp-{uuid.uuid4().hex[:8]}"
    rows = manifest[["image_id", "path", "label", "split"]].reset_index(drop=True)
    # One block per batch so the actor pool can spread the work.
    chunks = [rows.iloc[i : i + cfg.batch_size] for i in range(0, len(rows), cfg.batch_size)]
    ds = ray.data.from_pandas(chunks).map_batches(
        MaskPredictor,
        fn_constructor_kwargs=dict(
            weights=str(weights), detector_key=detector_key, imgsz=detector.imgsz, conf=detector.conf,
            num_classes=len(region_classes), resolution=cfg.resolution,
            device="cuda" if cfg.gpus_per_actor > 0 else "cpu",
        ),
        batch_size=cfg.batch_size,
        batch_format="pandas",
        compute=ActorPoolStrategy(size=cfg.num_actors),
        num_cpus=1,
        num_gpus=cfg.gpus_per_actor or None,
    )
    ds.write_parquet(str(tmp), min_rows_per_file=cfg.rows_per_shard, max_rows_per_file=cfg.rows_per_shard)
    return _publish(tmp, final, expected_ids=rows["image_id"], metadata={
        "set_id": set_id,
        "detector_key": detector_key,
        "detector_weights_sha256": sha256_file(weights),
        "manifest_hash": manifest_hash,
        "mask_resolution": cfg.resolution,
        "region_classes": list(region_classes),
        "conf": detector.conf,
        "imgsz": detector.imgsz,
    })


def write_mask_set(rows: pd.DataFrame, *, out_root: Path, metadata: dict, rows_per_shard: int = 256) -> Path:
    """Publish shard rows computed without Ray (e.g. from label files used as the box source).

    Args:
        rows: Rows of the shard schema (:func:`mask_rows`).
        out_root: Directory holding mask sets.
        metadata: At least ``set_id``, ``detector_key``, ``mask_resolution``, ``region_classes``.
        rows_per_shard: Maximum rows per Parquet file.

    Returns:
        The published directory ``out_root/<set_id>`` (existing sets are left as they are).
    """
    final = Path(out_root) / metadata["set_id"]
    if (final / METADATA).is_file():
        return final
    tmp = Path(out_root) / f".{metadata['set_id']}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    for n, start in enumerate(range(0, len(rows), rows_per_shard)):
        table = pa.Table.from_pandas(rows.iloc[start : start + rows_per_shard], preserve_index=False)
        pq.write_table(table, tmp / f"shard-{n:05d}.parquet")
    return _publish(tmp, final, expected_ids=rows["image_id"], metadata=metadata)


def _publish(tmp: Path, final: Path, *, expected_ids: pd.Series, metadata: dict) -> Path:
    """Check the shards in ``tmp`` hold one row per expected image, add metadata, rename."""
    shards = _shards(tmp)
    table = pd.concat([pq.read_table(s).to_pandas() for s in shards], ignore_index=True)
    ids = table["image_id"]
    if len(table) != len(expected_ids) or ids.duplicated().any() or set(ids) != set(expected_ids):
        raise RuntimeError(
            f"mask set {tmp}: wrote {len(table)} rows ({ids.duplicated().sum()} duplicated) "
            f"for {len(expected_ids)} manifest images"
        )
    atomic_write_json(tmp / METADATA, {
        "schema_version": SCHEMA_VERSION,
        **metadata,
        "rows": len(table),
        "rows_per_shard": {s.name: pq.ParquetFile(s).metadata.num_rows for s in shards},
        "summary": _summary(table, list(metadata["region_classes"]), int(metadata["mask_resolution"])),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    return publish_dir(tmp, final)


def read_metadata(set_dir: str | Path) -> dict:
    """The ``metadata.json`` of a published mask set.

    Raises:
        ValueError: The directory is not a complete mask set.
    """
    path = Path(set_dir) / METADATA
    if not path.is_file():
        raise ValueError(f"{set_dir} is not a complete mask set (no {METADATA}); run the job's mask stage")
    return json.loads(path.read_text())


def read_masks(set_dir: str | Path, *, image_ids: list[str], region_classes: list[str]) -> tuple[np.ndarray, dict]:
    """Load the masks of ``image_ids`` from a mask set, checking they fit the trial.

    Args:
        set_dir: Mask set directory.
        image_ids: Images needed, in the order wanted.
        region_classes: Region kinds the model expects, in channel order.

    Returns:
        ``(masks, metadata)``: uint8 array (N, K, R, R) with values {0, 1} aligned with
        ``image_ids``, and the set's metadata.

    Raises:
        ValueError: Not a complete set; region classes differ; an image has no row or several;
            a mask has the wrong byte size; rows of another detector.
    """
    meta = read_metadata(set_dir)
    if list(meta["region_classes"]) != list(region_classes):
        raise ValueError(
            f"mask set {set_dir}: region classes {meta['region_classes']} do not match the "
            f"model's {list(region_classes)}"
        )
    k, r = len(region_classes), int(meta["mask_resolution"])
    table = pd.concat(
        [pq.read_table(s, columns=["image_id", "masks", "detector"]).to_pandas() for s in _shards(Path(set_dir))],
        ignore_index=True,
    )
    counts = table["image_id"].value_counts()
    missing = [i for i in image_ids if i not in counts.index]
    if missing:
        raise ValueError(f"mask set {set_dir}: no mask row for {len(missing)} image(s), e.g. {missing[:3]}")
    dup = counts[counts > 1]
    if len(dup):
        raise ValueError(f"mask set {set_dir}: several rows for image(s) {list(dup.index[:3])}")
    foreign = table["detector"] != meta["detector_key"]
    if foreign.any():
        raise ValueError(
            f"mask set {set_dir}: rows from detector {table['detector'][foreign].iloc[0]!r}, "
            f"expected {meta['detector_key']!r}"
        )
    by_id = dict(zip(table["image_id"], table["masks"]))
    out = np.empty((len(image_ids), k, r, r), dtype=np.uint8)
    for n, image_id in enumerate(image_ids):
        buf = by_id[image_id]
        if len(buf) != k * r * r:
            raise ValueError(
                f"mask set {set_dir}: mask of {image_id!r} has {len(buf)} bytes, expected {k}x{r}x{r}"
            )
        out[n] = np.frombuffer(buf, np.uint8).reshape(k, r, r)
    return out, meta
