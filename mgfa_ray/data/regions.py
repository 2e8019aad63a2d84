"""Stage 2 — region labels: read and validate region box files (YOLO txt or Pascal VOC xml).

Two formats are read, one file per image:

* **YOLO txt** (:func:`parse_yolo_file`): one box per line, ``class cx cy w h``: an integer class
  id and the box centre, width and height normalised to [0, 1] by the image width and height.
* **Pascal VOC xml** (:func:`parse_voc_file`): ``<annotation>`` with the image ``<size>`` in pixels
  and one ``<object>`` per box, its class ``<name>`` and pixel ``<bndbox>`` (xmin, ymin, xmax,
  ymax); boxes are converted to the YOLO form as Ultralytics' VOC converter does.

:func:`parse_label_file` picks the parser by suffix and :func:`index_labels` finds both kinds
under a directory. Every defect is a :class:`LabelError` naming ``file:line``; boxes whose class
is outside the configured region classes either raise or are skipped with a warning, by policy
(the paper's Cotton labels contain three lines of class 16).
"""

from __future__ import annotations

import math
import os
import random
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from xml.parsers import expat

import numpy as np
import pandas as pd
from PIL import Image

from mgfa_ray.errors import UserError


class LabelError(UserError, ValueError):
    """A label file or line is invalid; the message starts with ``file:line`` (``file`` alone for
    whole-file problems such as an unsupported suffix)."""


@dataclass(frozen=True)
class Box:
    """One region box in normalised image coordinates.

    Attributes:
        cls: Region class index in [0, num_classes).
        cx, cy: Box centre, fractions of image width / height in [0, 1].
        w, h: Box width / height, fractions of image width / height in (0, 1].
        conf: Detector confidence in [0, 1]; 1.0 for hand-drawn boxes.
    """

    cls: int
    cx: float
    cy: float
    w: float
    h: float
    conf: float = 1.0


_SPLIT_SUFFIX = re.compile(r"_(train|test)$")

LABEL_SUFFIXES = (".txt", ".xml")
"""Label file suffixes: YOLO txt and Pascal VOC xml."""

_EDGE_TOL = 1e-9  # converted VOC coordinates this far outside [0, 1] are float noise and clipped


def parse_yolo_file(
    path: str | Path,
    *,
    num_classes: int,
    unknown_class: Literal["error", "skip"] = "error",
) -> list[Box]:
    """Parse and validate one YOLO txt label file.

    Args:
        path: The ``.txt`` file (UTF-8; a byte order mark at its start, as some Windows editors
            write, is ignored). An empty file means an image with no regions.
        num_classes: Number of region classes; valid ids are 0..num_classes-1.
        unknown_class: ``error`` raises on an id outside that range; ``skip`` drops the line and
            warns with file:line.

    Returns:
        The boxes in file order.

    Raises:
        LabelError: Wrong field count, a non-numeric field, a non-integer or negative class id, a
            coordinate outside [0, 1], a zero-size box, or (policy ``error``) an unknown class;
            the message names ``path:line``.
    """
    path = Path(path)
    boxes = []
    for lineno, raw in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):  # a BOM is dropped
        line = raw.strip()
        if not line:
            continue
        where = f"{path}:{lineno}"
        parts = line.split()
        if len(parts) != 5:
            raise LabelError(f"{where}: expected 5 fields 'class cx cy w h', got {len(parts)}: {line!r}")
        try:
            cls = int(parts[0])
        except ValueError:
            raise LabelError(f"{where}: class id must be an integer, got {parts[0]!r}") from None
        try:
            cx, cy, w, h = (float(v) for v in parts[1:])
        except ValueError:
            raise LabelError(f"{where}: coordinates must be numbers, got {parts[1:]}") from None
        if cls < 0 or cls >= num_classes:
            msg = f"{where}: unknown region class {cls}; allowed 0..{num_classes - 1}"
            if unknown_class == "skip":
                warnings.warn(msg + " (line skipped)", stacklevel=2)
                continue
            raise LabelError(msg)
        for name, v in (("cx", cx), ("cy", cy), ("w", w), ("h", h)):
            if not 0.0 <= v <= 1.0:
                raise LabelError(f"{where}: {name}={v} outside [0, 1] (coordinates are normalised)")
        if w == 0.0 or h == 0.0:
            raise LabelError(f"{where}: zero-size box (w={w}, h={h})")
        boxes.append(Box(cls, cx, cy, w, h))
    return boxes


