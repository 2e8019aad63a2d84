"""A look at a mask set (paper Fig. 3): detected regions and masks over photos, and a summary.

* :func:`render_mask_png` — one figure: the photo with every box (coloured per region class,
  labelled with its confidence), then one panel per region class with its mask over the photo.
* :func:`mask_summary` — boxes per image and mask coverage per region class.
* :func:`render_mask_figures` — ``mgfa-ray masks show SET``: a sample of images → one PNG each, plus
  ``summary.json``.

Reads the set through :func:`mgfa_ray.masks.read_rows` (local path or object-store URI) and the
photos through the manifest; matplotlib Agg canvas, no pyplot state; no Ray.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from mgfa_ray.data.images import decode_rgb
from mgfa_ray.data.manifest import read_manifest, select_images
from mgfa_ray.errors import InputError
from mgfa_ray.masks import read_metadata, read_rows
from mgfa_ray.plots import figure_png
from mgfa_ray.storage import atomic_write_bytes, atomic_write_json, safe_stem


def render_mask_png(photo: np.ndarray, boxes: np.ndarray, masks: np.ndarray, *, region_names: Sequence[str],
                    title: str, overlay_alpha: float = 0.45, dpi: int = 100) -> bytes:
    """One figure as PNG bytes: the photo with its boxes, then each region class's mask over it.

    Args:
        photo: uint8 (H, W, 3) RGB image.
        boxes: float (N, 6) rows ``[region_class, cx, cy, w, h, conf]``, coordinates normalised to
            [0, 1] (the shard schema of :mod:`mgfa_ray.masks`); N may be 0.
        masks: uint8 (K, R, R) with values {0, 1}, covering the whole photo.
        region_names: K region class names.
        title: Figure title.
        overlay_alpha: Opacity of the masks over the photo, in [0, 1].
        dpi: Output resolution.

    Returns:
        The PNG file content.

    Raises:
        ValueError: ``region_names`` does not have K entries; ``boxes`` is not (N, 6); a box class
            outside [0, K).
    """
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    k = len(masks)
    if len(region_names) != k:
        raise ValueError(f"need {k} region names, got {list(region_names)}")
    boxes = np.asarray(boxes, dtype=float).reshape(-1, 6) if len(boxes) else np.zeros((0, 6))
    if len(boxes) and not ((boxes[:, 0] >= 0) & (boxes[:, 0] < k)).all():
        raise ValueError(f"box classes {sorted(set(boxes[:, 0].astype(int).tolist()))} outside [0, {k})")
    colours = [matplotlib.colormaps["tab10"](c % 10) for c in range(k)]
    h, w = photo.shape[:2]
    fig = Figure(figsize=(2.8 * (1 + k), 3.2), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 1 + k, squeeze=False)[0]
    axes[0].imshow(photo)
    for c, cx, cy, bw, bh, conf in boxes:
        colour = colours[int(c)]
        axes[0].add_patch(Rectangle(((cx - bw / 2) * w, (cy - bh / 2) * h), bw * w, bh * h, fill=False,
                                    edgecolor=colour, linewidth=1.5))
        axes[0].text((cx - bw / 2) * w, (cy - bh / 2) * h, f"{region_names[int(c)]} {conf:.2f}", fontsize=6,
                     color="white", backgroundcolor=colour, va="bottom")
    axes[0].set_title(f"{len(boxes)} box(es)", fontsize=9)
    for c, name in enumerate(region_names):
        overlay = np.zeros((*masks[c].shape, 4))
        overlay[masks[c] > 0] = (*colours[c][:3], overlay_alpha)
        axes[1 + c].imshow(photo)
        axes[1 + c].imshow(overlay, extent=(0, w, h, 0), interpolation="nearest")
        axes[1 + c].set_title(f"{name} mask ({100 * float(masks[c].mean()):.1f}% of image)", fontsize=9)
    return figure_png(fig, axes, title=title)


def mask_summary(location: str | Path) -> dict:
    """Boxes per image and mask coverage per region class of a complete mask set.

    Returns:
        The metadata's ``summary`` (:func:`mgfa_ray.masks.summarize`) plus ``boxes_per_image``
        ``{min, median, max}`` over all images, ``per_class[name]["mean_boxes_per_image"]``,
        and ``set_id``, ``source`` (``detector`` | ``labels``), ``box_source`` (the id of the
        detector, or ``labels-<hash>`` of the label files, the boxes came from; the metadata's
        ``detector_key``), ``mask_resolution``, ``rows``.

    Raises:
        ValueError: Not a complete mask set.
    """
    return _summary(read_metadata(location), read_rows(location, columns=["boxes"])["boxes"])


def _summary(meta: dict, boxes: pd.Series) -> dict:
    """:func:`mask_summary` from the set's metadata and its ``boxes`` column."""
    counts = np.array([len(b) for b in boxes])
    classes = np.concatenate([np.asarray([b[0] for b in bs], dtype=int) for bs in boxes] or [np.zeros(0, int)])
    summary = {"set_id": meta["set_id"], "source": meta["source"], "box_source": meta["detector_key"],
               "mask_resolution": meta["mask_resolution"], "rows": meta["rows"]}
    summary.update(meta["summary"])
    summary["boxes_per_image"] = {"min": int(counts.min()), "median": float(np.median(counts)),
                                  "max": int(counts.max())}
    per_class = {name: dict(stats) for name, stats in meta["summary"]["per_class"].items()}
    for c, name in enumerate(meta["region_classes"]):
        per_class[name]["mean_boxes_per_image"] = float((classes == c).sum() / max(len(boxes), 1))
    summary["per_class"] = per_class
    return summary


