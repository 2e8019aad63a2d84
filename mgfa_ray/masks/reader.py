"""Stage 4, for its users: the mask-set reader (trials, ``mgfa-ray masks``, the CAM figures).

Data are checked where they are read: :func:`read_rows` (hence :func:`read_masks`, the trials,
``mgfa-ray masks``) refuses a shard that is missing, unreadable, or of another size or row count
than ``metadata.json`` records, with a :class:`~mgfa_ray.masks.format.MaskSetError` naming the set
and the shard. Checksums are checked by the job's rerun (:func:`mgfa_ray.masks.writer.build_mask_set`),
which reads every byte anyway. The format is :mod:`mgfa_ray.masks.format`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mgfa_ray.masks.format import CURRENT, METADATA, SCHEMA_VERSION, MaskSetError, read_json, shard_records_problem
from mgfa_ray.storage import fs_exists, fs_read, location_join, resolve_location


def resolve_mask_set(location: str | Path) -> str:
    """``location`` when it holds a mask set's ``metadata.json``; else, when it is a job's mask
    directory with a ``CURRENT`` file (:func:`mgfa_ray.masks.writer.write_current_set`), the set
    that file names."""
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
            unreadable or damaged (without the shard records of :data:`~mgfa_ray.masks.format.SHARD_RECORDS`),
            or the set is of another schema version.
    """
    location = resolve_mask_set(location)
    fs, set_dir = resolve_location(location)
    try:
        meta = read_json(fs, f"{set_dir}/{METADATA}")
    except ValueError as err:
        raise MaskSetError(f"mask set {location}: {METADATA} is unreadable ({err}); {_REBUILD}") from None
    if meta is None:
        raise MaskSetError(f"{location} is not a complete mask set (no {METADATA}); run or rerun the job's mask stage")
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise MaskSetError(f"mask set {location}: schema version {meta.get('schema_version')}, this mgfa-ray reads "
                           f"{SCHEMA_VERSION}; recompute it (rerun the job's mask stage)")
    problem = shard_records_problem(meta)
    if problem:
        raise MaskSetError(f"mask set {location}: damaged ({problem}); {_REBUILD}")
    return meta


def read_rows(location: str | Path, *, columns: list[str] | None = None) -> pd.DataFrame:
    """Every row of a complete mask set (plain pyarrow; shards in order), checked against its
    ``metadata.json``: each listed shard must exist, have the recorded size and hold the recorded
    number of rows. Checksums are checked by the job's
    rerun (:func:`mgfa_ray.masks.writer.build_mask_set`), which reads every byte anyway.

    Raises:
        MaskSetError: Not a complete mask set (see :func:`read_metadata`); a shard is missing,
            unreadable (truncated, not Parquet), of another size or row count; the message names
            the set and the shard and says that rerunning the job rebuilds it.
    """
    location = resolve_mask_set(location)
    meta = read_metadata(location)
    fs, set_dir = resolve_location(location)
    sizes = meta["shard_bytes"]
    tables = []
    for name, rows in sorted(meta["rows_per_shard"].items()):
        path = f"{set_dir}/{name}"
        if not fs_exists(fs, path):
            raise MaskSetError(f"mask set {location}: shard {name} is missing; {_REBUILD}")
        try:
            size = fs.get_file_info(path).size
            if size != sizes[name]:
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
        region_classes: Region classes the model expects, in channel order.
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
    table = _needed_rows(location, meta, image_ids=image_ids, labels=labels)
    sizes = table["masks"].map(len)
    if (sizes != k * r * r).any():
        i = table.index[(sizes != k * r * r).to_numpy()][0]
        raise MaskSetError(f"mask set {location}: mask of {i!r} has {sizes[i]} bytes, expected {k}x{r}x{r}")
    out = np.frombuffer(bytearray(b"".join(table["masks"])), np.uint8).reshape(len(image_ids), k, r, r)
    return out, meta


def _needed_rows(location: str | Path, meta: dict, *, image_ids: list[str], labels: list[int] | None) -> pd.DataFrame:
    """The set's rows of ``image_ids``, in that order (index ``image_id``), checked as
    :func:`read_masks` says: one row each, of the set's box source, not corrupt, of the given labels.

    Raises:
        MaskSetError: As :func:`read_masks` (every case but region classes and mask sizes).
    """
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
    return table
