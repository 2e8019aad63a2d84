"""The trial's ground-truth mask shapes beyond the paper's boxes: a moved crop window and line targets.

Two faults of a proxy whose attention cannot be told from a fixed map (issue 29):

* **A region in the same place in every crop.** Cropping every photo to its leaf box plus a margin
  puts the leaf in the same central block of every crop, so the mean training target (the position
  prior of :mod:`mgfa_ray.train.mask_fit`) is almost every target. :func:`jitter_offsets` gives each
  image a fixed draw that moves its crop window (``crop_jitter``, :func:`mgfa_ray.train.data.region_boxes`),
  so the region lands in a different place per image and only a map that looks at the image can
  follow it.
* **A box that is not the region.** An axis-aligned box around a diagonal midrib covers the blade
  on both sides. :func:`line_masks` draws the box's diagonal instead — the one the dark (leaf)
  pixels in the box run along (:func:`line_direction`) — as a band of fixed width
  (``line_regions``, ``line_width``). The direction is a heuristic on a light background (lab
  photos of leaves on a light table); the band is a target shape, not a vein detector.

Everything here is pure numpy and deterministic: the same image id, box and pixels give the same
target in every run, process and worker.
"""

from __future__ import annotations

import hashlib

import numpy as np


def jitter_offsets(image_ids: list[str]) -> np.ndarray:
    """A fixed draw per image of where its crop window moves.

    Args:
        image_ids: The images' manifest ids.

    Returns:
        float64 (N, 2) offsets ``(dx, dy)`` in [-1, 1], uniform, from the SHA-256 of each id: the
        same for an id in every run and process, independent of the other ids.
    """
    out = np.empty((len(image_ids), 2))
    for i, image_id in enumerate(image_ids):
        digest = hashlib.sha256(f"crop-jitter:{image_id}".encode()).digest()
        out[i] = [int.from_bytes(digest[k : k + 8], "big") / 2.0**64 * 2.0 - 1.0 for k in (0, 8)]
    return out


def best_boxes(boxes: list, *, region: int) -> np.ndarray:
    """The most confident box of one region class in each image.

    Args:
        boxes: Per image, its boxes ``[region_class, cx, cy, w, h, conf]`` normalised to [0, 1]
            (the mask set's ``boxes`` column, :mod:`mgfa_ray.masks`).
        region: The region class k.

    Returns:
        float64 (N, 4) ``(cx, cy, w, h)`` normalised to [0, 1]; NaN where the image has no box of
        that kind.
    """
    out = np.full((len(boxes), 4), np.nan)
    for i, image_boxes in enumerate(boxes):
        kind = [b for b in image_boxes if int(b[0]) == region]
        if kind:
            out[i] = max(kind, key=lambda b: b[5])[1:5]
    return out


def to_window(boxes: np.ndarray, windows: np.ndarray) -> np.ndarray:
    """Boxes ``(cx, cy, w, h)`` in photo coordinates as ``(x0, y0, x1, y1)`` in the coordinates of
    each image's crop window ``(x0, y0, x1, y1)`` (both normalised to [0, 1]). float64 (N, 4);
    NaN rows stay NaN."""
    x0, y0 = boxes[:, 0] - boxes[:, 2] / 2, boxes[:, 1] - boxes[:, 3] / 2
    x1, y1 = boxes[:, 0] + boxes[:, 2] / 2, boxes[:, 1] + boxes[:, 3] / 2
    ww, wh = windows[:, 2] - windows[:, 0], windows[:, 3] - windows[:, 1]
    return np.stack([(x0 - windows[:, 0]) / ww, (y0 - windows[:, 1]) / wh,
                     (x1 - windows[:, 0]) / ww, (y1 - windows[:, 1]) / wh], axis=1)


