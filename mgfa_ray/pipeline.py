"""The chained job: manifest → detector → masks → search → export (``mgfa-ray run JOB``).

Everything goes under the job's ``output_dir``::

    job.yaml                 resolved job config (data root included; a valid job file itself)
    manifest.parquet         stage 1 (mgfa_ray.data.manifest)
    detector/                stage 3: weights.pt, metrics.json (mAP@0.5 per region class); absent
                             with ``regions.source: labels``
    masks/<set_id>/          stage 4: Parquet shards + metadata.json (mgfa_ray.masks); elsewhere
                             when ``masks.location`` names a path or object-store URI
    cache/                   decoded images shared by trials
    search/<name>/           the search (mgfa_ray.search.driver): search.json, the Optuna study
                             (optuna.journal), one Ray Tune experiment per run; elsewhere when
                             ``search.storage_path`` names a path or object-store URI
    export/                  best_config.yaml, best_checkpoint/, trials.{parquet,csv},
                             trial_epochs.{parquet,csv}, plots (PNG), summary.json

Before any stage runs, :func:`check_job` checks the trial defaults, the search space and the
weights file, and :func:`take_job_credentials` moves keys out of storage URIs (nothing written or
printed holds a secret). Stage gates stop a weak detector (:func:`detector_gate`) or a mask set
with too many empty images (:func:`mask_gate`) before the search, unless accepted.

A rerun skips finished stages: the detector when its metrics file matches its key, the mask set
when its id is complete (a partial set resumes shard by shard), and the search resumes where it
stopped (a finished search only exports again).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from mgfa_ray.config import (
    ConfigError,
    JobConfig,
    TrainConfig,
    absolute,
    relative_to_cwd,
    resolve_data_root,
    to_dict,
    under,
    validate,
)
from mgfa_ray.data.manifest import build_manifest, check_images, manifest_hash, write_manifest
from mgfa_ray.data.regions import LabelError, index_labels, label_layout_hint, select_annotated
from mgfa_ray.detector.training import check_backbone_weights, train_detector
from mgfa_ray.errors import RunInterrupted, StageError
from mgfa_ray.masks import build_mask_set, read_metadata, write_current_set
from mgfa_ray.masks.sources import DetectorBoxes, LabelBoxes
from mgfa_ray.runtime import ensure_ray
from mgfa_ray.search.driver import create_search, run_search
from mgfa_ray.search.export import export_search
from mgfa_ray.search.space import SearchSpace, load_search_space
from mgfa_ray.storage import (
    atomic_write_json,
    atomic_write_yaml,
    is_uri,
    redact_location,
    redact_tree,
    take_credentials,
)
from mgfa_ray.storage.lock import DirectoryLock
from mgfa_ray.weights import WeightsError

WeakPolicy = Literal["stop", "accept", "warn"]
"""What a stage gate does with a weak detector or mask set: ``stop`` the job, ``accept`` it (the
job's ``--accept-weak``), or ``warn`` and go on (smoke runs)."""


def smoke_config(cfg: JobConfig) -> JobConfig:
    """The job shrunk to a CI-sized run: 3 classes x 8 photos, 1 detector epoch, 64 px, 2 trials
    of 1 epoch (a generated data set: 4 / 2 / 2 images per class and split), written to
    ``<output_dir>-smoke``."""
    d = to_dict(cfg)
    d["output_dir"] = cfg.output_dir.rstrip("/") + "-smoke"
    d["dataset"].update(max_classes=3, max_per_class=8)
    d["detector"].update(epochs=1, imgsz=64, batch=4)
    d["masks"].update(num_actors=1, batch_size=8)
    d["train"].update(resize=72, train_crop=64, eval_size=None, batch_size=8)
    d["search"].update(num_samples=2)
    if d.get("generate"):
        d["generate"].update(train_per_class=4, val_per_class=2, test_per_class=2)
    return validate(JobConfig, d, source="smoke config")


def check_job(cfg: JobConfig, *, source: str = "job") -> tuple[SearchSpace, TrainConfig]:
    """Check that the job's trial defaults, region classes and search space fit together, before
    any stage runs.

    Returns:
        The loaded search space and the trial template (manifest and masks paths are filled in by
        :func:`run_job`).

    Raises:
        ConfigError: ``train`` does not fit ``regions.classes`` (e.g. a second region class's weights
            with one kind), the search-space file is invalid, or one of its values would give an
            invalid trial (the message names the file and key).
        WeightsError: ``train.weights`` (or a ``weights`` value of the search space) is a file that
            is missing, does not load with ``torch.load(weights_only=True)``, is not a state_dict
            or does not fit the backbone (:func:`mgfa_ray.train.model.check_weights`).
    """
    check_output_dir(cfg.output_dir)
    template = validate(
        TrainConfig, {**to_dict(cfg.train), "manifest": "<manifest>", "masks": "<masks>",
                      "region_classes": list(cfg.regions.classes)},
        source=f"{source}: train (with regions.classes {cfg.regions.classes})",
    )
    space = load_search_space(cfg.search.space, base=template)
    _check_job_weights(cfg, space, source=source)
    try:
        check_backbone_weights(cfg.detector, nc=len(cfg.regions.classes))
    except WeightsError as err:
        raise WeightsError(f"{source}: {err}") from None
    return space, template


def check_output_dir(output_dir: str) -> None:
    """``output_dir`` can hold a job: a local or NFS directory, existing or not, never a file or an
    object-store URI (the detector, manifest and caches are local files; the search and the masks
    go to object storage through ``search.storage_path`` and ``masks.location``).

    Raises:
        ConfigError: Naming the field, the location (its secrets redacted) and what to do.
    """
    if is_uri(output_dir):
        raise ConfigError(f"output_dir: {redact_location(output_dir)} is an object-store location; output_dir must be "
                          "a local or NFS directory. Put the search on object storage with search.storage_path and "
                          "the mask sets with masks.location (credentials from the environment or a profile)")
    path = Path(output_dir).expanduser()
    for parent in (path, *path.parents):
        if parent.exists() and not parent.is_dir():
            raise ConfigError(f"output_dir: {parent} is a file, not a directory; give a directory for the job's "
                              "outputs (a new one is created)")
        if parent.is_dir():
            return


def _choices(space: SearchSpace, name: str, default: Any) -> list[Any]:
    """The values a search space gives the trial parameter ``name`` (``[default]`` when it does not)."""
    value = space.parameters.get(name, default)
    return list(getattr(value, "choices", [value]))


def _check_job_weights(cfg: JobConfig, space: SearchSpace, *, source: str) -> None:
    """Every (backbone, weights) pair a trial of the job can get loads (:func:`mgfa_ray.train.model.check_weights`)."""
    from mgfa_ray.train.model import check_weights

    for backbone in _choices(space, "backbone", cfg.train.backbone):
        for weights in _choices(space, "weights", cfg.train.weights):
            field = "train.weights" if weights == cfg.train.weights else f"{cfg.search.space}: parameters.weights"
            check_weights(backbone, weights, field=f"{source}: {field} (backbone {backbone})")


_REMEDIES = ("more detector epochs (detector.epochs, now {epochs}), a larger detector.imgsz (now {imgsz}; the "
             "paper uses 480), more labelled photos (regions.labels{max_images})")


def _remedies(cfg: JobConfig) -> str:
    more = f"; regions.max_images is {cfg.regions.max_images}" if cfg.regions.max_images else ""
    return _REMEDIES.format(epochs=cfg.detector.epochs, imgsz=cfg.detector.imgsz, max_images=more)


def detector_gate(metrics: dict[str, Any], cfg: JobConfig) -> str | None:
    """Stage gate after the detector: every region class's held-out mAP@0.5 must reach
    ``detector.min_map50``, and, where the detector measured them (:mod:`mgfa_ray.detector.overlap`),
    its held-out masks must overlap the hand-drawn masks better than the position prior does
    (``mask_iou`` > ``prior_iou``). ``min_map50`` 0 turns both checks off.

    Args:
        metrics: The detector's ``metrics.json`` (:func:`mgfa_ray.detector.training.train_detector`): reads
            ``per_class[<class>]["map50"]`` (float in [0, 1], or ``None`` when the class has no
            held-out instance: reported, never failed), ``n_holdout_instances``, and
            ``mask_iou`` / ``prior_iou`` when present (a detector trained before they existed
            has neither: only its mAP is checked).
        cfg: The job (threshold and the settings the remedies name).

    Returns:
        ``None`` when every class passes, else the message: each class's mAP@0.5 against the
        threshold, and the usual remedies.
    """
    low, lines = False, []
    for name in cfg.regions.classes:
        entry = metrics.get("per_class", {}).get(name, {})
        value, n = entry.get("map50"), entry.get("n_holdout_instances", 0)
        if value is None:
            lines.append(f"{name} not measured (no held-out instance: label more photos)")
            continue
        weak = value < cfg.detector.min_map50
        line = f"{name} {value:.3f}{' (below)' if weak else ''} on {n} held-out instances"
        iou, prior = entry.get("mask_iou"), entry.get("prior_iou")
        if iou is not None and prior is not None and cfg.detector.min_map50 > 0:
            if iou <= prior:
                weak = True
                line += f", its masks no better than a fixed mask (IoU {iou:.2f} vs the position prior's {prior:.2f})"
            else:
                line += f", mask IoU {iou:.2f} vs the position prior's {prior:.2f}"
        low |= weak
        lines.append(line)
    if not low:
        return None
    return (f"detector too weak for its masks: held-out mAP@0.5 {', '.join(lines)}; detector.min_map50 is "
            f"{cfg.detector.min_map50} and masks must beat the position prior. Remedies: {_remedies(cfg)}")


def mask_gate(meta: dict[str, Any], cfg: JobConfig, *, location: str) -> str | None:
    """Stage gate after the masks: for every region class, the fraction of images without a
    region may be at most ``masks.max_empty_fraction``.

    Args:
        meta: The mask set's ``metadata.json`` (:func:`mgfa_ray.masks.read_metadata`): reads
            ``summary.images`` and ``summary.per_class[<class>].images_with_region`` (fraction in
            [0, 1]).
        cfg: The job (threshold and the settings the remedies name).
        location: The set's location, named in the message.

    Returns:
        ``None`` when every class passes, else the message: per class the fraction and count of
        images without a region, against the threshold, and the usual remedies.
    """
    summary = meta["summary"]
    n = summary["images"]
    empty = {c: 1.0 - summary["per_class"][c]["images_with_region"] for c in cfg.regions.classes}
    if all(v <= cfg.masks.max_empty_fraction for v in empty.values()):
        return None
    shown = ", ".join(f"{c} {v:.2f} ({round(v * n)} of {n})" for c, v in empty.items())
    if cfg.regions.source == "labels":
        fix = "label the photos without boxes, or choose regions.source: detector"
    else:
        fix = f"a lower detector.conf (now {cfg.detector.conf}), {_remedies(cfg)}"
    return (f"mask set {redact_location(location)}: too many images without a region: fraction without a box "
            f"{shown}; masks.max_empty_fraction is {cfg.masks.max_empty_fraction}. Remedies: {fix}")


def _gate(problem: str | None, *, stage: str, weak: str, accepted: list[str]) -> None:
    """Act on a gate's verdict: ``weak`` is ``stop`` (raise), ``accept`` (the --accept-weak flag)
    or ``warn`` (smoke runs and ablations): both print a warning and record it in ``accepted``."""
    if problem is None:
        return
    if weak == "stop":
        raise StageError(f"{problem}; then rerun the same command (finished stages are kept). To go on with "
                         f"this {stage} knowingly: mgfa-ray run --accept-weak JOB")
    print(f"warning: weak {stage} accepted ({'--accept-weak' if weak == 'accept' else 'smoke run'}): {problem}",
          flush=True)
    accepted.append(problem)


def take_job_credentials(cfg: JobConfig) -> JobConfig:
    """``cfg`` with the keys that its storage locations carry moved to this process's environment
    (:func:`mgfa_ray.storage.take_credentials`): ``masks.location``, ``search.storage_path``,
    ``search.study_storage`` and ``search.warm_start.storage``. Nothing the job writes, logs or
    prints can then hold them; call before Ray starts, so that its local workers inherit them.

    Raises:
        ConfigError: A location carries a secret that cannot be taken (see ``take_credentials``).
    """
    masks = cfg.masks.model_copy(update={"location": take_credentials(cfg.masks.location, field="masks.location")})
    update: dict[str, Any] = {
        "storage_path": take_credentials(cfg.search.storage_path, field="search.storage_path"),
        "study_storage": take_credentials(cfg.search.study_storage, field="search.study_storage"),
    }
    if cfg.search.warm_start is not None:
        warm = cfg.search.warm_start
        update["warm_start"] = warm.model_copy(
            update={"storage": take_credentials(warm.storage, field="search.warm_start.storage")})
    return cfg.model_copy(update={"masks": masks, "search": cfg.search.model_copy(update=update)})


def _banner(stage: str) -> float:
    print(f"\n=== mgfa-ray: {stage} ===", flush=True)
    return time.perf_counter()


def job_data_root(cfg: JobConfig, out: Path) -> Path:
    """The root of the job's ``dataset.images`` and ``regions.labels``: with ``generate``, the data
    set it draws under ``<output_dir>/data/`` (:func:`mgfa_ray.data.decoy.generate_decoy`, drawn now
    unless already there); else :func:`~mgfa_ray.config.resolve_data_root` of ``data_root``.

    Raises:
        ConfigError: The data root does not exist.
    """
    if cfg.generate is None:
        return resolve_data_root(cfg.data_root)
    from mgfa_ray.data.decoy import generate_decoy

    return generate_decoy(cfg.generate, out / "data")


def job_mask_root(cfg: JobConfig, out: Path) -> str:
    """The directory (or URI) holding the job's mask sets: ``masks.location``, else ``<output_dir>/masks``."""
    return cfg.masks.location or str(out / "masks")


def prepare_detector(
    cfg: JobConfig, *, data_root: Path, out: Path, timings: dict[str, float],
    weak: WeakPolicy = "warn", accepted: list[str] | None = None,
) -> tuple[Any, dict[str, Any] | None, DetectorBoxes | LabelBoxes]:
    """Stages 1-3 of a job: manifest and detector (or the label files as they are), each skipped
    when already done (``mgfa-ray detector train JOB`` stops here).

    Returns:
        ``(manifest, detector, source)``: the manifest DataFrame, the detector's metrics (``None``
        with ``regions.source: labels``) and where the mask stage takes its boxes from.

    Raises:
        ConfigError: Missing data root, images or labels.
        LabelError: A malformed label line (file:line).
        StageError: ``weak="stop"`` and the detector failed its gate (:func:`detector_gate`).
    """
    accepted = [] if accepted is None else accepted
    atomic_write_yaml(out / "job.yaml", redact_tree({**to_dict(cfg), "data_root": str(data_root)}))

    t = _banner("manifest")
    # labelled_in_train needs the labels before the split; otherwise a bad image is reported first
    labels = index_labels(under(data_root, cfg.regions.labels)) if cfg.dataset.labelled_in_train else None
    manifest = build_manifest(under(data_root, cfg.dataset.images), cfg.dataset, labelled=labels or ())
    check_images(manifest, corrupt_images=cfg.masks.corrupt_images)  # a bad file stops the job here, not in the masks
    write_manifest(manifest, out / "manifest.parquet")
    counts = manifest["split"].value_counts().to_dict()
    print(f"{len(manifest)} images, {manifest['label'].nunique()} classes, splits {counts}", flush=True)
    timings["manifest"] = time.perf_counter() - t

    if labels is None:
        labels = index_labels(under(data_root, cfg.regions.labels))
    if cfg.regions.source == "detector":
        t = _banner("detector")
        labels = select_annotated(labels, manifest, max_images=cfg.regions.max_images, seed=cfg.regions.seed)
        det = train_detector(manifest=manifest, label_files=labels, region_classes=cfg.regions.classes,
                             cfg=cfg.detector, out_dir=out / "detector", unknown_class=cfg.regions.unknown_class)
        how = det["evaluation"]
        print(f"detector {det['detector_key']}: mAP@0.5 = {det['map50']:.3f} ({how}; {det['n_train']} train"
              + (f" / {det['n_holdout']} held-out images)" if how == "holdout" else " images, refit on all)"), flush=True)
        timings["detector"] = time.perf_counter() - t
        _gate(detector_gate(det, cfg), stage="detector", weak=weak, accepted=accepted)
        source: DetectorBoxes | LabelBoxes = DetectorBoxes(
            weights=str(out / "detector" / "weights.pt"), detector_key=det["detector_key"], imgsz=cfg.detector.imgsz,
            conf=cfg.detector.conf, batch_size=cfg.masks.batch_size)
    else:  # the label files as they are: no detector
        det = None
        if (hint := label_layout_hint(labels, manifest["image_id"].tolist())) is not None:
            raise LabelError(hint)  # labels laid out unlike the images (e.g. one flat folder)
        ids = set(manifest["image_id"])
        source = LabelBoxes.create({i: p for i, p in labels.items() if i in ids}, classes=cfg.regions.classes,
                                   unknown_class=cfg.regions.unknown_class, unlabelled=cfg.regions.unlabelled)
    return manifest, det, source


def prepare_data(
    cfg: JobConfig, *, data_root: Path, out: Path, timings: dict[str, float],
    weak: WeakPolicy = "warn", accepted: list[str] | None = None,
) -> tuple[TrainConfig, dict[str, Any] | None, str, dict[str, Any]]:
    """Stages 1-4 of a job: manifest, detector (or the label files as they are) and mask set,
    each skipped when already done; starts Ray (local, or the cluster of ``$RAY_ADDRESS``).
    The stage gates (:func:`detector_gate` right after the detector, :func:`mask_gate` after the
    masks) stop a weak stage or let it through with a warning, as ``weak`` says.

    Args:
        cfg: The job.
        data_root: Resolved data root.
        out: The job's output directory (absolute).
        timings: Filled with each stage's seconds.
        weak: What a failed gate does: ``stop`` raises :class:`~mgfa_ray.errors.StageError`;
            ``accept`` (``--accept-weak``) and ``warn`` (smoke runs; ablations) print a warning.
        accepted: Filled with the messages of the gates let through.

    Returns:
        ``(base, detector, set_dir, metadata)``: the trial template (``cfg.train`` with the
        manifest and mask set, paths relative to the working directory), the detector's metrics
        (``None`` with ``regions.source: labels``), the mask set's location and its metadata.

    Raises:
        ConfigError: Missing data root, images or labels.
        LabelError: A malformed label line (file:line).
        StageError: ``weak="stop"`` and a stage gate failed (the message gives the numbers per
            class and the remedies); the finished stages are kept.
    """
    accepted = [] if accepted is None else accepted
    manifest, det, source = prepare_detector(cfg, data_root=data_root, out=out, timings=timings, weak=weak,
                                             accepted=accepted)
    ensure_ray()

    t = _banner("masks")
    mask_root = job_mask_root(cfg, out)
    set_dir = build_mask_set(
        manifest=manifest, manifest_hash=manifest_hash(manifest), source=source, region_classes=cfg.regions.classes,
        cfg=cfg.masks, location=mask_root, manifest_path=str(out / "manifest.parquet"),
    )
    meta = read_metadata(set_dir)
    write_current_set(mask_root, meta["set_id"])
    print(f"mask set {redact_location(set_dir)} ({meta['rows']} rows): {meta['summary']}", flush=True)
    timings["masks"] = time.perf_counter() - t
    _gate(mask_gate(meta, cfg, location=set_dir), stage="mask set", weak=weak, accepted=accepted)
    base = TrainConfig(**cfg.train.model_dump(), manifest=relative_to_cwd(str(out / "manifest.parquet")),
                       masks=relative_to_cwd(set_dir), region_classes=cfg.regions.classes)
    return base, det, set_dir, meta


STAGES = ("detector", "masks", "search")
"""Where :func:`run_job` can stop: after the detector, after the mask set, or after the search and export."""



def prepared_job(cfg: JobConfig, *, smoke: bool = False) -> tuple[JobConfig, SearchSpace]:
    """The job as it will run, checked before anything is written: keys in storage URIs moved to the
    environment (:func:`take_job_credentials`), shrunk by :func:`smoke_config` when ``smoke``, and
    trial defaults, region classes and search space checked together (:func:`check_job`).

    Raises:
        ConfigError: As :func:`check_job` (the message names the field).
    """
    cfg = take_job_credentials(cfg)  # keys in storage URIs go to the environment, never into a file
    if smoke:
        cfg = smoke_config(cfg)
    space, _ = check_job(cfg)
    return cfg, space


@contextmanager
def job_directory(cfg: JobConfig) -> Iterator[tuple[Path, Path]]:
    """The job's output directory, created and locked for this driver while the block runs; yields
    ``(output directory, data root)`` (:func:`job_data_root`). A missing data root fails first, before
    anything is written.

    Raises:
        ConfigError: The data root does not exist.
        LockedError: Another live driver holds the directory (:class:`mgfa_ray.storage.lock.DirectoryLock`).
    """
    if cfg.generate is None:
        resolve_data_root(cfg.data_root)
    out = Path(cfg.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    with DirectoryLock(str(out), what="job"):
        yield out, job_data_root(cfg, out)


def run_job(cfg: JobConfig, *, smoke: bool = False, until: str = "search", accept_weak: bool = False) -> dict[str, Any]:
    """Run the stages of ``cfg`` up to ``until`` on the local (or connected) Ray cluster.

    Args:
        cfg: Validated job config.
        smoke: Shrink the job with :func:`smoke_config` (CI). Its 1-epoch, 64 px detector cannot
            pass the stage gates, so in a smoke run a failed gate is a printed warning.
        until: Last stage run, one of :data:`STAGES`: ``detector`` (manifest and detector; ``mgfa-ray
            detector train``), ``masks`` (up to the mask set; ``mgfa-ray masks build``) or ``search``
            (every stage and the export; ``mgfa-ray run`` / ``search start``).
        accept_weak: Let a stage that fails its gate (:func:`detector_gate`, :func:`mask_gate`)
            through, with a printed warning recorded in ``report.json`` (``accepted_weak``).

    Returns:
        Summary: stage timings, detector mAP@0.5, mask set, search summary, output paths (those of
        the stages run; ``report.json`` is written only when the search ran).

    Raises:
        ConfigError: Missing data root, image or label directory, or search-space file.
        LabelError: A malformed label line (file:line).
        LockedError: Another live driver runs a job in the same ``output_dir``, or the same search
            (:class:`mgfa_ray.storage.lock.DirectoryLock`).
        RunInterrupted: Ctrl-C during the search: nothing exported, the message says how to resume.
        StageError: A stage gate failed (not ``accept_weak``, not ``smoke``): the job stops before
            the search, keeping the finished stages.
    """
    if until not in STAGES:
        raise ValueError(f"until must be one of {STAGES}, got {until!r}")
    if until == "detector" and cfg.regions.source != "detector":
        raise ConfigError(f"regions.source is {cfg.regions.source!r}: job {cfg.name!r} trains no detector (its masks "
                          "come from the label files); run `mgfa-ray masks build JOB` instead")
    cfg, space = prepared_job(cfg, smoke=smoke)
    with job_directory(cfg) as (out, data_root):
        weak: WeakPolicy = "warn" if smoke else "accept" if accept_weak else "stop"
        return _run_stages(cfg, space, data_root=data_root, out=out, smoke=smoke, weak=weak, until=until)


def _run_stages(cfg: JobConfig, space: SearchSpace, *, data_root: Path, out: Path, smoke: bool,
                weak: WeakPolicy, until: str = "search") -> dict[str, Any]:
    timings: dict[str, float] = {}
    accepted: list[str] = []
    if until == "detector":
        _, det, _ = prepare_detector(cfg, data_root=data_root, out=out, timings=timings, weak=weak, accepted=accepted)
        return {"job": cfg.name, "smoke": smoke, "output_dir": str(out), "timings_seconds": timings,
                "detector": _detector_summary(det), "accepted_weak": accepted}
    base, det, set_dir, meta = prepare_data(cfg, data_root=data_root, out=out, timings=timings, weak=weak,
                                            accepted=accepted)
    if until == "masks":
        return {"job": cfg.name, "smoke": smoke, "output_dir": str(out), "timings_seconds": timings,
                "detector": _detector_summary(det), "accepted_weak": accepted,
                "mask_set": {"path": set_dir, "rows": meta["rows"], "summary": meta["summary"]}}

    t = _banner("search")
    # Ray runs each trial in its own directory: it gets absolute paths and the exact mask set. The
    # export keeps paths as given (relative to the working directory) and names the job's mask
    # directory, whose CURRENT set is the one this machine's detector gave: the best config works
    # in any clone that has run the job, whatever set id its detector produced there.
    export_base = base.model_copy(update={"masks": relative_to_cwd(job_mask_root(cfg, out))})
    search_dir = create_search(
        name=cfg.name, space=space, space_file=cfg.search.space, search=cfg.search, base=base.with_paths(absolute),
        export_base=export_base, storage_path=cfg.search.storage_path or str(out / "search"),
        max_epochs=1 if smoke else None, cache_dir=str(out / "cache"), export_dir=str(out / "export"))
    shown = redact_location(search_dir)
    print(f"search {shown} (resume: mgfa-ray search resume {shown})", flush=True)
    try:
        run_search(search_dir)
    except RunInterrupted as err:  # nothing exported: a partial search is not a result
        raise RunInterrupted(f"{err} (or run the same `mgfa-ray run` command again)") from None
    summary = export_search(search_dir, out / "export")
    timings["search"] = time.perf_counter() - t

    report = {
        "job": cfg.name, "smoke": smoke, "output_dir": str(out), "timings_seconds": timings,
        "detector": _detector_summary(det),
        "mask_set": {"path": set_dir, "rows": meta["rows"], "summary": meta["summary"]},
        "search": summary, "accepted_weak": accepted,
    }
    atomic_write_json(out / "report.json", report)
    if summary.get("best_masks_learned") is False:
        print("warning: masks not learned by the best trial: its attention did not beat the position prior on the "
              "training images (export/trials.csv: masks_learned; trial_epochs: train_fit_prior_<region class>)", flush=True)
    print(f"\n=== mgfa-ray: done in {sum(timings.values()):.0f} s — best {cfg.search.metric} "
          f"{summary['best_' + cfg.search.metric]:.3f}; best config {out / 'export' / 'best_config.yaml'}",
          flush=True)
    return report


def _detector_summary(det: dict[str, Any] | None) -> dict[str, Any] | None:
    return det and {k: det[k] for k in ("detector_key", "map50", "map50_95", "per_class")}
