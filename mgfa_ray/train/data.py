"""A trial's data: images decoded once (EXIF-upright, optionally cropped to a region's box, resized
to ``resize`` x ``resize``, kept as uint8 and cached on disk when a cache directory is given), the
ground-truth masks at their stored resolution (cropped the same way), the vein line targets and the
labels, kept per worker process in :data:`mgfa_ray.cache.TRIAL_DATA`.
"""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

from mgfa_ray.cache import TRIAL_DATA
from mgfa_ray.config import TrainConfig
from mgfa_ray.data.images import decode_rgb
from mgfa_ray.data.manifest import read_manifest
from mgfa_ray.errors import InputError
from mgfa_ray.masks import read_masks, read_metadata, read_rows
from mgfa_ray.storage import atomic_write_bytes, is_uri, sha256_json
from mgfa_ray.train.targets import best_boxes, jitter_offsets, line_masks, to_window


def load_images(
    paths: list[str], *, size: int, cache_dir: Path | None = None, boxes: np.ndarray | None = None
) -> torch.Tensor:
    """Decode, optionally crop, and resize images once, optionally through an on-disk cache.

    Args:
        paths: Image files.
        size: Output side in pixels (aspect ratio is not kept, as with a square resize).
        cache_dir: Directory for a ``.npy`` cache keyed by (paths, size, boxes); ``None`` disables it.
        boxes: Optional float (N, 4) crop boxes ``(x0, y0, x1, y1)``, normalised to [0, 1] by the
            image's width and height (:func:`region_boxes`); each image is cut to its box first.

    Returns:
        uint8 tensor (N, 3, size, size).

    Raises:
        ValueError: An image cannot be decoded (the message names the file).
    """
    cache = None
    if cache_dir is not None:
        key = sha256_json([paths, None if boxes is None else np.round(boxes, 6).tolist()])[:16]
        cache = Path(cache_dir) / f"images-{size}-{key}.npy"
        if cache.is_file():
            return torch.from_numpy(np.load(cache))
    out = np.empty((len(paths), 3, size, size), dtype=np.uint8)
    for i, path in enumerate(paths):
        if boxes is None:
            rgb = Image.fromarray(decode_rgb(path, max_side=size))
        else:  # decode at least fine enough that the box still has `size` pixels a side
            x0, y0, x1, y1 = boxes[i]
            rgb = Image.fromarray(decode_rgb(path, max_side=math.ceil(size / max(1e-3, min(x1 - x0, y1 - y0)))))
            w, h = rgb.size
            rgb = rgb.crop((round(x0 * w), round(y0 * h), max(round(x1 * w), round(x0 * w) + 1),
                            max(round(y1 * h), round(y0 * h) + 1)))
        out[i] = np.asarray(rgb.resize((size, size), Image.Resampling.BILINEAR)).transpose(2, 0, 1)
    if cache is not None:
        buf = io.BytesIO()
        np.save(buf, out)
        atomic_write_bytes(cache, buf.getvalue())
    return torch.from_numpy(out)


def region_boxes(boxes: list, *, region: int, margin: float, jitter: float = 0.0,
                 offsets: np.ndarray | None = None) -> np.ndarray:
    """The crop box of one region class in each image: its most confident box (a detector may also
    fire elsewhere, e.g. on a colour chart), widened by ``margin`` x its width / height on each side,
    optionally moved, and clipped to the image.

    Args:
        boxes: Per image, its boxes ``[region_class, cx, cy, w, h, conf]`` normalised to [0, 1]
            (the mask set's ``boxes`` column, :mod:`mgfa_ray.masks`).
        region: The region class k.
        margin: Fraction of the box's width / height added on each side, >= 0.
        jitter: Fraction of the margin by which the window moves, in [0, 1] (``crop_jitter``): the
            box stays inside its window.
        offsets: float (N, 2) in [-1, 1], each image's move as a fraction of ``jitter`` x margin
            (:func:`mgfa_ray.train.targets.jitter_offsets`); needed when ``jitter`` > 0.

    Returns:
        float64 (N, 4) boxes ``(x0, y0, x1, y1)`` normalised to [0, 1]; ``(0, 0, 1, 1)`` (the whole
        image) where the image has no box of that kind.

    Raises:
        ValueError: ``jitter`` > 0 without ``offsets`` of shape (N, 2).
    """
    best = best_boxes(boxes, region=region)
    shift = np.zeros((len(boxes), 2))
    if jitter > 0:
        if offsets is None or np.shape(offsets) != (len(boxes), 2):
            raise ValueError(f"jitter {jitter} needs offsets of shape ({len(boxes)}, 2)")
        shift = np.asarray(offsets) * jitter * margin * best[:, 2:4]
    out = np.tile(np.array([0.0, 0.0, 1.0, 1.0]), (len(boxes), 1))
    for i, (cx, cy, w, h) in enumerate(best):
        if np.isnan(cx):
            continue
        cx, cy = cx + shift[i, 0], cy + shift[i, 1]
        dx, dy = (0.5 + margin) * w, (0.5 + margin) * h
        out[i] = [max(0.0, cx - dx), max(0.0, cy - dy), min(1.0, cx + dx), min(1.0, cy + dy)]
    return out


