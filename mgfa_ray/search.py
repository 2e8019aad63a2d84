"""Stage 6 — the search: Ray Tune + Optuna TPE + ASHA over :func:`mgfa_ray.trial.run_trial`.

* :func:`tune_trainable` is the thin Ray wrapper: it validates the trial config, resumes from
  Ray's checkpoint when there is one, and reports every epoch's metrics with a checkpoint.
* :func:`run_search` builds the ``Tuner``: ``OptunaSearch`` with a seeded multivariate TPE sampler
  and the define-by-run space of :mod:`mgfa_ray.search_space`, a ``ConcurrencyLimiter``, an
  ``ASHAScheduler`` on epochs, two checkpoints kept per trial (DESIGN.md §4.7), one retry for a
  failed trial, fresh actors per trial (§4.8).
* :func:`export_results` writes what users take away: ``best_config.yaml`` (a
  :class:`~mgfa_ray.config.TrainConfig` that ``mgfa-ray train --config`` accepts as is),
  ``trials.parquet`` / ``trials.csv`` (one row per trial) and ``trial_epochs.parquet`` /
  ``trial_epochs.csv`` (one row per trial and epoch).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from .config import SearchConfig, TrainConfig, TrainParams, to_dict, validate
from .io import atomic_write_bytes, atomic_write_json, atomic_write_yaml
from .search_space import SearchSpace, optuna_space, trial_params
from .trial import load_checkpoint, run_trial, save_checkpoint

CHECKPOINT_FILE = "checkpoint.pt"


def tune_trainable(config: dict[str, Any], *, base: dict[str, Any], cache_dir: str | None = None) -> None:
    """Ray Tune function trainable: one trial of :func:`~mgfa_ray.trial.run_trial`.

    Args:
        config: The sampled parameters (Ray's trial config).
        base: The rest of the :class:`~mgfa_ray.config.TrainConfig` (data paths, defaults).
        cache_dir: Decoded-image cache shared by the trials.
    """
    from ray import tune

    cfg = validate(TrainConfig, {**base, **trial_params(config)}, source="trial config")
    resume = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            resume = load_checkpoint(Path(d) / CHECKPOINT_FILE)

    def report(metrics: dict[str, Any], state: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory() as d:
            save_checkpoint(state, Path(d) / CHECKPOINT_FILE)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))

    run_trial(cfg, on_epoch=report, resume=resume, cache_dir=Path(cache_dir) if cache_dir else None)


def trial_base(base: TrainConfig, *, search: SearchConfig, epochs: int) -> dict[str, Any]:
    """What every trial of a search runs with before its sampled parameters: ``base`` with the
    scheduler's epochs and one torch thread per reserved CPU. The export uses the same so the best
    config reruns exactly as its trial ran."""
    return {**to_dict(base), "epochs": epochs, "threads": max(1, int(search.cpus_per_trial))}


def run_search(
    *,
    name: str,
    space: SearchSpace,
    search: SearchConfig,
    base: TrainConfig,
    storage_path: Path,
    cache_dir: Path | None = None,
    max_epochs: int | None = None,
):
    """Run a search to completion and return Ray's ``ResultGrid``.

    Args:
        name: Experiment name (a folder under ``storage_path``).
        space: Validated search space.
        search: Trial count, concurrency, resources, seed.
        base: Trial defaults and data paths; ``epochs`` is replaced by the scheduler's maximum.
        storage_path: Absolute directory for Ray's experiment state and checkpoints.
        cache_dir: Decoded-image cache shared by trials.
        max_epochs: Override of ``space.scheduler.max_epochs`` (smoke runs).

    Returns:
        ``ray.tune.ResultGrid`` of every trial.
    """
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    epochs = max_epochs or space.scheduler.max_epochs
    base_dict = trial_base(base, search=search, epochs=epochs)
    searcher = OptunaSearch(
        space=optuna_space(space),
        metric=search.metric,
        mode="max",
        sampler=optuna.samplers.TPESampler(seed=search.seed, multivariate=True),
        points_to_evaluate=space.optuna_points() or None,
    )
    scheduler = ASHAScheduler(
        time_attr="training_iteration",
        max_t=epochs,
        grace_period=min(space.scheduler.grace_period, epochs),
        reduction_factor=space.scheduler.reduction_factor,
    )
    trainable = tune.with_resources(
        tune.with_parameters(tune_trainable, base=base_dict, cache_dir=str(cache_dir) if cache_dir else None),
        {"cpu": search.cpus_per_trial, "gpu": search.gpus_per_trial},
    )
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=search.max_concurrent),
            scheduler=scheduler,
            num_samples=search.num_samples,
            metric=search.metric,
            mode="max",
            reuse_actors=False,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=str(Path(storage_path).resolve()),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            failure_config=tune.FailureConfig(max_failures=1),
            verbose=1,
        ),
    )
    return tuner.fit()


def export_results(results, *, search: SearchConfig, base: TrainConfig, max_epochs: int, out_dir: Path) -> dict[str, Any]:
    """Write the best config and the trial tables; return a summary.

    The best trial is the one with the highest ``search.metric`` at its last reported epoch
    among the trials that finished without error (Ray's ``scope="last"``).

    Args:
        results: ``ResultGrid`` from :func:`run_search`.
        search: The search settings (metric, CPUs per trial).
        base: The trial defaults the search ran with, paths as the exported config should hold them.
        max_epochs: Epochs of a trial never stopped early.
        out_dir: Export directory.

    Returns:
        Summary dict (also written as ``summary.json``).

    Raises:
        RuntimeError: No trial reported the metric.
    """
    metric = search.metric
    param_names = list(TrainParams.model_fields)
    rows, epochs = [], []
    for result in results:
        cfg = trial_params(result.config or {})
        last = result.metrics or {}
        trial_id = last.get("trial_id") or (Path(result.path).name if result.path else None)
        history = result.metrics_dataframe
        row = {
            "trial": trial_id,
            "state": "ERROR" if result.error else "TERMINATED",
            "epochs_run": int(last.get("training_iteration", 0) or 0),
            "stopped_early": not result.error and int(last.get("training_iteration", 0) or 0) < max_epochs,
            metric: last.get(metric),
            f"best_{metric}": float(history[metric].max()) if history is not None and metric in history else None,
            "test_top1": last.get("test_top1"),
            "wall_seconds": last.get("time_total_s"),
            "checkpoint": result.checkpoint.path if result.checkpoint else None,
            "error": str(result.error).strip().splitlines()[-1] if result.error else None,
        }
        row.update({k: v for k, v in cfg.items() if k in param_names})
        rows.append(row)
        if history is not None and len(history):
            keep = [c for c in history.columns if c.startswith(("train_", "eval_", "test_")) or c in ("epoch", "lr", "epoch_seconds", "training_iteration")]
            epochs.append(history[keep].assign(trial=trial_id))
    table = pd.DataFrame(rows).sort_values("trial", ignore_index=True)
    out_dir = Path(out_dir)
    _write_table(table, out_dir / "trials")
    if epochs:
        _write_table(pd.concat(epochs, ignore_index=True), out_dir / "trial_epochs")

    reported = [r for r in results if r.metrics and metric in r.metrics]
    if not reported:
        errors = sorted({row["error"] for row in rows if row["error"]})
        raise RuntimeError(f"no trial reported {metric!r} (errors: {errors}); see {out_dir / 'trials.csv'}")
    best = results.get_best_result(metric=metric, mode="max", scope="last", filter_nan_and_inf=True)
    best_cfg = validate(TrainConfig, {**trial_base(base, search=search, epochs=max_epochs), **trial_params(best.config)},
                        source="best trial")
    atomic_write_yaml(out_dir / "best_config.yaml", to_dict(best_cfg))
    summary = {
        "experiment_path": results.experiment_path,
        "num_trials": len(table),
        "num_errored": int((table["state"] == "ERROR").sum()),
        "num_stopped_early": int(table["stopped_early"].sum()),
        "best_trial": best.metrics.get("trial_id"),
        f"best_{metric}": best.metrics[metric],
        "best_test_top1": best.metrics.get("test_top1"),
        "best_epochs_run": best.metrics.get("training_iteration"),
        "best_checkpoint": best.checkpoint.path if best.checkpoint else None,
        "total_trial_epochs": int(table["epochs_run"].sum()),
    }
    atomic_write_json(out_dir / "summary.json", summary)
    return summary


def _write_table(df: pd.DataFrame, stem: Path) -> None:
    import io

    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    atomic_write_bytes(stem.with_suffix(".parquet"), buf.getvalue())
    atomic_write_bytes(stem.with_suffix(".csv"), df.to_csv(index=False).encode())
