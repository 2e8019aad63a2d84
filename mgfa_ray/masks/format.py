"""The on-disk format of a mask set (stage 4), shared by :mod:`mgfa_ray.masks.writer` and
:mod:`mgfa_ray.masks.reader`.

A mask set lives in ``<location>/<set_id>/`` (a local or NFS directory, or an object-store URI such
as ``s3://bucket/prefix?endpoint_override=http://host:9000``; :func:`mgfa_ray.storage.resolve_location`)::

    plan.json              the sharding, fixed when the set is started (:data:`PLAN`)
    shard-NNNNN.parquet    one row per manifest image, shard *i* always the same images (:func:`shard_name`)
    metadata.json          written last: the set is complete only with it (:data:`METADATA`)

and a job's mask directory may hold ``CURRENT``, the id of the set its last run built
(:data:`CURRENT`).

``set_id`` (:func:`mask_set_id`) hashes everything the masks depend on (the box source — detector
key, digest of the network's tensors, input size and confidence threshold, or the label files'
hashes —, manifest hash, region classes, resolution, corrupt-image policy, schema and recipe
versions): another detector or manifest gives another set, never a mix. The content does not
depend on ``batch_size``, ``rows_per_shard`` or the number of actors (tested).

Shard schema (:data:`SHARD_SCHEMA`; plain pyarrow reads it):

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

Each shard's Parquet footer carries its statistics (key :data:`STATS_KEY`, ``mgfa_ray.shard_stats``:
rows, boxes, images without any box, per region class the images with a region and the summed
coverage), so the set summary is built from footers alone.

``metadata.json``: schema_version, set_id, source (``detector`` | ``labels``), detector_key (the
box source id, ``BoxSource.box_source``: a detector key or ``labels-<hash>``; the name predates
label files), detector_weights_digest (detector source), imgsz, conf, manifest_hash, manifest
(informational path), mask_resolution, region_classes, corrupt_images (policy), corrupt (image_ids
recorded as corrupt), rows, rows_per_shard {file: rows}, shard_bytes {file: size in bytes},
shard_sha256 {file: SHA-256 hex digest}, summary (:func:`mgfa_ray.masks.writer.summarize`),
created. ``rows_per_shard``, ``shard_bytes`` and ``shard_sha256`` are required and list the same
shard files (:func:`shard_records_problem`); a set whose metadata lacks them is damaged.
"""

from __future__ import annotations

import json

import pyarrow as pa

from mgfa_ray.config import MasksConfig
from mgfa_ray.errors import UserError
from mgfa_ray.storage import fs_exists, fs_read, sha256_json

#: Version of the shard schema and metadata layout; a set of another version is refused.
SCHEMA_VERSION = 2
#: Bump when equal inputs give other boxes or masks (a new set id, so old sets are not reused).
#: 2: every image letterboxed to the full square (``predict_boxes``), whatever its batch.
RECIPE_VERSION = 2
#: The set's metadata, written last (a set without it is incomplete).
METADATA = "metadata.json"
#: The set's sharding, written first.
PLAN = "plan.json"
#: File in a job's mask directory naming the set its last run built
#: (:func:`mgfa_ray.masks.writer.write_current_set`).
CURRENT = "CURRENT"
#: Key of the shard statistics in each shard's Parquet footer metadata (JSON).
STATS_KEY = b"mgfa_ray.shard_stats"
#: The columns of every shard (the table in the module docstring).
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
    by rerunning the job (:func:`mgfa_ray.masks.writer.build_mask_set` checks every shard before
    trusting a set)."""


#: The fields of ``metadata.json`` that record every shard file: ``{file: rows}``, ``{file: size in
#: bytes}``, ``{file: SHA-256 hex digest}``.
SHARD_RECORDS = ("rows_per_shard", "shard_bytes", "shard_sha256")


def shard_records_problem(meta: dict) -> str | None:
    """Why the shard records of ``meta`` (a set's ``metadata.json``) are unusable, or ``None``:
    each field of :data:`SHARD_RECORDS` must be an object, and all must list the same shard files."""
    for field in SHARD_RECORDS:
        if not isinstance(meta.get(field), dict):
            return f"{METADATA} has no {field}"
    names = set(meta[SHARD_RECORDS[0]])
    for field in SHARD_RECORDS[1:]:
        if set(meta[field]) != names:
            return f"{METADATA}'s {field} does not list the shards of {SHARD_RECORDS[0]}"
    return None


def shard_name(index: int) -> str:
    """File name of shard ``index``."""
    return f"shard-{index:05d}.parquet"


def mask_set_id(*, source_identity: dict, manifest_hash: str, region_classes: list[str], cfg: MasksConfig) -> str:
    """16-hex-digit id of a mask set from everything its content depends on."""
    return sha256_json({
        "schema": SCHEMA_VERSION, "recipe": RECIPE_VERSION, "source": source_identity, "manifest": manifest_hash,
        "regions": list(region_classes), "resolution": cfg.resolution, "corrupt_images": cfg.corrupt_images,
    })[:16]


def read_json(fs, path: str) -> dict | None:
    """The JSON content of the set file ``path`` on ``fs`` (``plan.json``, ``metadata.json``), or
    ``None`` when there is no such file.

    Raises:
        ValueError: The file is not JSON.
    """
    if not fs_exists(fs, path):
        return None
    return json.loads(fs_read(fs, path))
