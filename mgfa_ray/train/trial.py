"""Stage 5 — the trial: train and evaluate the classifier for one config, in plain PyTorch.

:func:`run_trial` maps a :class:`~mgfa_ray.config.TrainConfig` to per-epoch metrics and
checkpoint states; it knows nothing of Ray (the search wraps it in :mod:`mgfa_ray.search.driver`).

Steps, one function each (in the style of torchvision's classification references):
:func:`prepare` (device and seed, data, model, optimizer) → :func:`restore` (a checkpoint, when
resuming) → per epoch :func:`train_one_epoch` → :func:`evaluate_split` → :func:`epoch_metrics`
(the one place that names the metrics) → :func:`checkpoint_state` for the epoch callback.

Data path: images are decoded once, optionally cropped to a region's box (``crop_to_region``: the
masks get the same crop), resized to ``resize`` x ``resize`` and kept as uint8 (cached on disk
when a cache directory is given); masks come from the mask set at their stored resolution.
Both go to the trial's device once. Each training batch gets a random ``train_crop`` x ``train_crop``
window and a horizontal flip with p = 0.5 (paper Sec. IV-B), and the masks get exactly the same
window and flip (after being resized to the image's size) before :func:`~mgfa_ray.train.model.gt_attention`
pools them to the feature grid. Evaluation resizes the images to ``eval_size`` (default: the
``train_crop``; paper: test resize 448) or takes their centre ``eval_size`` window (``eval_crop:
center``, released code). The transforms are in :mod:`mgfa_ray.train.augment`.

Optimisation: SGD with momentum and weight decay, step (×``lr_decay`` every ``lr_step`` epochs) or cosine
schedule; on CUDA bf16 (or fp16 with a gradient scaler) autocast and channels-last; on CPU fp32,
deterministic for a seed, and a resumed run is bit-identical to an uninterrupted one.

Metrics reported every epoch (:func:`epoch_metrics` names them all): the training pass's loss and
its terms (``train_loss``, ``train_loss_ce``, ``train_loss_<region>``: the terms of
:func:`~mgfa_ray.train.model.mgfa_loss`, unweighted, every term even when its weight is 0); top-1, top-5
and cross-entropy on ``eval_split`` (and top-1, top-5 on test when that is another split); and the
mask-fit check (:mod:`mgfa_ray.train.mask_fit`) on the training images, the eval and the test split:
per region kind the attention's Eq. 7 error against the best constant map and the training
split's position prior (``<split>_fit_prior_<region>`` below 1: the attention follows the masks
better than a map that sees no image), and ``train_masks_learned``. Per-class accuracy of the eval
split is in the checkpoint state.
"""

from __future__ import annotations

import io
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

from mgfa_ray.train.augment import augment, eval_images
from mgfa_ray.config import TrainConfig, to_dict
from mgfa_ray.errors import InputError, UserError
from mgfa_ray.storage import atomic_write_bytes, is_uri, sha256_json
from mgfa_ray.data.manifest import read_manifest
from mgfa_ray.data.images import decode_rgb
from mgfa_ray.masks import read_masks, read_metadata, read_rows
from mgfa_ray.train.mask_fit import FIT_TERMS, mask_fit, masked_kinds, masks_learned, position_prior, region_present
from mgfa_ray.train.model import MGFAClassifier, build_backbone, gt_attention, mgfa_loss
from mgfa_ray.train.targets import best_boxes, jitter_offsets, line_masks, to_window
from mgfa_ray.train.worker import LastValue

