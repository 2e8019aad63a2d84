"""Typed, frozen configuration for every stage, validated at construction.

Unknown keys are rejected (``extra="forbid"``), every field has a type and range, and a YAML file
that fails validation raises :class:`ConfigError` naming the file and the dotted field path.

Two top-level documents exist:

* :class:`JobConfig` — a job file under ``jobs/`` (``mgfa-ray run``): dataset, region labels,
  detector, masks, trial defaults and search settings.
* :class:`TrainConfig` — one trial (``mgfa-ray train --config``): the hyperparameters of
  :class:`TrainParams` plus the manifest and mask set it trains on. The search exports the best
  trial as this document, so the exported file is accepted by ``mgfa-ray train`` as is.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mgfa_ray.errors import ConfigError
from mgfa_ray.storage import is_uri

DATA_ROOT_ENV = "MGFA_DATA_ROOT"
DEFAULT_DATA_ROOT = "../shared/data"


class FrozenModel(BaseModel):
    """The one base of every configuration and record model of the project: unknown keys are
    rejected (``extra="forbid"``) and instances are immutable (``frozen=True``; derive changed
    copies with ``model_copy(update=...)``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetConfig(FrozenModel):
    """Where the images are and how the manifest splits them.

    Attributes:
        layout: ``class_folders`` (``<class>/<name>.jpg``), ``ufg`` (``<class>_<index>.jpg``,
            paper split: odd index train, even index test) or ``split_folders``
            (``<split>/<class>/<name>.jpg``, the split given by the folder: train, val, test).
        images: Image directory, relative to the data root unless absolute.
        val_fraction: class_folders only: fraction of each class's groups held out for
            validation (the search metric), in [0, 1).
        test_fraction: class_folders only: fraction of each class's groups held out for test.
        classes: Optional subset of class names (in this order the labels are 0..N-1).
        max_classes: Optional cap on the number of classes (the first in sorted order).
        max_per_class: Optional cap on images per class (first images in sorted order).
        seed: Seed of the group shuffle.
        labelled_in_train: class_folders only: every photo group holding a photo with a region
            label (``regions.labels``) goes to the train split, so a detector trained on those
            photos has seen no validation or test leaf.
    """

    layout: Literal["class_folders", "ufg", "split_folders"]
    images: str
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    classes: list[str] | None = None
    max_classes: int | None = Field(None, ge=2)
    max_per_class: int | None = Field(None, ge=1)
    seed: int = 0
    labelled_in_train: bool = False

    @model_validator(mode="after")
    def _fractions(self) -> "DatasetConfig":
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                f"val_fraction + test_fraction must be < 1, got "
                f"{self.val_fraction} + {self.test_fraction}"
            )
        return self


class RegionsConfig(FrozenModel):
    """Hand-drawn region boxes (YOLO txt or Pascal VOC xml, see :mod:`mgfa_ray.data.regions`).

    Attributes:
        labels: Label directory, relative to the data root unless absolute; a label file's path
            relative to it, without ``.txt`` / ``.xml``, is the image_id it belongs to.
        classes: Region class names; line class id ``i`` means ``classes[i]``.
        unknown_class: What a line with a class id outside ``classes`` does: ``error`` raises,
            ``skip`` drops the line with a warning naming file:line.
        max_images: Train the detector on at most this many annotated images, drawn (seeded)
            from the manifest's train split — the paper annotates 30 Cotton80 and 70 SoyLocal
            images. ``None`` uses every labelled image of the manifest.
        seed: Seed of that draw.
        source: Where the masks' boxes come from: ``detector`` (train the detector on the
            annotated images, then detect regions in every image; paper Sec. III-A) or ``labels``
            (the label files used as they are, e.g. the paper authors' boxes for every Cotton80 /
            SoyLocal image; no detector is trained).
        unlabelled: ``labels`` source only: a manifest image without a label file is an ``error``,
            or gets ``empty`` masks (no region). An empty label file always means "no region".
    """

    labels: str
    classes: list[str] = Field(["vein", "contour"], min_length=1)
    unknown_class: Literal["error", "skip"] = "error"
    max_images: int | None = Field(None, ge=2)
    seed: int = 0
    source: Literal["detector", "labels"] = "detector"
    unlabelled: Literal["error", "empty"] = "error"