def line_direction(gray: np.ndarray) -> int:
    """Which diagonal of a box the dark pixels in it run along.

    Dark pixels are those below the midpoint of the box's 10th and 90th luminance percentiles (a
    leaf on a light background); the sign of the correlation of their x and y coordinates, each
    scaled by the box's side, picks the diagonal.

    Args:
        gray: float or uint8 (H, W) luminance of the box's pixels, row index y top to bottom.

    Returns:
        ``1`` for top-left to bottom-right, ``-1`` for top-right to bottom-left; ``1`` when the
        box has no contrast or fewer than 2 rows or columns.
    """
    g = np.asarray(gray, dtype=np.float64)
    if g.ndim != 2 or min(g.shape) < 2:
        return 1
    lo, hi = np.percentile(g, 10), np.percentile(g, 90)
    if hi - lo <= 0:
        return 1
    ys, xs = np.nonzero(g < (lo + hi) / 2)
    xs, ys = xs / g.shape[1], ys / g.shape[0]
    cov = float(((xs - xs.mean()) * (ys - ys.mean())).mean()) if len(xs) else 0.0
    return 1 if cov >= 0 else -1


def line_mask(box: np.ndarray, *, direction: int, width: float, resolution: int, supersample: int = 4) -> np.ndarray:
    """A band along one diagonal of a box, as area coverage.

    Args:
        box: ``(x0, y0, x1, y1)`` normalised to the mask's frame (may reach outside [0, 1]).
        direction: ``1`` (top-left to bottom-right) or ``-1`` (top-right to bottom-left).
        width: Band width as a fraction of the mask side, > 0.
        resolution: R, the mask side in pixels.
        supersample: Sub-pixel samples per pixel side for the coverage.

    Returns:
        float32 (R, R) in [0, 1]: the fraction of each pixel within ``width / 2`` of the segment.

    Raises:
        ValueError: ``direction`` is not 1 or -1, or ``width`` is not positive.
    """
    if direction not in (1, -1):
        raise ValueError(f"direction must be 1 or -1, got {direction}")
    if not width > 0:
        raise ValueError(f"width must be > 0, got {width}")
    x0, y0, x1, y1 = (float(v) for v in box)
    a = np.array([x0, y0]) if direction == 1 else np.array([x1, y0])
    b = np.array([x1, y1]) if direction == 1 else np.array([x0, y1])
    n = resolution * supersample
    c = (np.arange(n) + 0.5) / n
    p = np.stack(np.meshgrid(c, c, indexing="xy"), axis=-1)  # (n, n, 2) as (x, y); row index y
    ab = b - a
    t = np.clip(((p - a) @ ab) / max(float(ab @ ab), 1e-12), 0.0, 1.0)
    dist = np.linalg.norm(p - (a + t[..., None] * ab), axis=-1)
    inside = (dist <= width / 2).astype(np.float32)
    return inside.reshape(resolution, supersample, resolution, supersample).mean(axis=(1, 3))


def line_masks(images: np.ndarray, boxes: np.ndarray, *, width: float, resolution: int) -> np.ndarray:
    """Line targets of one region class for a batch of (cropped, resized) images.

    Args:
        images: uint8 (N, 3, S, S) RGB, the images the masks belong to (:func:`mgfa_ray.train.data.load_images`).
        boxes: float (N, 4) ``(x0, y0, x1, y1)`` of the kind's box in each image's frame,
            normalised to [0, 1] (:func:`to_window`); a NaN row: no box.
        width: Band width as a fraction of the mask side.
        resolution: R, the mask side in pixels.

    Returns:
        float32 (N, R, R) in [0, 1]: :func:`line_mask` along the diagonal :func:`line_direction`
        picks from the image's pixels inside its box; all zero where there is no box.
    """
    n, _, s, _ = images.shape
    out = np.zeros((n, resolution, resolution), dtype=np.float32)
    gray = images.astype(np.float32).mean(axis=1)
    for i in range(n):
        if np.isnan(boxes[i]).any():
            continue
        x0, y0, x1, y1 = np.clip(boxes[i], 0.0, 1.0)
        px0, py0 = int(np.floor(x0 * s)), int(np.floor(y0 * s))
        px1, py1 = max(px0 + 1, int(np.ceil(x1 * s))), max(py0 + 1, int(np.ceil(y1 * s)))
        direction = line_direction(gray[i, py0:py1, px0:px1])
        out[i] = line_mask(boxes[i], direction=direction, width=width, resolution=resolution)
    return out
