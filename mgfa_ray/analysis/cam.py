"""Class activation maps of a trained classifier (paper Fig. 4), rendered as PNG files.

CAM (Zhou et al., "Learning Deep Features for Discriminative Localization", CVPR 2016): the
classifier ends in global average pooling and a linear head, so the logit of class c is

    logit_c = Σ_ch w_{c,ch} · mean_{h,w} F_final[ch, h, w] + b_c = mean_{h,w} CAM_c[h, w] + b_c,

with CAM_c = Σ_ch w_{c,ch} · F_final[ch] and F_final the Eq. 5-6 feature mix of
:func:`~mgfa_ray.train.model.fuse_features`. The map shows where the evidence for class c lies; Pan et
al. (DICTA 2021, Fig. 4) use it to show that mask guidance moves it onto veins and contours.

* :func:`raw_class_activation_maps` — un-normalised CAMs of every class at the feature grid.
* :func:`class_activation_maps` — the CAM of the predicted (or given) class, ReLU, upsampled to
  the input size and normalised to [0, 1], with the attention maps (Eq. 4).
* :func:`render_cam_png` — one figure: photo, CAM overlay, one overlay per attention map.
* :func:`render_cams` — ``mgfa-ray cam``: checkpoint + manifest → one PNG per image.

Pure PyTorch and matplotlib (Agg canvas, no pyplot state); no Ray.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from mgfa_ray.config import TrainConfig, validate
from mgfa_ray.data.manifest import read_manifest, select_images
from mgfa_ray.errors import InputError
from mgfa_ray.plots import figure_png
from mgfa_ray.storage import atomic_write_bytes, safe_stem
from mgfa_ray.train.augment import eval_images, resize_images
from mgfa_ray.train.checkpoint import load_checkpoint
from mgfa_ray.train.data import crop_boxes, load_images
from mgfa_ray.train.model import MGFAClassifier
from mgfa_ray.train.step import build_model

CamClass = Literal["predicted", "true"]


class CamResult(NamedTuple):
    """Output of :func:`class_activation_maps` for a batch of B images at ``size`` x ``size``.

    Attributes:
        cams: float32 (B, size, size) in [0, 1]: the CAM of ``classes`` after ReLU and bilinear
            upsampling, divided by its per-image maximum (an all-zero map stays zero).
        classes: int64 (B,): the class each CAM is for (``predicted`` unless labels were given).
        predicted: int64 (B,): argmax of the logits.
        confidence: float32 (B,) in [0, 1]: softmax probability of ``predicted``.
        attention: float32 (B, K, size, size): the attention maps M_k (Eq. 4) upsampled
            bilinearly, on the activation's scale (softmax maps are not renormalised).
    """

    cams: torch.Tensor
    classes: torch.Tensor
    predicted: torch.Tensor
    confidence: torch.Tensor
    attention: torch.Tensor


@torch.no_grad()
def raw_class_activation_maps(
    model: MGFAClassifier, images: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Un-normalised CAMs of every class at the feature grid (Zhou et al. 2016, Eq. 5-6 features).

    CAM_c = Σ_ch w_{c,ch} · F_final[ch], bias excluded, no ReLU, so that the spatial mean of
    CAM_c equals ``logit_c - head.bias[c]`` exactly (up to float rounding).

    Args:
        model: The classifier; put in eval mode here. Its device is used.
        images: Normalised float images (B, 3, H_in, W_in), e.g. from
            :func:`~mgfa_ray.train.augment.eval_images`.

    Returns:
        ``(cams, logits, attention)``: float32 (B, num_classes, H, W), float32
        (B, num_classes) and the attention maps (B, K, H, W) at the feature grid.
    """
    model.eval()
    device = next(model.parameters()).device
    fused, attention = model.fuse(model.forward_features(images.to(device)).float())
    weight = model.head.weight.float()  # (num_classes, C)
    cams = torch.einsum("nc,bchw->bnhw", weight, fused)
    logits = model.head(fused.mean(dim=(2, 3)))
    return cams, logits.float(), attention


