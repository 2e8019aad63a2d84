"""The export of a search (the end of stage 6): what users take away from :mod:`mgfa_ray.search.driver`.

:func:`export_search` writes, in named steps:

1. :func:`_trial_tables` reads every trial (Ray's folders via :func:`mgfa_ray.search.driver.ray_trials`,
   states and values from the Optuna study) into the ``trials`` and ``trial_epochs`` tables, which
   are written first, so that a search with no COMPLETE trial still leaves them to look at;
2. :func:`_choose_best` picks the best trial (:func:`mgfa_ray.search.study.best_trial`);
3. :func:`_write_best` writes its config and copies its checkpoint;
4. :func:`_write_plots` draws every trial (:mod:`mgfa_ray.plots`);
5. :func:`_summary` is written last as ``summary.json``.

:func:`default_export_dir` says where ``mgfa-ray search resume|export`` writes unless told.
"""

from __future__ import annotations

import io
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from mgfa_ray.config import TrainConfig, TrainParams, relative_to_cwd, to_dict, validate
from mgfa_ray.errors import StageError, UserError
from mgfa_ray.search.driver import SearchRecord, ray_trials, read_record, write_target
from mgfa_ray.search.space import define_by_run, trial_params
from mgfa_ray.storage import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_yaml,
    is_uri,
    location_join,
    publish_dir,
    redact_location,
)

#: The per-epoch columns of ``trial_epochs`` besides every ``train_*``, ``eval_*`` and ``test_*`` metric.
EPOCH_COLUMNS = ("epoch", "lr", "epoch_seconds", "training_iteration", "time_total_s", "setup_seconds",
                 "worker_pid", "worker_trial", "worker_rss_mb", "worker_cuda_allocated_mb")


def default_export_dir(search_dir: str) -> Path:
    """Where ``mgfa-ray search resume|export`` writes unless told: the job's export directory
    recorded with the search (when it exists where the record now points), else
    ``<search dir>/export``; for a search on an object store ``outputs/search_exports/<name>``.

    Raises:
        ConfigError: No search in ``search_dir`` (or its ``search.json`` is invalid).
    """
    from mgfa_ray.storage import safe_stem

    record = read_record(search_dir)
    recorded = write_target(search_dir, record.export_dir)
    if recorded:
        return Path(recorded)
    if is_uri(search_dir):
        return Path("outputs") / "search_exports" / safe_stem(search_dir.split("?")[0].rstrip("/").rsplit("/", 1)[-1])
    return Path(search_dir) / "export"


