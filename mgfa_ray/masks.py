"""Stage 4 — ground-truth region masks precomputed by Ray Data into Parquet shards.

The manifest, sorted by image_id, is cut into shards of ``rows_per_shard`` images. Each pending
shard is one item of a Ray Data dataset mapped (``map_batches``, ``batch_size=1``) over an actor
pool of :class:`ShardWriter` — one GPU per actor when ``gpus_per_actor`` > 0, CPU otherwise; each
actor loads the detector once. For its shard an actor decodes the images (threads, one batch
ahead), runs the detector ``batch_size`` images per call, rasterises the boxes
(:func:`rasterize`) and writes the shard itself, atomically and once (:func:`create_once`: a
complete temporary file hard-linked to its name; an object-store upload only appears once
complete). The pure core, :class:`MaskComputer`, runs without Ray; ``executor="local"`` runs the
same writer in-process.

Why not ``Dataset.write_parquet``: its files get per-run names and are written in place, so after a
kill a rerun can neither tell finished files from partial ones nor know which images they cover.
Here shard *i* always holds the same images, and a finished shard is never rewritten.

Restart. ``<location>/<set_id>/plan.json`` fixes the sharding when a set is started. A rerun
keeps every shard whose image_ids are exactly those planned for it and computes only the others.
``metadata.json`` is written last, after a check that the shards hold exactly one row per manifest
image; a set without it is incomplete and :func:`read_masks` refuses it. Hidden temporaries
(``.shard-…``, ``.plan.json.…``, ``.metadata.json.…``) that a killed writer leaves are deleted once
the file they were meant for exists, and all of them once the set is published.

Failures. A killed actor (its process, or the node under it) is restarted by Ray and the shards it
held are computed again in the same call: the pool's actors are created with
``max_restarts=ACTOR_RESTARTS`` and ``max_task_retries=-1``. Retries must be unbounded: while a
lost node is not yet declared dead, every attempt to reach its actor fails at once and counts as a
retry (measured: a bound of 3 was spent within seconds of a node loss, before the actor was
restarted on a new node). Restarts are bounded instead (Ray Data's default is unbounded), so a
shard that kills every actor taking it — a decoder crash, an out-of-memory kill — ends the call
with a ``RuntimeError`` after ``ACTOR_RESTARTS`` restarts of its actor rather than looping forever.
A restarted actor waits for a node with the resources it needs. A killed driver leaves finished
shards. After any failure a rerun resumes.

Concurrent writers. Two writers of one set (two jobs sharing a mask location) may run at the same
time: each file is created once and never replaced (local and NFS: a complete temporary
hard-linked to its name, ``link`` failing when the name exists; object store: checked first, then
uploaded whole, so two uploads racing in that window both land and the last stays), the first plan
written is the one both use, a writer skips a shard that another has finished, and a writer
tolerates its temporaries being cleaned up by the other. Both calls return the same complete set.
Masks are deterministic, so two writers compute identical shards; if a writer finds a shard it has
just computed already written with other content, it fails with a ``RuntimeError`` saying the
writers disagree instead of replacing it.

``set_id`` hashes everything the masks depend on (the box source — detector key, digest of the
network's tensors, input size and confidence threshold, or the label files' hashes —, manifest hash, region classes,
resolution, corrupt-image policy, schema and recipe versions): another detector or manifest gives
another set, never a mix. The content does not depend on ``batch_size``, ``rows_per_shard`` or the
number of actors (tested).

Location: a local or NFS directory, or an object-store URI such as
``s3://bucket/prefix?endpoint_override=http://host:9000`` (:func:`mgfa_ray.storage.resolve_location`).

Shard schema (``shard-NNNNN.parquet``, one row per manifest image; plain pyarrow reads it):

==============  ====================  ==========================================================
column          Arrow type            meaning
==============  ====================  ==========================================================
image_id        string                manifest image_id
label           int64                 class index
split           string                ``train`` | ``val`` | ``test``
boxes           list<list<double>>    boxes ``[region_class, cx, cy, w, h, conf]``, normalised to
                                      [0, 1] by image width/height; conf 1.0 for label files
masks           binary                uint8 array (K, R, R) in C order, values {0, 1}: channel k
                                      is the union of region class k's boxes; K and R are in
                                      ``metadata.json`` (``region_classes``, ``mask_resolution``)
detector        string                id of the box source (detector key, or ``labels-<hash>``)
error           string (nullable)     why the image could not be decoded (``corrupt_images:
                                      record``; with label files as the box source, the
                                      photo's first bytes and header are checked); null for a
                                      good image
==============  ====================  ==========================================================

Each shard's Parquet footer carries its statistics (key ``mgfa_ray.shard_stats``: rows, boxes,
images without any box, per region class the images with a region and the summed coverage), so
the set summary is built from footers alone.

No detection. A region kind with no box above the confidence threshold (or an empty label file)
yields an all-zero channel and no boxes of that class. The trial's ground-truth map for it is then
all zero (:func:`mgfa_ray.model.gt_attention`): Eq. 7 pulls the attention map towards zero, which
for the softmax variant is a uniform map — no region, no preferred location.

``metadata.json``: schema_version, set_id, source (``detector`` | ``labels``), detector_key (the
box source id), detector_weights_digest (detector source), imgsz, conf, manifest_hash, manifest
(informational path), mask_resolution, region_classes, corrupt_images (policy), corrupt (image_ids
recorded as corrupt), rows, rows_per_shard {file: rows}, shard_bytes {file: size in bytes},
shard_sha256 {file: SHA-256 hex digest}, summary (:func:`summarize`), created. Sets written
before ``shard_bytes``/``shard_sha256`` existed are read and checked without them.

Integrity. Data are checked where they are read: :func:`read_rows` (hence :func:`read_masks`,
the trials, ``mgfa-ray masks``) refuses a shard that is missing, unreadable, or of another size
or row count than ``metadata.json`` records, with a :class:`MaskSetError` naming the set and the
shard. A rerun of the job never trusts ``metadata.json`` alone: :func:`build_mask_set` checks
every shard's size and SHA-256 first, deletes the damaged ones (and ``metadata.json``), computes
them again and publishes the set anew.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import json
import logging
import math
import os
import time
import uuid
import warnings
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from .config import MasksConfig
from .errors import InputError, StageError, UserError
from .runtime import configure
from .storage import fs_exists, fs_list, fs_read, fs_write_atomic, location_join, resolve_location, sha256_file, sha256_json
from .manifest import ImageError, image_problem, sniff_bytes
from .regions import Box, LabelError, check_voc_sizes, label_layout_hint, parse_label_file

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
#: Bump when equal inputs give other boxes or masks (a new set id, so old sets are not reused).
#: 2: every image letterboxed to the full square (``predict_boxes``), whatever its batch.
RECIPE_VERSION = 2
METADATA = "metadata.json"
PLAN = "plan.json"
#: Times Ray restarts a mask actor that died (killed, out of memory, its node lost); its shards are
#: retried each time. One more death fails the call (a rerun resumes). Ray Data's default (-1)
#: would restart an actor that a shard crashes every time forever.
ACTOR_RESTARTS = 5
STATS_KEY = b"mgfa_ray.shard_stats"
SHARD_SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("label", pa.int64()),
    ("split", pa.string()),
    ("boxes", pa.list_(pa.list_(pa.float64()))),
    ("masks", pa.binary()),
    ("detector", pa.string()),
    ("error", pa.string()),
])


class MaskSetError(UserError, ValueError):
    """A mask set cannot be used as it is: incomplete, damaged (a shard missing, truncated, of
    another size or row count than ``metadata.json`` records), or not the one the trial needs. The
    message names the set (and the shard or image) and says what to do; a damaged set is rebuilt
    by rerunning the job (:func:`build_mask_set` checks every shard before trusting a set)."""


def rasterize(boxes: list[Box], *, num_classes: int, resolution: int) -> np.ndarray:
    """Union of each region class's boxes as a binary mask.

    A pixel is set when it overlaps the box at all, so a thin vein box keeps at least one pixel
    of width. Box edges outside the image are clipped.

    Args:
        boxes: Boxes in normalised coordinates (see :class:`mgfa_ray.regions.Box`).
        num_classes: K, the number of region classes (channels).
        resolution: R, the mask side in pixels.

    Returns:
        uint8 array (K, R, R) with values {0, 1}; row index is y (top to bottom). No box of a
        class: that channel is all zero.

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
    """Decode an image file to an (H, W, 3) uint8 RGB array (Pillow).

    Args:
        path: Image file.
        max_side: If given, let the JPEG decoder shrink by a power of two while both sides stay
            >= ``max_side`` (``PIL.Image.draft``); normalised boxes are unaffected.

    Raises:
        ValueError: The file is missing or unreadable, empty, not a JPEG/PNG/BMP file by its first
            bytes (:func:`mgfa_ray.manifest.sniff_bytes`, checked before Pillow so that no plugin
            is looked for), or Pillow fails on it in any way — any exception while opening or
            decoding this one file is the file's fault (Ultralytics' patched ``Image.open``, for
            one, raises ``ModuleNotFoundError`` on a file it cannot identify). The message names it.
    """
    try:
        with open(path, "rb") as f:  # read once: the path may be a pipe
            data = f.read()
    except OSError as err:
        raise ImageError(f"cannot decode image {path}: cannot be read ({err.strerror or err})") from None
    reason = sniff_bytes(data[:8])
    if reason is not None:
        raise ImageError(f"cannot decode image {path}: {reason}")
    try:
        with Image.open(io.BytesIO(data)) as img:
            if max_side is not None:
                img.draft("RGB", (max_side, max_side))
            return np.asarray(img.convert("RGB"))
    except Exception as err:  # noqa: BLE001 - the decode boundary: whatever fails here is this file
        raise ImageError(f"cannot decode image {path}: {type(err).__name__}: {err}") from None


