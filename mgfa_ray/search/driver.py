"""Stage 6 — the search: Ray Tune + Optuna over :func:`mgfa_ray.train.trial.run_trial`, resumable.

A search lives in one directory, ``<storage_path>/<name>/`` (a local or NFS path, or an
object-store URI)::

    search.json          what the search is: space, settings, trial template, study, runs (written
                         first, atomically; read by resume, extend and export)
    optuna.journal       the Optuna study (default study storage; an RDB URL can be given instead)
    runs/run-0/          the Ray Tune experiment of the first num_samples trials: one folder per
                         trial with its checkpoints (>= 2 kept), progress.csv, result.json and
                         TensorBoard event files
    runs/run-1/ …        one experiment per extension (``--more-trials N``): Ray freezes
                         num_samples on restore (``Tuner.restore`` keeps the TuneConfig), so an extension is a new Tuner
                         on the same study

* :func:`tune_trainable` is the thin Ray wrapper of one trial: it validates the config, resumes
  from Ray's checkpoint, and reports every epoch's metrics with a checkpoint.
* :func:`create_search` writes ``search.json``; :func:`run_search` runs (or resumes, or extends)
  it; :func:`mgfa_ray.search.export.export_search` writes what users take away. A search directory is relocatable: it
  refers to itself (and to its job's outputs) by relative paths only (:data:`PATH_FIELDS`), and
  a run stopped by Ctrl-C raises :class:`~mgfa_ray.errors.RunInterrupted` instead of exporting.
  The Optuna study is the record of every trial's state and value (kept in step with Ray by
  :mod:`mgfa_ray.search.study`); Ray's trial folders hold the per-epoch metrics and checkpoints.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from mgfa_ray.config import ConfigError, FrozenModel, SearchConfig, StudySource, TrainConfig, to_dict, validate
from mgfa_ray.errors import InputError, StageError
from mgfa_ray.runtime import configure, ensure_ray
from mgfa_ray.search.asha import first_rung
from mgfa_ray.search.space import SearchSpace, trial_params
from mgfa_ray.search.tune_state import complete_state_file, reconcile_search_state
from mgfa_ray.storage import (
    atomic_filesystem,
    fs_exists,
    fs_read,
    fs_write_atomic,
    is_uri,
    location_join,
    redact_location,
    redact_text,
    resolve_location,
)
from mgfa_ray.storage.lock import DirectoryLock

CHECKPOINT_FILE = "checkpoint.pt"
RECORD_FILE = "search.json"
RECORD_VERSION = 1


def tune_trainable(config: dict[str, Any], *, base: dict[str, Any], cache_dir: str | None = None) -> None:
    """Ray Tune function trainable: one trial of :func:`~mgfa_ray.train.trial.run_trial`.

    Besides the trial's metrics every epoch reports where its worker's time and memory went:
    ``trial_started_at`` (Unix time, s, the trainable's start), ``setup_seconds`` (start to the first
    epoch: config, checkpoint, data, model), ``reported_at`` (Unix time of the report) and the
    worker's state as the trial started (:func:`mgfa_ray.train.worker.start_trial`: pid, how many trials
    the process has run, resident and CUDA memory). Before and after the trial the worker hands back
    the memory freed (:func:`mgfa_ray.train.worker.release_trial_memory`: C heap, CUDA cache), so a reused
    worker starts the next trial at the same level.

    Args:
        config: The sampled parameters (Ray's trial config).
        base: The rest of the :class:`~mgfa_ray.config.TrainConfig` (data paths, defaults).
        cache_dir: Decoded-image cache shared by the trials.
    """
    import torch  # here, not at the top: the driver and the stand-in trials of the tests never need torch
    from ray import tune

    from mgfa_ray.train.checkpoint import load_checkpoint
    from mgfa_ray.train.trial import run_trial
    from mgfa_ray.train.worker import allow_slow_unwind, release_trial_memory, start_trial

    configure()  # this worker process: Ultralytics offline, Optuna's log level (mgfa_ray.runtime)
    allow_slow_unwind()  # a reused worker waits for this trial's thread to unwind instead of failing the next
    started, clock = time.time(), time.perf_counter()
    release_trial_memory()  # what a trial stopped by the scheduler held while its thread unwound
    worker = start_trial()
    cfg = validate(TrainConfig, {**base, **trial_params(config)}, source="trial config")
    resume = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            resume = load_checkpoint(Path(d) / CHECKPOINT_FILE)
    setup: list[float] = []

    def report(metrics: dict[str, Any], state: dict[str, Any]) -> None:
        if not setup:  # the first epoch of this run of the trainable ends now
            setup.append(time.perf_counter() - clock - metrics["epoch_seconds"])
        extra = {"trial_started_at": started, "setup_seconds": setup[0], "reported_at": time.time(), **worker}
        with tempfile.TemporaryDirectory() as d:  # private: Ray copies it to the trial's storage atomically
            torch.save(state, Path(d) / CHECKPOINT_FILE)
            tune.report({**metrics, **extra}, checkpoint=tune.Checkpoint.from_directory(d))

    try:
        run_trial(cfg, on_epoch=report, resume=resume, cache_dir=Path(cache_dir) if cache_dir else None)
    finally:
        release_trial_memory()


def trial_base(base: TrainConfig, *, search: SearchConfig, epochs: int) -> dict[str, Any]:
    """What every trial of a search runs with before its sampled parameters: ``base`` with the
    scheduler's epochs and one torch thread per reserved CPU. The export uses the same so the best
    config reruns exactly as its trial ran."""
    return {**to_dict(base), "epochs": epochs, "threads": max(1, int(search.cpus_per_trial))}


class RunRecord(FrozenModel):
    """One Ray Tune experiment of a search: ``runs/<name>`` with ``num_samples`` trials."""

    name: str
    num_samples: int


class SearchRecord(FrozenModel):
    """``search.json``: everything resume, extend and export need, written before any trial runs.

    Attributes:
        version: Record format version.
        name: Search name (the directory's name).
        space: The validated search space; ``space_file`` where it came from.
        search: The search settings.
        max_epochs: Epochs of a trial never stopped early.
        trial_base: The config every trial starts from (absolute data paths).
        export_base: The same with paths as the user gave them (what ``best_config.yaml`` holds).
        cache_dir: Decoded-image cache of the trials.
        export_dir: Where :func:`mgfa_ray.search.export.export_search` writes by default (``<search dir>/export``
            if None).
        study: The Optuna study.
        runs: The Ray experiments so far, in order.
        dir_relative: The :data:`PATH_FIELDS` that ``search.json`` holds relative to the search
            directory (in memory, after :func:`read_record`, every path is absolute again).
    """

    version: int = RECORD_VERSION
    name: str
    space_file: str
    space: SearchSpace
    search: SearchConfig
    max_epochs: int
    trial_base: dict[str, Any]
    export_base: dict[str, Any]
    cache_dir: str | None = None
    export_dir: str | None = None
    study: StudySource
    runs: list[RunRecord]
    dir_relative: list[str] = []


PATH_FIELDS = ("study.storage", "cache_dir", "export_dir", "trial_base.manifest", "trial_base.masks",
               "trial_base.weights")
"""The record's fields that hold local paths. In ``search.json`` those inside the search's home
(:func:`_home`) are written relative to the search directory and listed in ``dir_relative``;
:func:`read_record` resolves them against the directory it reads, so a search moved or copied
(with its job's outputs) refers to itself and to its job's outputs where they are now, never
where they were. Paths outside the home (data elsewhere) stay absolute."""


def _home(search_dir: Path, record: SearchRecord) -> Path:
    """The directory a search moves with: its job's output directory when the search sits in a
    job's layout (``<home>/<storage>/<name>`` with the export directory ``<home>/<export>``), else
    the search directory itself."""
    home = search_dir.parent.parent
    if record.export_dir and not is_uri(record.export_dir) and Path(record.export_dir).parent == home:
        return home
    return search_dir


def _get(doc: dict[str, Any], field: str) -> Any:
    head, _, rest = field.partition(".")
    value = doc.get(head)
    return _get(value, rest) if rest and isinstance(value, dict) else (None if rest else value)


def _set(doc: dict[str, Any], field: str, value: Any) -> None:
    head, _, rest = field.partition(".")
    if rest:
        _set(doc[head], rest, value)
    else:
        doc[head] = value


def read_record(search_dir: str) -> SearchRecord:
    """The ``search.json`` of ``search_dir`` (path or URI), with the paths it holds relative to
    the search directory (``dir_relative``) resolved against ``search_dir`` as it is now.

    Raises:
        NoSearchError: No search there (no ``search.json``).
        DamagedRecordError: The file is not JSON or not a valid record (the message names it and
            what to do).
    """
    fs, path = resolve_location(search_dir)
    record_path = location_join(path, RECORD_FILE)
    shown = location_join(redact_location(search_dir), RECORD_FILE)
    if not fs_exists(fs, record_path):
        raise NoSearchError(f"{redact_location(search_dir)}: no search here ({RECORD_FILE} not found)")
    remedy = ("it is written atomically, so something outside mgfa-ray changed it: restore it from a copy of the "
              "search directory, or remove the directory to start the search over (its trials are lost)")
    try:
        data = json.loads(fs_read(fs, record_path))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DamagedRecordError(f"{shown}: damaged, not JSON ({err}); {remedy}") from None
    if isinstance(data, dict) and not is_uri(search_dir):
        _resolve_paths(data, Path(path))
    try:
        return validate(SearchRecord, data, source=shown)
    except ConfigError as err:
        why = f"{RECORD_FILE} is damaged or from another version of mgfa-ray"
        raise DamagedRecordError(f"{err}\n{why}: {remedy}") from None


class NoSearchError(ConfigError):
    """A directory that holds no search (:func:`read_record`)."""


class DamagedRecordError(ConfigError):
    """A ``search.json`` that is not JSON or not a valid record (:func:`read_record`): never
    rewritten silently, the message says how to recover."""


def _resolve_paths(data: dict[str, Any], search_dir: Path) -> None:
    """Resolve ``data``'s ``dir_relative`` fields against ``search_dir`` (in place)."""
    for field in data.get("dir_relative") or []:
        value = _get(data, field)
        if isinstance(value, str):
            _set(data, field, os.path.normpath(search_dir / value))


def _write_record(search_dir: str, record: SearchRecord) -> None:
    fs, path = resolve_location(search_dir)
    doc = record.model_dump(mode="json")
    if not is_uri(search_dir):
        Path(path).mkdir(parents=True, exist_ok=True)
        home = _home(Path(path), record)
        doc["dir_relative"] = []
        for field in PATH_FIELDS:
            value = _get(doc, field)
            if isinstance(value, str) and not is_uri(value) and Path(value).is_absolute() \
                    and Path(value).is_relative_to(home):
                _set(doc, field, os.path.relpath(value, path))
                doc["dir_relative"].append(field)
    fs_write_atomic(fs, location_join(path, RECORD_FILE), json.dumps(doc, indent=2).encode())


def write_target(search_dir: str, target: str | None) -> str | None:
    """``target`` (a directory the search writes: cache, export) if it lies inside
    ``search_dir``, already exists, or lies in a job's output directory (one holding the
    ``job.yaml`` every job writes first), else ``None``: a search directory copied away from its
    job's outputs never creates directories outside itself where its relative references now
    point, and a job's search resumed before its first export still exports into the job's
    ``export/``."""
    if target is None or is_uri(target) or is_uri(search_dir):
        return target
    inside = Path(target).resolve().is_relative_to(Path(search_dir).resolve())
    in_job = (Path(target).parent / "job.yaml").is_file()
    return target if inside or in_job or Path(target).is_dir() else None


def create_search(
    *,
    name: str,
    space: SearchSpace,
    space_file: str,
    search: SearchConfig,
    base: TrainConfig,
    export_base: TrainConfig | None = None,
    storage_path: str,
    max_epochs: int | None = None,
    cache_dir: str | None = None,
    export_dir: str | None = None,
) -> str:
    """Create the search ``<storage_path>/<name>`` — or return it when it exists with the same
    settings, so a rerun of a job resumes instead of starting over.

    Args:
        name: Search name.
        space: Validated search space; ``space_file`` its file (recorded).
        search: Trial count, concurrency, resources, sampler, seed, storage.
        base: Trial defaults with absolute data paths; ``epochs`` becomes ``max_epochs``.
        export_base: The same with paths as the exported best config should hold them (default ``base``).
        storage_path: Directory or object-store URI holding searches.
        max_epochs: Override of ``space.scheduler.max_epochs`` (smoke runs).
        cache_dir: Decoded-image cache shared by trials.
        export_dir: Default export directory (recorded; ``mgfa-ray search resume`` exports there).

    Returns:
        The search directory (path or URI).

    Raises:
        ConfigError: A search of that name exists with other settings and trials that reported
            results (the message lists each differing field, old and new value, and the choices),
            or an object-store ``storage_path`` without ``search.study_storage``. A search of that
            name with other settings but no trial that reported an epoch (e.g. every trial failed
            at its start on bad weights) is replaced: its runs, study and record are removed.
    """
    search_dir = location_join(storage_path, name) if is_uri(storage_path) else str(Path(storage_path).resolve() / name)
    cache_dir = str(Path(cache_dir).resolve()) if cache_dir and not is_uri(cache_dir) else cache_dir
    epochs = max_epochs or space.scheduler.max_epochs
    study_storage = _study_storage(search, storage_path=storage_path, search_dir=search_dir)
    record = SearchRecord(
        name=name, space_file=str(space_file), space=space, search=search, max_epochs=epochs,
        trial_base=trial_base(base, search=search, epochs=epochs),
        export_base=trial_base(export_base or base, search=search, epochs=epochs),
        cache_dir=str(cache_dir) if cache_dir else None,
        export_dir=str(Path(export_dir).resolve()) if export_dir else None,
        study=StudySource(storage=study_storage, study_name=name),
        runs=[RunRecord(name="run-0", num_samples=search.num_samples)],
    )
    if _same_search_exists(search_dir, record):
        return search_dir
    _start_study(record, cache_dir=cache_dir)
    _write_record(search_dir, record)
    return search_dir


def _study_storage(search: SearchConfig, *, storage_path: str, search_dir: str) -> str:
    """The Optuna storage of a new search: ``search.study_storage`` (a path made absolute, an RDB
    URL as is), else the journal ``<search_dir>/optuna.journal``.

    Raises:
        ConfigError: ``storage_path`` is an object store and ``search.study_storage`` is not set.
    """
    if search.study_storage:
        return search.study_storage if is_uri(search.study_storage) else str(Path(search.study_storage).resolve())
    if is_uri(storage_path):
        raise ConfigError(f"search.study_storage: required when storage_path is an object store ({storage_path}); "
                          "give an RDB URL (sqlite:///…, postgresql://…) or a journal file on local disk or NFS")
    return str(Path(search_dir) / "optuna.journal")


def _same_search_exists(search_dir: str, record: SearchRecord) -> bool:
    """Whether ``search_dir`` holds a search with ``record``'s settings (runs aside), to be reused.
    One with other settings is removed (:func:`_discard_search`, under the search lock) when none of
    its trials reported an epoch; then, as with no search there, the answer is ``False``.

    Raises:
        ConfigError: The search there has other settings and trials that reported results (the
            message lists each differing field, old and new value, and the choices).
        LockedError: A live driver runs the search there.
    """
    try:
        existing = read_record(search_dir)
    except NoSearchError:
        return False  # a damaged record is raised, never overwritten with a new one
    differ = _differences(existing.model_dump(mode="json", exclude={"runs", "dir_relative"}),
                          record.model_dump(mode="json", exclude={"runs", "dir_relative"}))
    if not differ:
        return True
    with DirectoryLock(search_dir, what="search"):  # never under a driver that runs it
        results = _trials_with_results(existing)
        if results:
            shown = redact_location(search_dir)
            raise ConfigError(
                f"{shown}: a search of this name exists, with {results} trial(s) that reported results, and "
                f"other settings: {'; '.join(differ)}. Keep it: restore the old values (then a rerun resumes it; "
                f"`mgfa-ray search resume {shown} --more-trials N` extends it); or start a new search: give the "
                "job another name, output_dir or search.storage_path")
        print(f"search {redact_location(search_dir)}: no trial reported an epoch, so it is replaced by the new "
              f"settings ({'; '.join(differ)})", flush=True)
        _discard_search(search_dir, existing)
    return False


def _start_study(record: SearchRecord, *, cache_dir: str | None) -> None:
    """Create the decoded-image cache directory (local ``cache_dir``) and the search's Optuna study
    (or open it when it exists), and copy the warm-start study's finished trials into a study
    without trials (``record.search.warm_start``)."""
    from mgfa_ray.search.study import StudyRef, copy_trials

    search = record.search
    if cache_dir and not is_uri(cache_dir):
        Path(cache_dir).mkdir(parents=True, exist_ok=True)  # exists: the trials may write it (write_target)
    study = StudyRef(record.study.storage, record.study.study_name).load(create=True)
    if search.warm_start is not None and not study.trials:
        copied = copy_trials(StudyRef(search.warm_start.storage, search.warm_start.study_name), study)
        print(f"warm start: {copied} trials from {search.warm_start.study_name!r} in {search.warm_start.storage}",
              flush=True)


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """``field: old -> new`` for every leaf that differs between two record dumps (secrets hidden)."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        else:
            out.append(redact_text(f"{prefix}{key}: {a!r} -> {b!r}"))
    return out


def _trials_with_results(record: SearchRecord) -> int:
    """Trials of the search's study that reported at least one epoch (an intermediate value or a
    final value): what a replaced search would lose. A study that cannot be read counts as having
    results (nothing is replaced then)."""
    from mgfa_ray.search.study import StudyRef

    try:
        study = StudyRef(record.study.storage, record.study.study_name).load()
    except KeyError:
        return 0
    except Exception:  # unreadable: keep it
        return 1
    return sum(1 for t in study.get_trials(deepcopy=False) if t.value is not None or t.intermediate_values)


def _discard_search(search_dir: str, record: SearchRecord) -> None:
    """Remove a search that holds no results: its Ray runs, its Optuna study and its record."""
    import optuna
    import pyarrow.fs as pafs

    from mgfa_ray.search.study import StudyRef

    fs, path = resolve_location(search_dir)
    runs = location_join(path, "runs")
    if fs.get_file_info(runs).type == pafs.FileType.Directory:
        fs.delete_dir(runs)
    ref = StudyRef(record.study.storage, record.study.study_name)
    try:
        optuna.delete_study(study_name=ref.study_name, storage=ref.open_storage())
    except KeyError:  # no study yet
        pass
    fs.delete_file(location_join(path, RECORD_FILE))


def run_search(
    search_dir: str,
    *,
    more_trials: int = 0,
    errored: Literal["skip", "resume", "restart"] = "skip",
    trainable: Callable | None = None,
) -> SearchRecord:
    """Run a search until every run has its trials: resume the last run if it was cut short (the
    driver killed at any moment), then add ``more_trials`` in a new run.

    Args:
        search_dir: From :func:`create_search`.
        more_trials: Trials to add in a new run after the existing runs finish.
        errored: What a resumed run does with trials that errored after Ray's retries: ``skip``
            keeps them FAIL; ``resume`` runs them again from their last checkpoint; ``restart``
            runs them again from scratch. Both give the new attempt a fresh Optuna trial.
        trainable: Ray function trainable called as ``trainable(config, base=..., cache_dir=...)``
            (default :func:`tune_trainable`; tests pass a fast stand-in).

    Returns:
        The search record, with the new run when ``more_trials`` > 0.

    Raises:
        ValueError: ``more_trials`` < 0.
        ConfigError: No search in ``search_dir`` (or its ``search.json`` is invalid).
        DamagedJournalError: The study's journal is damaged other than by a torn last record.
        RunInterrupted: Stopped by SIGINT (Ctrl-C): the search is saved, nothing is exported, and
            the message gives the ``mgfa-ray search resume`` command that continues it.
        LockedError: Another live driver runs this search (:class:`mgfa_ray.storage.lock.DirectoryLock`).
        StorageUnavailableError: The object store holding the search stayed unreachable for
            ``$MGFA_STORAGE_RETRY_S`` seconds; rerun once it is back.
    """
    if more_trials < 0:
        raise InputError(f"more_trials must be >= 0, got {more_trials}")
    read_record(search_dir)  # a clear error before anything starts
    with DirectoryLock(search_dir, what="search"):
        record = read_record(search_dir)  # as of taking the lock: a driver before us may have extended it
        from mgfa_ray.search.journal import release_stale_journal_lock
        from mgfa_ray.search.study import StudyRef

        if not is_uri(record.study.storage):  # a journal: its lock may be a killed driver's
            release_stale_journal_lock(record.study.storage)
        # The study opens (a torn journal record dropped, other damage named) before Ray starts.
        StudyRef(record.study.storage, record.study.study_name).load()
        ensure_ray()
        for i in range(len(record.runs)):
            _fit_run(search_dir, record, i, trainable=trainable,
                     errored=errored if i == len(record.runs) - 1 else "skip")
        if more_trials:
            run = RunRecord(name=f"run-{len(record.runs)}", num_samples=more_trials)
            record = record.model_copy(update={"runs": [*record.runs, run]})
            _write_record(search_dir, record)
            _fit_run(search_dir, record, len(record.runs) - 1, trainable=trainable, errored="skip")
    return record


def _fit_run(search_dir: str, record: SearchRecord, index: int, *, trainable: Callable | None, errored: str) -> None:
    """Run (or resume) the Ray experiment ``record.runs[index]`` to its end.

    Raises:
        RunInterrupted: Ray Tune stopped the experiment before all its trials finished (SIGINT /
            Ctrl-C, SIGUSR1); its state is saved and ``mgfa-ray search resume`` continues it.
        StageError: Ray Tune ended the experiment before all its trials finished without a stop
            signal (e.g. it could not read its saved state and started over).
    """
    from mgfa_ray.search.study import StudyRef, bound_study

    # The study where the search directory is now: Ray's pickled searcher and scheduler hold the
    # location of the day the search was created (a moved or copied search must not use it).
    experiment = None if is_uri(search_dir) else \
        location_join(resolve_location(location_join(search_dir, "runs"))[1], record.runs[index].name)
    with bound_study(StudyRef(record.study.storage, record.study.study_name), experiment_path=experiment), \
            _stop_signal_watch() as stopped:
        run_path, fs = _fit(search_dir, record, index, trainable=trainable, errored=errored)
        _check_finished(search_dir, record, index, run_path, fs, stopped=stopped())


@contextmanager
def _stop_signal_watch():
    """Yield a function telling whether Ray Tune was stopped by a signal during the block.

    On its first SIGINT (or SIGUSR1) Ray Tune's handler sets its stop event and puts back the
    SIGINT handler it found when ``fit`` began, which it otherwise leaves replaced. That handler is
    this one (behaving as Python's default, ``KeyboardInterrupt``), so finding it in place after
    ``fit`` means Ray was stopped by a signal. Outside the main thread no handler can be set:
    the function then says ``False``.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return

    def watched(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, watched)
    try:
        yield lambda: signal.getsignal(signal.SIGINT) is watched
    finally:
        signal.signal(signal.SIGINT, previous)


def _fit(search_dir: str, record: SearchRecord, index: int, *, trainable: Callable | None, errored: str):
    from ray import tune

    from mgfa_ray.search.scheduler import StudyScheduler
    from mgfa_ray.search.searcher import StudySearch
    from mgfa_ray.search.study import StudyRef

    search, run = record.search, record.runs[index]
    fs, runs_path = resolve_location(location_join(search_dir, "runs"))
    fs = atomic_filesystem(fs, accept=complete_state_file)  # never a truncated or half-read state file
    run_path = location_join(runs_path, run.name)
    fn = tune.with_resources(
        tune.with_parameters(trainable or tune_trainable, base=record.trial_base,
                             cache_dir=write_target(search_dir, record.cache_dir)),
        {"cpu": search.cpus_per_trial, "gpu": search.gpus_per_trial},
    )
    if tune.Tuner.can_restore(run_path, storage_filesystem=fs):
        repaired = reconcile_search_state(run_path, fs)
        if repaired:
            print(f"Ray's saved searcher state and trial list came from two snapshots (a driver killed while "
                  f"uploading them); made them agree: {redact_text(repaired)}", flush=True)
        tuner = tune.Tuner.restore(run_path, trainable=fn, storage_filesystem=fs,
                                   resume_errored=errored == "resume", restart_errored=errored == "restart")
        with _snapshot_period(search.snapshot_period_s), _tensorboard(search.tensorboard):
            tuner.fit()
        return run_path, fs
    study = StudyRef(record.study.storage, record.study.study_name)
    sched = record.space.scheduler
    searcher = StudySearch(space=record.space, study=study, metric=search.metric, sampler=search.sampler,
                           seed=search.seed + index, run=run.name, startup_trials=search.tpe_startup_trials)
    scheduler = StudyScheduler(study=study, metric=search.metric, max_epochs=record.max_epochs,
                               grace_period=first_rung(sched.grace_period, record.max_epochs),
                               reduction_factor=sched.reduction_factor, early_stopping=sched.early_stopping)
    tuner = tune.Tuner(
        fn,
        tune_config=tune.TuneConfig(
            search_alg=tune.search.ConcurrencyLimiter(searcher, max_concurrent=search.max_concurrent),
            scheduler=scheduler,
            num_samples=run.num_samples,
            metric=search.metric,
            mode="max",
            # A finished trial's worker runs the next one (mgfa_ray.train.worker: what it keeps, what not).
            reuse_actors=search.reuse_workers,
        ),
        run_config=tune.RunConfig(
            name=run.name,
            storage_path=runs_path,
            storage_filesystem=fs,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=search.checkpoints_to_keep),
            failure_config=tune.FailureConfig(max_failures=search.max_failures),
            callbacks=None if search.tensorboard else _result_loggers(),  # None: Ray's defaults, TensorBoard's too
            verbose=1,
        ),
    )
    with _snapshot_period(search.snapshot_period_s), _tensorboard(search.tensorboard):
        tuner.fit()
    return run_path, fs


@contextmanager
def _tune_environment(key: str, value: str | None):
    """Within the block ``$key`` (a Ray Tune variable it reads when ``Tuner.fit`` starts) is
    ``value``; None leaves it alone. A value the user set in the environment wins; the variable is
    restored afterwards."""
    if value is None or key in os.environ:
        yield
        return
    os.environ[key] = value
    try:
        yield
    finally:
        os.environ.pop(key, None)


def _snapshot_period(seconds: float):
    """Within the block Ray Tune snapshots its experiment state every ``seconds`` (0: after every
    controller step): ``$TUNE_GLOBAL_CHECKPOINT_S`` (:func:`_tune_environment`)."""
    return _tune_environment("TUNE_GLOBAL_CHECKPOINT_S", f"{seconds:g}")


def _result_loggers() -> list:
    """Ray Tune's loggers of ``progress.csv`` and ``result.json``, which this project reads
    (``ExperimentAnalysis``); passed to a run without TensorBoard (``search.tensorboard: false``)."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    return [CSVLoggerCallback(), JsonLoggerCallback()]


def _tensorboard(enabled: bool):
    """Within the block Ray Tune adds no logger of its own when TensorBoard is off:
    ``$TUNE_DISABLE_AUTO_CALLBACK_LOGGERS`` (Ray Tune's documented variable; :func:`_tune_environment`).
    A run made without TensorBoard lists :func:`_result_loggers` in its saved run config, so a
    resumed run keeps exactly those."""
    return _tune_environment("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", None if enabled else "1")


def _check_finished(search_dir: str, record: SearchRecord, index: int, run_path: str, fs, *, stopped: bool) -> None:
    """Raise unless every trial of the run finished: :class:`~mgfa_ray.errors.RunInterrupted`
    when Ray was ``stopped`` by a signal, else :class:`~mgfa_ray.errors.StageError`.

    Ray Tune's ``Tuner.fit`` returns normally when stopped by SIGINT (it saves the experiment and
    logs "Experiment has been interrupted"); its saved state (public ``ExperimentAnalysis``) then
    holds fewer trials than ``num_samples`` or trials neither TERMINATED nor ERROR.
    """
    from ray.tune import ExperimentAnalysis

    from mgfa_ray.errors import RunInterrupted

    run = record.runs[index]
    trials = ExperimentAnalysis(run_path, storage_filesystem=fs).trials
    done = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
    if done >= run.num_samples:
        return
    if stopped:
        raise RunInterrupted(
            f"search {search_dir} interrupted: {done} of {run.num_samples} trials of {run.name} finished "
            f"(nothing exported); the trials and the study are saved. Resume with: "
            f"mgfa-ray search resume {search_dir}")
    raise StageError(
        f"search {search_dir}: Ray Tune ended {run.name} with {done} of {run.num_samples} trials finished and "
        f"no stop signal (see its log above, e.g. 'Failed to restore the run state'); nothing exported. "
        f"Run `mgfa-ray search resume {search_dir}` again")


def ray_trials(search_dir: str) -> pd.DataFrame:
    """Ray's view of every trial of every run, read from the experiment folders.

    Returns:
        One row per Ray trial: ``trial`` (Ray id), ``run``, ``optuna_trial``, ``ray_status``
        (TERMINATED / ERROR / …), ``epochs_run``, ``last_<metric>``, ``history`` (the trial's
        per-epoch DataFrame), ``checkpoint`` (path of its latest checkpoint, or None) and
        ``config``.
    """
    from ray.tune import ExperimentAnalysis

    record = read_record(search_dir)
    fs, runs_path = resolve_location(location_join(search_dir, "runs"))
    rows = []
    for run in record.runs:
        run_path = location_join(runs_path, run.name)
        try:
            analysis = ExperimentAnalysis(run_path, storage_filesystem=fs)
        except (ValueError, FileNotFoundError):  # the run has not started yet
            continue
        frames = analysis.trial_dataframes
        for trial in analysis.trials:
            history = frames.get(trial.trial_id)
            epochs, last = 0, None
            if history is not None and len(history):
                history = history.sort_values("training_iteration").drop_duplicates("training_iteration", keep="last")
                epochs, last = int(history["training_iteration"].max()), history.iloc[-1]
            rows.append({
                "trial": trial.trial_id, "run": run.name, "optuna_trial": trial.config.get("optuna_trial"),
                "ray_status": trial.status, "epochs_run": epochs,
                f"last_{record.search.metric}": float(last[record.search.metric]) if last is not None else None,
                "wall_seconds": float(last["time_total_s"]) if last is not None else None,
                "history": history, "checkpoint": trial.checkpoint.path if trial.checkpoint else None,
                "checkpoint_fs": fs, "config": trial.config,
            })
    return pd.DataFrame(rows)