def export_search(search_dir: str, out_dir: str | Path, *, partial: bool = False) -> dict[str, Any]:
    """Write what users take away from a search; return its summary.

    Writes to ``out_dir``:

    * ``best_config.yaml`` — the best trial's full :class:`~mgfa_ray.config.TrainConfig`, which
      ``mgfa-ray train --config`` accepts as is;
    * ``best_checkpoint/checkpoint.pt`` — the best trial's last checkpoint;
    * ``trials.parquet`` / ``trials.csv`` — one row per trial: Ray id, run, Optuna number, state
      (COMPLETE / PRUNED / FAIL, from the study), Ray status, epochs run, the metric's last and
      best value, test top-1, ``masks_learned`` (the last epoch's mask-fit verdict,
      :mod:`mgfa_ray.train.mask_fit`: did the attention beat the position prior on the training images),
      wall time, checkpoint, parameters;
    * ``trial_epochs.parquet`` / ``trial_epochs.csv`` — one row per trial and epoch, every metric and the
      worker it ran in (``setup_seconds``, ``worker_pid``, ``worker_trial``, its memory);
    * ``trial_curves.png``, ``optimization_history.png``, ``param_importances.png``,
      ``parallel_coordinate.png`` — every trial, pruned ones included (:mod:`mgfa_ray.plots`);
    * ``summary.json`` (with ``best_masks_learned``: the best trial's verdict).

    The best trial is :func:`mgfa_ray.search.study.best_trial`: the highest final value among COMPLETE
    trials (trained ``max_epochs``); a trial stopped early is PRUNED and never best.

    An unfinished search (a trial still RUNNING in the study — a driver killed, or a journal whose
    last record was torn — or trials not yet started) is not presented as a result: it is an error
    unless ``partial``; then ``summary.json`` says ``finished: false`` with the trial counts, and
    ``best_config.yaml`` starts with a comment saying the search is unfinished.

    Raises:
        UnfinishedSearchError: The search is unfinished and ``partial`` is not set (nothing is
            written).

        StageError: No trial is COMPLETE (the message counts the trials' states).
    """
    from mgfa_ray.search.status import trial_states
    from mgfa_ray.search.study import StudyRef, search_trials

    record = read_record(search_dir)
    study = StudyRef(record.study.storage, record.study.study_name).load()
    _, states, finished = trial_states(record, search_trials(study))
    ended = sum(states[s] for s in ("COMPLETE", "PRUNED", "FAIL"))
    counts = ", ".join(f"{k} {v}" for k, v in states.items() if v)
    unfinished = None if finished else f"unfinished search: {ended} of {sum(states.values())} trials finished ({counts})"

    if unfinished and not partial:
        shown = redact_location(search_dir)
        raise UnfinishedSearchError(
            f"search {shown}: {unfinished}; nothing exported. Finish it with `mgfa-ray search resume {shown}` (a "
            f"RUNNING trial is a driver that stopped, or a journal record cut short: resume repairs both), or export "
            f"what is there with `mgfa-ray search export --partial {shown}` (marked unfinished)")
    ray = ray_trials(search_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table, epochs = _trial_tables(ray, study, metric=record.search.metric)
    _write_table(table, out / "trials")
    if epochs is not None:
        _write_table(epochs, out / "trial_epochs")
    best, best_row = _choose_best(study, ray, table, search_dir=search_dir, record=record, out=out)
    best_ckpt = _write_best(record, best, best_row, out, unfinished=unfinished)
    _write_plots(study, table, epochs, record=record, out=out)
    summary = {**_summary(search_dir, record, table, best, best_row, best_ckpt), "finished": finished,
               "unfinished": unfinished}
    atomic_write_json(out / "summary.json", summary)
    return summary


class UnfinishedSearchError(UserError):
    """An export asked of a search that has not finished (:func:`export_search`): exit status 2,
    the message says how to finish it or export it marked unfinished."""


def _trial_tables(ray: pd.DataFrame, study, *, metric: str) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Step 1 (read): the ``trials`` table (one row per Ray trial, sorted by run and Optuna number)
    and the ``trial_epochs`` table (one row per trial and epoch; ``None`` when no trial reported an
    epoch). ``ray`` is :func:`~mgfa_ray.search.driver.ray_trials`; states and values come from ``study``."""
    from mgfa_ray.search.study import search_trials

    trials = {t.user_attrs["ray_trial_id"]: t for t in search_trials(study)}
    param_names = list(TrainParams.model_fields)
    rows, epochs = [], []
    for r in ray.to_dict("records"):
        rows.append(_trial_row(r, trials.get(r["trial"]), metric=metric, param_names=param_names))
        history = r["history"]
        if history is not None and len(history):
            keep = [c for c in history.columns if c.startswith(("train_", "eval_", "test_")) or c in EPOCH_COLUMNS]
            epochs.append(history[keep].assign(trial=r["trial"]))
    table = pd.DataFrame(rows)
    if len(table):
        table = table.sort_values(["run", "optuna_trial"], ignore_index=True)
    return table, pd.concat(epochs, ignore_index=True) if epochs else None


def _trial_row(r: dict[str, Any], t, *, metric: str, param_names: list[str]) -> dict[str, Any]:
    """One row of ``trials``: the Ray trial ``r`` (a :func:`~mgfa_ray.search.driver.ray_trials` record)
    with its Optuna trial ``t`` (``None`` when the study has none: state ``UNKNOWN``)."""
    from optuna.trial import TrialState

    history = r["history"]
    row = {
        "trial": r["trial"], "run": r["run"], "optuna_trial": t.number if t else r["optuna_trial"],
        "state": t.state.name if t else "UNKNOWN", "ray_status": r["ray_status"], "epochs_run": r["epochs_run"],
        metric: t.value if t and t.state in (TrialState.COMPLETE, TrialState.PRUNED) else None,
        f"best_{metric}": float(history[metric].max()) if history is not None and len(history) else None,
        "test_top1": float(history["test_top1"].iloc[-1]) if history is not None and "test_top1" in history else None,
        "masks_learned": _masks_learned(history),
        "wall_seconds": r["wall_seconds"], "checkpoint": r["checkpoint"],
    }
    row.update({k: v for k, v in trial_params(r["config"]).items() if k in param_names})
    return row


def _masks_learned(history: pd.DataFrame | None) -> bool | None:
    """The mask-fit verdict of a trial's last epoch (``train_masks_learned``,
    :mod:`mgfa_ray.train.mask_fit`): True when its attention beat the position prior on the training
    images for every kind it uses, False when not; ``None`` when it uses none or reported no epoch."""
    if history is None or not len(history) or "train_masks_learned" not in history:
        return None
    value = history["train_masks_learned"].iloc[-1]
    return None if pd.isna(value) else bool(value)


def _choose_best(study, ray: pd.DataFrame, table: pd.DataFrame, *, search_dir: str, record: SearchRecord,
                 out: Path):
    """Step 2 (choose): the best Optuna trial (:func:`mgfa_ray.search.study.best_trial`) and its row of
    ``ray`` (``None`` when Ray's folders no longer hold it).

    Raises:
        StageError: No trial is COMPLETE (the message counts the trials' states and names
            ``trials.csv``).
    """
    from mgfa_ray.search.study import best_trial

    best = best_trial(study)
    if best is None:
        counts = table["state"].value_counts().to_dict() if len(table) else {}
        raise StageError(f"no trial of {search_dir} trained {record.max_epochs} epochs without error "
                           f"(states: {counts}); see {out / 'trials.csv'}")
    best_rid = best.user_attrs["ray_trial_id"]
    best_row = ray.loc[ray["trial"] == best_rid].iloc[0] if (ray["trial"] == best_rid).any() else None
    return best, best_row


def _write_best(record: SearchRecord, best, best_row, out: Path, *, unfinished: str | None = None) -> Path | None:
    """Step 3 (best): write ``best_config.yaml`` (the record's ``export_base`` with the best
    trial's parameters, validated; headed by a comment when ``unfinished`` says the search is) and
    copy its last checkpoint to ``best_checkpoint/``; returns that directory, or ``None`` when the
    trial has no checkpoint."""
    import optuna

    params = trial_params({**{k: v for k, v in best.params.items() if "/" not in k},
                           **define_by_run(optuna.trial.FixedTrial(best.params), space=record.space)})
    best_cfg = validate(TrainConfig, {**record.export_base, **_data_paths_now(record), **params}, source="best trial")
    comment = f"UNFINISHED: the best so far of an {unfinished}; exported with --partial" if unfinished else None
    atomic_write_yaml(out / "best_config.yaml", to_dict(best_cfg), comment=comment)
    if best_row is not None and best_row["checkpoint"]:
        return _copy_checkpoint(best_row["checkpoint_fs"], best_row["checkpoint"], out / "best_checkpoint")
    return None


def _data_paths_now(record: SearchRecord) -> dict[str, str]:
    """The export's data paths (``manifest``, ``masks``, ``weights``) that lead nowhere from the
    working directory any more — the job's output directory was moved or copied since the search
    began — replaced by where the search's record finds them now (:func:`mgfa_ray.search.driver.read_record`
    resolves them against the search directory as it is), relative to the working directory when
    below it. Paths that still resolve are kept as given, so a published config stays portable.
    ``masks`` may name the job's mask directory (its ``CURRENT`` set): then the directory that holds
    the trials' set now."""
    moved = {}
    for field in ("manifest", "masks", "weights"):
        given, now = record.export_base.get(field), record.trial_base.get(field)
        if not isinstance(given, str) or not isinstance(now, str) or is_uri(given) or is_uri(now):
            continue
        if Path(given).expanduser().exists():  # still resolves from here: kept as given
            continue
        target = Path(now) if Path(given).name == Path(now).name else Path(now).parent
        if target.exists():
            moved[field] = relative_to_cwd(str(target))
    return moved


def _write_plots(study, table: pd.DataFrame, epochs: pd.DataFrame | None, *, record: SearchRecord,
                 out: Path) -> None:
    """Step 4 (plots): every trial's curves and Optuna's plots into ``out`` (:mod:`mgfa_ray.plots`),
    with the scheduler's rung epochs marked."""
    from mgfa_ray.plots import write_search_plots
    from mgfa_ray.search.asha import rung_epochs
    from mgfa_ray.search.study import search_trials

    sched = record.space.scheduler
    write_search_plots(search_trials(study), table, epochs, metric=record.search.metric, out=out,
                       rungs=rung_epochs(record.max_epochs, sched.grace_period, sched.reduction_factor,
                                              sched.early_stopping))


def _summary(search_dir: str, record: SearchRecord, table: pd.DataFrame, best, best_row,
             best_ckpt: Path | None) -> dict[str, Any]:
    """Step 5 (publish): the content of ``summary.json`` (what :func:`export_search` returns)."""
    metric = record.search.metric
    states = table["state"].value_counts().to_dict()
    return {
        "search_dir": search_dir,
        "study": record.study.model_dump(),
        "runs": [r.model_dump() for r in record.runs],
        "num_trials": len(table),
        "states": {k: int(v) for k, v in states.items()},
        "best_trial": best.user_attrs["ray_trial_id"],
        "best_optuna_trial": best.number,
        f"best_{metric}": best.value,
        "best_test_top1": float(best_row["history"]["test_top1"].iloc[-1])
        if best_row is not None and "test_top1" in best_row["history"] else None,
        "best_masks_learned": _masks_learned(best_row["history"]) if best_row is not None else None,
        "best_checkpoint": str(best_ckpt) if best_ckpt else None,
        "total_trial_epochs": int(table["epochs_run"].sum()),
        "tensorboard_logdir": location_join(search_dir, "runs"),
    }


def _copy_checkpoint(fs, path: str, dest: Path) -> Path:
    """Copy a trial checkpoint directory to ``dest``: copied in full beside it first, then swapped in
    (:func:`mgfa_ray.storage.publish_dir`)."""
    import pyarrow.fs as pafs

    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".best_checkpoint-"))
    try:
        pafs.copy_files(path, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    except OSError as err:  # e.g. a full disk: no half copy left behind, and the message names the copy
        shutil.rmtree(tmp, ignore_errors=True)
        if err.filename is None:
            err.filename = str(dest)
        raise
    return publish_dir(tmp, dest)


def _write_table(df: pd.DataFrame, stem: Path) -> None:
    """Write ``df`` as ``<stem>.parquet`` and ``<stem>.csv`` (each atomically)."""
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    atomic_write_bytes(stem.with_suffix(".parquet"), buf.getvalue())
    atomic_write_bytes(stem.with_suffix(".csv"), df.to_csv(index=False).encode())
