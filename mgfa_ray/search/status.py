"""``mgfa-ray search status DIR``: where a search stands, read from another shell without touching it.

Read-only by construction: the search record (``search.json``) and the driver's lock record are
read through the search directory's filesystem (local, NFS or object store), and the Optuna study
through a journal backend that cannot write (:class:`ReadOnlyJournal`) or an RDB storage that
creates no tables. Nothing takes the search's lock, so a running driver is never disturbed and a
search whose driver is alive can be watched.

:func:`search_status` gives, as a JSON-ready dict:

* ``trials`` — the search's trials per state (Optuna's COMPLETE / PRUNED / FAIL / RUNNING, and
  NOT_STARTED for the samples not yet asked), counted over :func:`mgfa_ray.search.study.search_trials`;
* ``best`` — the best COMPLETE trial so far with its parameters (the simplex as its weights), or
  ``None``; ``leading`` — while none is COMPLETE, the trial with the highest value reported so far;
* ``rungs`` — the scheduler's rungs (at ``grace_period * reduction_factor**k``
  epochs, and ``max_epochs``): how many trials reached each and how many were stopped there;
* ``epochs`` — trial epochs run (one intermediate value per epoch) against the budget
  ``num_samples * max_epochs``;
* ``rate`` and ``eta_seconds`` — seconds per trial epoch measured from the trials' start and end
  times (finished trials; running ones while none has finished), the search's concurrency, and
  the time the remaining epochs take at that rate if no further trial is stopped early (an upper
  bound: ASHA stops most trials at a rung);
* ``driver`` — the lock holder (host, pid, heartbeat) and whether it is alive.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
from optuna.storages.journal import BaseJournalBackend
from optuna.trial import FrozenTrial, TrialState

from mgfa_ray.errors import UserError
from mgfa_ray.search.asha import rung_epochs
from mgfa_ray.storage import fs_read, is_uri, location_join, resolve_location


class ReadOnlyJournal(BaseJournalBackend):
    """An Optuna journal file read as it is, never written (no lock file, no append).

    The records are the file's complete lines (``\\n``-terminated) as of each read; a last line
    without its newline — a record being written by the running driver, or torn by a crash — is
    left for a later read. A complete line that is not JSON is skipped and counted in
    ``skipped``.

    Args:
        path: The journal file (local or NFS).

    Raises:
        UserError: On the first read, when the file does not exist.
    """

    def __init__(self, path: str):
        self.path = path
        self.skipped = 0

    def read_logs(self, log_number_from: int) -> Iterator[dict[str, Any]]:
        try:
            data = Path(self.path).read_bytes()
        except FileNotFoundError:
            raise UserError(f"{self.path}: the search's Optuna journal does not exist (the search has not "
                            "started, or its directory was moved without it)") from None
        lines = data.split(b"\n")[:-1]  # the part after the last newline is incomplete
        for number, line in enumerate(lines):
            if number < log_number_from:
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                self.skipped += 1

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        raise PermissionError(f"{self.path}: opened read-only (mgfa-ray search status never writes)")


def open_study_readonly(storage: str, study_name: str) -> optuna.Study:
    """The study ``study_name`` in ``storage`` (a journal file path or an RDB URL), opened without
    any write: a :class:`ReadOnlyJournal`, or ``RDBStorage`` without table creation or migration.

    Raises:
        UserError: No such journal file, or no such study in the storage.
    """
    return _open_study(storage, study_name)[0]


def _open_study(storage: str, study_name: str) -> tuple[optuna.Study, ReadOnlyJournal | None]:
    journal = None
    if storage.startswith("sqlite:///") and not Path(storage[len("sqlite:///"):]).is_file():
        # sqlite would create an empty database file on connecting
        raise UserError(f"{storage}: the search's study database does not exist")
    backend: optuna.storages.BaseStorage
    if is_uri(storage):  # an RDB URL
        backend = optuna.storages.RDBStorage(storage, skip_table_creation=True, skip_compatibility_check=True)
    else:
        journal = ReadOnlyJournal(storage)
        backend = optuna.storages.JournalStorage(journal)
    try:
        return optuna.load_study(storage=backend, study_name=study_name), journal
    except KeyError:
        raise UserError(f"no Optuna study {study_name!r} in {storage}: no trial of the search has been "
                        "asked yet, or the study storage was moved") from None


def _driver(search_dir: str) -> dict[str, Any] | None:
    """The lock record of the search's driver, with ``alive`` (read only; never taken)."""
    from mgfa_ray.storage.lock import LOCK_FILE, DirectoryLock

    fs, path = resolve_location(search_dir)
    try:
        holder = json.loads(fs_read(fs, location_join(path, LOCK_FILE)))
    except (FileNotFoundError, ValueError):
        return None
    lock = DirectoryLock(search_dir)  # not entered: only its staleness rule is used
    return {"host": holder.get("host"), "pid": holder.get("pid"),
            "heartbeat_age_seconds": round(time.time() - float(holder.get("heartbeat", 0)), 1),
            "alive": not lock.stale(holder)}