def render_mask_figures(
    location: str | Path,
    *,
    out_dir: str | Path | None = None,
    image_ids: Sequence[str] | None = None,
    split: str | None = None,
    count: int = 8,
    seed: int | None = 0,
    manifest: str | Path | None = None,
) -> tuple[list[Path], dict]:
    """``mgfa-ray masks show``: figures of detected regions and masks (paper Fig. 3) and a summary.

    Writes ``<out_dir>/<safe image id>.png`` per image and ``<out_dir>/summary.json``
    (:func:`mask_summary`), atomically.

    Args:
        location: Mask set location (directory or URI).
        out_dir: Output directory; default ``outputs/mask_figures/<set_id>``.
        image_ids: Image ids to draw; ``None`` draws a sample of ``count`` images.
        split: Sample from this split only (``None``: all splits).
        count: Sample size, >= 1.
        seed: Seed of the sample; ``None`` takes the first ``count`` images in image_id order.
        manifest: Manifest giving the photos' paths; default the one recorded in the set's
            metadata (the job's ``manifest.parquet``).

    Returns:
        ``(paths, summary)``: the PNG files in order, and the summary.

    Raises:
        ValueError: Not a complete mask set; no manifest recorded or given; unknown image ids;
            an empty split; an image that cannot be decoded.
    """
    meta = read_metadata(location)
    manifest = manifest if manifest is not None else meta.get("manifest")
    if manifest is None:
        raise InputError(f"mask set {location} records no manifest; pass one (--manifest)")
    chosen = select_images(read_manifest(manifest), image_ids=list(image_ids) if image_ids else None, split=split,
                           count=count, seed=seed, source=f"manifest {manifest}")
    rows = read_rows(location, columns=["image_id", "boxes", "masks", "error"]).set_index("image_id")
    missing = [i for i in chosen["image_id"] if i not in rows.index]
    if missing:
        raise InputError(f"mask set {location} has no row for {missing[:3]} (another manifest?)")
    k, r = len(meta["region_classes"]), int(meta["mask_resolution"])
    out = Path(out_dir) if out_dir is not None else Path("outputs") / "mask_figures" / meta["set_id"]
    written: list[Path] = []
    used: set[str] = set()
    for image_id, path in zip(chosen["image_id"], chosen["path"]):
        row = rows.loc[image_id]
        stem = safe_stem(image_id)
        if stem in used:  # two ids mapping to one name: keep both files
            stem = f"{stem}-{hashlib.sha256(image_id.encode()).hexdigest()[:8]}"
        used.add(stem)
        masks = np.frombuffer(row["masks"], np.uint8).reshape(k, r, r)
        boxes = np.array([list(b) for b in row["boxes"]], dtype=float).reshape(-1, 6)
        photo = decode_rgb(path, max_side=512) if pd.isna(row["error"]) else np.zeros((r, r, 3), np.uint8)
        title = f"{image_id}" + ("" if pd.isna(row["error"]) else f"\n{row['error']}")
        written.append(atomic_write_bytes(out / f"{stem}.png", render_mask_png(
            photo, boxes, masks, region_names=meta["region_classes"], title=title)))
    summary = _summary(meta, rows["boxes"])  # the rows already read, not a second pass over the set
    atomic_write_json(out / "summary.json", summary)
    return written, summary