def crop_masks(masks: np.ndarray, boxes: np.ndarray, *, upsample: int = 8) -> np.ndarray:
    """Cut each image's masks to its box and resample them to the stored resolution — the crop
    :func:`load_images` gives the image — as area coverage: each mask is upsampled ``upsample``
    times (nearest), cut at the box rounded to that finer grid, and average-pooled back to R x R.

    Args:
        masks: (N, K, R, R) masks in [0, 1].
        boxes: float (N, 4) normalised boxes ``(x0, y0, x1, y1)``.
        upsample: Sub-pixel steps per mask pixel for the box edges.

    Returns:
        float32 (N, K, R, R) in [0, 1]: the fraction of each new pixel the region covers.
    """
    n, _, r, _ = masks.shape
    fine = r * upsample
    out = np.empty(masks.shape, dtype=np.float32)
    for i in range(n):
        x0, y0, x1, y1 = (int(round(v * fine)) for v in boxes[i])
        m = F.interpolate(torch.from_numpy(np.ascontiguousarray(masks[i : i + 1])).float(), scale_factor=upsample,
                          mode="nearest")
        window = m[..., y0 : max(y1, y0 + 1), x0 : max(x1, x0 + 1)]
        out[i] = F.adaptive_avg_pool2d(window, r)[0].numpy()
    return out


def crop_boxes(cfg: TrainConfig, image_ids: list[str]) -> np.ndarray:
    """The ``crop_to_region`` boxes of ``image_ids`` from ``cfg``'s mask set (:func:`region_boxes`),
    moved by ``cfg.crop_jitter`` (:func:`mgfa_ray.train.targets.jitter_offsets`).

    Returns:
        float64 (N, 4) normalised ``(x0, y0, x1, y1)``, aligned with ``image_ids``.

    Raises:
        ValueError: ``cfg.crop_to_region`` is not set (there is no region to crop to).
    """
    if cfg.crop_to_region is None:
        raise ValueError("crop_boxes needs a config with crop_to_region set")
    rows = read_rows(cfg.masks, columns=["image_id", "boxes"]).set_index("image_id")
    return region_boxes(rows.loc[image_ids, "boxes"].tolist(), region=cfg.region_classes.index(cfg.crop_to_region),
                        margin=cfg.crop_margin, jitter=cfg.crop_jitter, offsets=jitter_offsets(image_ids))


def line_targets(cfg: TrainConfig, masks: np.ndarray, images: np.ndarray, *, image_ids: list[str],
                 windows: np.ndarray | None) -> np.ndarray:
    """Replace the masks of ``cfg.line_regions`` by line targets (:func:`mgfa_ray.train.targets.line_masks`).

    Args:
        masks: (N, K, R, R) masks in [0, 1], in the frame of ``images``.
        images: uint8 (N, 3, S, S), the images as the trial sees them (cropped, resized).
        image_ids: The images' ids, aligned with ``masks``.
        windows: float (N, 4) crop windows ``(x0, y0, x1, y1)`` of :func:`crop_boxes`; ``None``: the
            whole photo.

    Returns:
        float32 (N, K, R, R) in [0, 1]; the other kinds' masks unchanged.
    """
    rows = read_rows(cfg.masks, columns=["image_id", "boxes"]).set_index("image_id")
    photo_boxes = rows.loc[image_ids, "boxes"].tolist()
    if windows is None:
        windows = np.tile(np.array([0.0, 0.0, 1.0, 1.0]), (len(image_ids), 1))
    out = masks.astype(np.float32, copy=True)
    for kind in cfg.line_regions:
        k = cfg.region_classes.index(kind)
        boxes = to_window(best_boxes(photo_boxes, region=k), windows)
        out[:, k] = line_masks(images, boxes, width=cfg.line_width, resolution=masks.shape[-1])
    return out


