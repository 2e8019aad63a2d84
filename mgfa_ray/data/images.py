"""Image files: what a file is (magic bytes), whether it decodes, its upright size, and decoding it to
RGB pixels. One owner for every read of a photo's pixels: the EXIF orientation is applied everywhere
(the manifest check, the VOC size check, the detector's masks, the trial and the figures see the
same upright photo, as Ultralytics does).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from mgfa_ray.errors import UserError


class ImageError(UserError, ValueError):
    """Manifest images that cannot be read or decoded; the message names every file (up to a
    few) and says what to do."""


#: First bytes of the formats the manifest takes (JPEG, PNG, BMP).
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM")


def sniff_bytes(head: bytes) -> str | None:
    """Why a file starting with ``head`` (its first 8 bytes or more) is not a JPEG, PNG or BMP
    image, judged without Pillow (so no plugin is looked for), or ``None`` when it may be one."""
    if not head:
        return "empty file (0 bytes)"
    if not head.startswith(_MAGIC):
        return f"not a JPEG, PNG or BMP image (it starts with {head[:8]!r})"
    return None


def sniff_image(path: str | Path) -> str | None:
    """:func:`sniff_bytes` of the file at ``path`` (reads 8 bytes), or why it cannot be read."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    return sniff_bytes(head)


#: EXIF orientations (tag 0x0112) whose upright view swaps the stored width and height.
_SIDEWAYS = (5, 6, 7, 8)


def upright_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) of an opened image as it is shown: the stored size, swapped when its EXIF
    orientation turns it by 90° (:func:`mgfa_ray.data.images.decode_rgb` decodes that view).
    Reads the header only."""
    w, h = img.size
    return (h, w) if img.getexif().get(0x0112) in _SIDEWAYS else (w, h)


def image_problem(path: str | Path) -> str | None:
    """Why the image at ``path`` cannot be used, from its first bytes and its header (Pillow reads
    the header, not the pixels: a file cut short in its pixel data passes here and fails when
    decoded), or ``None``."""
    reason = sniff_image(path)
    if reason is not None:
        return reason
    try:
        with Image.open(path) as img:
            img.size  # noqa: B018 - the header is parsed on open
    except Exception as err:  # noqa: BLE001 - any failure to parse this file is the file's
        return f"{type(err).__name__}: {err}"
    return None


def decode_rgb(path: str, *, max_side: int | None = None) -> np.ndarray:
    """Decode an image file to an (H, W, 3) uint8 RGB array (Pillow), turned upright by its EXIF
    orientation tag (``PIL.ImageOps.exif_transpose``; a phone photo stores its pixels sideways
    with tag 6 or 8, and every viewer, OpenCV's ``imread`` and so Ultralytics' loader show it
    upright). This is the project's one decoder: region labels, detector inference, masks, trials,
    class activation maps and figures all see the upright view, whose width and height normalised
    boxes refer to.

    Args:
        path: Image file.
        max_side: If given, let the JPEG decoder shrink by a power of two while both sides stay
            >= ``max_side`` (``PIL.Image.draft``); normalised boxes are unaffected.

    Raises:
        ValueError: The file is missing or unreadable, empty, not a JPEG/PNG/BMP file by its first
            bytes (:func:`mgfa_ray.data.images.sniff_bytes`, checked before Pillow so that no plugin
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
            upright = ImageOps.exif_transpose(img)  # a copy when turned, else img itself
            return np.asarray(upright.convert("RGB"))
    except Exception as err:  # noqa: BLE001 - the decode boundary: whatever fails here is this file
        raise ImageError(f"cannot decode image {path}: {type(err).__name__}: {err}") from None