@dataclass(frozen=True)
class DetectorBoxes:
    """Box source: the trained region detector (paper Sec. III-A).

    Attributes:
        weights: Detector weights file (``weights.pt`` of :mod:`mgfa_ray.detector`).
        detector_key: Id of that detector (:func:`mgfa_ray.detector.detector_key`).
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
    def source_id(self) -> str:
        """The value of every row's ``detector`` column."""
        return self.detector_key

    def identity(self) -> dict:
        """What the boxes depend on (enters the set id): the detector key, the digest of the network's
        tensors (:func:`mgfa_ray.detector.weights_digest`; not the file's bytes, which change with
        Ultralytics' save date), input size and confidence threshold."""
        from .detector import weights_digest

        return {"detector": self.detector_key, "weights_digest": weights_digest(self.weights), "imgsz": self.imgsz,
                "conf": self.conf}


@dataclass(frozen=True)
class LabelBoxes:
    """Box source: existing label files used as they are (YOLO txt or Pascal VOC xml).

    Attributes:
        label_files: ``(image_id, file)`` pairs, sorted (build with :meth:`create`).
        classes: Region class names; index = class id.
        unknown_class: Policy for boxes of other classes (:func:`mgfa_ray.regions.parse_label_file`).
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
        """From an ``image_id → file`` mapping such as :func:`mgfa_ray.regions.index_labels`."""
        return cls(tuple(sorted((str(k), str(v)) for k, v in label_files.items())), tuple(classes),
                   unknown_class, unlabelled)

    @property
    def source_id(self) -> str:
        """``labels-<16 hex digits>`` of the label files' content (every row's ``detector`` value)."""
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


def mask_rows(rows: pd.DataFrame, boxes: list[list[Box]], *, source_id: str, num_classes: int, resolution: int,
              errors: list[str | None] | None = None) -> pd.DataFrame:
    """Shard rows (schema in the module docstring) for manifest rows and their boxes.

    Args:
        rows: Manifest rows (image_id, label, split).
        boxes: Per row, its region boxes.
        source_id: Id of the box source, stored in the ``detector`` column.
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
        "detector": [source_id] * len(rows),
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
        self.source_id = source.source_id  # once: for label files it hashes every file
        self.num_classes, self.resolution, self.corrupt_images = num_classes, resolution, corrupt_images
        self._model = None

    def _detect(self, paths: list[str]) -> tuple[list[list[Box]], list[str | None]]:
        from .detector import load_detector, predict_boxes

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
                    bad = isinstance(im, str)
                    boxes.append([] if bad else next(found))
                    errors.append(im if bad else None)
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
        return mask_rows(rows, boxes, source_id=self.source_id, num_classes=self.num_classes,
                         resolution=self.resolution, errors=errors), corrupt


