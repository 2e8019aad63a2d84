"""Stage 5 — the trial: train and evaluate the classifier for one config, in plain PyTorch.

:func:`run_trial` maps a :class:`~mgfa_ray.config.TrainConfig` to per-epoch metrics and
checkpoint states; it knows nothing of Ray (the search wraps it in :mod:`mgfa_ray.search`).

Data path: images are decoded once, resized to ``resize`` x ``resize`` and kept as uint8 (cached
on disk when a cache directory is given); masks come from the mask set at their stored resolution.
Each training batch gets a random ``crop`` x ``crop`` window and a horizontal flip with p = 0.5
(paper Sec. IV-B), and the masks get exactly the same window and flip (after being resized to the
image's size) before :func:`~mgfa_ray.model.gt_attention` pools them to the feature grid.
Evaluation resizes image and masks to ``crop`` (paper: test resize 448).

Metrics reported every epoch: ``epoch``, ``lr``, ``train_loss`` and its terms ``train_loss_ce``,
``train_loss_<region>`` (unweighted, every term even when its weight is 0), ``eval_top1`` and
``eval_loss_ce`` on ``eval_split``, ``test_top1`` when the eval split is not the test split,
``epoch_seconds``.
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

from .config import TrainConfig, to_dict
from .io import atomic_write_bytes, sha256_json
from .manifest import read_manifest
from .masks import decode_rgb, read_masks
from .model import MGFAClassifier, build_backbone, gt_attention, mgfa_loss

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

EpochCallback = Callable[[dict[str, Any], dict[str, Any]], None]


def load_images(paths: list[str], *, size: int, cache_dir: Path | None = None) -> torch.Tensor:
    """Decode and resize images once, optionally through an on-disk cache.

    Args:
        paths: Image files.
        size: Output side in pixels (aspect ratio is not kept, as with a square resize).
        cache_dir: Directory for a ``.npy`` cache keyed by (paths, size); ``None`` disables it.

    Returns:
        uint8 tensor (N, 3, size, size).

    Raises:
        ValueError: An image cannot be decoded (the message names the file).
    """
    cache = None
    if cache_dir is not None:
        cache = Path(cache_dir) / f"images-{size}-{sha256_json(paths)[:16]}.npy"
        if cache.is_file():
            return torch.from_numpy(np.load(cache))
    out = np.empty((len(paths), 3, size, size), dtype=np.uint8)
    for i, path in enumerate(paths):
        rgb = Image.fromarray(decode_rgb(path, max_side=size))
        out[i] = np.asarray(rgb.resize((size, size), Image.BILINEAR)).transpose(2, 0, 1)
    if cache is not None:
        buf = io.BytesIO()
        np.save(buf, out)
        atomic_write_bytes(cache, buf.getvalue())
    return torch.from_numpy(out)


def augment(
    images: torch.Tensor, masks: torch.Tensor, *, crop: int, train: bool, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the same geometric transform to images and their masks, then normalise the images.

    Args:
        images: uint8 (B, 3, R, R).
        masks: uint8 or float (B, K, M, M), values in [0, 1], covering the same full image.
        crop: Output side in pixels.
        train: Random ``crop`` window + horizontal flip (p = 0.5) if True, else a resize to
            ``crop`` (paper Sec. IV-B).
        generator: RNG for the window and flip (CPU generator).

    Returns:
        ``(x, m)``: float32 images (B, 3, crop, crop) normalised with ImageNet mean/std, and
        float32 masks (B, K, crop, crop) in [0, 1], geometrically aligned with ``x``.
    """
    b, _, r, _ = images.shape
    x = images.float().div_(255.0)
    m = F.interpolate(masks.float(), size=(r, r), mode="bilinear", align_corners=False)
    if train:
        tops = torch.randint(0, r - crop + 1, (b,), generator=generator).tolist()
        lefts = torch.randint(0, r - crop + 1, (b,), generator=generator).tolist()
        flips = (torch.rand(b, generator=generator) < 0.5).tolist()
        xs, ms = [], []
        for i in range(b):
            xi = x[i, :, tops[i] : tops[i] + crop, lefts[i] : lefts[i] + crop]
            mi = m[i, :, tops[i] : tops[i] + crop, lefts[i] : lefts[i] + crop]
            if flips[i]:
                xi, mi = xi.flip(-1), mi.flip(-1)
            xs.append(xi)
            ms.append(mi)
        x, m = torch.stack(xs), torch.stack(ms)
    else:
        x, m = _resize(x, crop), _resize(m, crop)
    return _normalise(x), m.clamp_(0.0, 1.0)