EpochCallback = Callable[[dict[str, Any], dict[str, Any]], None]


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
    """The crop box of one region kind in each image: its most confident box (a detector may also
    fire elsewhere, e.g. on a colour chart), widened by ``margin`` x its width / height on each side,
    optionally moved, and clipped to the image.

    Args:
        boxes: Per image, its boxes ``[region_class, cx, cy, w, h, conf]`` normalised to [0, 1]
            (the mask set's ``boxes`` column, :mod:`mgfa_ray.masks`).
        region: The region kind k.
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


def build_model(cfg: TrainConfig, num_classes: int) -> MGFAClassifier:
    """The classifier of ``cfg``: backbone, mask attention per region kind, linear head.

    Raises:
        ValueError: Unknown backbone or a weights file that does not fit (see
            :func:`~mgfa_ray.train.model.build_backbone`).
    """
    backbone, channels = build_backbone(cfg.backbone, cfg.weights, output_stride=cfg.output_stride)
    return MGFAClassifier(
        backbone, num_features=channels, num_classes=num_classes, num_regions=len(cfg.region_classes),
        alpha=cfg.alpha, feature_weights=cfg.feature_weights(), activation=cfg.activation,
        shared_conv=cfg.shared_conv, attention_bias=cfg.attention_bias, head_bias=cfg.head_bias,
    )


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module):
    """SGD with momentum and weight decay, and the learning-rate schedule of ``cfg``.

    ``step``: lr × ``lr_decay`` every ``lr_step`` epochs (paper Sec. IV-B: ÷10 every 100; released
    code: ×0.13 every 60); ``cosine``: annealed from ``lr``
    to 0 over ``epochs``. The scheduler is stepped once per epoch.

    Returns:
        ``(optimizer, scheduler)``.
    """
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler: torch.optim.lr_scheduler.LRScheduler
    if cfg.lr_schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    else:
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_step, gamma=cfg.lr_decay)
    return optimizer, scheduler


class StepContext:
    """What one training step needs besides the batch: device, autocast dtype, memory format,
    gradient scaler and the loss weights of ``cfg``.

    Args:
        cfg: The trial configuration (precision, channels_last, activation, loss weights).
        device: The device the model lives on. bf16/fp16 autocast and channels_last apply on CUDA
            only; CPU runs fp32 (deterministic).
    """

    def __init__(self, cfg: TrainConfig, device: torch.device):
        self.cfg = cfg
        self.device = device
        cuda = device.type == "cuda"
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision) if cuda else None
        self.memory_format = torch.channels_last if cuda and cfg.channels_last else torch.contiguous_format
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype is torch.float16)
        self.mask_loss_weights = dict(zip(cfg.region_classes, cfg.mask_loss_weights()))

    def autocast(self):
        """The autocast context of the forward pass (disabled on CPU and for fp32)."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None)

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """Images in the model's memory format."""
        return x.contiguous(memory_format=self.memory_format)


def train_step(
    model: MGFAClassifier,
    optimizer: torch.optim.Optimizer,
    ctx: StepContext,
    *,
    images: torch.Tensor,
    masks: torch.Tensor,
    labels: torch.Tensor,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """One SGD step on a batch: augment image and masks alike, forward, Eq. 7-8 loss, backward.
    With ``empty_masks: exclude`` an image whose (cropped) target of a kind is empty is left out of
    that kind's loss.

    Args:
        model: The classifier, in train mode, on ``ctx.device``.
        optimizer: Its optimizer.
        ctx: Device, precision and loss weights.
        images: uint8 (B, 3, R, R) on ``ctx.device``.
        masks: (B, K, M, M) in [0, 1] on ``ctx.device``.
        labels: int64 (B,) on ``ctx.device``.
        generator: CPU RNG for crops and flips.

    Returns:
        The detached loss terms of :func:`~mgfa_ray.train.model.mgfa_loss` (scalar tensors on the device;
        no host synchronisation).
    """
    x, m = augment(images, masks, size=ctx.cfg.train_crop, train=True, generator=generator)
    with ctx.autocast():
        logits, attention = model(ctx.inputs(x))
    target = gt_attention(m, grid=tuple(attention.shape[-2:]), activation=ctx.cfg.activation)
    present = region_present(target) if ctx.cfg.empty_masks == "exclude" else None
    losses = mgfa_loss(logits=logits.float(), labels=labels, attention=attention.float(), target=target,
                       mask_loss_weights=ctx.mask_loss_weights, mu=ctx.cfg.mu, present=present)
    optimizer.zero_grad(set_to_none=True)
    ctx.scaler.scale(losses["loss"]).backward()
    ctx.scaler.step(optimizer)
    ctx.scaler.update()
    return {k: v.detach() for k, v in losses.items()}


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write a checkpoint state (from the epoch callback) atomically with ``torch.save``."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    The state holds ``epoch``, ``model``, ``optimizer``, ``scheduler``, ``scaler`` (gradient
    scaler), ``generator`` and ``torch_rng`` (plus ``cuda_rng`` on CUDA), ``history`` (metrics of
    every epoch so far), ``eval_per_class`` and ``config`` (the resolved TrainConfig).

    Raises:
        ValueError: The file is missing or is not a trial checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or "epoch" not in state or "model" not in state:
        raise InputError(f"{path} is not an mgfa-ray trial checkpoint")
    return state