@torch.no_grad()
def class_activation_maps(
    model: MGFAClassifier,
    images_u8: torch.Tensor,
    *,
    size: int,
    labels: torch.Tensor | None = None,
    batch_size: int = 16,
) -> CamResult:
    """CAMs (Zhou et al., CVPR 2016) for the predicted class or given labels (paper Fig. 4).

    The images go through the test-time transform (:func:`~mgfa_ray.train.augment.eval_images`: resize to
    ``size``, ImageNet normalisation); the CAM of the chosen class is ReLU'd, upsampled bilinearly
    to ``size`` x ``size`` and divided by its maximum per image.

    Args:
        model: A trained :class:`~mgfa_ray.train.model.MGFAClassifier` (eval mode is set here).
        images_u8: uint8 (B, 3, R, R) RGB images, values in [0, 255].
        size: Side of the model input and of the returned maps, in pixels (the config's
            ``eval_input_size``).
        labels: int64 (B,) classes to explain; ``None`` explains the predicted classes.
        batch_size: Images per forward pass.

    Returns:
        A :class:`CamResult`; every tensor is on the CPU.

    Raises:
        ValueError: ``images_u8`` is not uint8 (B, 3, R, R), or ``labels`` has the wrong length or
            a class outside [0, num_classes).
    """
    if images_u8.dtype != torch.uint8 or images_u8.dim() != 4 or images_u8.shape[1] != 3:
        raise ValueError(f"images must be uint8 (B, 3, R, R), got {images_u8.dtype} {tuple(images_u8.shape)}")
    num_classes = model.head.out_features
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.int64).cpu()
        if labels.shape != (len(images_u8),):
            raise ValueError(f"need one label per image ({len(images_u8)}), got shape {tuple(labels.shape)}")
        bad = labels[(labels < 0) | (labels >= num_classes)]
        if len(bad):
            raise ValueError(f"label {int(bad[0])} is outside [0, {num_classes})")
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in CamResult._fields}
    for s in range(0, len(images_u8), batch_size):
        x = eval_images(images_u8[s : s + batch_size], size=size)
        raw, logits, attention = raw_class_activation_maps(model, x)
        raw, logits, attention = raw.cpu(), logits.cpu(), attention.float().cpu()
        probs = logits.softmax(dim=1)
        confidence, predicted = probs.max(dim=1)
        classes = predicted if labels is None else labels[s : s + batch_size]
        cam = raw[torch.arange(len(classes)), classes].clamp_min(0.0)[:, None]  # ReLU, (b, 1, H, W)
        cam = F.interpolate(cam, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
        cam = cam / cam.flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None]
        parts["cams"].append(cam.float())
        parts["classes"].append(classes)
        parts["predicted"].append(predicted)
        parts["confidence"].append(confidence.float())
        parts["attention"].append(F.interpolate(attention, size=(size, size), mode="bilinear", align_corners=False))
    if not parts["cams"]:
        k = model.attention.num_regions
        return CamResult(torch.zeros(0, size, size), torch.zeros(0, dtype=torch.int64),
                         torch.zeros(0, dtype=torch.int64), torch.zeros(0), torch.zeros(0, k, size, size))
    return CamResult(*(torch.cat(parts[k]) for k in CamResult._fields))


def display_images(images_u8: torch.Tensor, *, size: int) -> torch.Tensor:
    """The photos as the model sees them: uint8 (B, 3, R, R) → uint8 (B, size, size, 3) (HWC),
    the :func:`~mgfa_ray.train.augment.resize_images` test-time resize without the normalisation."""
    rgb = resize_images(images_u8, size=size).cpu().clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)
    return rgb.permute(0, 2, 3, 1).contiguous()