def shard_name(index: int) -> str:
    """File name of shard ``index``."""
    return f"shard-{index:05d}.parquet"


def _shard_stats(table: pd.DataFrame, num_classes: int, resolution: int) -> dict:
    masks = np.stack([np.frombuffer(b, np.uint8) for b in table["masks"]]).reshape(len(table), num_classes, -1)
    coverage = masks.mean(-1)
    n_boxes = np.array([len(b) for b in table["boxes"]])
    return {
        "schema_version": SCHEMA_VERSION,
        "rows": len(table),
        "boxes": int(n_boxes.sum()),
        "images_without_box": int((n_boxes == 0).sum()),
        "images_with_region": [int(v) for v in (coverage > 0).sum(0)],
        "coverage_sum": [float(v) for v in coverage.sum(0)],
        "corrupt": table["image_id"][table["error"].notna()].astype(str).tolist(),
    }


def _shard_bytes(table: pd.DataFrame, num_classes: int, resolution: int) -> bytes:
    arrow = pa.Table.from_pandas(table, schema=SHARD_SCHEMA, preserve_index=False)
    arrow = arrow.replace_schema_metadata({STATS_KEY: json.dumps(_shard_stats(table, num_classes, resolution))})
    buf = pa.BufferOutputStream()
    pq.write_table(arrow, buf)
    return buf.getvalue().to_pybytes()


class ShardWriter:
    """Ray Data actor (or a plain callable): shard work items → shards written, one summary row each.

    Args:
        source: Box source.
        set_location: The mask set's location (directory or URI).
        num_classes: K region classes.
        resolution: R, mask side in pixels.
        corrupt_images: ``error`` or ``record``.
    """

    def __init__(self, *, source: BoxSource, set_location: str, num_classes: int, resolution: int,
                 corrupt_images: Literal["error", "record"] = "error"):
        configure()  # this (actor) process: Ultralytics offline (mgfa_ray.runtime)
        self.fs, self.dir = resolve_location(set_location)
        self.compute = MaskComputer(source, num_classes=num_classes, resolution=resolution,
                                    corrupt_images=corrupt_images)

    def __call__(self, items: pd.DataFrame) -> pd.DataFrame:
        """Items with columns shard (int) and image_id, path, label, split (one list each) → rows
        ``{shard, rows, seconds, corrupt}`` (``corrupt``: JSON list of messages).

        A shard already finished — by a concurrent writer of the set, or by an earlier attempt of
        this task whose actor died after writing it — is neither computed nor written again.

        Raises:
            RuntimeError: The shard appeared while it was computed here, with other content (two
                writers of the set disagree); it is not replaced.
        """
        out = []
        for item in items.to_dict("records"):
            t0 = time.perf_counter()
            name = shard_name(int(item["shard"]))
            rows = pd.DataFrame({c: list(item[c]) for c in ("image_id", "path", "label", "split")})
            done = _finished(self.fs, f"{self.dir}/{name}", rows["image_id"].astype(str).tolist())
            if done is not None:
                out.append({"shard": int(item["shard"]), "rows": done["rows"], "seconds": time.perf_counter() - t0,
                            "corrupt": json.dumps([])})
                continue
            table, corrupt = self.compute(rows)
            if table is not None:
                data = _shard_bytes(table, self.compute.num_classes, self.compute.resolution)
                existing = create_once(self.fs, f"{self.dir}/{name}", data)
                if existing is not None and not _same_rows(existing, data):
                    raise StageError(
                        f"mask set {self.dir}: {name} was written meanwhile by another writer of this set with "
                        f"other content than computed here; two writers disagree (a detector that is not "
                        f"deterministic across machines or devices?). Kept the first; run one writer per set, "
                        f"or delete the set to recompute it"
                    )
            out.append({"shard": int(item["shard"]), "rows": 0 if table is None else len(table),
                        "seconds": time.perf_counter() - t0, "corrupt": json.dumps(corrupt)})
        return pd.DataFrame(out)


