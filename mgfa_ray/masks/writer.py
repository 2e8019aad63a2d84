"""Stage 4, second half: the mask-set writer — masks precomputed by Ray Data into Parquet shards.

The manifest, sorted by image_id, is cut into shards of ``rows_per_shard`` images. Each pending
shard is one item of a Ray Data dataset mapped (``map_batches``, ``batch_size=1``) over an actor
pool of :class:`ShardWriter` — one GPU per actor when ``gpus_per_actor`` > 0, CPU otherwise; each
actor loads the detector once. For its shard an actor decodes the images (threads, one batch
ahead), runs the detector ``batch_size`` images per call, rasterises the boxes
(:mod:`mgfa_ray.masks.sources`) and writes the shard itself, atomically and once
(:func:`mgfa_ray.storage.create_once`: a complete temporary file hard-linked to its name; an
object-store upload only appears once complete). ``executor="local"`` runs the same writer
in-process. The format of what is written is :mod:`mgfa_ray.masks.format`.

Why not ``Dataset.write_parquet``: its files get per-run names and are written in place, so after a
kill a rerun can neither tell finished files from partial ones nor know which images they cover.
Here shard *i* always holds the same images, and a finished shard is never rewritten.

Restart. ``<location>/<set_id>/plan.json`` fixes the sharding when a set is started. A rerun
keeps every shard whose image_ids are exactly those planned for it and computes only the others.
``metadata.json`` is written last, after a check that the shards hold exactly one row per manifest
image; a set without it is incomplete and :func:`mgfa_ray.masks.reader.read_masks` refuses it.
Hidden temporaries (``.shard-…``, ``.plan.json.…``, ``.metadata.json.…``) that a killed writer
leaves are deleted once the file they were meant for exists, and all of them once the set is
published.

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

Integrity. A rerun of the job never trusts ``metadata.json`` alone: :func:`build_mask_set` checks
every shard's size and SHA-256 first, deletes the damaged ones (and ``metadata.json``), computes
them again and publishes the set anew. (Readers check sizes and row counts:
:mod:`mgfa_ray.masks.reader`.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mgfa_ray.config import MasksConfig
from mgfa_ray.data.images import ImageError
from mgfa_ray.data.regions import LabelError, check_voc_sizes, label_layout_hint
from mgfa_ray.errors import InputError, StageError
from mgfa_ray.masks.format import (
    CURRENT,
    METADATA,
    PLAN,
    SCHEMA_VERSION,
    SHARD_SCHEMA,
    STATS_KEY,
    mask_set_id,
    read_json,
    shard_name,
    shard_records_problem,
)
from mgfa_ray.masks.sources import BoxSource, DetectorBoxes, LabelBoxes, MaskComputer
from mgfa_ray.runtime import configure, ensure_ray
from mgfa_ray.storage import create_once, fs_exists, fs_list, fs_read, fs_write_atomic, location_join, resolve_location

log = logging.getLogger(__name__)

#: Times Ray restarts a mask actor that died (killed, out of memory, its node lost); its shards are
#: retried each time. One more death fails the call (a rerun resumes). Ray Data's default (-1)
#: would restart an actor that a shard crashes every time forever.
ACTOR_RESTARTS = 5


def _shard_stats(table: pd.DataFrame, num_classes: int, resolution: int) -> dict:
    """The footer statistics of a shard's rows (:data:`~mgfa_ray.masks.format.STATS_KEY`)."""
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
    """The Parquet file of a shard's rows, its statistics in the footer."""
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


#: Name prefixes of the hidden temporaries written beside a set's files
#: (:func:`mgfa_ray.storage.temporary_name`: ``.<name>.<hex>.tmp``).
_TEMPORARIES = (f".{PLAN}.", f".{METADATA}.", ".shard-")


def _clean_temporaries(fs, set_dir: str, *, published: bool) -> None:
    """Delete hidden temporaries in ``set_dir``: those whose file exists (a killed writer's, or a
    concurrent writer's copy of a file that exists, which :func:`~mgfa_ray.storage.create_once`
    tolerates), or every one once the set is ``published`` (all its files exist then)."""
    names = fs_list(fs, set_dir)
    present = [n for n in names if not n.startswith(".")]
    for name in names:
        if name.startswith(_TEMPORARIES) and (published or any(name.startswith(f".{p}.") for p in present)):
            try:
                fs.delete_file(f"{set_dir}/{name}")
            except FileNotFoundError:  # another writer removed or renamed it first
                pass