def render_cam_png(
    photo: np.ndarray,
    cam: np.ndarray,
    attention: np.ndarray,
    *,
    region_names: Sequence[str],
    title: str,
    cmap: str = "jet",
    overlay_alpha: float = 0.5,
    dpi: int = 100,
) -> bytes:
    """One figure as PNG bytes: the photo, the CAM overlay and one overlay per attention map.

    Drawn on a matplotlib Agg canvas (no pyplot, no global state); colours from
    ``matplotlib.colormaps[cmap]``. Each attention map is divided by its own maximum for display
    (softmax maps are tiny, a uniform map shows as one flat colour); the panel title gives the
    raw range.

    Args:
        photo: uint8 (S, S, 3) RGB image.
        cam: float (S, S) in [0, 1].
        attention: float (K, S, S), non-negative.
        region_names: K region class names (e.g. ``["vein", "contour"]``), used in panel titles.
        title: Figure title (true / predicted class and confidence).
        cmap: A name in ``matplotlib.colormaps``.
        overlay_alpha: Opacity of the heat maps over the photo, in [0, 1].
        dpi: Output resolution.

    Returns:
        The PNG file content.

    Raises:
        ValueError: ``region_names`` does not have K entries, or ``cmap`` is unknown.
    """
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if len(region_names) != len(attention):
        raise ValueError(f"need {len(attention)} region names, got {list(region_names)}")
    if cmap not in matplotlib.colormaps:
        raise ValueError(f"unknown matplotlib colormap {cmap!r}")
    colormap = matplotlib.colormaps[cmap]
    panels = 2 + len(attention)
    fig = Figure(figsize=(2.6 * panels, 3.0), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    axes[0].imshow(photo)
    axes[0].set_title("photo", fontsize=9)
    axes[1].imshow(photo)
    axes[1].imshow(cam, cmap=colormap, vmin=0.0, vmax=1.0, alpha=overlay_alpha)
    axes[1].set_title("CAM", fontsize=9)
    for k, (name, amap) in enumerate(zip(region_names, attention)):
        low, peak = float(amap.min()), float(amap.max())
        ax = axes[2 + k]
        ax.imshow(photo)
        ax.imshow(amap / peak if peak > 0 else amap, cmap=colormap, vmin=0.0, vmax=1.0, alpha=overlay_alpha)
        ax.set_title(f"{name} attention ({low:.3g} to {peak:.3g})", fontsize=9)
    return figure_png(fig, axes, title=title)


def _checkpoint_path(path: str | Path) -> Path:
    path = Path(path)
    return path / "checkpoint.pt" if path.is_dir() else path


def load_trained_model(checkpoint: str | Path, *, device: str = "cpu") -> tuple[MGFAClassifier, TrainConfig, list[str]]:
    """Rebuild the classifier of a trial checkpoint (:func:`~mgfa_ray.train.checkpoint.save_checkpoint`).

    No weights file is needed: the backbone is built empty and the checkpoint's state loaded.

    Args:
        checkpoint: ``checkpoint.pt`` or a run directory holding one.
        device: Torch device for the model.

    Returns:
        ``(model, cfg, class_names)``: the model in eval mode, the run's config, and one class name
        per class (``str(label)`` when the checkpoint lacks them).

    Raises:
        ValueError: The checkpoint is missing, is not a trial checkpoint, has an invalid config, or
            its weights do not fit the config's model.
    """
    path = _checkpoint_path(checkpoint)
    state = load_checkpoint(path)
    if "config" not in state or "head.weight" not in state["model"]:
        raise InputError(f"checkpoint {path} has no config or no classifier head")
    cfg = validate(TrainConfig, state["config"], source=f"{path} (config)")
    num_classes = int(state["model"]["head.weight"].shape[0])
    model = build_model(cfg.model_copy(update={"weights": None}), num_classes)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise InputError(
            f"checkpoint {path}: weights do not fit the {cfg.backbone} model of its config: {err}"
        ) from None
    names = list((state.get("eval_per_class") or {}).get("class_name") or [])
    if len(names) != num_classes:
        names = [str(i) for i in range(num_classes)]
    return model.to(device).eval(), cfg, [str(n) if n is not None else str(i) for i, n in enumerate(names)]


def render_cams(
    checkpoint: str | Path,
    *,
    out_dir: str | Path | None = None,
    image_ids: Sequence[str] | None = None,
    split: str = "test",
    count: int = 8,
    manifest: str | Path | None = None,
    cam_class: CamClass = "predicted",
    device: str = "cpu",
) -> list[Path]:
    """``mgfa-ray cam``: CAM figures (paper Fig. 4) of a trained run, one PNG per image.

    Each ``<out_dir>/<safe image id>.png`` (see :func:`~mgfa_ray.storage.safe_stem`) shows the photo at the model's
    input size, its CAM and the attention maps of every region class, titled with the true and
    predicted class and the softmax confidence. Files are written atomically.

    Args:
        checkpoint: ``checkpoint.pt`` of a run (or its directory).
        out_dir: Output directory; default ``<checkpoint dir>/cam``.
        image_ids: Manifest image ids to explain, in this order; ``None`` takes the first
            ``count`` images of ``split`` in manifest (image_id) order.
        split: Manifest split used when ``image_ids`` is ``None``.
        count: Number of images used when ``image_ids`` is ``None``, >= 1.
        manifest: Manifest file overriding the config's (e.g. when the data moved).
        cam_class: Explain the ``predicted`` class or the ``true`` (manifest) label.
        device: Torch device for the forward passes.

    Returns:
        The written PNG paths, one per image, in order.

    Raises:
        ValueError: Missing or invalid checkpoint; unknown image id; empty split; ``count`` < 1;
            a manifest label outside the model's classes; an image that cannot be decoded; a
            CUDA device without CUDA or an invalid device.
    """
    if cam_class not in ("predicted", "true"):
        raise ValueError(f"cam_class must be 'predicted' or 'true', got {cam_class!r}")
    try:
        device_type = torch.device(device).type
    except RuntimeError:
        raise InputError(f"invalid torch device {device!r}") from None
    if device_type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} requested but CUDA is not available")
    path = _checkpoint_path(checkpoint)
    model, cfg, class_names = load_trained_model(path, device=device)
    manifest_path = Path(manifest) if manifest is not None else Path(cfg.manifest)
    rows = select_images(read_manifest(manifest_path), image_ids=image_ids, split=split, count=count,
                         source=f"manifest {manifest_path}")
    labels = torch.tensor(rows["label"].to_numpy(dtype="int64"))
    if len(labels) and int(labels.max()) >= len(class_names):
        raise InputError(f"manifest {manifest_path} has label {int(labels.max())} but the model has "
                         f"{len(class_names)} classes")
    # A model trained on crops (crop_to_region) is explained on the same crops.
    boxes = crop_boxes(cfg, rows["image_id"].tolist()) if cfg.crop_to_region is not None else None
    images = load_images(rows["path"].tolist(), size=cfg.resize, boxes=boxes)
    result = class_activation_maps(model, images, size=cfg.eval_input_size,
                                   labels=labels if cam_class == "true" else None)
    photos = display_images(images, size=cfg.eval_input_size).numpy()

    out = Path(out_dir) if out_dir is not None else path.parent / "cam"
    written: list[Path] = []
    used: set[str] = set()
    for i, image_id in enumerate(rows["image_id"]):
        stem = safe_stem(image_id)
        if stem in used:  # two ids mapping to one name: keep both files
            stem = f"{stem}-{hashlib.sha256(image_id.encode()).hexdigest()[:8]}"
        used.add(stem)
        true, pred = int(labels[i]), int(result.predicted[i])
        title = (f"{image_id}\ntrue: {class_names[true]} | predicted: {class_names[pred]} "
                 f"({float(result.confidence[i]):.2f}) | CAM of {cam_class} class")
        png = render_cam_png(photos[i], result.cams[i].numpy(), result.attention[i].numpy(),
                             region_names=cfg.region_classes, title=title)
        written.append(atomic_write_bytes(out / f"{stem}.png", png))
    return written