def _check_classes(classes: list[str], unknown_class: str) -> None:
    if unknown_class not in ("error", "skip"):
        raise ValueError(f"unknown_class must be 'error' or 'skip', got {unknown_class!r}")
    if len(set(classes)) != len(classes):
        raise ValueError(f"region class names must be unique, got {classes}")


@dataclass
class _Element:
    """One element of an XML file: tag, the line of its start tag, its text and child elements."""

    tag: str
    line: int
    text: str = ""
    children: list[_Element] = field(default_factory=list)

    def find(self, tag: str) -> _Element | None:
        return next((c for c in self.children if c.tag == tag), None)


def _read_xml(path: Path) -> _Element:
    """The element tree of an XML file, each element with its line (expat; standard library only)."""
    parser = expat.ParserCreate()
    stack: list[_Element] = []
    roots: list[_Element] = []

    def start(tag: str, _attrs: dict) -> None:
        el = _Element(tag, parser.CurrentLineNumber)
        (stack[-1].children if stack else roots).append(el)
        stack.append(el)

    def end(_tag: str) -> None:
        stack.pop()

    def text(data: str) -> None:
        if stack:
            stack[-1].text += data

    parser.StartElementHandler, parser.EndElementHandler, parser.CharacterDataHandler = start, end, text
    try:
        with path.open("rb") as fh:
            parser.ParseFile(fh)
    except expat.ExpatError as e:
        where = f"{path}:{e.lineno}"
        raise LabelError(f"{where}: malformed XML: {expat.ErrorString(e.code)} (column {e.offset + 1})") from None
    return roots[0]


def _need(path: Path, parent: _Element, tag: str) -> _Element:
    el = parent.find(tag)
    if el is None:
        raise LabelError(f"{path}:{parent.line}: <{parent.tag}> has no <{tag}>")
    return el


def _number(path: Path, el: _Element, what: str) -> float:
    raw = el.text.strip()
    try:
        v = float(raw)
    except ValueError:
        v = math.nan
    if not math.isfinite(v):
        raise LabelError(f"{path}:{el.line}: {what} <{el.tag}> must be a number, got {raw!r}")
    return v


def _to_unit(v: float, name: str, where: str) -> float:
    """``v`` if in [0, 1]; clipped into it if at most 1e-9 outside (float noise); else an error."""
    if 0.0 <= v <= 1.0:
        return v
    if -_EDGE_TOL <= v <= 1.0 + _EDGE_TOL:
        return min(max(v, 0.0), 1.0)
    raise LabelError(
        f"{where}: converted {name}={v:.6g} outside [0, 1] (the VOC converter's 1-pixel offset moves the centre "
        "of a box this close to the image edge off the image)"
    )


def parse_voc_file(
    path: str | Path,
    *,
    classes: list[str],
    unknown_class: Literal["error", "skip"] = "error",
) -> list[Box]:
    """Parse and validate one Pascal VOC xml annotation file.

    The file is ``<annotation>`` with ``<size><width/><height/></size>`` (image size in pixels) and
    one ``<object>`` per box: ``<name>`` (the class name) and ``<bndbox>`` with ``xmin``, ``ymin``,
    ``xmax``, ``ymax`` in pixels. Other elements (``difficult``, ``truncated``, ``pose``, ...) are
    ignored, so every object is kept. Pixel boxes become normalised centre/size exactly as
    Ultralytics' VOC converter does (``convert_box`` in the download script of
    ``ultralytics/cfg/datasets/VOC.yaml``)::

        cx = ((xmin + xmax) / 2 - 1) / W    cy = ((ymin + ymax) / 2 - 1) / H
        w = (xmax - xmin) / W               h = (ymax - ymin) / H

    (the ``- 1`` is VOC's 1-based pixel numbering). Results within 1e-9 outside [0, 1] are clipped;
    anything further out is an error. Only the standard library's expat parser is used.

    Args:
        path: The ``.xml`` file. An annotation without ``<object>`` means an image with no regions.
        classes: Region class names; a box's class is the index of its ``<name>`` in this list
            (exact, case-sensitive match after stripping whitespace). Names must be unique.
        unknown_class: ``error`` raises on a name not in ``classes``; ``skip`` drops the object
            and warns (``UserWarning``) with file:line and the name.

    Returns:
        The boxes in file order, with ``cls`` in [0, len(classes)) and coordinates in [0, 1].

    Raises:
        LabelError: Malformed XML (the parser's line); a root other than ``<annotation>``; a
            missing ``<size>``, ``<width>`` or ``<height>``, or a non-positive or non-numeric one;
            an object without ``<name>`` (or an empty one), ``<bndbox>`` or one of its four
            coordinates; a non-numeric coordinate; a coordinate outside [0, W] / [0, H] (the box
            lies outside the image); ``xmin >= xmax`` or ``ymin >= ymax`` (zero-size box); a
            converted centre outside [0, 1]; or (policy ``error``) an unknown class name. The
            message starts with ``path:line`` of the offending element.
        ValueError: ``unknown_class`` is not ``error``/``skip``, or ``classes`` has duplicates.
    """
    path = Path(path)
    _check_classes(classes, unknown_class)
    root = _read_xml(path)
    if root.tag != "annotation":
        raise LabelError(f"{path}:{root.line}: root element must be <annotation>, got <{root.tag}>")
    dims = _voc_image_size(path, root)
    boxes = []
    for obj in (c for c in root.children if c.tag == "object"):
        box = _voc_box(path, obj, dims=dims, classes=classes, unknown_class=unknown_class)
        if box is not None:
            boxes.append(box)
    return boxes