def _resize(x: torch.Tensor, side: int) -> torch.Tensor:
    if x.shape[-1] == side:
        return x
    return F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False, antialias=True)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def eval_images(images: torch.Tensor, *, crop: int) -> torch.Tensor:
    """Test-time input: uint8 (B, 3, R, R) resized to (B, 3, crop, crop) float32, ImageNet-normalised
    (paper Sec. IV-B: test resize); the same images :func:`augment` gives with ``train=False``."""
    return _normalise(_resize(images.float().div_(255.0), crop))


def build_model(cfg: TrainConfig, num_classes: int) -> MGFAClassifier:
    """The classifier of ``cfg``: backbone, mask attention per region kind, linear head."""
    backbone, channels = build_backbone(cfg.backbone, cfg.weights)
    k = len(cfg.region_classes)
    return MGFAClassifier(
        backbone, num_features=channels, num_classes=num_classes, num_regions=k,
        alpha=cfg.alpha, region_weights=(cfg.beta, cfg.gamma)[:k],
        activation=cfg.activation, shared_conv=cfg.shared_conv,
    )


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write a checkpoint state (from the epoch callback) atomically with ``torch.save``."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises:
        ValueError: The file is missing or is not a trial checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or "epoch" not in state or "model" not in state:
        raise ValueError(f"{path} is not an mgfa-ray trial checkpoint")
    return state


@torch.no_grad()
def _evaluate(model, images, labels, *, crop, device, batch_size=64) -> tuple[float, float]:
    model.eval()
    correct, loss_sum = 0, 0.0
    for s in range(0, len(labels), batch_size):
        x = eval_images(images[s : s + batch_size], crop=crop)
        y = labels[s : s + batch_size].to(device)
        logits, _ = model(x.to(device))
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
    n = max(1, len(labels))
    return correct / n, loss_sum / n