def _same_rows(a: bytes, b: bytes) -> bool:
    """Whether two shard files hold equal rows (the footers' writer version may differ)."""
    try:
        return pq.read_table(pa.BufferReader(a)).equals(pq.read_table(pa.BufferReader(b)))
    except (OSError, ValueError):  # an unreadable file is not equal
        return False


def create_once(fs, path: str, data: bytes) -> bytes | None:
    """Create the file ``path`` holding ``data`` unless a file is already there; never replace one.

    Local and NFS: ``data`` goes to a hidden temporary (``.<name>.<random>.tmp``, fsync'ed) that is
    hard-linked to ``path``: ``link`` fails when the name exists, so of two writers exactly one
    creates the file, and no reader sees part of it (a filesystem without hard links falls back to
    a check, then a rename). Object store: pyarrow has no exclusive create, so the name is checked,
    then :func:`mgfa_ray.storage.fs_write_atomic` uploads the file whole; two writers racing in between
    both upload it and the last upload stays.

    Returns:
        ``None`` when this call created the file, else the bytes of the file already there —
        also when another writer's cleanup removed this call's temporary (it does so only once
        the file exists).
    """
    import pyarrow.fs as pafs

    if isinstance(fs, pafs.LocalFileSystem):
        parent, name = os.path.split(path)
        tmp = os.path.join(parent, f".{name}.{uuid.uuid4().hex[:12]}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # mode: 0o666 less the umask, as open()
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
                return None
            except FileExistsError:
                pass
            except FileNotFoundError:  # our temporary was cleaned up because the file exists
                if not os.path.exists(path):
                    raise
            except OSError as err:
                if err.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP) or os.path.exists(path):
                    raise
                os.replace(tmp, path)  # no hard links on this filesystem
                return None
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
    elif not fs_exists(fs, path):
        try:
            fs_write_atomic(fs, path, data)
            return None
        except OSError:
            if not fs_exists(fs, path):  # not a temporary cleaned up by another writer: a real failure
                raise
    return fs_read(fs, path)


#: Name prefixes of the hidden temporaries written beside a set's files.
_TEMPORARIES = (f".{PLAN}.", f".{METADATA}.", ".shard-")


def _clean_temporaries(fs, set_dir: str, *, published: bool) -> None:
    """Delete hidden temporaries in ``set_dir``: those whose file exists (a killed writer's, or a
    concurrent writer's copy of a file that exists, which :func:`create_once` tolerates), or every
    one once the set is ``published`` (all its files exist then)."""
    names = fs_list(fs, set_dir)
    present = [n for n in names if not n.startswith(".")]
    for name in names:
        if name.startswith(_TEMPORARIES) and (published or any(name.startswith(f".{p}.") for p in present)):
            try:
                fs.delete_file(f"{set_dir}/{name}")
            except FileNotFoundError:  # another writer removed or renamed it first
                pass


def mask_set_id(*, source_identity: dict, manifest_hash: str, region_classes: list[str], cfg: MasksConfig) -> str:
    """16-hex-digit id of a mask set from everything its content depends on."""
    return sha256_json({
        "schema": SCHEMA_VERSION, "recipe": RECIPE_VERSION, "source": source_identity, "manifest": manifest_hash,
        "regions": list(region_classes), "resolution": cfg.resolution, "corrupt_images": cfg.corrupt_images,
    })[:16]


def _read_json(fs, path: str) -> dict | None:
    if not fs_exists(fs, path):
        return None
    return json.loads(fs_read(fs, path))


def _plan(fs, set_dir: str, *, set_id: str, n_rows: int, rows_per_shard: int) -> dict:
    """The set's sharding: the stored plan when the set was started before (or is being started by
    a concurrent writer: the first plan written wins), else a new one."""
    path = f"{set_dir}/{PLAN}"
    new = {"schema_version": SCHEMA_VERSION, "set_id": set_id, "n_rows": n_rows, "rows_per_shard": rows_per_shard,
           "n_shards": max(1, math.ceil(n_rows / rows_per_shard))}
    plan = _read_json(fs, path)
    if plan is None:
        existing = create_once(fs, path, json.dumps(new, indent=2).encode())
        plan = new if existing is None else json.loads(existing)
    if plan.get("n_rows") == n_rows and plan.get("schema_version") == SCHEMA_VERSION:
        if plan["rows_per_shard"] != rows_per_shard:
            log.warning("mask set %s was started with rows_per_shard=%d; keeping it (configured %d)",
                        set_id, plan["rows_per_shard"], rows_per_shard)
        return plan
    fs_write_atomic(fs, path, json.dumps(new, indent=2).encode())  # another layout (not of this set id): replace
    return new


def _finished(fs, path: str, expected: list[str]) -> dict | None:
    """The footer statistics of the shard at ``path`` if it exists and holds exactly the
    ``expected`` image_ids (one read of the file), with its size (``bytes``) and SHA-256
    (``sha256``) added; else ``None``."""
    if not fs_exists(fs, path):
        return None
    try:
        data = fs_read(fs, path)
        shard = pq.ParquetFile(pa.BufferReader(data))
        stats = json.loads(shard.metadata.metadata[STATS_KEY])
        ids = shard.read(columns=["image_id"]).column("image_id").to_pylist()
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as err:  # unreadable: rewrite it
        log.warning("shard %s unreadable (%s); recomputing it", path, err)
        return None
    return {**stats, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()} if ids == expected else None


