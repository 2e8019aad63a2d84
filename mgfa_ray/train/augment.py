"""The trial's image transforms: one geometric transform for an image batch and its region masks.

Training (paper Sec. IV-B): each image gets a random ``train_crop`` x ``train_crop`` window and a
horizontal flip with p = 0.5; its masks, resized to the image's size, get exactly the same window
and flip, so the ground-truth attention (:func:`~mgfa_ray.train.model.gt_attention`, Eq. 7) stays aligned
with the pixels. Test time: the images are resized to ``eval_size`` (paper: test resize 448) or cut
to their centre ``eval_size`` window (``eval_crop: center``, released code). Images are then
standardised with the ImageNet mean and std. The functions here take that output side as ``size``.

Everything runs on the tensors' device; the random draws come from a CPU generator, so a seed gives
the same augmentation on every device. Used by :mod:`mgfa_ray.train.trial` (training and evaluation) and
:mod:`mgfa_ray.analysis.cam` (test-time input).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mgfa_ray.errors import InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def augment(
    images: torch.Tensor,
    masks: torch.Tensor,
    *,
    size: int,
    train: bool,
    generator: torch.Generator | None = None,
    eval_crop: str = "resize",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the same geometric transform to images and their masks, then normalise the images.

    Runs on the tensors' device (the GPU in CUDA trials); the random windows and flips are drawn
    from ``generator`` on the CPU, so a seed gives the same augmentation on every device. The
    crop and flip are one indexing operation over the batch (an exact copy of the pixels).

    Args:
        images: uint8 (B, 3, R, R).
        masks: uint8 or float (B, K, M, M), values in [0, 1], covering the same full image; they
            are resized to R x R (bilinear) before the window is cut.
        size: Output side in pixels, <= R: the training crop with ``train``, else the evaluation
            size.
        train: Random ``size`` window + horizontal flip (p = 0.5) if True, else the test input
            of ``eval_crop``.
        generator: RNG for the window and flip (CPU generator).
        eval_crop: ``resize`` to ``size`` (paper Sec. IV-B) or the ``center`` ``size`` window
            (released code).

    Returns:
        ``(x, m)``: float32 images (B, 3, size, size) normalised with ImageNet mean/std, and
        float32 masks (B, K, size, size) in [0, 1], geometrically aligned with ``x``.

    Raises:
        InputError: ``size`` is larger than the images.
    """
    b, _, r, _ = images.shape
    if size > r:
        raise InputError(f"{'crop' if train else 'evaluation size'} {size} is larger than the {r} px images")
    x = images.float().div_(255.0)
    m = F.interpolate(masks.float(), size=(r, r), mode="bilinear", align_corners=False)
    if train:
        rows, cols = random_windows(b, side=r, crop=size, generator=generator)
        x, m = cut_windows(x, rows, cols), cut_windows(m, rows, cols)
    elif eval_crop == "center":
        x, m = _center(x, size), _center(m, size)
    else:
        x, m = _resize(x, size), _resize(m, size)
    return normalise(x), m.clamp_(0.0, 1.0)


def _center(x: torch.Tensor, side: int) -> torch.Tensor:
    top = (x.shape[-1] - side) // 2
    return x[..., top : top + side, top : top + side]


def random_windows(
    b: int, *, side: int, crop: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``crop`` x ``crop`` windows of ``side`` x ``side`` images, each flipped horizontally
    with p = 0.5 (paper Sec. IV-B), as pixel indices for :func:`cut_windows`.

    Draws, in this order, B tops, B lefts and B flips from ``generator`` (CPU).

    Returns:
        ``(rows, cols)``: int64 (B, crop) each, on the CPU; a flipped window's columns run right
        to left.
    """
    tops = torch.randint(0, side - crop + 1, (b,), generator=generator)
    lefts = torch.randint(0, side - crop + 1, (b,), generator=generator)
    flips = torch.rand(b, generator=generator) < 0.5
    offsets = torch.arange(crop)
    return tops[:, None] + offsets, lefts[:, None] + torch.where(flips[:, None], crop - 1 - offsets, offsets)


def cut_windows(t: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``t[b][:, rows[b]][:, :, cols[b]]`` for every b in one indexing op (an exact copy of the
    values): (B, C, R, R) and int64 (B, h), (B, w) → (B, C, h, w), on ``t``'s device."""
    rows, cols = rows.to(t.device), cols.to(t.device)
    b, c = t.shape[:2]
    bi = torch.arange(b, device=t.device)[:, None, None, None]
    ci = torch.arange(c, device=t.device)[None, :, None, None]
    return t[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


def _resize(x: torch.Tensor, side: int) -> torch.Tensor:
    if x.shape[-1] == side:
        return x
    return F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False, antialias=True)


def normalise(x: torch.Tensor) -> torch.Tensor:
    """Float images (B, 3, H, W) in [0, 1] → standardised with the ImageNet mean and std."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def resize_images(images: torch.Tensor, *, size: int, eval_crop: str = "resize") -> torch.Tensor:
    """The test-time input (paper Sec. IV-B): uint8 (B, 3, R, R) → float32 (B, 3, size, size) in
    [0, 1]: resized (bilinear, antialiased; unchanged when R = size), or with ``eval_crop="center"``
    the centre window (released code)."""
    x = images.float().div_(255.0)
    return _center(x, size) if eval_crop == "center" else _resize(x, size)


def eval_images(images: torch.Tensor, *, size: int, eval_crop: str = "resize") -> torch.Tensor:
    """Test-time input: :func:`resize_images`, then :func:`normalise`; the same images
    :func:`augment` gives with ``train=False``."""
    return normalise(resize_images(images, size=size, eval_crop=eval_crop))