def _voc_image_size(path: Path, root: _Element) -> dict[str, float]:
    """``{"width", "height"}`` of the image, in pixels, from the ``<size>`` of a VOC ``<annotation>``.

    Raises:
        LabelError: ``<size>``, ``<width>`` or ``<height>`` is missing, non-numeric or not positive.
    """
    size = _need(path, root, "size")
    dims = {}
    for tag in ("width", "height"):
        el = _need(path, size, tag)
        dims[tag] = _number(path, el, "image")
        if dims[tag] <= 0:
            raise LabelError(f"{path}:{el.line}: image <{tag}> must be positive, got {el.text.strip()!r}")
    return dims


def _voc_box(path: Path, obj: _Element, *, dims: dict[str, float], classes: list[str],
             unknown_class: Literal["error", "skip"]) -> Box | None:
    """One VOC ``<object>`` as a normalised :class:`Box` (conversion in :func:`parse_voc_file`);
    ``None`` when its class is unknown and ``unknown_class`` is ``skip`` (a ``UserWarning`` names
    file:line, attributed to the caller of :func:`parse_voc_file`).

    Raises:
        LabelError: As :func:`parse_voc_file`, for this object.
    """
    name_el = _need(path, obj, "name")
    name = name_el.text.strip()
    if not name:
        raise LabelError(f"{path}:{name_el.line}: <object> has an empty <name>")
    bnd = _need(path, obj, "bndbox")
    els = {k: _need(path, bnd, k) for k in ("xmin", "ymin", "xmax", "ymax")}
    xy = {k: _number(path, el, "box coordinate") for k, el in els.items()}
    if name not in classes:
        msg = f"{path}:{name_el.line}: unknown region class {name!r}; allowed {classes}"
        if unknown_class == "skip":
            warnings.warn(msg + " (object skipped)", stacklevel=3)  # the caller of parse_voc_file
            return None
        raise LabelError(msg)
    img_w, img_h = dims["width"], dims["height"]
    for k, limit, dim in (("xmin", img_w, "width"), ("xmax", img_w, "width"),
                          ("ymin", img_h, "height"), ("ymax", img_h, "height")):
        if not 0.0 <= xy[k] <= limit:
            raise LabelError(
                f"{path}:{els[k].line}: box lies outside the image: {k}={els[k].text.strip()} not in "
                f"[0, {dims[dim]:g}] (image {dim} in pixels)"
            )
    xmin, ymin, xmax, ymax = xy["xmin"], xy["ymin"], xy["xmax"], xy["ymax"]
    if xmin >= xmax or ymin >= ymax:
        raise LabelError(
            f"{path}:{bnd.line}: zero-size box (xmin={xmin:g}, xmax={xmax:g}, ymin={ymin:g}, ymax={ymax:g}); "
            "need xmin < xmax and ymin < ymax"
        )
    where = f"{path}:{bnd.line}"
    cx = _to_unit(((xmin + xmax) / 2.0 - 1.0) / img_w, "cx", where)
    cy = _to_unit(((ymin + ymax) / 2.0 - 1.0) / img_h, "cy", where)
    w = _to_unit((xmax - xmin) / img_w, "w", where)
    h = _to_unit((ymax - ymin) / img_h, "h", where)
    return Box(classes.index(name), cx, cy, w, h)