def _damaged_shards(fs, set_dir: str, meta: dict) -> dict[str, str]:
    """The shards of a published set that are not as ``metadata.json`` records them: ``{name: why}``.

    Checks each listed shard's presence, size and SHA-256 (``shard_bytes``, ``shard_sha256``), or,
    for a set written before those were recorded, that its footer reads and gives its row count.
    Reads every shard once.
    """
    sizes, sums = meta.get("shard_bytes") or {}, meta.get("shard_sha256") or {}
    damaged = {}
    for name, rows in sorted((meta.get("rows_per_shard") or {}).items()):
        path = f"{set_dir}/{name}"
        if not fs_exists(fs, path):
            damaged[name] = "missing"
            continue
        data = fs_read(fs, path)
        if name in sizes and len(data) != sizes[name]:
            damaged[name] = f"{len(data)} bytes, metadata.json records {sizes[name]}"
        elif name in sums and hashlib.sha256(data).hexdigest() != sums[name]:
            damaged[name] = "its SHA-256 differs from the one metadata.json records"
        elif name not in sums:
            try:
                n = pq.ParquetFile(pa.BufferReader(data)).metadata.num_rows
            except (OSError, ValueError, pa.ArrowException) as err:
                damaged[name] = f"unreadable ({err})"
                continue
            if n != rows:
                damaged[name] = f"{n} rows, metadata.json records {rows}"
    return damaged


def summarize(stats: list[dict], region_classes: list[str]) -> dict:
    """The set summary from shard statistics.

    Returns:
        ``{images, mean_boxes_per_image, images_without_box, corrupt_images, per_class: {name:
        {images_with_region (fraction in [0, 1]), mean_coverage (mean fraction of the image
        covered, in [0, 1])}}}``.
    """
    n = sum(s["rows"] for s in stats)
    return {
        "images": n,
        "mean_boxes_per_image": sum(s["boxes"] for s in stats) / max(n, 1),
        "images_without_box": sum(s["images_without_box"] for s in stats),
        "corrupt_images": sum(len(s["corrupt"]) for s in stats),
        "per_class": {
            name: {
                "images_with_region": sum(s["images_with_region"][k] for s in stats) / max(n, 1),
                "mean_coverage": sum(s["coverage_sum"][k] for s in stats) / max(n, 1),
            }
            for k, name in enumerate(region_classes)
        },
    }


def _mask_rows(manifest: pd.DataFrame, source: BoxSource) -> pd.DataFrame:
    """The manifest's ``image_id``, ``path``, ``label``, ``split``, sorted by ``image_id``; for the
    ``labels`` source every label file is read here, so that its defects stop the stage before any
    shard is computed.

    Raises:
        ValueError: The manifest repeats an image_id; ``unlabelled="error"`` and an image without
            a label file.
        LabelError: A bad label line, no label file matching any image, a VOC ``<size>`` unlike
            its photo (as :func:`build_mask_set`).
    """
    rows = manifest[["image_id", "path", "label", "split"]].astype({"image_id": str, "path": str, "split": str})
    rows = rows.sort_values("image_id", ignore_index=True)
    if rows["image_id"].duplicated().any():
        raise InputError(f"manifest repeats image_id {rows['image_id'][rows['image_id'].duplicated()].iloc[0]!r}")
    if isinstance(source, LabelBoxes):  # bad label lines, missing files, wrong VOC sizes fail here, clearly
        if (hint := label_layout_hint(dict(source.label_files), rows["image_id"].tolist())) is not None:
            raise LabelError(hint)  # no file matches any image: a layout error, whatever the policy
        check_voc_sizes(dict(source.label_files), dict(zip(rows["image_id"], rows["path"])))
        source.boxes(rows["image_id"].tolist())
    return rows


def _pending_shards(fs, set_dir: str, parts: dict[int, pd.DataFrame]) -> list[int]:
    """The shard indices of ``parts`` without a finished shard in ``set_dir``; a shard file there
    that is unreadable or holds other images than planned is deleted."""
    pending = []
    for i, part in parts.items():
        path = f"{set_dir}/{shard_name(i)}"
        if _finished(fs, path, part["image_id"].tolist()) is None:
            pending.append(i)
            if fs_exists(fs, path):  # unreadable, or not its planned images: never a finished shard
                try:
                    fs.delete_file(path)
                except FileNotFoundError:
                    pass
    return pending


def _compute_shards(pending: list[int], parts: dict[int, pd.DataFrame], *, writer: dict,
                    cfg: MasksConfig, executor: Literal["ray", "local"]) -> list[dict]:
    """Write the ``pending`` shards with :class:`ShardWriter` (``writer`` its arguments), in this
    process or on a Ray Data actor pool (:func:`_run_ray`); returns one result row per shard.

    Raises:
        RuntimeError: The Ray Data job failed (as :func:`build_mask_set`).
    """
    items = [{"shard": i, **{c: parts[i][c].tolist() for c in ("image_id", "path", "label", "split")}}
             for i in pending]
    if not items:
        return []
    if executor == "local":
        return ShardWriter(**writer)(pd.DataFrame(items)).to_dict("records")
    return _run_ray(items, writer, cfg)


def _raise_if_corrupt(results: list[dict], *, fs, set_dir: str, set_location: str,
                      cfg: MasksConfig) -> None:
    """Under ``corrupt_images="error"``, stop when a shard recorded an image that cannot be decoded.

    Raises:
        ImageError: Naming up to five such images and how many more; the finished shards are kept
            for a rerun (:func:`_abandon`, which deletes a set folder without any).
    """
    corrupt = [m for r in results for m in json.loads(r["corrupt"])]
    if corrupt and cfg.corrupt_images == "error":
        kept = _abandon(fs, set_dir)
        raise ImageError(
            f"{len(corrupt)} image(s) cannot be decoded: {'; '.join(corrupt[:5])}"
            + (f"; and {len(corrupt) - 5} more" if len(corrupt) > 5 else "")
            + ". Remove or replace them, or set masks.corrupt_images: record to record them in the mask set and "
            "train without them"
            + (f". The {kept} finished shard(s) in {set_location} are reused when the manifest is unchanged "
               f"(images replaced under the same names)" if kept else "")
        )


