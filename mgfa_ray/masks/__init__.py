"""Stage 4 — ground-truth region masks precomputed into a mask set of Parquet shards.

The stage is four modules, and this package gathers their public names (what the pipeline, the
trials, the tools and the tests import):

* :mod:`mgfa_ray.masks.sources` — where region boxes come from (:class:`DetectorBoxes`, the trained
  detector; :class:`LabelBoxes`, existing label files); :class:`MaskComputer`, the pure core
  (manifest rows → shard rows, no Ray involved; photos decoded by :mod:`mgfa_ray.data.images`,
  boxes rasterised by :func:`mgfa_ray.data.regions.rasterize`);
* :mod:`mgfa_ray.masks.writer` — :func:`build_mask_set`: the write-once shard protocol (plan,
  finished and damaged shards, concurrent writers, publishing ``metadata.json``) and the Ray Data
  actor pool of :class:`ShardWriter`; :func:`write_current_set`;
* :mod:`mgfa_ray.masks.reader` — :func:`read_metadata`, :func:`read_rows`, :func:`read_masks`,
  :func:`resolve_mask_set`, each checking what it reads;

and :mod:`mgfa_ray.masks.format`, the on-disk format both sides share (directory layout, shard
schema, ``metadata.json``, set id). Files are published through :mod:`mgfa_ray.storage`
(temporary, fsync, then a link that fails when the name exists), on a local or NFS directory or an
object store.
"""

from mgfa_ray.masks.format import (
    CURRENT,
    METADATA,
    PLAN,
    RECIPE_VERSION,
    SCHEMA_VERSION,
    SHARD_SCHEMA,
    STATS_KEY,
    MaskSetError,
    mask_set_id,
    shard_name,
)
from mgfa_ray.masks.reader import read_masks, read_metadata, read_rows, resolve_mask_set
from mgfa_ray.masks.sources import BoxSource, DetectorBoxes, LabelBoxes, MaskComputer, mask_rows
from mgfa_ray.masks.writer import ACTOR_RESTARTS, ShardWriter, build_mask_set, summarize, write_current_set

__all__ = [
    "ACTOR_RESTARTS", "CURRENT", "METADATA", "PLAN", "RECIPE_VERSION", "SCHEMA_VERSION", "SHARD_SCHEMA", "STATS_KEY",
    "BoxSource", "DetectorBoxes", "LabelBoxes", "MaskComputer", "MaskSetError", "ShardWriter", "build_mask_set",
    "mask_rows", "mask_set_id", "read_masks", "read_metadata", "read_rows",
    "resolve_mask_set", "shard_name", "summarize", "write_current_set",
]