def parse_label_file(
    path: str | Path,
    *,
    classes: list[str],
    unknown_class: Literal["error", "skip"] = "error",
) -> list[Box]:
    """Parse one label file, YOLO txt or Pascal VOC xml, chosen by its suffix.

    Args:
        path: A ``.txt`` file (:func:`parse_yolo_file`, with ``num_classes=len(classes)``) or an
            ``.xml`` file (:func:`parse_voc_file`). Suffixes are matched exactly (lower case).
        classes: Region class names; YOLO ids index this list, VOC names are looked up in it.
        unknown_class: ``error`` or ``skip`` (warn and drop), for a class outside ``classes``.

    Returns:
        The boxes in file order, in normalised coordinates.

    Raises:
        LabelError: The suffix is neither ``.txt`` nor ``.xml`` (the message names the file and
            the allowed suffixes), or the parser rejects the file (``file:line``).
        ValueError: ``unknown_class`` is not ``error``/``skip``, or ``classes`` has duplicates.
    """
    path = Path(path)
    _check_classes(classes, unknown_class)
    if path.suffix == ".txt":
        return parse_yolo_file(path, num_classes=len(classes), unknown_class=unknown_class)
    if path.suffix == ".xml":
        return parse_voc_file(path, classes=classes, unknown_class=unknown_class)
    raise LabelError(
        f"{path}: unsupported label file suffix {path.suffix!r}; allowed .txt (YOLO) or .xml (Pascal VOC)"
    )


def index_labels(label_dir: str | Path) -> dict[str, Path]:
    """Map image_id → label file for every ``*.txt`` (YOLO) and ``*.xml`` (VOC) under ``label_dir``.

    The image_id is the file's path relative to ``label_dir`` without its suffix
    (``acer_campestre/ny1079-01-1``); a trailing ``_train``/``_test`` (the UFG release's naming,
    ``47_6_test.txt``) is dropped so ids match the manifest's ``47_6``. Other files (``.DS_Store``,
    images) are ignored.

    Args:
        label_dir: Directory searched recursively.

    Returns:
        image_id → label file, in sorted file-path order.

    Raises:
        LabelError: The directory does not exist or holds no label files, or two files give one
            image_id (``a.txt`` and ``a.xml``, or ``a.txt`` and ``a_train.txt``); the message
            names both files.
    """
    label_dir = Path(label_dir)
    if not label_dir.is_dir():
        raise LabelError(f"{label_dir}: label directory does not exist")
    files = sorted(f for suffix in LABEL_SUFFIXES for f in label_dir.rglob(f"*{suffix}") if f.is_file())
    out: dict[str, Path] = {}
    for f in files:
        rel = f.relative_to(label_dir).with_suffix("").as_posix()
        image_id = _SPLIT_SUFFIX.sub("", rel)
        if image_id in out:
            raise LabelError(f"{out[image_id]} and {f}: two label files for image {image_id!r}; keep one")
        out[image_id] = f
    if not out:
        raise LabelError(f"{label_dir}: no label files (.txt or .xml)")
    return out


def label_layout_hint(label_files: Mapping[str, str | Path], image_ids: list[str]) -> str | None:
    """When no label file's id is a manifest image_id: a message saying where the labels were
    looked for and which layout is expected (with a hint when they sit in one flat folder whose
    stems match the images'); ``None`` when some match.

    Args:
        label_files: image_id → label file (:func:`index_labels`).
        image_ids: The manifest's image_ids.
    """
    ids = set(image_ids)
    if any(i in ids for i in label_files) or not label_files or not ids:
        return None
    where = os.path.commonpath([str(Path(f).parent) for f in label_files.values()])
    label_id, image_id = sorted(label_files)[0], sorted(ids)[0]
    msg = (f"none of the {len(label_files)} label files under {where} belongs to a manifest image: a label "
           f"file's id is its path under the label directory without suffix (e.g. {label_id!r}), and the "
           f"manifest's ids are {'<class>/<stem>' if '/' in image_id else '<stem>'} (e.g. {image_id!r}); lay the "
           f"labels out as the images are: <labels>/{'<class>/' if '/' in image_id else ''}<stem>.txt (or .xml)")
    stems = {i.rsplit("/", 1)[-1]: i for i in ids}
    flat = [i for i in label_files if "/" not in i and i in stems]
    if flat:
        msg += (f". They sit in one flat folder: move each into a subfolder named after its class, "
                f"e.g. {label_files[flat[0]]} to {where}/{stems[flat[0]]}{Path(label_files[flat[0]]).suffix}")
    return msg