def study_location(search_dir: str, storage: str) -> str:
    """The study storage of a record: an RDB URL or absolute path as recorded; a relative journal
    path is relative to the search directory."""
    if is_uri(storage) or Path(storage).is_absolute() or is_uri(search_dir):
        return storage
    return str(Path(search_dir) / storage)


def _params(trial: FrozenTrial, space) -> dict[str, Any]:
    from mgfa_ray.search.space import define_by_run

    return {**{k: v for k, v in trial.params.items() if "/" not in k},
            **define_by_run(optuna.trial.FixedTrial(trial.params), space=space)}


def _rate(trials: list[FrozenTrial], now: float) -> float | None:
    """Seconds per trial epoch: finished trials' run time over their epochs; while none has
    finished, running trials' time so far over their epochs. ``None`` before any epoch."""
    done = [(t.datetime_complete.timestamp() - t.datetime_start.timestamp(), len(t.intermediate_values))
            for t in trials if t.state.is_finished() and t.datetime_start and t.datetime_complete
            and t.intermediate_values]
    if not done:
        done = [(now - t.datetime_start.timestamp(), len(t.intermediate_values))
                for t in trials if t.state == TrialState.RUNNING and t.datetime_start and t.intermediate_values]
    spent = sum(seconds for seconds, _ in done)
    epochs = sum(n for _, n in done)
    return spent / epochs if epochs else None


def search_status(search_dir: str, *, now: float | None = None) -> dict[str, Any]:
    """Where the search in ``search_dir`` (path or URI) stands, read without writing anything.

    Args:
        search_dir: A search directory (``outputs/<job>/search/<job>``) or its object-store URI.
        now: Unix time the running trials' time is measured to (default: now).

    Returns:
        JSON-ready dict; keys in the module docstring. Epochs and values come from the study's
        intermediate values (one per trial epoch, the search metric); times in seconds.

    Raises:
        ConfigError: No search in ``search_dir`` (no valid ``search.json``).
        UserError: Its study storage or study is missing.
    """
    from mgfa_ray.search.driver import read_record
    from mgfa_ray.search.study import search_trials

    now = time.time() if now is None else now
    record = read_record(search_dir)
    storage = study_location(search_dir, record.study.storage)
    study, journal = _open_study(storage, record.study.study_name)
    trials = search_trials(study)
    sched, max_epochs = record.space.scheduler, record.max_epochs
    num_samples, states, finished = trial_states(record, trials)

    epochs_of = {t.number: max(t.intermediate_values, default=0) for t in trials}
    rung_steps = rung_epochs(max_epochs, sched.grace_period, sched.reduction_factor, sched.early_stopping)
    rungs = []
    for i, epoch in enumerate(rung_steps):
        nxt = rung_steps[i + 1] if i + 1 < len(rung_steps) else math.inf
        reached = [t for t in trials if epochs_of[t.number] >= epoch]
        rungs.append({"epoch": epoch, "reached": len(reached),
                      "stopped_here": sum(t.state == TrialState.PRUNED and epochs_of[t.number] < nxt for t in reached),
                      "running": sum(t.state == TrialState.RUNNING and epochs_of[t.number] < nxt for t in reached)})

    done = sum(len(t.intermediate_values) for t in trials)
    budget = num_samples * max_epochs
    # Epochs still to run if no further trial is stopped: running trials to max_epochs, unstarted trials whole.
    remaining = sum(max_epochs - epochs_of[t.number] for t in trials if t.state == TrialState.RUNNING)
    remaining += states["NOT_STARTED"] * max_epochs
    per_epoch = _rate(trials, now)
    concurrency = max(1, min(record.search.max_concurrent, states["RUNNING"] + states["NOT_STARTED"]))
    eta = per_epoch * remaining / concurrency if per_epoch is not None and remaining else (0.0 if not remaining else None)

    best = _best(trials, record.space, record.search.metric)
    return {
        "search_dir": search_dir,
        "study": {"storage": storage, "study_name": record.study.study_name},
        "metric": record.search.metric,
        "num_samples": num_samples,
        "max_epochs": max_epochs,
        "scheduler": {"grace_period": sched.grace_period, "reduction_factor": sched.reduction_factor,
                      "early_stopping": sched.early_stopping},
        "trials": states,
        "finished": finished,
        **best,
        "rungs": rungs,
        "epochs": {"done": done, "budget": budget, "fraction": round(done / budget, 4) if budget else None,
                   "remaining_at_most": remaining},
        "rate": {"seconds_per_trial_epoch": per_epoch, "max_concurrent": record.search.max_concurrent},
        "eta_seconds": eta,
        "driver": _driver(search_dir),
        "journal_records_skipped": journal.skipped if journal else 0,
    }