def build_mask_set(
    *,
    manifest: pd.DataFrame,
    manifest_hash: str,
    source: BoxSource,
    region_classes: list[str],
    cfg: MasksConfig,
    location: str | Path,
    executor: Literal["ray", "local"] = "ray",
    manifest_path: str | None = None,
) -> str:
    """Compute the masks of every manifest image into a mask set, resuming a partial one.

    Args:
        manifest: Manifest table (columns of :mod:`mgfa_ray.manifest`).
        manifest_hash: :func:`mgfa_ray.manifest.manifest_hash` of it.
        source: Box source (:class:`DetectorBoxes` or :class:`LabelBoxes`).
        region_classes: Region class names, in mask-channel order.
        cfg: Mask settings (resolution, batch size, actors, shard size, corrupt-image policy).
        location: Directory or URI holding mask sets.
        executor: ``ray`` (Ray Data actor pool; needs ``ray.init``) or ``local`` (the same
            :class:`ShardWriter` in this process, shard after shard).
        manifest_path: Recorded in the metadata for tools such as ``mgfa-ray masks``.

    Returns:
        The mask set location ``<location>/<set_id>``. A finished set is returned untouched once
        its shards are checked against ``metadata.json``; damaged shards are computed again.

    Raises:
        ImageError: Images that cannot be decoded under ``corrupt_images="error"`` (named; finished
            shards are kept for a rerun, a set folder without any is deleted).
        ValueError: ``unlabelled="error"`` and an image without a label file.
        LabelError: For the ``labels`` source: a bad label line (``file:line``), no label file
            matching any image (:func:`mgfa_ray.regions.label_layout_hint`), a VOC ``<size>``
            unlike its photo (:func:`mgfa_ray.regions.check_voc_sizes`).
        RuntimeError: The shards do not hold exactly one row per manifest image; the Ray Data job
            failed (a task raised, or an actor died more than ``ACTOR_RESTARTS`` times); a
            concurrent writer of the set wrote a shard with other content. Finished shards are
            kept; a rerun resumes.
    """
    k = len(region_classes)
    identity = source.identity()
    set_id = mask_set_id(source_identity=identity, manifest_hash=manifest_hash, region_classes=region_classes,
                         cfg=cfg)
    set_location = location_join(location, set_id)
    fs, set_dir = resolve_location(set_location)
    if fs_exists(fs, f"{set_dir}/{METADATA}") and _intact(fs, set_dir, set_location):
        log.info("mask set %s is complete; skipping", set_location)
        return set_location
    rows = _mask_rows(manifest, source)
    fs.create_dir(set_dir, recursive=True)
    _clean_temporaries(fs, set_dir, published=False)
    plan = _plan(fs, set_dir, set_id=set_id, n_rows=len(rows), rows_per_shard=cfg.rows_per_shard)
    step = plan["rows_per_shard"]
    parts = {i: rows.iloc[i * step : (i + 1) * step] for i in range(plan["n_shards"])}
    pending = _pending_shards(fs, set_dir, parts)
    log.info("mask set %s: %d of %d shards to compute", set_id, len(pending), len(parts))
    writer = {"source": source, "set_location": set_location, "num_classes": k, "resolution": cfg.resolution,
              "corrupt_images": cfg.corrupt_images}
    results = _compute_shards(pending, parts, writer=writer, cfg=cfg, executor=executor)
    _raise_if_corrupt(results, fs=fs, set_dir=set_dir, set_location=set_location, cfg=cfg)
    return _publish(fs, set_dir, set_location, parts=parts, metadata={
        "set_id": set_id,
        "source": source.kind,
        "detector_key": source.source_id,
        "detector_weights_digest": identity.get("weights_digest"),
        "imgsz": identity.get("imgsz"),
        "conf": identity.get("conf"),
        "manifest_hash": manifest_hash,
        "manifest": manifest_path,
        "mask_resolution": cfg.resolution,
        "region_classes": list(region_classes),
        "corrupt_images": cfg.corrupt_images,
    })


def _intact(fs, set_dir: str, set_location: str) -> bool:
    """Whether a published set is as its ``metadata.json`` records it (:func:`_damaged_shards`). If
    not, the damaged shards and ``metadata.json`` are deleted, with a warning naming them, so the
    caller rebuilds those shards and publishes the set again."""
    try:
        damaged = _damaged_shards(fs, set_dir, json.loads(fs_read(fs, f"{set_dir}/{METADATA}")))
    except (ValueError, AttributeError) as err:  # metadata.json unreadable or not an object
        damaged = {METADATA: f"unreadable ({err})"}
    if not damaged:
        return True
    log.warning("mask set %s is damaged (%s); rebuilding what is damaged", set_location,
                "; ".join(f"{n}: {why}" for n, why in damaged.items()))
    for name in [n for n in damaged if n != METADATA] + [METADATA]:
        try:
            fs.delete_file(f"{set_dir}/{name}")
        except FileNotFoundError:
            pass
    return False


