"""The chained job: manifest → detector → masks → search → export (``mgfa-ray run JOB``).

Everything goes under the job's ``output_dir``::

    job.yaml                 resolved job config (data root included; a valid job file itself)
    manifest.parquet         stage 1 (mgfa_ray.manifest)
    detector/                stage 3: weights.pt, metrics.json (mAP@0.5 per region class); absent
                             with ``regions.source: labels``
    masks/<set_id>/          stage 4: Parquet shards + metadata.json (mgfa_ray.masks); elsewhere
                             when ``masks.location`` names a path or object-store URI
    cache/                   decoded images shared by trials
    search/<name>/           the search (mgfa_ray.search): search.json, the Optuna study
                             (optuna.journal), one Ray Tune experiment per run; elsewhere when
                             ``search.storage_path`` names a path or object-store URI
    export/                  best_config.yaml, best_checkpoint/, trials.{parquet,csv},
                             trial_epochs.{parquet,csv}, plots (PNG), summary.json

A rerun skips finished stages: the detector when its metrics file matches its key, the mask set
when its id is complete (a partial set resumes shard by shard), and the search resumes where it
stopped (a finished search only exports again).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .config import (
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
from .detector import train_detector
from .io import atomic_write_json, atomic_write_yaml
from .lock import DirectoryLock
from .manifest import build_manifest, manifest_hash, write_manifest
from .masks import DetectorBoxes, LabelBoxes, build_mask_set, read_metadata, write_current_set
from .regions import index_labels, select_annotated
from .search import create_search, export_search, run_search
from .search_space import SearchSpace, load_search_space


def smoke_config(cfg: JobConfig) -> JobConfig:
    """The job shrunk to a CI-sized run: 3 classes x 8 photos, 1 detector epoch, 64 px, 2 trials
    of 1 epoch, written to ``<output_dir>-smoke``."""
    d = to_dict(cfg)
    d["output_dir"] = cfg.output_dir.rstrip("/") + "-smoke"
    d["dataset"].update(max_classes=3, max_per_class=8)
    d["detector"].update(epochs=1, imgsz=64, batch=4)
    d["masks"].update(num_actors=1, batch_size=8)
    d["train"].update(resize=72, crop=64, batch_size=8)
    d["search"].update(num_samples=2)
    return validate(JobConfig, d, source="smoke config")


def check_job(cfg: JobConfig, *, source: str = "job") -> tuple[SearchSpace, TrainConfig]:
    """Check that the job's trial defaults, region classes and search space fit together, before
    any stage runs.

    Returns:
        The loaded search space and the trial template (manifest and masks paths are filled in by
        :func:`run_job`).

    Raises:
        ConfigError: ``train`` does not fit ``regions.classes`` (e.g. a second region kind's weights
            with one kind), the search-space file is invalid, or one of its values would give an
            invalid trial (the message names the file and key).
        WeightsError: ``train.weights`` (or a ``weights`` value of the search space) is a file that
            is missing, does not load with ``torch.load(weights_only=True)``, is not a state_dict
            or does not fit the backbone (:func:`mgfa_ray.model.check_weights`).
    """
    template = validate(
        TrainConfig, {**to_dict(cfg.train), "manifest": "<manifest>", "masks": "<masks>",
                      "region_classes": list(cfg.regions.classes)},
        source=f"{source}: train (with regions.classes {cfg.regions.classes})",
    )
    space = load_search_space(cfg.search.space, base=template)
    _check_job_weights(cfg, space, source=source)
    return space, template


def _choices(space: SearchSpace, name: str, default: Any) -> list[Any]:
    """The values a search space gives the trial parameter ``name`` (``[default]`` when it does not)."""
    value = space.parameters.get(name, default)
    return list(getattr(value, "choices", [value]))


def _check_job_weights(cfg: JobConfig, space: SearchSpace, *, source: str) -> None:
    """Every (backbone, weights) pair a trial of the job can get loads (:func:`mgfa_ray.model.check_weights`)."""
    from .model import check_weights

    for backbone in _choices(space, "backbone", cfg.train.backbone):
        for weights in _choices(space, "weights", cfg.train.weights):
            field = "train.weights" if weights == cfg.train.weights else f"{cfg.search.space}: parameters.weights"
            check_weights(backbone, weights, field=f"{source}: {field} (backbone {backbone})")


def _banner(stage: str) -> float:
    print(f"\n=== mgfa-ray: {stage} ===", flush=True)
    return time.perf_counter()


def job_mask_root(cfg: JobConfig, out: Path) -> str:
    """The directory (or URI) holding the job's mask sets: ``masks.location``, else ``<output_dir>/masks``."""
    return cfg.masks.location or str(out / "masks")


