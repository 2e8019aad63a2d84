"""One optimisation step and one evaluation pass of the classifier (paper Eq. 2-8): the model and
optimizer built from a config, the training step on an augmented batch (every loss term reported),
evaluation on a split (top-1, top-5, cross-entropy, the mask-fit check), and the attention prior fit.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from mgfa_ray.config import TrainConfig
from mgfa_ray.train.augment import augment, eval_images
from mgfa_ray.train.mask_fit import FIT_TERMS, mask_fit, position_prior, region_present
from mgfa_ray.train.model import MGFAClassifier, build_backbone, gt_attention, mgfa_loss


def build_model(cfg: TrainConfig, num_classes: int) -> MGFAClassifier:
    """The classifier of ``cfg``: backbone, mask attention per region class, linear head.

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
        "total": [...]}``, one entry per class, and with ``masks`` for each region class of
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