@torch.no_grad()
def evaluate(
    model: MGFAClassifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    size: int,
    num_classes: int,
    ctx: StepContext,
    masks: torch.Tensor | None = None,
    prior: torch.Tensor | None = None,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Top-1, top-5 and per-class accuracy at the test resize (paper Sec. IV-B), and the mask-fit
    check of the attention maps (:mod:`mgfa_ray.train.mask_fit`).

    Args:
        model: The classifier on ``ctx.device`` (put in eval mode here).
        images: uint8 (N, 3, R, R) on ``ctx.device``.
        labels: int64 (N,) in [0, num_classes).
        size: Side of the test-time input in pixels (the config's ``eval_input_size``).
        num_classes: Number of classes (top-5 becomes top-``num_classes`` when there are fewer).
        ctx: Device, precision and activation.
        masks: Optional (N, K, M, M) region masks in [0, 1] of the same images; they get the
            images' resize and :func:`~mgfa_ray.train.model.gt_attention`.
        prior: The position prior (K, H, W) of the training split (:func:`train_prior`); ``None``:
            the mean target of these images (in-sample).
        batch_size: Images per forward pass.

    Returns:
        ``top1`` and ``top5`` in [0, 1], ``loss_ce`` (mean cross-entropy), ``mean_class_top1``
        (top-1 averaged over the classes present), ``per_class``: ``{"correct": [...],
        "total": [...]}``, one entry per class, and with ``masks`` for each region kind of
        ``ctx.cfg.region_classes`` the terms of :func:`~mgfa_ray.train.mask_fit.mask_fit` as
        ``<term>_<kind>``: ``loss_<kind>`` (Eq. 7 error over the images holding the region),
        ``const_loss_<kind>``, ``prior_loss_<kind>``, ``fit_const_<kind>``, ``fit_prior_<kind>``.
    """
    model.eval()
    correct = torch.zeros(num_classes, dtype=torch.int64, device=ctx.device)
    total = torch.zeros(num_classes, dtype=torch.int64, device=ctx.device)
    top5 = torch.zeros((), dtype=torch.int64, device=ctx.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
    maps: list[tuple[torch.Tensor, torch.Tensor]] = []
    eval_crop = ctx.cfg.eval_crop
    k = min(5, num_classes)
    for s in range(0, len(labels), batch_size):
        y = labels[s : s + batch_size]
        if masks is None:
            x = eval_images(images[s : s + batch_size], size=size, eval_crop=eval_crop)
        else:  # the same images as eval_images, and the masks resized alike
            x, m = augment(images[s : s + batch_size], masks[s : s + batch_size], size=size, train=False,
                           eval_crop=eval_crop)
        with ctx.autocast():
            logits, attention = model(ctx.inputs(x))
        if masks is not None:
            target = gt_attention(m, grid=tuple(attention.shape[-2:]), activation=ctx.cfg.activation)
            maps.append((attention.float(), target))
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        hit = logits.argmax(1) == y
        correct += torch.bincount(y[hit], minlength=num_classes)
        total += torch.bincount(y, minlength=num_classes)
        top5 += (logits.topk(k, dim=1).indices == y[:, None]).any(1).sum()
    n = max(1, len(labels))
    correct_l, total_l = correct.tolist(), total.tolist()
    present = [c / t for c, t in zip(correct_l, total_l) if t]
    out = {
        "top1": sum(correct_l) / n, "top5": top5.item() / n, "loss_ce": loss_sum.item() / n,
        "mean_class_top1": sum(present) / max(1, len(present)),
        "per_class": {"correct": correct_l, "total": total_l},
    }
    if maps:
        out.update(_fit_terms(ctx.cfg.region_classes, maps, prior))
    return out


def _fit_terms(kinds: list[str], maps: list[tuple[torch.Tensor, torch.Tensor]],
               prior: torch.Tensor | None) -> dict[str, float]:
    """:func:`~mgfa_ray.train.mask_fit.mask_fit` of the collected (attention, target) batches, as
    ``<term>_<kind>``."""
    attention, target = torch.cat([a for a, _ in maps]), torch.cat([t for _, t in maps])
    fits = mask_fit(attention=attention, target=target,
                    prior=position_prior(target) if prior is None else prior.to(target.device))
    return {f"{term}_{kind}": fit[term] for kind, fit in zip(kinds, fits) for term in FIT_TERMS}


@torch.no_grad()
def train_prior(model: MGFAClassifier, images: torch.Tensor, masks: torch.Tensor, *, ctx: StepContext,
                batch_size: int = 64) -> torch.Tensor:
    """The position prior of the mask-fit check (:func:`~mgfa_ray.train.mask_fit.position_prior`): the
    mean ground-truth map of the training images at the evaluation geometry (``eval_size``,
    ``eval_crop``), on the model's feature grid.

    Args:
        model: The classifier (one image's forward pass gives the grid).
        images: uint8 (N, 3, R, R) training images on ``ctx.device``.
        masks: (N, K, M, M) their region masks in [0, 1].
        ctx: Device, activation and evaluation geometry.

    Returns:
        float32 (K, H, W) on ``ctx.device``.
    """
    cfg = ctx.cfg
    was_training = model.training
    model.eval()
    x = eval_images(images[:1], size=cfg.eval_input_size, eval_crop=cfg.eval_crop)
    h, w = model.forward_features(ctx.inputs(x)).shape[-2:]
    model.train(was_training)
    targets = []
    for s in range(0, len(images), batch_size):
        _, m = augment(images[s : s + batch_size], masks[s : s + batch_size], size=cfg.eval_input_size, train=False,
                       eval_crop=cfg.eval_crop)
        targets.append(gt_attention(m, grid=(h, w), activation=cfg.activation))
    return position_prior(torch.cat(targets))


def fit_rows(n: int, limit: int) -> torch.Tensor:
    """The training images of the mask-fit check: all ``n`` when ``n <= limit``, else ``limit``
    evenly spaced ones (a fixed subset, the same every epoch). int64 (min(n, limit),)."""
    if n <= limit:
        return torch.arange(n)
    return torch.linspace(0, n - 1, limit).round().long().unique()


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


_TRIAL_DATA = LastValue()  # the last decoded data set of this process: a reused trial worker decodes it once


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
    parts, class_names = _TRIAL_DATA.get(trial_data_key(cfg, cache_dir), lambda: _decode_trial_data(cfg, cache_dir))
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


def _decode_trial_data(cfg: TrainConfig, cache_dir: Path | None):
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


@dataclass
class Trial:
    """Everything one trial trains and reports on, built by :func:`prepare`.

    Attributes:
        cfg: The trial configuration.
        device: Where the data and the model live.
        data: ``data[part] = (images uint8 (N, 3, R, R), masks (N, K, M, M) in [0, 1], labels int64
            (N,))`` on ``device``, for ``train``, ``eval`` and possibly ``test`` (:func:`load_trial_data`).
        class_names: ``class_names[label]``.
        model: The classifier (:func:`build_model`) on ``device``, in ``ctx.memory_format``.
        ctx: Precision, memory format, gradient scaler and loss weights (:class:`StepContext`).
        optimizer: SGD of :func:`make_optimizer`.
        scheduler: Its learning-rate schedule, stepped once per epoch.
        generator: CPU RNG of the epoch orders, crops and flips, seeded with ``cfg.seed``.
        prior: The position prior (K, H, W) of the mask-fit check (:func:`train_prior`).
        fit_rows: The training images the mask-fit check evaluates every epoch (:func:`fit_rows`).
    """

    cfg: TrainConfig
    device: torch.device
    data: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    class_names: list[str]
    model: MGFAClassifier
    ctx: StepContext
    optimizer: torch.optim.Optimizer
    scheduler: Any
    generator: torch.Generator
    prior: torch.Tensor
    fit_rows: torch.Tensor


def trial_device(cfg: TrainConfig) -> torch.device:
    """Seed torch's global RNG with ``cfg.seed``, set ``cfg.threads`` and pick the device.

    ``device: auto`` is CUDA when available, else the CPU; on CUDA cuDNN autotuning is on (the
    input shapes are fixed).

    Raises:
        ValueError: ``device: cuda`` but CUDA is not available.
    """
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' requested but CUDA is not available")
    if use_cuda:
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels
    return torch.device("cuda" if use_cuda else "cpu")


def prepare(cfg: TrainConfig, *, cache_dir: Path | None = None) -> Trial:
    """Step 1 of :func:`run_trial`: device and seed (:func:`trial_device`), the data on the
    device (:func:`load_trial_data`), the freshly initialised model, optimizer, schedule and the
    augmentation generator.

    Raises:
        ValueError: As :func:`trial_device`, :func:`load_trial_data` and :func:`build_model`.
    """
    device = trial_device(cfg)
    data, class_names = load_trial_data(cfg, device=device, cache_dir=cache_dir)
    model = build_model(cfg, len(class_names)).to(device)
    ctx = StepContext(cfg, device)
    model = model.to(memory_format=ctx.memory_format)
    optimizer, scheduler = make_optimizer(cfg, model)
    images, masks, labels = data["train"]
    prior = train_prior(model, images, masks, ctx=ctx)  # no RNG draw: the seeded run is unchanged
    return Trial(cfg=cfg, device=device, data=data, class_names=class_names, model=model, ctx=ctx,
                 optimizer=optimizer, scheduler=scheduler, generator=torch.Generator().manual_seed(cfg.seed),
                 prior=prior, fit_rows=fit_rows(len(labels), cfg.mask_fit_images).to(device))


def restore(trial: Trial, state: dict[str, Any]) -> tuple[list[dict[str, Any]], int]:
    """Step 2 of :func:`run_trial`: load a checkpoint state (:func:`checkpoint_state`) into
    ``trial`` — model, optimizer, scheduler, gradient scaler, augmentation generator, torch's CPU
    RNG (and CUDA RNGs on CUDA) — so training continues as if it had never stopped.

    Returns:
        ``(history, start)``: the metrics of the epochs already run, and the next epoch (1-based).
    """
    trial.model.load_state_dict(state["model"])
    trial.optimizer.load_state_dict(state["optimizer"])
    trial.scheduler.load_state_dict(state["scheduler"])
    trial.ctx.scaler.load_state_dict(state.get("scaler") or {})
    trial.generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    if trial.device.type == "cuda" and state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return list(state["history"]), int(state["epoch"]) + 1


def train_one_epoch(trial: Trial) -> tuple[dict[str, float], int]:
    """Step 3 of :func:`run_trial`: one pass over the train split in a random order (from
    ``trial.generator``), :func:`train_step` per batch of ``cfg.batch_size``, then one step of
    the learning-rate schedule.

    A last batch of a single image is skipped (BatchNorm cannot train on it) unless it is the
    only one.

    Returns:
        ``(means, seen)``: the loss terms of :func:`~mgfa_ray.train.model.mgfa_loss` (``loss``,
        ``loss_ce``, ``loss_<kind>``, unweighted) averaged over the ``seen`` images trained on.
    """
    cfg, generator = trial.cfg, trial.generator
    images, masks, labels = trial.data["train"]
    trial.model.train()
    perm = torch.randperm(len(labels), generator=generator)
    sums: dict[str, torch.Tensor] = {}
    seen = 0
    for s in range(0, len(labels), cfg.batch_size):
        idx = perm[s : s + cfg.batch_size]
        if len(idx) < 2 and seen:  # BatchNorm cannot train on a single image
            continue
        idx_d = idx.to(trial.device)
        losses = train_step(trial.model, trial.optimizer, trial.ctx, images=images[idx_d], masks=masks[idx_d],
                            labels=labels[idx_d], generator=generator)
        for key, value in losses.items():
            sums[key] = sums.get(key, 0.0) + value.double() * len(idx)
        seen += len(idx)
    trial.scheduler.step()
    return {key: value.item() / seen for key, value in sums.items()}, seen


def evaluate_split(trial: Trial, part: str) -> dict[str, Any]:
    """Step 4 of :func:`run_trial`: :func:`evaluate` on ``trial.data[part]`` (``eval``,
    ``test``, or ``train``: its mask-fit subset ``trial.fit_rows``) with its masks and the
    training split's position prior, at the test-time input of ``cfg`` (``eval_size``,
    ``eval_crop``)."""
    images, masks, labels = trial.data[part]
    if part == "train":
        images, masks, labels = images[trial.fit_rows], masks[trial.fit_rows], labels[trial.fit_rows]
    return evaluate(trial.model, images, labels, masks=masks, prior=trial.prior, size=trial.cfg.eval_input_size,
                    num_classes=len(trial.class_names), ctx=trial.ctx)


def epoch_metrics(
    cfg: TrainConfig,
    *,
    epoch: int,
    lr: float,
    train: dict[str, float],
    splits: dict[str, dict[str, Any]],
    images_per_second: float,
    epoch_seconds: float,
) -> dict[str, Any]:
    """Step 5 of :func:`run_trial`, and the one place that names the reported metrics (module
    docstring), in this order (the columns of ``metrics.csv``):

    * ``epoch``, ``lr``, ``train_loss``, ``train_loss_ce``, ``train_loss_<kind>`` (the training
      pass, augmented);
    * the mask-fit check on the training images at the evaluation geometry
      (:mod:`mgfa_ray.train.mask_fit`): ``train_fit_loss_<kind>``, ``train_const_loss_<kind>``,
      ``train_prior_loss_<kind>``, ``train_fit_const_<kind>``, ``train_fit_prior_<kind>``;
    * ``eval_top1``, ``eval_top5``, ``eval_mean_class_top1``, ``eval_loss_ce``, and per kind
      ``eval_loss_<kind>``, ``eval_const_loss_<kind>``, ``eval_prior_loss_<kind>``,
      ``eval_fit_const_<kind>``, ``eval_fit_prior_<kind>``;
    * ``test_top1``, ``test_top5`` and the same five terms per kind when ``splits`` has ``test``;
    * ``train_masks_learned``: 1.0 when the attention beats the position prior on the training
      images for every kind the model uses, 0.0 when not, NaN when it uses none
      (:func:`~mgfa_ray.train.mask_fit.masks_learned`);
    * ``train_images_per_second`` and ``epoch_seconds``.

    Args:
        cfg: The trial configuration (its ``region_classes`` name the region terms, in order).
        epoch: The epoch (1-based).
        lr: The learning rate the epoch trained with.
        train: Mean loss terms of :func:`train_one_epoch` (``loss``, ``loss_ce``, ``loss_<kind>``).
        splits: :func:`evaluate` results by part: ``train`` (its mask-fit subset), ``eval`` and
            optionally ``test``.
        images_per_second: Training images per second of the epoch's training loop.
        epoch_seconds: Wall time of the epoch, evaluation included.

    Returns:
        The epoch's metrics: a flat dict of floats (``epoch``: int).
    """
    kinds = cfg.region_classes
    metrics: dict[str, Any] = {"epoch": epoch, "lr": lr}
    metrics.update({f"train_{name}": train[name] for name in ("loss", "loss_ce", *(f"loss_{k}" for k in kinds))})
    for part, ev in splits.items():
        if part != "train":
            names = ("top1", "top5", "mean_class_top1", "loss_ce") if part == "eval" else ("top1", "top5")
            metrics.update({f"{part}_{name}": ev[name] for name in names})
        for kind in kinds:
            for term in FIT_TERMS:  # the train part's "loss" is not the training pass's train_loss_<kind>
                name = "fit_loss" if part == "train" and term == "loss" else term
                metrics[f"{part}_{name}_{kind}"] = ev[f"{term}_{kind}"]
    learned = masks_learned(metrics, masked_kinds(kinds, cfg.feature_weights(), cfg.mask_loss_weights()))
    metrics["train_masks_learned"] = math.nan if learned is None else float(learned)
    metrics["train_images_per_second"] = images_per_second
    metrics["epoch_seconds"] = epoch_seconds
    return metrics


def checkpoint_state(trial: Trial, *, epoch: int, history: list[dict[str, Any]], ev: dict[str, Any]) -> dict[str, Any]:
    """The state :func:`restore` resumes from after ``epoch`` (keys in :func:`load_checkpoint`),
    with the eval split's per-class counts of :func:`evaluate` ``ev`` as ``eval_per_class``."""
    cuda = trial.device.type == "cuda"
    return {
        "epoch": epoch, "model": trial.model.state_dict(), "optimizer": trial.optimizer.state_dict(),
        "scheduler": trial.scheduler.state_dict(), "scaler": trial.ctx.scaler.state_dict(),
        "generator": trial.generator.get_state(), "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if cuda else None,
        "history": history, "config": to_dict(trial.cfg),
        "eval_per_class": {"class_name": trial.class_names, **ev["per_class"]},
    }


def run_trial(
    cfg: TrainConfig,
    *,
    on_epoch: EpochCallback | None = None,
    resume: dict[str, Any] | None = None,
    cache_dir: Path | None = None,
) -> list[dict[str, Any]]:
    """Train and evaluate the classifier of ``cfg`` for ``cfg.epochs`` epochs: :func:`prepare`,
    :func:`restore` (with ``resume``), then per epoch :func:`train_one_epoch`,
    :func:`evaluate_split` and :func:`epoch_metrics`.

    The decoded images and masks are moved to the device once; augmentation runs there.

    Args:
        cfg: The trial configuration.
        on_epoch: Called after every epoch with ``(metrics, checkpoint_state)``; save the state
            with :func:`save_checkpoint` to be able to resume.
        resume: A checkpoint state; training continues at the epoch after it, with the model,
            optimizer, scheduler, gradient scaler and RNG states restored (same result as never
            stopping, bit for bit on CPU).
        cache_dir: Decoded-image cache directory shared between trials (optional).

    Returns:
        The metrics of every epoch, including those before ``resume``.

    Raises:
        ValueError: The manifest or mask set is missing or does not fit the config (region kinds,
            image ids), the train or evaluation split is empty, or CUDA is requested but absent.
    """
    trial = prepare(cfg, cache_dir=cache_dir)
    history, start = restore(trial, resume) if resume is not None else ([], 1)
    for epoch in range(start, cfg.epochs + 1):
        t0 = time.perf_counter()
        lr = trial.optimizer.param_groups[0]["lr"]
        train, seen = train_one_epoch(trial)
        if trial.device.type == "cuda":
            torch.cuda.synchronize()  # the clock must include the queued GPU work of the last steps
        train_seconds = time.perf_counter() - t0
        splits: dict[str, dict[str, Any]] = {part: evaluate_split(trial, part) for part in ("train", "eval", "test")
                                             if part in trial.data}
        metrics = epoch_metrics(cfg, epoch=epoch, lr=lr, train=train, splits=splits,
                                images_per_second=seen / train_seconds, epoch_seconds=time.perf_counter() - t0)
        history.append(metrics)
        if on_epoch is not None:
            on_epoch(metrics, checkpoint_state(trial, epoch=epoch, history=history, ev=splits["eval"]))
    return history


def train_to_dir(cfg: TrainConfig, out_dir: Path, *, resume: bool = False, cache_dir: Path | None = None) -> dict[str, Any]:
    """``mgfa-ray train``: run one config, saving its config, metrics and checkpoint in ``out_dir``.

    Writes ``config.yaml`` (the resolved config), ``metrics.csv`` (one row per epoch),
    ``per_class_accuracy.csv`` (the latest epoch's top-1 per class on ``eval_split``) and
    ``checkpoint.pt`` (the latest epoch) atomically after every epoch, and ``final.json``.

    Args:
        cfg: The trial config (e.g. a search's exported ``best_config.yaml``).
        out_dir: Output directory.
        resume: Continue from ``out_dir/checkpoint.pt``.
        cache_dir: Decoded-image cache directory.

    Returns:
        The last epoch's metrics.

    Raises:
        UserError: ``resume`` and ``out_dir`` holds no checkpoint (nothing to resume).
    """

    from mgfa_ray.storage import atomic_write_json, atomic_write_yaml

    out_dir = Path(out_dir)
    ckpt = out_dir / "checkpoint.pt"
    if resume and not ckpt.is_file():
        raise UserError(f"--resume: nothing to resume in {out_dir} (no {ckpt.name}); run without --resume to "
                        "start this config from epoch 1, or give the --output-dir of the run to continue")
    state = load_checkpoint(ckpt) if resume else None
    atomic_write_yaml(out_dir / "config.yaml", to_dict(cfg))

    def on_epoch(metrics: dict[str, Any], state: dict[str, Any]) -> None:
        save_checkpoint(state, ckpt)
        atomic_write_bytes(out_dir / "metrics.csv", pd.DataFrame(state["history"]).to_csv(index=False).encode())
        per_class = pd.DataFrame(state["eval_per_class"])
        per_class["top1"] = per_class["correct"] / per_class["total"].where(per_class["total"] > 0)
        atomic_write_bytes(out_dir / "per_class_accuracy.csv", per_class.to_csv(index_label="label").encode())
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()), flush=True)

    history = run_trial(cfg, on_epoch=on_epoch, resume=state, cache_dir=cache_dir)
    final = history[-1] if history else {}
    if (warning := masks_not_learned_warning(cfg, final)) is not None:
        print(f"warning: {warning}", flush=True)
    atomic_write_json(out_dir / "final.json", final)
    return final


def masks_not_learned_warning(cfg: TrainConfig, metrics: dict[str, Any]) -> str | None:
    """The warning of a trial whose attention did not beat the position prior on its training
    images (:func:`~mgfa_ray.train.mask_fit.masks_learned`), naming each used kind's ratio; ``None`` when
    the masks were learned or the model uses none."""
    kinds = masked_kinds(cfg.region_classes, cfg.feature_weights(), cfg.mask_loss_weights())
    if masks_learned(metrics, kinds) is not False:
        return None
    ratios = ", ".join(f"{k} {metrics.get(f'train_fit_prior_{k}', math.nan):.3f}" for k in kinds)
    return (f"masks not learned: on the training images the attention's Eq. 7 error over the position prior's is "
            f"{ratios} (below 1 needed); an accuracy comparison with the backbone says nothing about the masks. "
            "More epochs, a higher lr or larger delta/lam let the attention fit them")