def _abandon(fs, set_dir: str) -> int:
    """After a failed build: the number of finished shards in ``set_dir``, which are kept for a
    rerun; when there are none, the set's folder (its plan and temporaries) is deleted, so no
    empty set is left behind."""
    names = fs_list(fs, set_dir)
    shards = sum(1 for n in names if n.startswith("shard-") and n.endswith(".parquet"))
    if not shards:
        try:
            fs.delete_dir(set_dir)
        except FileNotFoundError:
            pass
    return shards


def _run_ray(items: list[dict], writer: dict, cfg: MasksConfig) -> list[dict]:
    """The pending shards through a Ray Data actor pool; one summary row per shard."""
    import ray.data
    from ray.data import ActorPoolStrategy

    if isinstance(writer["source"], DetectorBoxes):  # the actors' device and decode threads
        writer = {**writer, "source": dataclasses.replace(
            writer["source"], device="cuda" if cfg.gpus_per_actor > 0 else "cpu",
            decode_threads=max(1, int(cfg.cpus_per_actor)))}
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        ShardWriter,
        fn_constructor_kwargs=writer,
        batch_size=1,  # one shard per call: a shard is the unit of atomic write and resume
        batch_format="pandas",
        compute=ActorPoolStrategy(size=min(cfg.num_actors, len(items))),
        num_cpus=cfg.cpus_per_actor,
        num_gpus=cfg.gpus_per_actor or None,
        max_restarts=ACTOR_RESTARTS,  # a dead actor is restarted (on another node if its node died)...
        max_task_retries=-1,  # ...and its shards retried: unbounded, a lost node's actor fails fast until restarted
    )
    try:
        return ds.take_all()
    except Exception as err:  # a worker died or raised: what finished is on disk
        raise StageError(f"mask precompute failed ({type(err).__name__}: {err}); finished shards are kept, "
                           f"a rerun computes the rest") from err