def prepare_data(
    cfg: JobConfig, *, data_root: Path, out: Path, timings: dict[str, float]
) -> tuple[TrainConfig, dict[str, Any] | None, str, dict[str, Any]]:
    """Stages 1-4 of a job: manifest, detector (or the label files as they are) and mask set,
    each skipped when already done; starts Ray (local, or the cluster of ``$RAY_ADDRESS``).

    Args:
        cfg: The job.
        data_root: Resolved data root.
        out: The job's output directory (absolute).
        timings: Filled with each stage's seconds.

    Returns:
        ``(base, detector, set_dir, metadata)``: the trial template (``cfg.train`` with the
        manifest and mask set, paths relative to the working directory), the detector's metrics
        (``None`` with ``regions.source: labels``), the mask set's location and its metadata.

    Raises:
        ConfigError: Missing data root, images or labels.
        LabelError: A malformed label line (file:line).
    """
    import ray

    atomic_write_yaml(out / "job.yaml", {**to_dict(cfg), "data_root": str(data_root)})

    t = _banner("manifest")
    manifest = build_manifest(under(data_root, cfg.dataset.images), cfg.dataset)
    write_manifest(manifest, out / "manifest.parquet")
    counts = manifest["split"].value_counts().to_dict()
    print(f"{len(manifest)} images, {manifest['label'].nunique()} classes, splits {counts}", flush=True)
    timings["manifest"] = time.perf_counter() - t

    labels = index_labels(under(data_root, cfg.regions.labels))
    if cfg.regions.source == "detector":
        t = _banner("detector")
        labels = select_annotated(labels, manifest, max_images=cfg.regions.max_images, seed=cfg.regions.seed)
        det = train_detector(manifest=manifest, label_files=labels, region_classes=cfg.regions.classes,
                             cfg=cfg.detector, out_dir=out / "detector", unknown_class=cfg.regions.unknown_class)
        print(f"detector {det['detector_key']}: held-out mAP@0.5 = {det['map50']:.3f} "
              f"({det['n_train']} train / {det['n_holdout']} held-out images)", flush=True)
        timings["detector"] = time.perf_counter() - t
        source: DetectorBoxes | LabelBoxes = DetectorBoxes(
            weights=str(out / "detector" / "weights.pt"), detector_key=det["detector_key"], imgsz=cfg.detector.imgsz,
            conf=cfg.detector.conf, batch_size=cfg.masks.batch_size)
    else:  # the label files as they are: no detector
        det = None
        ids = set(manifest["image_id"])
        source = LabelBoxes.create({i: p for i, p in labels.items() if i in ids}, classes=cfg.regions.classes,
                                   unknown_class=cfg.regions.unknown_class, unlabelled=cfg.regions.unlabelled)

    if not ray.is_initialized():  # a local cluster, or the one named by $RAY_ADDRESS
        ray.init(include_dashboard=False, configure_logging=False)

    t = _banner("masks")
    mask_root = job_mask_root(cfg, out)
    set_dir = build_mask_set(
        manifest=manifest, manifest_hash=manifest_hash(manifest), source=source, region_classes=cfg.regions.classes,
        cfg=cfg.masks, location=mask_root, manifest_path=str(out / "manifest.parquet"),
    )
    meta = read_metadata(set_dir)
    write_current_set(mask_root, meta["set_id"])
    print(f"mask set {set_dir} ({meta['rows']} rows): {meta['summary']}", flush=True)
    timings["masks"] = time.perf_counter() - t
    base = TrainConfig(**cfg.train.model_dump(), manifest=relative_to_cwd(str(out / "manifest.parquet")),
                       masks=relative_to_cwd(set_dir), region_classes=cfg.regions.classes)
    return base, det, set_dir, meta


def run_job(cfg: JobConfig, *, smoke: bool = False) -> dict[str, Any]:
    """Run every stage of ``cfg`` on the local (or connected) Ray cluster.

    Args:
        cfg: Validated job config.
        smoke: Shrink the job with :func:`smoke_config` (CI).

    Returns:
        Summary: stage timings, detector mAP@0.5, mask set, search summary, output paths.

    Raises:
        ConfigError: Missing data root, image or label directory, or search-space file.
        LabelError: A malformed label line (file:line).
        LockedError: Another live driver runs a job in the same ``output_dir``, or the same search
            (:class:`mgfa_ray.lock.DirectoryLock`).
    """
    if smoke:
        cfg = smoke_config(cfg)
    space, _ = check_job(cfg)  # before any stage runs or anything is written
    data_root = resolve_data_root(cfg.data_root)
    out = Path(cfg.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    with DirectoryLock(str(out), what="job"):
        return _run_stages(cfg, space, data_root=data_root, out=out, smoke=smoke)


def _run_stages(cfg: JobConfig, space: SearchSpace, *, data_root: Path, out: Path, smoke: bool) -> dict[str, Any]:
    timings: dict[str, float] = {}
    base, det, set_dir, meta = prepare_data(cfg, data_root=data_root, out=out, timings=timings)

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
    print(f"search {search_dir} (resume: mgfa-ray search resume {search_dir})", flush=True)
    run_search(search_dir)
    summary = export_search(search_dir, out / "export")
    timings["search"] = time.perf_counter() - t

    report = {
        "job": cfg.name, "smoke": smoke, "output_dir": str(out), "timings_seconds": timings,
        "detector": det and {k: det[k] for k in ("detector_key", "map50", "map50_95", "per_class")},
        "mask_set": {"path": set_dir, "rows": meta["rows"], "summary": meta["summary"]},
        "search": summary,
    }
    atomic_write_json(out / "report.json", report)
    print(f"\n=== mgfa-ray: done in {sum(timings.values()):.0f} s — best {cfg.search.metric} "
          f"{summary['best_' + cfg.search.metric]:.3f}; best config {out / 'export' / 'best_config.yaml'}",
          flush=True)
    return report