def load_trial_data(
    cfg: TrainConfig, *, device: torch.device, cache_dir: Path | None = None
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]], list[str]]:
    """The trial's images, masks and labels per split, on ``device``.

    Reads the manifest and the mask set, crops photos and masks to ``cfg.crop_to_region``'s box
    when set (:func:`crop_boxes`, :func:`crop_masks`), and decodes the images once
    (:func:`load_images`). The decoded data stay in this process's memory (on the CPU) while the
    next trial asks for the same (:func:`trial_data_key`): a reused trial worker only copies them
    to the device again.

    Returns:
        ``(data, class_names)``: ``data[part] = (images uint8 (N, 3, R, R), masks (N, K, M, M) in
        [0, 1], labels int64 (N,))`` for the parts ``train``, ``eval`` (``cfg.eval_split``) and
        ``test`` (when the eval split is not the test split and the manifest has one);
        ``class_names[label]``. On the CPU the tensors are the kept ones: do not modify them.

    Raises:
        ValueError: The manifest or mask set is missing or does not fit the config, or the train
            or evaluation split is empty.
    """
    parts, class_names = TRIAL_DATA.get(trial_data_key(cfg, cache_dir), lambda: decode_trial_data(cfg, cache_dir))
    data = {name: tuple(t.to(device) for t in tensors) for name, tensors in parts.items()}
    return data, class_names


def trial_data_key(cfg: TrainConfig, cache_dir: Path | None) -> str | None:
    """What the decoded data of ``cfg`` depend on: the manifest file (path, size, modification
    time), the mask set (its location and ``metadata.json``) and the config fields that select,
    crop and resize. ``None`` (do not keep) when the manifest is not a local file."""
    from mgfa_ray.masks import resolve_mask_set

    manifest = Path(cfg.manifest)
    if is_uri(cfg.manifest) or not manifest.is_file():
        return None
    st = manifest.stat()
    return sha256_json([str(manifest.resolve()), st.st_size, st.st_mtime_ns, resolve_mask_set(cfg.masks),
                        read_metadata(cfg.masks), cfg.region_classes, cfg.crop_to_region, cfg.crop_margin,
                        cfg.crop_jitter, cfg.line_regions, cfg.line_width, cfg.resize, cfg.eval_split,
                        str(cache_dir)])


def decode_trial_data(cfg: TrainConfig, cache_dir: Path | None):
    """Decode a trial's data from its manifest and mask set (no per-process cache: see
    :func:`load_trial_data`): images (cropped and resized as ``cfg`` says, cached under ``cache_dir``),
    ground-truth masks and labels per part (train, eval, test), and the class names.

    Raises:
        InputError: The train or eval split is empty (images the mask set records as corrupt are left
            out with a warning).
    """
    manifest = read_manifest(cfg.manifest)
    corrupt = set(read_metadata(cfg.masks).get("corrupt") or [])  # masks.corrupt_images: record
    if corrupt:
        warnings.warn(f"mask set {cfg.masks}: {len(corrupt)} image(s) recorded as corrupt are left out: "
                      f"{sorted(corrupt)[:5]}", stacklevel=2)
        manifest = manifest[~manifest["image_id"].isin(corrupt)]
    num_classes = int(manifest["label"].max()) + 1
    class_names = manifest.drop_duplicates("label").set_index("label")["class_name"].reindex(range(num_classes))
    parts = {"train": manifest[manifest["split"] == "train"], "eval": manifest[manifest["split"] == cfg.eval_split]}
    if cfg.eval_split != "test" and (manifest["split"] == "test").any():
        parts["test"] = manifest[manifest["split"] == "test"]
    for name in ("train", "eval"):
        if parts[name].empty:
            split = "train" if name == "train" else cfg.eval_split
            raise InputError(f"manifest {cfg.manifest}: split {split!r} is empty")
    used = pd.concat(list(parts.values()), ignore_index=True)  # disjoint splits: each image once
    masks, _ = read_masks(cfg.masks, image_ids=used["image_id"].tolist(), region_classes=cfg.region_classes,
                          labels=used["label"].tolist())
    boxes = None
    if cfg.crop_to_region is not None:
        boxes = crop_boxes(cfg, used["image_id"].tolist())
        masks = crop_masks(masks, boxes)
    images = load_images(used["path"].tolist(), size=cfg.resize, cache_dir=cache_dir, boxes=boxes)
    if cfg.line_regions:
        masks = line_targets(cfg, masks, images.numpy(), image_ids=used["image_id"].tolist(), windows=boxes)
    row_of = {image_id: n for n, image_id in enumerate(used["image_id"])}
    data = {}
    for name, df in parts.items():
        rows = torch.tensor([row_of[i] for i in df["image_id"]], dtype=torch.int64)
        data[name] = (images[rows], torch.from_numpy(masks[rows.numpy()]),
                      torch.tensor(df["label"].to_numpy(dtype="int64")))
    return data, class_names.tolist()