class DetectorConfig(FrozenModel):
    """Ultralytics YOLO region detector (paper Sec. III-A).

    Attributes:
        model: Model YAML (``yolo11n.yaml``: built without weights; a YAML shipped in
            ``mgfa_ray/detector/models`` by file name, e.g. ``yolo11n-mobilenetv2.yaml``; or a path)
            or a local ``.pt`` file.
        backbone_weights: ``None`` (the model's own initialisation) or a local torchvision
            ``state_dict`` loaded into the model YAML's ``TorchVision`` backbone before training
            (:mod:`mgfa_ray.detector.backbone`; e.g. the ImageNet MobileNetV2 features with
            ``yolo11n-mobilenetv2.yaml``). Relative paths are relative to the working directory.
        imgsz: Train/inference input size in pixels (paper: 480).
        epochs: Training epochs.
        batch: Training batch size.
        holdout_fraction: Fraction of annotated images held out for mAP@0.5, in (0, 1).
        conf: Confidence threshold for boxes that become masks, in [0, 1].
        min_map50: Stage gate (:func:`mgfa_ray.pipeline.detector_gate`): a job stops after the
            detector, before the masks and the search, when a region class's held-out mAP@0.5 is
            below this, or when its held-out masks overlap the hand-drawn masks no better than the
            position prior (:mod:`mgfa_ray.detector.overlap`); a class without held-out instance is
            reported, not failed. Default 0.05, by measurement
            (``results/benchmarks/detector_gate.json``: the main job's recipe trained 1-150
            epochs): below 0.05 every class's masks were empty (IoU 0); between 0.27 and 0.35 the
            vein masks went from empty to better than the prior, so no mAP threshold separates
            useful masks from useless ones there and the mask check does; a detector that learnt
            nothing on a foreign VOC dataset measured 0.002. 0 turns both checks off. Not part of
            the detector key (changing it retrains nothing).
        seed: Training seed (also seeds the held-out split and the cross-validation folds).
        cv_folds: 0: measure mAP on one held-out split (``holdout_fraction``) and publish the model
            trained on the rest. k ≥ 2: measure mAP by grouped k-fold cross-validation over all
            annotated photos, then refit on all of them for the mask set (k + 1 trainings).
        mosaic, scale, degrees, fliplr, flipud: Ultralytics training augmentation (probability of
            a 4-image mosaic; ± image gain; ± rotation in degrees; probability of a horizontal /
            vertical flip). Defaults are Ultralytics' own.
    """

    model: str = "yolo11n.yaml"
    backbone_weights: str | None = None
    imgsz: int = Field(480, ge=32)
    epochs: int = Field(100, ge=1)
    batch: int = Field(8, ge=1)
    holdout_fraction: float = Field(0.25, gt=0.0, lt=1.0)
    conf: float = Field(0.1, ge=0.0, le=1.0)
    seed: int = 0
    min_map50: float = Field(0.05, ge=0.0, le=1.0)
    cv_folds: int = Field(0, ge=0)
    mosaic: float = Field(1.0, ge=0.0, le=1.0)
    scale: float = Field(0.5, ge=0.0, lt=1.0)
    degrees: float = Field(0.0, ge=0.0, le=180.0)
    fliplr: float = Field(0.5, ge=0.0, le=1.0)
    flipud: float = Field(0.0, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _check_cv_folds(self) -> "DetectorConfig":
        if self.cv_folds == 1:
            raise ValueError("cv_folds must be 0 (one held-out split) or at least 2 (k-fold cross-validation), got 1")
        return self


class MasksConfig(FrozenModel):
    """Ray Data mask precompute (:mod:`mgfa_ray.masks`).

    Attributes:
        resolution: Side of the stored square mask in pixels; finer than any feature grid so that
            training can crop and flip masks with the image before pooling.
        batch_size: Images per detector call inside an actor.
        num_actors: Actors in the Ray Data pool (each loads the detector once).
        rows_per_shard: Rows (images) per Parquet shard; a shard is the unit of work and of resume.
        gpus_per_actor: GPUs per actor (0 on CPU machines; then the detector runs on CPU).
        cpus_per_actor: CPUs per actor; also its image-decoding threads.
        corrupt_images: An image that cannot be decoded is an ``error`` (the stage fails listing
            every such image; finished shards are kept) or gets a ``record``: a row whose
            ``error`` column says why, with no boxes and empty masks; trials leave such images
            out, with a warning naming them. The job checks every image's first bytes and header
            right after the manifest, so under ``error`` it stops before the detector.
        location: Where mask sets are written: a local or NFS path, or an object-store URI
            (``s3://bucket/prefix?endpoint_override=...``) read through pyarrow filesystems.
            ``None``: ``<output_dir>/masks``.
        max_empty_fraction: Stage gate (:func:`mgfa_ray.pipeline.mask_gate`): a job stops after
            the masks, before the search, when the fraction of images without a region of some
            class is above this. Default 0.5, by measurement: the leafsnap20 set has 9.6 % of
            images without a vein box and none without a contour, while a useless detector left
            50 of 50 images (100 %) without any box; above one half, most trials' masks for that
            class would be all-zero and its attention term would learn nothing. 1 turns the gate
            off. Not part of the mask set id.
    """

    resolution: int = Field(64, ge=8)
    batch_size: int = Field(16, ge=1)
    num_actors: int = Field(2, ge=1)
    rows_per_shard: int = Field(256, ge=1)
    gpus_per_actor: float = Field(0.0, ge=0.0)
    cpus_per_actor: float = Field(1.0, gt=0.0)
    corrupt_images: Literal["error", "record"] = "error"
    location: str | None = None
    max_empty_fraction: float = Field(0.5, ge=0.0, le=1.0)


class RegionWeights(FrozenModel):
    """Weights of one region class beyond the paper's two (``TrainParams.extra_regions``).

    Attributes:
        feature: Its Eq. 5 feature weight (like beta), >= 0; counts towards the simplex sum.
        mask_loss: Its Eq. 8 loss weight (like delta), >= 0; 0 removes its term.
    """

    feature: float = Field(ge=0.0, le=1.0)
    mask_loss: float = Field(ge=0.0)


class TrainParams(FrozenModel):
    """Hyperparameters of one trial: model, augmentation, optimisation and the paper's weights.

    Paper defaults (Pan et al., DICTA 2021, Sec. IV-B and Eq. 5-8) are the field defaults.

    Attributes:
        backbone: torchvision backbone name.
        weights: ``None`` (random init), ``"imagenet"`` (torchvision download, online only) or a
            path to a local ``state_dict`` file.
        resize: Side in pixels images are resized to before the random crop (paper: 512).
        train_crop: Side of the random training crop in pixels, <= ``resize`` (paper: 448).
        eval_size: Side of the test-time input in pixels, <= ``resize``; ``None`` (default): the
            ``train_crop`` (paper: both 448). See :attr:`TrainParams.eval_input_size`.
        epochs: Training epochs.
        batch_size: Images per step.
        lr: Initial SGD learning rate (paper: 0.003).
        momentum: SGD momentum (paper prints 0.938).
        weight_decay: SGD weight decay.
        lr_step: ``step`` schedule: epochs between learning-rate decays (paper: 100).
        lr_decay: ``step`` schedule: factor the learning rate is multiplied by every ``lr_step``
            epochs, in (0, 1] (paper: 0.1, i.e. ÷10; released code: 0.13 every 60 epochs).
        lr_schedule: ``step`` (paper: ×``lr_decay`` every ``lr_step`` epochs) or ``cosine``
            (annealed to 0 over ``epochs``).
        alpha, beta, gamma: Eq. 5-6 feature weights, non-negative, alpha + beta + gamma (+ the
            ``extra_regions`` feature weights) = 1. beta is region class 0 (paper: vein), gamma
            kind 1 (paper: contour).
        delta, lam, mu: Eq. 8 loss weights for L_vein (kind 0), L_con (kind 1) and L_ce,
            non-negative; 0 removes a term (it is still reported).
        extra_regions: Weights of region classes 2, 3, ... when a dataset has more than two.
        empty_masks: What an image without a region of some kind (no box found, or cropped out)
            does in that kind's Eq. 7 loss: ``exclude`` (default) leaves it out — its all-zero
            target is no place the attention can go, and a softmax map can never reach it;
            ``include`` averages it in (the paper's and the released code's behaviour). The
            mask-fit metrics (:mod:`mgfa_ray.train.mask_fit`) always leave it out.
        mask_fit_images: Training images (an evenly spaced, fixed subset) on which the mask-fit
            check evaluates the attention every epoch at the evaluation geometry
            (``train_fit_prior_<kind>``, :mod:`mgfa_ray.train.mask_fit`), >= 1; the position prior is the
            mean target of every training image.
        activation: Eq. 4 attention activation: ``softmax`` over H*W (paper as
            printed: each map sums to 1, so the attention branch is ~1/(H*W) of the feature),
            ``softmax_scaled`` (H*W times the softmax: mean 1, the feature's scale) or
            ``sigmoid`` (released code). The ground-truth normalisation follows it
            (:func:`mgfa_ray.train.model.gt_attention`).
        shared_conv: One 1x1 conv for every region class (released code) instead of one per kind.
        attention_bias: The attention's 1x1 conv has a bias (released code: no).
        head_bias: The linear classifier has a bias (released code: no).
        output_stride: Backbone output stride 32, 16 or 8 (dilated last stages,
            :func:`mgfa_ray.train.model.build_backbone`): a finer feature grid for the attention maps.
        crop_to_region: Crop every photo (and its masks) to the box of this region class before
            resizing, with ``crop_margin``: e.g. ``contour`` makes the leaf fill the frame, so
            clutter around it (a colour chart, a ruler) cannot identify the class. ``None``: the
            whole photo. A photo without that region keeps its whole frame.
        crop_margin: Margin added on each side of that box, as a fraction of its width / height.
        crop_jitter: Moves each image's crop window by up to this fraction of its margin along x
            and y, in [0, 1], by a fixed per-image draw (:func:`mgfa_ray.train.targets.jitter_offsets`), so
            the region does not sit in the same place in every crop and a fixed map cannot match
            it; the masks get the same window. 0: the box is centred.
        line_regions: Region classes whose ground-truth mask is a line, not a box: the diagonal of
            the kind's most confident box that follows the dark (leaf) pixels in it, as a band
            ``line_width`` wide (:func:`mgfa_ray.train.targets.line_masks`). For a midrib (vein) the
            detector's axis-aligned box around a diagonal vein covers the blade on both sides;
            the line does not. Empty (default): every kind is its boxes (the paper).
        line_width: Width of those bands as a fraction of the mask side, in (0, 1].
        eval_crop: How the test-time input is made: ``resize`` (paper: the image resized to
            ``eval_size``) or ``center`` (released code: the ``resize`` image's centre window of
            ``eval_size``).
        eval_split: Manifest split evaluated each epoch (the search metric).
        precision: CUDA autocast dtype: ``bf16`` (default), ``fp16`` (with a gradient scaler,
            saved in checkpoints) or ``fp32``. CPU always runs fp32.
        channels_last: Use the channels-last memory format on CUDA (faster convolutions).
        threads: torch CPU threads (``None``: torch default).
        device: ``auto`` (CUDA when present), ``cpu`` or ``cuda``.
        seed: Seed of initialisation, shuffling and augmentation.
    """

    backbone: Literal["mobilenet_v2", "resnet18", "resnet34", "resnet50", "resnet101"] = "resnet50"
    weights: str | None = None
    resize: int = Field(512, ge=16)
    train_crop: int = Field(448, ge=16)
    eval_size: int | None = Field(None, ge=16)
    epochs: int = Field(300, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(0.003, gt=0.0)
    momentum: float = Field(0.938, ge=0.0, lt=1.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    lr_step: int = Field(100, ge=1)
    lr_decay: float = Field(0.1, gt=0.0, le=1.0)
    lr_schedule: Literal["step", "cosine"] = "step"
    alpha: float = Field(0.3, ge=0.0, le=1.0)
    beta: float = Field(0.5, ge=0.0, le=1.0)
    gamma: float = Field(0.2, ge=0.0, le=1.0)
    delta: float = Field(0.1, ge=0.0)
    lam: float = Field(0.1, ge=0.0)
    mu: float = Field(1.0, ge=0.0)
    extra_regions: list[RegionWeights] = []
    empty_masks: Literal["exclude", "include"] = "exclude"
    mask_fit_images: int = Field(128, ge=1)
    activation: Literal["softmax", "softmax_scaled", "sigmoid"] = "softmax"
    shared_conv: bool = False
    attention_bias: bool = True
    head_bias: bool = True
    output_stride: Literal[8, 16, 32] = 32
    crop_to_region: str | None = None
    crop_margin: float = Field(0.05, ge=0.0, le=1.0)
    crop_jitter: float = Field(0.0, ge=0.0, le=1.0)
    line_regions: list[str] = []
    line_width: float = Field(0.125, gt=0.0, le=1.0)
    eval_crop: Literal["resize", "center"] = "resize"
    eval_split: Literal["val", "test"] = "val"
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    channels_last: bool = True
    threads: int | None = Field(None, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0

    @property
    def eval_input_size(self) -> int:
        """Side in pixels of the test-time input: ``eval_size``, else ``train_crop``."""
        return self.train_crop if self.eval_size is None else self.eval_size

    @model_validator(mode="after")
    def _check(self) -> "TrainParams":
        weights = [self.alpha, self.beta, self.gamma, *(r.feature for r in self.extra_regions)]
        total = sum(weights)
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            names = "alpha + beta + gamma" + " + extra_regions[].feature" * bool(self.extra_regions)
            raise ValueError(
                f"{names} must equal 1 (paper Eq. 6), got {' + '.join(map(str, weights))} = {total}"
            )
        if self.train_crop > self.resize:
            raise ValueError(f"train_crop ({self.train_crop}) must be <= resize ({self.resize})")
        if self.eval_input_size > self.resize:
            raise ValueError(f"eval_size ({self.eval_size}) must be <= resize ({self.resize})")
        if self.crop_jitter > 0 and self.crop_to_region is None:
            raise ValueError(f"crop_jitter {self.crop_jitter} needs crop_to_region (there is no crop to move)")
        return self


class TrainConfig(TrainParams):
    """One trial: :class:`TrainParams` plus the data it trains on.

    Attributes:
        manifest: Manifest Parquet file (see :mod:`mgfa_ray.data.manifest`).
        masks: Mask set location: a directory or an object-store URI (see :mod:`mgfa_ray.masks`).
        region_classes: Region classes the model attends to, in mask-channel order; must equal the
            mask set's. Kind 0 pairs with (beta, delta), kind 1 with (gamma, lam), kind i >= 2
            with ``extra_regions[i - 2]``. Weights of kinds the list does not have must be 0.
    """

    manifest: str
    masks: str
    region_classes: list[str] = ["vein", "contour"]

    def with_paths(self, convert: Callable[[str], str]) -> "TrainConfig":
        """A copy with ``convert(path) -> str`` applied to the manifest, masks and a weights file
        (``weights`` other than a file path, i.e. ``None`` or ``"imagenet"``, is kept)."""
        update = {"manifest": convert(self.manifest), "masks": convert(self.masks)}
        if self.weights not in (None, "imagenet"):
            update["weights"] = convert(self.weights)
        return self.model_copy(update=update)

    def feature_weights(self) -> tuple[float, ...]:
        """Eq. 5 weights of the region classes, one per ``region_classes`` entry: (beta, gamma, ...)."""
        all_w = (self.beta, self.gamma, *(r.feature for r in self.extra_regions))
        return all_w[: len(self.region_classes)]

    def mask_loss_weights(self) -> tuple[float, ...]:
        """Eq. 8 weights of the region terms, one per ``region_classes`` entry: (delta, lam, ...)."""
        all_w = (self.delta, self.lam, *(r.mask_loss for r in self.extra_regions))
        return all_w[: len(self.region_classes)]

    @model_validator(mode="after")
    def _regions(self) -> "TrainConfig":
        k = len(self.region_classes)
        if k < 1 or len(set(self.region_classes)) != k:
            raise ValueError(f"region_classes must name at least one region class, each once, got {self.region_classes}")
        if k == 1 and (self.gamma != 0 or self.lam != 0):
            raise ValueError(
                f"with one region class gamma and lam must be 0, got gamma={self.gamma}, lam={self.lam}"
            )
        if len(self.extra_regions) != max(0, k - 2):
            raise ValueError(
                f"{k} region classes {self.region_classes} need {max(0, k - 2)} extra_regions entries (classes 2 and "
                f"up), got {len(self.extra_regions)}"
            )
        if self.crop_to_region is not None and self.crop_to_region not in self.region_classes:
            raise ValueError(f"crop_to_region {self.crop_to_region!r} is not one of the region classes "
                             f"{self.region_classes}")
        unknown = [k for k in self.line_regions if k not in self.region_classes]
        if unknown:
            raise ValueError(f"line_regions {unknown} are not region classes {self.region_classes}")
        if self.mu + sum(self.mask_loss_weights()) <= 0:
            raise ValueError("mu and the mask loss weights are all 0: the loss (Eq. 8) would be empty")
        return self


class StudySource(FrozenModel):
    """An earlier Optuna study to warm-start from.

    Attributes:
        storage: Its storage: an RDB URL (``sqlite:///…``, ``postgresql://…``) or a journal file path
            (e.g. ``outputs/leafsnap20/search/leafsnap20/optuna.journal``).
        study_name: The study's name in it (a search's ``search.json`` names both).
    """

    storage: str
    study_name: str


class SearchConfig(FrozenModel):
    """Ray Tune + Optuna search settings of a job.

    Attributes:
        space: Search-space YAML (see :mod:`mgfa_ray.search.space`), relative to the working
            directory unless absolute.
        num_samples: Number of trials.
        max_concurrent: Trials running at once.
        cpus_per_trial: CPUs reserved per trial (also the trial's torch threads).
        gpus_per_trial: GPUs per trial; fractions (e.g. 0.25) share a GPU.
        seed: Seed of the sampler.
        sampler: ``random`` (default) or ``tpe`` (multivariate TPE). Replayed on 64 recorded
            learning curves with ASHA at this project's rungs, no curve run twice, 100 seeds
            (results/benchmarks/README.md, ``search_efficiency_sim*.json``): random proposals reached
            a top-set configuration in 0.57 of random search's epochs, TPE in 0.56-0.57, Ray's stock
            ``OptunaSearch`` + ``ASHAScheduler`` in 0.58 — a table of 64 points cannot rank samplers.
            ``tpe`` is the choice where a neighbour of a good configuration is likely good too (a
            smooth space, a long search), and it is required with ``warm_start``.
        startup_trials: With ``tpe``: its random start-up trials before its model proposes
            (Optuna's ``n_startup_trials``). Default (None): half of ``num_samples``, at least 10
            (Optuna's own default is 10 whatever the budget); on the replay above 10 and 32 start-up
            trials did alike (0.56 and 0.57 of random search's epochs).
        metric: Metric the search maximises: top-1 accuracy on the trial's ``eval_split``,
            reported every epoch.
        storage_path: Where the search lives: a directory (local or NFS) or an object-store URI
            (``s3://bucket/prefix?endpoint_override=…``; credentials from the environment). Default
            ``<output_dir>/search``. The search is ``<storage_path>/<job name>/``.
        study_storage: The Optuna study's storage: an RDB URL or a journal file path. Default: the
            journal ``optuna.journal`` in the search directory; required when ``storage_path`` is
            an object store (a journal needs POSIX file locks).
        warm_start: An earlier study whose finished trials seed this search's sampler (needs
            ``sampler: tpe``: random proposals ignore earlier trials).
        max_failures: Times Ray retries a failed trial from its last checkpoint.
        checkpoints_to_keep: Checkpoints kept per trial, >= 2: with 1, Ray Tune re-snapshots the
            experiment over and over (ray-project/ray#31613).
        snapshot_period_s: Seconds between Ray Tune's snapshots of the experiment state (its
            ``TUNE_GLOBAL_CHECKPOINT_S``, applied only while the search runs), >= 0. 0 (default):
            after every controller step, so a driver killed at any moment resumes from the trials
            Ray had at that moment (Ray's own default snapshots every >= 10 s). A
            ``$TUNE_GLOBAL_CHECKPOINT_S`` set in the environment wins.
        reuse_workers: Run the next trial in the worker process of a finished one (Ray Tune's
            ``reuse_actors``) instead of starting a fresh process: the worker keeps torch, CUDA,
            the decoded images and the backbone weights loaded, and every trial still starts from
            its own seed with a new model and optimizer (:func:`mgfa_ray.train.trial.run_trial`).
            ``false``: a fresh process per trial.
        tensorboard: Ray Tune's TensorBoard event files in every trial's directory (its
            ``TBXLoggerCallback``; ``tensorboard --logdir <search>/runs``). ``false`` keeps only
            ``progress.csv`` and ``result.json`` (what this project reads): the driver then does not
            import torch for tensorboardX (about 3 s and 3.5 CPU-seconds per driver start, measured
            on the 2-core CPU machine) and writes one file less per reported epoch.
    """

    space: str
    num_samples: int = Field(8, ge=1)
    max_concurrent: int = Field(2, ge=1)
    cpus_per_trial: float = Field(1.0, gt=0.0)
    gpus_per_trial: float = Field(0.0, ge=0.0)
    seed: int = 0
    sampler: Literal["tpe", "random"] = "random"
    startup_trials: int | None = Field(None, ge=0)
    metric: Literal["eval_top1"] = "eval_top1"
    storage_path: str | None = None
    study_storage: str | None = None
    warm_start: StudySource | None = None
    max_failures: int = Field(2, ge=0)
    checkpoints_to_keep: int = Field(2, ge=2)
    reuse_workers: bool = True
    snapshot_period_s: float = Field(0.0, ge=0.0)
    tensorboard: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> "SearchConfig":
        if self.gpus_per_trial > 1 and self.gpus_per_trial != int(self.gpus_per_trial):
            raise ValueError(f"gpus_per_trial above 1 must be a whole number, got {self.gpus_per_trial}")
        if self.warm_start is not None and self.sampler != "tpe":
            raise ValueError(f"warm_start seeds the sampler's model, but sampler is {self.sampler!r}, which ignores "
                             "earlier trials: set search.sampler: tpe")
        return self

    @property
    def tpe_startup_trials(self) -> int:
        """TPE's random start-up trials: ``startup_trials``, else max(10, num_samples // 2)."""
        return self.startup_trials if self.startup_trials is not None else max(10, self.num_samples // 2)


class DecoyConfig(FrozenModel):
    """Settings of the decoy control, a generated data set (a job's ``generate`` section;
    :mod:`mgfa_ray.data.decoy` draws it).

    Attributes:
        kind: ``decoy`` (the only generator).
        classes: Number of classes C, 2 to 8 (orientations 180°/C apart).
        train_per_class, val_per_class, test_per_class: Images per class in each split.
        size: Image side in pixels (a power of two keeps the label boxes exact binary fractions).
        decoy: Draw the decoy (``false``: the same images without it).
        decoy_side: Side of the decoy square as a fraction of the image side.
        contrast: Amplitude of the object's grating in [0, 1] (the background's is the same).
        jitter: Orientation noise of the object's grating, ± degrees.
        seed: Seed of everything drawn.
    """

    kind: Literal["decoy"] = "decoy"
    classes: int = Field(4, ge=2, le=8)
    train_per_class: int = Field(40, ge=1)
    val_per_class: int = Field(10, ge=1)
    test_per_class: int = Field(25, ge=1)
    size: int = Field(128, ge=32)
    decoy: bool = True
    decoy_side: float = Field(0.14, gt=0.0, le=0.25)
    contrast: float = Field(0.25, gt=0.0, le=1.0)
    jitter: float = Field(10.0, ge=0.0, le=45.0)
    seed: int = 0

    def class_names(self) -> list[str]:
        """``class0``, ``class1``, … (folder names, in label order)."""
        return [f"class{k}" for k in range(self.classes)]


class AblationConfig(FrozenModel):
    """Table III as a job (``mgfa-ray ablation JOB``, :mod:`mgfa_ray.analysis.ablation`).

    Attributes:
        rows: Ablation rows: ``backbone`` (α = 1, no mask loss), a region class of
            ``regions.classes`` (only that kind's feature and loss weights kept, the other kinds'
            feature share given to α), ``all`` (every kind: the job's ``train`` weights).
            ``None``: backbone, each kind alone, and all kinds together (with two or more kinds).
        seeds: Seeds per row and activation (``train.seed``, ``train.seed + 1``, …), >= 1.
        activations: Attention activations to compare (``softmax``, ``softmax_scaled``,
            ``sigmoid``); ``None``: the job's ``train.activation`` alone.
        max_concurrent: Trials at once; ``None``: ``search.max_concurrent``.
    """

    rows: list[str] | None = Field(None, min_length=1)
    seeds: int = Field(5, ge=1)
    activations: list[Literal["softmax", "softmax_scaled", "sigmoid"]] | None = Field(None, min_length=1)
    max_concurrent: int | None = Field(None, ge=1)


class JobConfig(FrozenModel):
    """A whole job: manifest → detector → masks → search → export (``mgfa-ray run``).

    Attributes:
        name: Job name; names the search experiment.
        data_root: Root that dataset and label paths are relative to; ``None`` takes the
            environment variable ``MGFA_DATA_ROOT``, else ``../shared/data``.
        output_dir: Where every stage writes (relative to the working directory unless absolute).
        dataset, regions, detector, masks, search: Stage settings.
        train: Trial defaults; the search space overrides the parameters it samples.
        ablation: Settings of ``mgfa-ray ablation`` (rows, seeds, activations).
        generate: A data set the job draws itself before the manifest (:class:`DecoyConfig`, the
            positive control of :mod:`mgfa_ray.data.decoy`), into ``<output_dir>/data/``; its images and
            labels are then the data root of ``dataset.images`` and ``regions.labels``, and it
            needs ``dataset.layout: split_folders`` and ``regions.source: labels``. ``None``: the
            data root's files.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    data_root: str | None = None
    output_dir: str
    dataset: DatasetConfig
    regions: RegionsConfig
    detector: DetectorConfig = DetectorConfig()
    masks: MasksConfig = MasksConfig()
    train: TrainParams = TrainParams()
    search: SearchConfig
    ablation: AblationConfig = AblationConfig()
    generate: DecoyConfig | None = None

    @model_validator(mode="after")
    def _splits(self) -> "JobConfig":
        if self.dataset.layout == "ufg" and self.train.eval_split == "val":
            raise ValueError("dataset.layout ufg has no validation split (the paper's 1:1 train/test split): set "
                             "train.eval_split: test, or every trial would fail on an empty 'val' split after the "
                             "detector and the masks have run")
        unknown = [k for k in self.train.line_regions if k not in self.regions.classes]
        if unknown:
            raise ValueError(f"train.line_regions {unknown} are not region classes {self.regions.classes}")
        return self

    @model_validator(mode="after")
    def _generated(self) -> "JobConfig":
        if self.generate is not None and (self.dataset.layout != "split_folders" or self.regions.source != "labels"):
            raise ValueError(f"generate draws a split_folders data set with exact label boxes: set dataset.layout: "
                             f"split_folders and regions.source: labels (got {self.dataset.layout!r}, "
                             f"{self.regions.source!r})")
        return self


M = TypeVar("M", bound=BaseModel)


def _format_errors(source: str, err: ValidationError) -> str:
    lines = [f"{source}: invalid configuration"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (not a field of this section)"
        value = e.get("input")
        shown = "" if e["type"] == "missing" or isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"  {loc}: {msg}{shown}")
    return "\n".join(lines)


def validate(cls: type[M], data: Any, *, source: str = "<config>") -> M:
    """Build ``cls`` from a mapping, turning validation errors into :class:`ConfigError`.

    Raises:
        ConfigError: Naming ``source`` and each bad field as a dotted path.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(source, err)) from None


def load_yaml(path: str | os.PathLike) -> Any:
    """Read a YAML file.

    Raises:
        ConfigError: The file is missing or is not valid YAML (with its line).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None


def load_config(cls: type[M], path: str | os.PathLike) -> M:
    """Load and validate a YAML config file as ``cls`` (e.g. :class:`JobConfig`)."""
    return validate(cls, load_yaml(path), source=str(path))


def to_dict(cfg: BaseModel) -> dict[str, Any]:
    """Plain-dict form of a config, the exact document :func:`load_config` accepts back."""
    return cfg.model_dump(mode="json")


def resolve_data_root(configured: str | None) -> Path:
    """The data root: ``configured``, else ``$MGFA_DATA_ROOT``, else ``../shared/data``.

    Raises:
        ConfigError: The directory does not exist (the message says where it came from and how
            to set it).
    """
    if configured is not None:
        root, origin = configured, "data_root in the job file"
    elif os.environ.get(DATA_ROOT_ENV):
        root, origin = os.environ[DATA_ROOT_ENV], f"${DATA_ROOT_ENV}"
    else:
        root, origin = DEFAULT_DATA_ROOT, "the default"
    path = Path(root).expanduser().resolve()
    if not path.is_dir():
        raise ConfigError(
            f"data root {str(path)!r} (from {origin}) does not exist; set {DATA_ROOT_ENV} or "
            f"data_root in the job file to the directory holding the datasets"
        )
    return path


def absolute(path: str) -> str:
    """``path`` made absolute against the working directory (Ray runs trials elsewhere); a URI
    (``s3://...``) is returned unchanged."""
    if is_uri(path):
        return path
    return str(Path(path).expanduser().resolve())


def relative_to_cwd(path: str) -> str:
    """``path`` relative to the working directory when it lies below it, else unchanged (URIs
    too); keeps exported configs portable between clones."""
    if is_uri(path):
        return path
    p, cwd = Path(path).resolve(), Path.cwd().resolve()
    return str(p.relative_to(cwd)) if p.is_relative_to(cwd) else path


def under(root: Path, path: str) -> Path:
    """``path`` if absolute, else ``root / path``."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else root / p
