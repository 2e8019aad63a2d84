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
per region class the attention's Eq. 7 error against the best constant map and the training
split's position prior (``<split>_fit_prior_<region>`` below 1: the attention follows the masks
better than a map that sees no image), and ``train_masks_learned``. Per-class accuracy of the eval
split is in the checkpoint state.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch

from mgfa_ray.config import TrainConfig, to_dict
from mgfa_ray.errors import InputError, UserError
from mgfa_ray.storage import atomic_write_bytes
from mgfa_ray.train.checkpoint import load_checkpoint, save_checkpoint
from mgfa_ray.train.data import load_trial_data
from mgfa_ray.train.mask_fit import FIT_TERMS, masked_classes, masks_learned
from mgfa_ray.train.model import MGFAClassifier
from mgfa_ray.train.step import StepContext, build_model, evaluate, fit_rows, make_optimizer, train_prior, train_step

EpochCallback = Callable[[dict[str, Any], dict[str, Any]], None]


@dataclass
class TrialRun:
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


def prepare(cfg: TrainConfig, *, cache_dir: Path | None = None) -> TrialRun:
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
    return TrialRun(cfg=cfg, device=device, data=data, class_names=class_names, model=model, ctx=ctx,
                 optimizer=optimizer, scheduler=scheduler, generator=torch.Generator().manual_seed(cfg.seed),
                 prior=prior, fit_rows=fit_rows(len(labels), cfg.mask_fit_images).to(device))


def restore(trial: TrialRun, state: dict[str, Any]) -> tuple[list[dict[str, Any]], int]:
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


def train_one_epoch(trial: TrialRun) -> tuple[dict[str, float], int]:
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


def evaluate_split(trial: TrialRun, part: str) -> dict[str, Any]:
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
    learned = masks_learned(metrics, masked_classes(kinds, cfg.feature_weights(), cfg.mask_loss_weights()))
    metrics["train_masks_learned"] = math.nan if learned is None else float(learned)
    metrics["train_images_per_second"] = images_per_second
    metrics["epoch_seconds"] = epoch_seconds
    return metrics


def checkpoint_state(trial: TrialRun, *, epoch: int, history: list[dict[str, Any]], ev: dict[str, Any]) -> dict[str, Any]:
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
        ValueError: The manifest or mask set is missing or does not fit the config (region classes,
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
    kinds = masked_classes(cfg.region_classes, cfg.feature_weights(), cfg.mask_loss_weights())
    if masks_learned(metrics, kinds) is not False:
        return None
    ratios = ", ".join(f"{k} {metrics.get(f'train_fit_prior_{k}', math.nan):.3f}" for k in kinds)
    return (f"masks not learned: on the training images the attention's Eq. 7 error over the position prior's is "
            f"{ratios} (below 1 needed); an accuracy comparison with the backbone says nothing about the masks. "
            "More epochs, a higher lr or larger delta/lam let the attention fit them")