def _plan(fs, set_dir: str, *, set_id: str, n_rows: int, rows_per_shard: int) -> dict:
    """The set's sharding: the stored plan when the set was started before (or is being started by
    a concurrent writer: the first plan written wins), else a new one."""
    path = f"{set_dir}/{PLAN}"
    new = {"schema_version": SCHEMA_VERSION, "set_id": set_id, "n_rows": n_rows, "rows_per_shard": rows_per_shard,
           "n_shards": max(1, math.ceil(n_rows / rows_per_shard))}
    plan = read_json(fs, path)
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

    Checks each listed shard's presence, size and SHA-256 (``shard_bytes``, ``shard_sha256``); a
    ``metadata.json`` without those records (:func:`~mgfa_ray.masks.format.shard_records_problem`)
    is itself damaged (``{"metadata.json": why}``). Reads every shard once.
    """
    problem = shard_records_problem(meta)
    if problem:
        return {METADATA: problem}
    sizes, sums = meta["shard_bytes"], meta["shard_sha256"]
    damaged = {}
    for name in sorted(meta["rows_per_shard"]):
        path = f"{set_dir}/{name}"
        if not fs_exists(fs, path):
            damaged[name] = "missing"
            continue
        data = fs_read(fs, path)
        if len(data) != sizes[name]:
            damaged[name] = f"{len(data)} bytes, metadata.json records {sizes[name]}"
        elif hashlib.sha256(data).hexdigest() != sums[name]:
            damaged[name] = "its SHA-256 differs from the one metadata.json records"
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
        manifest: Manifest table (columns of :mod:`mgfa_ray.data.manifest`).
        manifest_hash: :func:`mgfa_ray.data.manifest.manifest_hash` of it.
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
            matching any image (:func:`mgfa_ray.data.regions.label_layout_hint`), a VOC ``<size>``
            unlike its photo (:func:`mgfa_ray.data.regions.check_voc_sizes`).
        RuntimeError: The shards do not hold exactly one row per manifest image; the Ray Data job
            failed (a task raised, or an actor died more than ``ACTOR_RESTARTS`` times); a
            concurrent writer of the set wrote a shard with other content. Finished shards are
            kept; a rerun resumes.
    """
    identity = source.identity()
    set_id = mask_set_id(source_identity=identity, manifest_hash=manifest_hash, region_classes=region_classes,
                         cfg=cfg)
    set_location = location_join(location, set_id)
    fs, set_dir = resolve_location(set_location)
    if fs_exists(fs, f"{set_dir}/{METADATA}") and _intact(fs, set_dir, set_location):
        log.info("mask set %s is complete; skipping", set_location)
        return set_location
    parts = _start(fs, set_dir, _mask_rows(manifest, source), set_id=set_id, cfg=cfg)
    pending = _pending_shards(fs, set_dir, parts)
    log.info("mask set %s: %d of %d shards to compute", set_id, len(pending), len(parts))
    writer = {"source": source, "set_location": set_location, "num_classes": len(region_classes),
              "resolution": cfg.resolution, "corrupt_images": cfg.corrupt_images}
    results = _compute_shards(pending, parts, writer=writer, cfg=cfg, executor=executor)
    _raise_if_corrupt(results, fs=fs, set_dir=set_dir, set_location=set_location, cfg=cfg)
    return _publish(fs, set_dir, set_location, parts=parts, metadata={
        "set_id": set_id, **_source_metadata(source, identity), "manifest_hash": manifest_hash,
        "manifest": manifest_path, "mask_resolution": cfg.resolution, "region_classes": list(region_classes),
        "corrupt_images": cfg.corrupt_images,
    })


def _start(fs, set_dir: str, rows: pd.DataFrame, *, set_id: str, cfg: MasksConfig) -> dict[int, pd.DataFrame]:
    """Open the set for writing: its folder created, temporaries whose file exists deleted, its plan
    read or written (:func:`_plan`). Returns the planned shards, ``{index: manifest rows}``."""
    fs.create_dir(set_dir, recursive=True)
    _clean_temporaries(fs, set_dir, published=False)
    plan = _plan(fs, set_dir, set_id=set_id, n_rows=len(rows), rows_per_shard=cfg.rows_per_shard)
    step = plan["rows_per_shard"]
    return {i: rows.iloc[i * step : (i + 1) * step] for i in range(plan["n_shards"])}


def _source_metadata(source: BoxSource, identity: dict) -> dict:
    """The ``metadata.json`` fields of the box source (:mod:`mgfa_ray.masks.format`); ``identity`` is
    ``source.identity()``, computed once (for label files it hashes every file)."""
    return {"source": source.kind, "detector_key": source.box_source,
            "detector_weights_digest": identity.get("weights_digest"), "imgsz": identity.get("imgsz"),
            "conf": identity.get("conf")}


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

    ensure_ray()  # not Ray Data's own start, which would add the dashboard
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


def write_current_set(root: str, set_id: str) -> None:
    """Record ``<root>/<set_id>`` as the current set of the mask directory ``root`` (a path or URI):
    ``<root>/CURRENT`` holds the set id (written atomically), so a config can name the root, e.g.
    ``outputs/leafsnap20/masks``, and read on any machine the set the job built there — whose id
    depends on that machine's detector."""
    fs, root_path = resolve_location(root)
    fs_write_atomic(fs, location_join(root_path, CURRENT), f"{set_id}\n".encode())