def run_trial(
    cfg: TrainConfig,
    *,
    on_epoch: EpochCallback | None = None,
    resume: dict[str, Any] | None = None,
    cache_dir: Path | None = None,
) -> list[dict[str, Any]]:
    """Train and evaluate the classifier of ``cfg`` for ``cfg.epochs`` epochs.

    Args:
        cfg: The trial configuration.
        on_epoch: Called after every epoch with ``(metrics, checkpoint_state)``; save the state
            with :func:`save_checkpoint` to be able to resume.
        resume: A checkpoint state; training continues at the epoch after it, with the model,
            optimizer, scheduler and RNG states restored (same result as never stopping, on CPU).
        cache_dir: Decoded-image cache directory shared between trials (optional).

    Returns:
        The metrics of every epoch, including those before ``resume``.

    Raises:
        ValueError: The manifest or mask set is missing, does not fit the config, or the train
            or evaluation split is empty.
    """
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    device = torch.device("cuda" if use_cuda else "cpu")

    manifest = read_manifest(cfg.manifest)
    num_classes = int(manifest["label"].max()) + 1
    parts = {"train": manifest[manifest["split"] == "train"], "eval": manifest[manifest["split"] == cfg.eval_split]}
    if cfg.eval_split != "test" and (manifest["split"] == "test").any():
        parts["test"] = manifest[manifest["split"] == "test"]
    for name in ("train", "eval"):
        if parts[name].empty:
            split = "train" if name == "train" else cfg.eval_split
            raise ValueError(f"manifest {cfg.manifest}: split {split!r} is empty")
    used = pd.concat(list(parts.values()), ignore_index=True)  # disjoint splits: each image once
    masks, _ = read_masks(cfg.masks, image_ids=used["image_id"].tolist(), region_classes=cfg.region_classes)
    images = load_images(used["path"].tolist(), size=cfg.resize, cache_dir=cache_dir)
    row_of = {image_id: n for n, image_id in enumerate(used["image_id"])}
    data = {}
    for name, df in parts.items():
        rows = torch.tensor([row_of[i] for i in df["image_id"]], dtype=torch.int64)
        data[name] = (images[rows], torch.from_numpy(masks[rows.numpy()]), torch.tensor(df["label"].to_numpy(dtype="int64")))

    model = build_model(cfg, num_classes).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_step, gamma=0.1)
    generator = torch.Generator().manual_seed(cfg.seed)
    history: list[dict[str, Any]] = []
    start = 1
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        generator.set_state(resume["generator"])
        torch.set_rng_state(resume["torch_rng"])
        history = list(resume["history"])
        start = int(resume["epoch"]) + 1

    k = len(cfg.region_classes)
    region_w = (cfg.delta, cfg.lam)[:k]
    images, masks, labels = data["train"]
    n = len(labels)
    for epoch in range(start, cfg.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        lr = optimizer.param_groups[0]["lr"]
        perm = torch.randperm(n, generator=generator)
        sums: dict[str, float] = {}
        seen = 0
        for s in range(0, n, cfg.batch_size):
            idx = perm[s : s + cfg.batch_size]
            if len(idx) < 2 and seen:  # BatchNorm cannot train on a single image
                continue
            x, m = augment(images[idx], masks[idx], crop=cfg.crop, train=True, generator=generator)
            x, m, y = x.to(device, non_blocking=True), m.to(device, non_blocking=True), labels[idx].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_cuda):
                logits, attention = model(x)
            target = gt_attention(m, grid=tuple(attention.shape[-2:]), activation=cfg.activation)
            losses = mgfa_loss(logits=logits.float(), labels=y, attention=attention.float(), target=target,
                               region_weights=region_w, mu=cfg.mu)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            optimizer.step()
            for key, value in losses.items():
                sums[key] = sums.get(key, 0.0) + value.item() * len(idx)
            seen += len(idx)
        scheduler.step()
        metrics: dict[str, Any] = {"epoch": epoch, "lr": lr, "train_loss": sums["loss"] / seen,
                                   "train_loss_ce": sums["loss_ce"] / seen}
        for i, region in enumerate(cfg.region_classes):
            metrics[f"train_loss_{region}"] = sums[f"loss_region{i}"] / seen
        eval_images_u8, _, eval_labels = data["eval"]
        metrics["eval_top1"], metrics["eval_loss_ce"] = _evaluate(model, eval_images_u8, eval_labels, crop=cfg.crop, device=device)
        if "test" in data:
            test_images_u8, _, test_labels = data["test"]
            metrics["test_top1"], _ = _evaluate(model, test_images_u8, test_labels, crop=cfg.crop, device=device)
        metrics["epoch_seconds"] = time.perf_counter() - t0
        history.append(metrics)
        if on_epoch is not None:
            state = {
                "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "generator": generator.get_state(),
                "torch_rng": torch.get_rng_state(), "history": history, "config": to_dict(cfg),
            }
            on_epoch(metrics, state)
    return history


def train_to_dir(cfg: TrainConfig, out_dir: Path, *, resume: bool = False, cache_dir: Path | None = None) -> dict[str, Any]:
    """``mgfa-ray train``: run one config, saving its config, metrics and checkpoint in ``out_dir``.

    Writes ``config.yaml`` (the resolved config), ``metrics.csv`` (one row per epoch) and
    ``checkpoint.pt`` (the latest epoch) atomically after every epoch, and ``final.json``.

    Args:
        cfg: The trial config (e.g. a search's exported ``best_config.yaml``).
        out_dir: Output directory.
        resume: Continue from ``out_dir/checkpoint.pt`` if it exists.
        cache_dir: Decoded-image cache directory.

    Returns:
        The last epoch's metrics.
    """

    from .io import atomic_write_json, atomic_write_yaml

    out_dir = Path(out_dir)
    ckpt = out_dir / "checkpoint.pt"
    state = load_checkpoint(ckpt) if resume and ckpt.is_file() else None
    atomic_write_yaml(out_dir / "config.yaml", to_dict(cfg))

    def on_epoch(metrics: dict[str, Any], state: dict[str, Any]) -> None:
        save_checkpoint(state, ckpt)
        atomic_write_bytes(out_dir / "metrics.csv", pd.DataFrame(state["history"]).to_csv(index=False).encode())
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()), flush=True)

    history = run_trial(cfg, on_epoch=on_epoch, resume=state, cache_dir=cache_dir)
    final = history[-1] if history else {}
    atomic_write_json(out_dir / "final.json", final)
    return final