def trial_states(record, trials: list[FrozenTrial]) -> tuple[int, dict[str, int], bool]:
    """How far a search is: its trials asked for over all runs (``num_samples``), its trials per
    state (COMPLETE, PRUNED, FAIL, RUNNING, and NOT_STARTED: asked for, not yet begun), and whether
    it is finished (none running, none still to start). ``record`` is the search's
    :class:`~mgfa_ray.search.driver.SearchRecord`, ``trials`` :func:`~mgfa_ray.search.study.search_trials`."""
    num_samples = sum(r.num_samples for r in record.runs)
    states = {s: 0 for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")}
    for t in trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    states["NOT_STARTED"] = max(0, num_samples - len(trials))
    return num_samples, states, states["RUNNING"] == 0 and states["NOT_STARTED"] == 0


def _best(trials: list[FrozenTrial], space, metric: str) -> dict[str, Any]:
    """``best``: the best COMPLETE trial (as :func:`mgfa_ray.search.study.best_trial`) with its parameters;
    ``leading``: while none is COMPLETE, the trial with the highest value reported at any epoch."""
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    best = max(done, key=lambda t: (t.value, -t.number)) if done else None
    leading = None
    if best is None:
        reported = [(v, -t.number, step, t) for t in trials for step, v in t.intermediate_values.items()
                    if math.isfinite(v)]
        if reported:
            v, _, step, t = max(reported, key=lambda r: r[:2])
            leading = {"optuna_trial": t.number, "ray_trial": t.user_attrs.get("ray_trial_id"), "state": t.state.name,
                       metric: v, "epoch": step, "params": _params(t, space)}
    return {"best": best and {"optuna_trial": best.number, "ray_trial": best.user_attrs.get("ray_trial_id"),
                              metric: best.value, "epochs": max(best.intermediate_values, default=None),
                              "params": _params(best, space)},
            "leading": leading}


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    return f"{h} h {rem // 60:02d} min" if h else f"{rem // 60} min {rem % 60:02d} s"


def format_status(status: dict[str, Any]) -> str:
    """:func:`search_status` as the text ``mgfa-ray search status`` prints."""
    metric, trials = status["metric"], status["trials"]
    driver = status["driver"]
    lines = [f"search {status['search_dir']} — " + ("finished" if status["finished"] else "not finished")]
    if driver:
        lines.append(f"driver: pid {driver['pid']} on {driver['host']!r}, heartbeat {driver['heartbeat_age_seconds']:.0f} s "
                     f"ago ({'alive' if driver['alive'] else 'gone: `mgfa-ray search resume DIR` continues it'})")
    elif not status["finished"]:
        lines.append("driver: none (`mgfa-ray search resume DIR` continues the search)")
    lines.append(f"trials ({status['num_samples']}): " + ", ".join(f"{k} {v}" for k, v in trials.items()))
    for key in ("best", "leading"):
        b = status[key]
        if b:
            params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in b["params"].items())
            where = f"epoch {b['epoch']}, {b['state']}" if key == "leading" else f"{b['epochs']} epochs"
            lines.append(f"{key}{' so far' if key == 'best' else ' (no trial COMPLETE yet)'}: Optuna trial "
                         f"{b['optuna_trial']} (Ray {b['ray_trial']}, {where}) {metric} {b[metric]:.4f}; {params}")
    if not status["best"] and not status["leading"]:
        lines.append("best so far: none (no epoch reported yet)")
    lines.append("rungs (epoch: trials reached / stopped there / running):")
    lines.extend(f"  {r['epoch']:>4}: {r['reached']:>3} / {r['stopped_here']:>3} / {r['running']:>3}" for r in status["rungs"])
    e, rate = status["epochs"], status["rate"]
    lines.append(f"epochs: {e['done']} of the budget {e['budget']} ({status['num_samples']} trials x "
                 f"{status['max_epochs']} epochs, {100 * (e['fraction'] or 0):.0f}%)")
    per = rate["seconds_per_trial_epoch"]
    lines.append(f"rate: {per:.1f} s per trial epoch, {rate['max_concurrent']} trials at once" if per is not None
                 else "rate: unknown (no epoch yet)")
    if not status["finished"]:
        lines.append(f"ETA: at most {_duration(status['eta_seconds'])} ({e['remaining_at_most']} epochs left if no "
                     "further trial is stopped early)")
    if status["journal_records_skipped"]:
        lines.append(f"warning: {status['journal_records_skipped']} unreadable record(s) in {status['study']['storage']} skipped")
    return "\n".join(lines)