def _publish(fs, set_dir: str, set_location: str, *, parts: dict[int, pd.DataFrame], metadata: dict) -> str:
    """Check every planned shard holds its images exactly once, then write ``metadata.json`` (unless a
    concurrent writer published the set first) and delete every temporary left in the set."""
    stats, rows_per_shard, shard_bytes, shard_sha256 = [], {}, {}, {}
    for i, part in parts.items():
        shard_stats = _finished(fs, f"{set_dir}/{shard_name(i)}", part["image_id"].tolist())
        if shard_stats is None:
            raise StageError(f"mask set {set_location}: {shard_name(i)} is missing or does not hold its "
                               f"{len(part)} planned images")
        rows_per_shard[shard_name(i)] = shard_stats["rows"]
        shard_bytes[shard_name(i)] = shard_stats["bytes"]
        shard_sha256[shard_name(i)] = shard_stats["sha256"]
        stats.append(shard_stats)
    extra = [n for n in fs_list(fs, set_dir) if n.endswith(".parquet") and n not in rows_per_shard]
    if extra:
        raise StageError(f"mask set {set_location}: unexpected shard files {extra[:3]}")
    region_classes = metadata["region_classes"]
    meta = {
        "schema_version": SCHEMA_VERSION,
        **metadata,
        "rows": sum(rows_per_shard.values()),
        "rows_per_shard": rows_per_shard,
        "shard_bytes": shard_bytes,
        "shard_sha256": shard_sha256,
        "corrupt": [i for s in stats for i in s["corrupt"]],
        "summary": summarize(stats, region_classes),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    existing = create_once(fs, f"{set_dir}/{METADATA}", (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
    if existing is not None:
        if json.loads(existing).get("rows_per_shard") != rows_per_shard:
            raise StageError(f"mask set {set_location}: another writer published it with shards "
                               f"{json.loads(existing).get('rows_per_shard')}, this one found {rows_per_shard}")
        log.info("mask set %s was published meanwhile by another writer; keeping its metadata", set_location)
    _clean_temporaries(fs, set_dir, published=True)
    return set_location


CURRENT = "CURRENT"
"""File in a job's mask directory naming the set its last run built (:func:`write_current_set`)."""


def write_current_set(root: str, set_id: str) -> None:
    """Record ``<root>/<set_id>`` as the current set of the mask directory ``root`` (a path or URI):
    ``<root>/CURRENT`` holds the set id (written atomically), so a config can name the root, e.g.
    ``outputs/leafsnap20/masks``, and read on any machine the set the job built there — whose id
    depends on that machine's detector."""
    fs, root_path = resolve_location(root)
    fs_write_atomic(fs, location_join(root_path, CURRENT), f"{set_id}\n".encode())


def resolve_mask_set(location: str | Path) -> str:
    """``location`` when it holds a mask set's ``metadata.json``; else, when it is a job's mask
    directory with a ``CURRENT`` file (:func:`write_current_set`), the set that file names."""
    fs, path = resolve_location(location)
    if fs_exists(fs, location_join(path, METADATA)) or not fs_exists(fs, location_join(path, CURRENT)):
        return str(location)
    set_id = fs_read(fs, location_join(path, CURRENT)).decode().strip()
    return location_join(location, set_id)


_REBUILD = "rerun the job (`mgfa-ray run JOB`) to rebuild it"


def read_metadata(location: str | Path) -> dict:
    """The ``metadata.json`` of a complete mask set (``location`` may be a job's mask directory:
    its current set is read, :func:`resolve_mask_set`).

    Raises:
        MaskSetError: The location holds no complete mask set, its ``metadata.json`` is
            unreadable, or the set is of another schema version.
    """
    location = resolve_mask_set(location)
    fs, set_dir = resolve_location(location)
    try:
        meta = _read_json(fs, f"{set_dir}/{METADATA}")
    except ValueError as err:
        raise MaskSetError(f"mask set {location}: {METADATA} is unreadable ({err}); {_REBUILD}") from None
    if meta is None:
        raise MaskSetError(f"{location} is not a complete mask set (no {METADATA}); run or rerun the job's mask stage")
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise MaskSetError(f"mask set {location}: schema version {meta.get('schema_version')}, this mgfa-ray reads "
                           f"{SCHEMA_VERSION}; recompute it (rerun the job's mask stage)")
    return meta


def read_rows(location: str | Path, *, columns: list[str] | None = None) -> pd.DataFrame:
    """Every row of a complete mask set (plain pyarrow; shards in order), checked against its
    ``metadata.json``: each listed shard must exist, have the recorded size (sets written since
    sizes were recorded) and hold the recorded number of rows. Checksums are checked by the job's
    rerun (:func:`build_mask_set`), which reads every byte anyway.

    Raises:
        MaskSetError: Not a complete mask set (see :func:`read_metadata`); a shard is missing,
            unreadable (truncated, not Parquet), of another size or row count; the message names
            the set and the shard and says that rerunning the job rebuilds it.
    """
    location = resolve_mask_set(location)
    meta = read_metadata(location)
    fs, set_dir = resolve_location(location)
    sizes = meta.get("shard_bytes") or {}
    tables = []
    for name, rows in sorted(meta["rows_per_shard"].items()):
        path = f"{set_dir}/{name}"
        if not fs_exists(fs, path):
            raise MaskSetError(f"mask set {location}: shard {name} is missing; {_REBUILD}")
        try:
            size = fs.get_file_info(path).size
            if name in sizes and size != sizes[name]:
                raise MaskSetError(f"mask set {location}: shard {name} has {size} bytes, {METADATA} records "
                                   f"{sizes[name]} (truncated or replaced); {_REBUILD}")
            with fs.open_input_file(path) as f:
                table = pq.read_table(f, columns=columns)
        except (OSError, pa.ArrowException) as err:  # truncated, not Parquet, unreadable
            raise MaskSetError(f"mask set {location}: shard {name} is unreadable ({err}); {_REBUILD}") from None
        if table.num_rows != rows:
            raise MaskSetError(f"mask set {location}: shard {name} holds {table.num_rows} rows, {METADATA} records "
                               f"{rows}; {_REBUILD}")
        tables.append(table)
    return pa.concat_tables(tables).to_pandas()


def read_masks(location: str | Path, *, image_ids: list[str], region_classes: list[str],
               labels: list[int] | None = None) -> tuple[np.ndarray, dict]:
    """Load the masks of ``image_ids`` from a mask set, checking they fit the trial.

    Args:
        location: Mask set location (directory or URI).
        image_ids: Images needed, in the order wanted.
        region_classes: Region kinds the model expects, in channel order.
        labels: Optionally the manifest labels of ``image_ids``; each must equal its row's.

    Returns:
        ``(masks, metadata)``: uint8 array (N, K, R, R) with values {0, 1} aligned with
        ``image_ids``, and the set's metadata.

    Raises:
        MaskSetError: Not a complete set or another schema version; region classes differ; the
            shards do not hold the rows the metadata says; an image has no row or several; a row
            of another box source; a mask of the wrong byte size; an image recorded as corrupt; a
            label that differs from the manifest's. Each message names the set and the images.
    """
    meta = read_metadata(location)
    if list(meta["region_classes"]) != list(region_classes):
        raise MaskSetError(
            f"mask set {location}: region classes {meta['region_classes']} do not match the "
            f"model's {list(region_classes)}"
        )
    k, r = len(region_classes), int(meta["mask_resolution"])
    table = read_rows(location, columns=["image_id", "label", "masks", "detector", "error"])
    if len(table) != meta["rows"]:
        raise MaskSetError(f"mask set {location}: shards hold {len(table)} rows, metadata says {meta['rows']}")
    counts = table["image_id"].value_counts()
    missing = [i for i in image_ids if i not in counts.index]
    if missing:
        raise MaskSetError(f"mask set {location}: no mask row for {len(missing)} image(s), e.g. {missing[:3]}")
    dup = counts[counts > 1]
    if len(dup):
        raise MaskSetError(f"mask set {location}: several rows for image(s) {list(dup.index[:3])}")
    table = table.set_index("image_id").loc[list(image_ids)]
    foreign = table["detector"] != meta["detector_key"]
    if foreign.any():
        raise MaskSetError(
            f"mask set {location}: image {table.index[foreign.to_numpy()][0]!r} has rows of box source "
            f"{table['detector'][foreign].iloc[0]!r}, the set's is {meta['detector_key']!r}"
        )
    bad = table["error"].notna()
    if bad.any():
        raise MaskSetError(
            f"mask set {location}: {int(bad.sum())} needed image(s) were recorded as corrupt, e.g. "
            f"{table.index[bad.to_numpy()][0]!r}: {table['error'][bad].iloc[0]}; remove them from the manifest"
        )
    if labels is not None:
        wrong = table["label"].to_numpy() != np.asarray(labels)
        if wrong.any():
            raise MaskSetError(f"mask set {location}: labels of {list(table.index[wrong][:3])} differ from the "
                             f"manifest's; the set belongs to another manifest")
    sizes = table["masks"].map(len)
    if (sizes != k * r * r).any():
        i = table.index[(sizes != k * r * r).to_numpy()][0]
        raise MaskSetError(f"mask set {location}: mask of {i!r} has {sizes[i]} bytes, expected {k}x{r}x{r}")
    out = np.frombuffer(bytearray(b"".join(table["masks"])), np.uint8).reshape(len(image_ids), k, r, r)
    return out, meta