def check_voc_sizes(label_files: Mapping[str, str | Path], image_paths: Mapping[str, str]) -> None:
    """Check that each VOC label's ``<size>`` is the size of its photo (Pillow reads the header).

    VOC boxes are normalised by ``<size>``. Another aspect ratio than the photo's makes every
    box wrong: an error. The same aspect ratio (within 1%) at another scale is right when the
    photo was rescaled after annotation: a warning. YOLO files, images without a label and
    photos that cannot be read (the image check reports them) are skipped.

    Args:
        label_files: image_id → label file.
        image_paths: image_id → photo file.

    Raises:
        LabelError: A ``<size>`` of another aspect ratio than the photo; names the label file
            (``file:line``), the photo and both sizes.
    """
    from mgfa_ray.data.images import sniff_image, upright_size

    for image_id, label in label_files.items():
        label, photo = Path(label), image_paths.get(image_id)
        if label.suffix != ".xml" or photo is None or sniff_image(photo) is not None:
            continue
        try:
            with Image.open(photo) as im:
                w, h = upright_size(im)  # boxes are drawn on the photo as shown
        except Exception:  # noqa: BLE001, S112 - an unreadable photo is reported by the image check
            continue
        root = _read_xml(label)
        size = root.find("size")
        if root.tag != "annotation" or size is None:
            continue  # the parser reports it
        width, height = size.find("width"), size.find("height")
        if width is None or height is None:
            continue  # the parser reports it
        try:
            xw, xh = float(width.text), float(height.text)
        except ValueError:
            continue  # the parser reports it
        if (xw, xh) == (w, h) or min(xw, xh) <= 0:
            continue
        sizes = f"<size> {xw:g}x{xh:g}"
        if abs(xw / xh - w / h) <= 0.01 * w / h:
            warnings.warn(f"{label}:{size.line}: {sizes} differs from the photo {photo} ({w}x{h} pixels) at the "
                          f"same aspect ratio; boxes are normalised by <size>, right if the photo was rescaled "
                          f"after annotation", stacklevel=2)
            continue
        raise LabelError(
            f"{label}:{size.line}: {sizes} does not match the photo {photo} ({w}x{h} pixels); boxes normalised by a "
            f"wrong size are wrong: correct <width> and <height> to the photo's (swapped ones suggest a photo "
            f"rotated after annotation)"
        )


def select_annotated(
    label_files: dict[str, Path], manifest: pd.DataFrame, *, max_images: int | None, seed: int
) -> dict[str, Path]:
    """The label files the detector trains on: those of manifest images, optionally capped.

    With ``max_images`` (paper: 30 annotated Cotton80 images, 70 SoyLocal), a seeded draw of at
    most that many from the manifest's train split, so no test image is annotated; without it,
    every label file whose image is in the manifest.

    Args:
        label_files: image_id → label file, from :func:`index_labels`.
        manifest: The manifest (columns image_id, split).
        max_images: Cap on annotated images, or ``None``.
        seed: Seed of the draw.

    Returns:
        image_id → label file, sorted by image_id.

    Raises:
        LabelError: No label file belongs to a manifest image (the message says where the labels
            were looked for and the layout expected, :func:`label_layout_hint`); ``max_images``
            is set and no train-split image has a label file; a VOC ``<size>`` of another aspect
            ratio than its photo (:func:`check_voc_sizes`, when the manifest has a ``path`` column).
    """
    ids = set(manifest["image_id"])
    hint = label_layout_hint(label_files, list(ids))
    if hint is not None:
        raise LabelError(hint)
    in_manifest = {k: v for k, v in sorted(label_files.items()) if k in ids}
    if "path" in manifest:
        check_voc_sizes(in_manifest, dict(zip(manifest["image_id"], manifest["path"])))
    if max_images is None:
        return in_manifest
    train = set(manifest.loc[manifest["split"] == "train", "image_id"])
    pool = [k for k in in_manifest if k in train]
    if not pool:
        raise LabelError("regions.max_images is set but no train-split image of the manifest has a label file")
    rng = random.Random(seed)
    chosen = sorted(rng.sample(pool, min(max_images, len(pool))))
    return {k: in_manifest[k] for k in chosen}


def rasterize(boxes: list[Box], *, num_classes: int, resolution: int) -> np.ndarray:
    """Union of each region class's boxes as a binary mask.

    A pixel is set when it overlaps the box at all, so a thin vein box keeps at least one pixel
    of width. Box edges outside the image are clipped.

    Args:
        boxes: Boxes in normalised coordinates (see :class:`mgfa_ray.data.regions.Box`).
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
