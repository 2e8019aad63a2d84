"""The Optuna side of the search: one persistent study that Ray Tune's trials are kept in step with.

Ray 2.60's ``OptunaSearch`` keeps the trial ↔ study mapping only in the driver's memory and runs
Optuna with a no-op pruner, which breaks a search that must survive crashes: a restarted
trial's new id is a ``KeyError`` in its ``on_trial_result``, a trial retried to success stays FAIL,
and an early-stopped trial is told COMPLETE with its truncated score (read in Ray's
``ray/tune/search/optuna/optuna_search.py``). Here the study itself holds everything needed to
pick up after a crash:

* every Optuna trial carries the user attributes ``ray_trial_id`` (the Ray trial running it) and
  ``driver_session`` (the driver process that last claimed it); every Ray trial's config carries
  its Optuna trial number under :data:`OPTUNA_TRIAL_KEY`;
* :class:`StudySearch` (a Ray ``Searcher``) asks the study for new trials; after a driver crash it
  first hands out *orphans* — RUNNING trials that the restored Ray experiment does not know (the
  driver died after asking Optuna but before Ray's experiment snapshot recorded the trial), so no
  trial is lost or run twice;
* :class:`StudyScheduler` (a Ray ``FIFOScheduler``) writes every epoch's metric as an intermediate
  value, stops trials by asynchronous successive halving (ASHA, Li et al., MLSys 2020;
  :mod:`mgfa_ray.search.asha`) computed from rungs recorded in the study, so they survive a driver
  restart, whereas Ray's ``ASHAScheduler`` starts empty on ``Tuner.restore`` — and tells the final
  state: COMPLETE (ran ``max_epochs``, with its last value), PRUNED (stopped early, value = last
  intermediate value), FAIL (errored after Ray's retries). A trial Ray runs again after an error
  (``resume_errored`` / ``restart_errored``) gets a fresh Optuna trial with the same parameters
  (Optuna's own convention: system attribute ``failed_trial``), so it ends COMPLETE or PRUNED too.

Both use Ray and Optuna through their public APIs only (:class:`OpenStudy`); what has no public
route is in :mod:`mgfa_ray.compat`.

A trial whose outcome reached the study before the crash but not Ray's snapshot is rerun by Ray
from its last checkpoint; the scheduler replays the recorded decision (PRUNED → stop,
COMPLETE → run to the end) and never rewrites a finished trial.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock
from optuna.trial import FrozenTrial, TrialState
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher

from mgfa_ray.search.asha import STOP_ATTR, Asha, is_rung_attr, rung_attrs, rung_values
from mgfa_ray.compat import move_trial_storage, running_trial, trial_experiment_path
from mgfa_ray.errors import UserError
from mgfa_ray.runtime import configure
from mgfa_ray.search.space import OPTUNA_TRIAL_KEY, SearchSpace, define_by_run
from mgfa_ray.storage import is_uri

log = logging.getLogger(__name__)

RAY_TRIAL_ATTR = "ray_trial_id"
SESSION_ATTR = "driver_session"
RUN_ATTR = "run"
WARM_START_ATTR = "warm_start_from"

SESSION = uuid.uuid4().hex
"""This driver process's token: trials it claimed carry it in ``driver_session``."""

class DamagedJournalError(UserError):
    """An Optuna journal file damaged other than by a torn last record (which is repaired): the
    message names the file and line and what to do."""


def _scan_journal(path: Path) -> tuple[int, int]:
    """``(size, end)``: the file's size and the end of its last complete record (a line ending in a
    newline, which Optuna writes last, and fsyncs). ``end < size``: the last record is torn.

    Raises:
        DamagedJournalError: A complete line that is not a JSON record (``path:line``).
    """
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    for number, line in enumerate(data[:end].split(b"\n")[:-1], start=1):
        try:
            json.loads(line)
        except ValueError as err:
            raise DamagedJournalError(
                f"{path}:{number}: not an Optuna journal record ({err}); the study cannot be read past "
                f"this line. Restore the file from a backup, or keep the records before it by cutting "
                f"the file after line {number - 1} (the trials recorded after it are then lost)") from None
    return len(data), end


class WholeRecordJournal(JournalFileBackend):
    """Optuna's journal file (``JournalFileBackend``: the same file, format and symlink lock) whose
    appends are whole or nothing: when a write fails — a full disk, a quota — the bytes written so
    far are cut off again (``ftruncate`` under the lock) before the error propagates, so the
    journal is never left with a torn record and the study stays readable and resumable. (A
    process killed in mid-write can still leave one; :func:`repair_journal` drops it when the
    journal is next opened.)

    Args:
        file_path: The journal file (created empty when absent, as Optuna does).
    """

    def __init__(self, file_path: str) -> None:
        self._append_lock = JournalFileSymlinkLock(file_path)
        super().__init__(file_path, lock_obj=self._append_lock)
        self._journal_path = file_path

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        """Append ``logs`` (Optuna's operation records) as JSON lines, all or none of them.

        Raises:
            OSError: The write or its ``fsync`` failed (the file is as it was before the call).
        """
        data = ("\n".join(json.dumps(log, separators=(",", ":")) for log in logs) + "\n").encode("utf-8")
        self._append_lock.acquire()
        try:
            fd = os.open(self._journal_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                start = os.fstat(fd).st_size
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                    os.fsync(fd)
                except OSError:
                    os.ftruncate(fd, start)
                    raise
            finally:
                os.close(fd)
        finally:
            self._append_lock.release()


def repair_journal(path: str | os.PathLike) -> None:
    """Make an Optuna journal file safe to read and append to.

    A record torn by a crash or a full disk during a write (a last line without its newline) is
    dropped: the file is truncated back to the end of its last complete record — one ``truncate``
    under the journal's own lock (the lock Optuna's writers take), so a live writer finishing its
    record is never cut and a crash during the repair loses nothing more — and a warning names the
    file. Optuna itself skips such a line when reading but appends the next record onto it, which
    makes the whole study unreadable. A missing file is left alone.

    Raises:
        DamagedJournalError: Any other damage: a complete line that is not a JSON record (the
            message names ``file:line``).
    """
    path = Path(path)
    if not path.is_file():
        return
    size, end = _scan_journal(path)
    if end == size:
        return
    lock = JournalFileSymlinkLock(str(path))
    lock.acquire()
    try:
        size, end = _scan_journal(path)  # again, under the lock: a writer may have finished it
        if end == size:
            return
        try:
            os.truncate(path, end)
        except OSError as err:  # e.g. a read-only copy: Optuna reads past the torn record anyway
            log.warning("%s: its last record is torn (%d bytes, a write cut short) and cannot be dropped "
                        "(%s); reading without it", path, size - end, err)
            return
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        lock.release()
    log.warning("%s: dropped its torn last record (%d bytes: a write cut short by a crash or a full disk); "
                "the study keeps every complete record", path, size - end)


def release_stale_journal_lock(path: str | os.PathLike, *, settle_s: float = 2.0) -> bool:
    """Remove the lock an Optuna journal's writer left behind when it was killed during an append.

    Optuna's writers hold ``<journal>.lock`` (a symbolic link: ``JournalFileSymlinkLock``, the
    ``JournalFileBackend`` default) for one append, milliseconds. A driver killed during one leaves
    the link, and the next writer waits Optuna's grace period (30 s, then it releases it by force):
    every resume after such a crash stalled for 30 s. For the caller that holds the search's
    :class:`~mgfa_ray.storage.lock.DirectoryLock` — no other driver writes the study — the link is removed
    once the same link (inode and mtime, ``lstat``) has stood for ``settle_s`` seconds of this
    process's clock: any live writer (optuna-dashboard, a script of the user's) would have released
    it long before. A warning names the file.

    Args:
        path: The journal file (its lock is ``path + ".lock"``).
        settle_s: Seconds the same link must stand before it counts as left behind, > 0.

    Returns:
        Whether a left-behind link was removed (False: none, or released meanwhile).

    Raises:
        ValueError: ``settle_s`` <= 0.
    """
    if settle_s <= 0:
        raise ValueError(f"settle_s must be > 0, got {settle_s}")
    link = Path(f"{os.fspath(path)}.lock")
    seen, since = None, time.monotonic()
    while True:
        try:
            st = os.lstat(link)
        except FileNotFoundError:
            return False
        if (st.st_ino, st.st_mtime_ns) != seen:  # a new holder: wait for this one
            seen, since = (st.st_ino, st.st_mtime_ns), time.monotonic()
        elif time.monotonic() - since >= settle_s:
            break
        time.sleep(0.05)
    try:
        link.unlink()
    except FileNotFoundError:
        return False
    log.warning("%s: removed the lock its last writer left behind (a driver killed while writing the study); "
                "the search holds its own lock, so no other driver writes this journal", link)
    return True


@dataclass(frozen=True)
class StudyRef:
    """Where a study lives: ``storage`` is an RDB URL (``sqlite:///abs/path.db``,
    ``postgresql://…``, any SQLAlchemy URL) or the path of an Optuna journal file (on local disk or
    NFS: it needs POSIX file locks); ``study_name`` names the study in it.
    Both can be opened with optuna-dashboard (``optuna-dashboard <journal file or URL>``)."""

    storage: str
    study_name: str

    def open_storage(self, *, create: bool = True) -> optuna.storages.BaseStorage:
        """The Optuna storage object (``RDBStorage`` or ``JournalStorage(JournalFileBackend)``).

        Every journal the project opens goes through here: a torn last record is dropped first
        (:func:`repair_journal`), so no reader fails on it and no writer appends onto it.

        Raises:
            DamagedJournalError: The journal is damaged other than by a torn last record.
            KeyError: ``create`` is false and the journal file does not exist.
        """
        configure()  # Optuna's log level (mgfa_ray.runtime), before the first study opens
        if is_uri(self.storage):  # an RDB URL
            return optuna.storages.RDBStorage(self.storage)
        path = Path(self.storage)
        if not create and not path.is_file():
            raise KeyError(f"no Optuna study {self.study_name!r}: journal {path} does not exist")
        path.parent.mkdir(parents=True, exist_ok=True)
        repair_journal(path)
        return optuna.storages.JournalStorage(WholeRecordJournal(str(path)))

    def load(self, *, sampler: optuna.samplers.BaseSampler | None = None, create: bool = False) -> optuna.Study:
        """The study (maximising). ``create`` makes it if absent; otherwise a missing study (or
        journal file) is a ``KeyError`` naming storage and study.

        Raises:
            DamagedJournalError: See :meth:`open_storage`.
        """
        return self.load_from(self.open_storage(create=create), sampler=sampler, create=create)

    def load_from(self, storage: optuna.storages.BaseStorage, *, sampler: optuna.samplers.BaseSampler | None = None,
                  create: bool = False) -> optuna.Study:
        """:meth:`load` on a storage object from :meth:`open_storage`."""
        if create:
            return optuna.create_study(storage=storage, study_name=self.study_name, direction="maximize",
                                       sampler=sampler, load_if_exists=True)
        try:
            return optuna.load_study(storage=storage, study_name=self.study_name, sampler=sampler)
        except KeyError:
            raise KeyError(f"no Optuna study {self.study_name!r} in {self.storage}") from None


@dataclass(frozen=True)
class _Binding:
    study: StudyRef
    experiment_path: str | None


_BOUND: dict[str, _Binding] = {}


@contextmanager
def bound_study(ref: StudyRef, *, experiment_path: str | None = None):
    """While active, every :class:`StudySearch` and :class:`StudyScheduler` of study
    ``ref.study_name`` opens ``ref``, whatever study location it was pickled with, and the
    scheduler keeps every new trial's storage in ``experiment_path`` (a local Ray experiment
    directory as it is now; ``None``: leave trials as Ray made them).

    Ray pickles the searcher and the scheduler into the experiment with the study location of the
    day the search was created; a search directory moved or copied since must use the journal
    where it is now (:func:`mgfa_ray.search.driver.read_record` resolves it at load time), never write
    into the original's. The search driver binds the study around ``Tuner.fit``.
    """
    previous = _BOUND.get(ref.study_name)
    _BOUND[ref.study_name] = _Binding(ref, experiment_path)
    try:
        yield ref
    finally:
        if previous is None:
            _BOUND.pop(ref.study_name, None)
        else:
            _BOUND[ref.study_name] = previous


def make_sampler(kind: str, seed: int, *, startup_trials: int = 10) -> optuna.samplers.BaseSampler:
    """``tpe``: seeded multivariate TPE (Optuna ``TPESampler(multivariate=True)``; its first
    ``startup_trials`` trials are random, :attr:`mgfa_ray.config.SearchConfig.tpe_startup_trials`);
    ``random``: seeded ``RandomSampler``, the search's default (:class:`mgfa_ray.config.SearchConfig`).

    Raises:
        ValueError: ``kind`` is neither."""
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=startup_trials)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"sampler must be 'tpe' or 'random', got {kind!r}")


def _number_by_ray_id(study: optuna.Study, ray_trial_id: str) -> int | None:
    """The newest Optuna trial run by ``ray_trial_id`` (a retried trial has several)."""
    numbers = [t.number for t in study.get_trials(deepcopy=False) if t.user_attrs.get(RAY_TRIAL_ATTR) == ray_trial_id]
    return max(numbers) if numbers else None


class OpenStudy:
    """A study and the storage object it was opened on, which addresses its trials by number.

    Everything goes through public API: ``optuna.Study`` for ask/tell/get_trials and the public
    methods of the ``BaseStorage`` the project opened itself (:meth:`StudyRef.open_storage`) for
    what a ``Study`` has no method for (a user attribute, an intermediate value or a new RUNNING
    trial, by trial number). For an RDB URL the study reads through Optuna's cache of *finished*
    trials; the writes here only touch unfinished ones, so both views agree.

    Args:
        ref: Where the study lives.
        sampler: The sampler of ``study`` (``None``: Optuna's default).
        create: Create the study if absent (else a missing one is a ``KeyError``).
    """

    def __init__(self, ref: StudyRef, *, sampler: optuna.samplers.BaseSampler | None = None, create: bool = False):
        self.storage = ref.open_storage(create=create)
        self.study = ref.load_from(self.storage, sampler=sampler, create=create)
        self.study_id = self.storage.get_study_id_from_name(ref.study_name)

    def trial_id(self, number: int) -> int:
        """The storage's id of trial ``number``."""
        return self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)

    def frozen(self, number: int) -> FrozenTrial:
        """Trial ``number`` as the storage holds it now."""
        return self.storage.get_trial(self.trial_id(number))

    def set_user_attrs(self, number: int, attrs: dict[str, Any]) -> None:
        """Set user attributes of (unfinished) trial ``number``."""
        tid = self.trial_id(number)
        for key, value in attrs.items():
            self.storage.set_trial_user_attr(tid, key, value)

    def report(self, number: int, step: int, value: float) -> None:
        """Record (or overwrite) the intermediate value of (unfinished) trial ``number`` at ``step``."""
        self.storage.set_trial_intermediate_value(self.trial_id(number), step, value)

    def add_running(self, template: FrozenTrial) -> int:
        """Add a trial (from ``optuna.trial.create_trial(state=RUNNING, ...)``); returns its number."""
        return self.storage.get_trial_number_from_id(self.storage.create_new_trial(self.study_id, template))

    def running_trial(self, number: int) -> optuna.trial.Trial:
        """An ``optuna.trial.Trial`` on RUNNING trial ``number`` (to complete its parameters)."""
        return running_trial(self.study, self.trial_id(number))


class _StudyUser:
    """Shared by searcher and scheduler: the study, opened lazily in the driver and never pickled
    (Ray pickles both into the experiment; the storage is reconnected after a restore)."""

    study_ref: StudyRef
    _study_sampler: optuna.samplers.BaseSampler | None
    _open: OpenStudy | None
    _trial_numbers: dict[str, int]

    def _init_study(self, ref: StudyRef, sampler: optuna.samplers.BaseSampler | None) -> None:
        self.study_ref = ref
        self._study_sampler = sampler
        self._open = None
        self._trial_numbers = {}

    @property
    def opened(self) -> OpenStudy:
        """The open study: where the search's :func:`bound_study` says, else ``study_ref``."""
        if self._open is None:
            bound = _BOUND.get(self.study_ref.study_name)
            # Never the pickled path of a moved search; a bound study exists (create_search made it).
            ref = bound.study if bound else self.study_ref
            self._open = OpenStudy(ref, sampler=self._study_sampler, create=bound is None)
        return self._open

    @property
    def study(self) -> optuna.Study:
        return self.opened.study

    def _number_of(self, trial_id: str, config: dict[str, Any] | None) -> int | None:
        if trial_id in self._trial_numbers:
            return self._trial_numbers[trial_id]
        number = _number_by_ray_id(self.study, trial_id)
        if number is None and config is not None and OPTUNA_TRIAL_KEY in config:
            number = int(config[OPTUNA_TRIAL_KEY])
        if number is not None:
            self._trial_numbers[trial_id] = number
        return number


def unflatten(params: dict[str, Any], sep: str = "/") -> dict[str, Any]:
    """``{"a/b": 1, "c": 2}`` → ``{"a": {"b": 1}, "c": 2}`` (Optuna names nested config keys so)."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        *heads, last = key.split(sep)
        node = out
        for head in heads:
            node = node.setdefault(head, {})
        node[last] = value
    return out


def sample_config(trial: optuna.trial.Trial, space: SearchSpace) -> dict[str, Any]:
    """Suggest ``space`` on ``trial`` (:func:`~mgfa_ray.search.space.define_by_run`): its parameters
    (``simplex/u<i>`` nested under ``simplex``) and the constants it adds (simplex weights, fixed
    parameters). A parameter the trial already holds keeps its value."""
    constants = define_by_run(trial, space=space)
    return {**unflatten(dict(trial.params)), **constants}


STATE_FORMAT = 2
"""Format of a pickled :class:`StudySearch` / :class:`StudyScheduler` state (its ``format`` key);
a state of another format is refused (:func:`_check_state_format`)."""


class StateFormatError(UserError):
    """A pickled searcher or scheduler state of another format than :data:`STATE_FORMAT`."""


def _check_state_format(state: dict[str, Any], what: str) -> None:
    """Raise :class:`StateFormatError` when ``state`` (of the ``what``: searcher or scheduler) is
    not of :data:`STATE_FORMAT` (a state without ``format`` key is format 1)."""
    found = state.get("format", 1) if isinstance(state, dict) else "unknown"
    if found != STATE_FORMAT:
        raise StateFormatError(f"Ray's saved {what} state was written by another mgfa-ray version (format {found}, "
                               f"this version reads {STATE_FORMAT}): start a new search directory, or resume it "
                               "with the mgfa-ray version that started it")


class StudySearch(_StudyUser, Searcher):
    """Ray Tune searcher over a persistent Optuna study (public ``Searcher`` API; the study through
    ``ask``, ``enqueue_trial`` and :class:`OpenStudy`).

    Args:
        space: The validated search space; its ``points_to_evaluate`` are enqueued once per study
            (a point already in the study — from an earlier run or a warm start — is not enqueued
            again).
        study: Where the study lives.
        metric: Metric maximised.
        sampler: ``tpe`` or ``random`` (:func:`make_sampler`).
        seed: Sampler seed.
        startup_trials: TPE's random start-up trials (:func:`make_sampler`).
        run: Name of the Ray experiment using the searcher (stored on each trial as ``run``).

    Returns configs holding the sampled parameters, the simplex cut variables (nested under
    ``simplex``) and :data:`OPTUNA_TRIAL_KEY`.
    """

    def __init__(self, *, space: SearchSpace, study: StudyRef, metric: str, sampler: str, seed: int, run: str,
                 startup_trials: int = 10):
        Searcher.__init__(self, metric=metric, mode="max")
        self._init_study(study, make_sampler(sampler, seed, startup_trials=startup_trials))
        self.space_spec = space
        self.run = run
        self._enqueue_points()

    def _enqueue_points(self) -> None:
        """Enqueue the space's points not yet in the study (once per study, not per run). A point
        enqueued before a crash and not yet asked is found by Optuna's own ``skip_if_exists``."""
        study = self.study
        tried = [t.params for t in study.get_trials(deepcopy=False)]
        for point in self.space_spec.optuna_points():
            if not any(_same_params(point, p) for p in tried):
                study.enqueue_trial(point, skip_if_exists=True)
                tried.append(point)

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec) -> bool:
        """The space, metric and mode are the searcher's own: a Tune config cannot replace them."""
        return False

    def _orphan(self) -> FrozenTrial | None:
        """The oldest RUNNING trial of this run that no live driver claims: asked before a driver
        crash, never recorded by Ray's snapshot."""
        orphans = [t for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                   if t.user_attrs.get(SESSION_ATTR) != SESSION and t.user_attrs.get(RUN_ATTR, self.run) == self.run]
        return min(orphans, key=lambda t: t.number) if orphans else None

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        orphan = self._orphan()
        if orphan is not None:
            # Suggesting again returns the values the orphan already holds and samples any the
            # crash left unsampled.
            number = orphan.number
            ot_trial = self.opened.running_trial(number)
            log.warning("trial %s takes over Optuna trial %d (asked before a driver crash; Ray never recorded it)",
                        trial_id, number)
        else:
            ot_trial = self.study.ask()
            number = ot_trial.number
        config = sample_config(ot_trial, self.space_spec)
        self.opened.set_user_attrs(number, {RAY_TRIAL_ATTR: trial_id, SESSION_ATTR: SESSION, RUN_ATTR: self.run})
        self._trial_numbers[trial_id] = number
        return {**config, OPTUNA_TRIAL_KEY: number}

    # The scheduler records results and final states (it sees the result that made it stop a
    # trial, which Ray withholds from the searcher); the searcher only suggests.
    def on_trial_result(self, trial_id: str, result: dict) -> None:
        return None

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        return None

    def __getstate__(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "study_ref": self.study_ref, "sampler": self._study_sampler,
                "space": self.space_spec, "run": self.run, "metric": self.metric,
                "trial_numbers": dict(self._trial_numbers)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        _check_state_format(state, "searcher")
        Searcher.__init__(self, metric=state["metric"], mode="max")
        self._init_study(state["study_ref"], state["sampler"])
        self._trial_numbers.update(state["trial_numbers"])
        self.space_spec, self.run = state["space"], state["run"]

    def save(self, checkpoint_path: str) -> None:
        import pickle

        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__getstate__(), f)

    def restore(self, checkpoint_path: str) -> None:
        import pickle

        with open(checkpoint_path, "rb") as f:
            self.__setstate__(pickle.load(f))


def _same_params(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if set(a) != set(b):
        return False
    for k, v in a.items():
        w = b[k]
        if isinstance(v, float) or isinstance(w, float):
            if not (isinstance(w, (int, float)) and math.isclose(float(v), float(w), rel_tol=1e-12, abs_tol=1e-15)):
                return False
        elif v != w:
            return False
    return True


class StudyScheduler(_StudyUser, FIFOScheduler):
    """Ray Tune scheduler that keeps the study in step with Ray and stops trials by ASHA
    (:class:`mgfa_ray.search.asha.Asha`, its rungs recorded in the study).

    Args:
        study: Where the study lives.
        metric: Metric maximised (reported every epoch).
        max_epochs: Epochs of a trial never stopped; a trial that reports it is COMPLETE.
        grace_period: Epochs before a trial can be stopped (ASHA's minimum resource).
        reduction_factor: ASHA's reduction factor (integer >= 2): at each rung a trial continues
            only when in the top 1/reduction_factor of the trials that reached the rung.
        early_stopping: ``False`` runs every trial to ``max_epochs`` (random-search baseline).
    """

    def __init__(self, *, study: StudyRef, metric: str, max_epochs: int, grace_period: int, reduction_factor: int,
                 early_stopping: bool = True):
        FIFOScheduler.__init__(self)
        self._init_study(study, None)
        self.metric_name = metric
        self.max_epochs = max_epochs
        self.early_stopping = early_stopping
        self.asha = Asha(min_resource=grace_period, reduction_factor=reduction_factor)

    @property
    def metric(self) -> str:
        return self.metric_name

    def set_search_properties(self, metric, mode, **spec) -> bool:
        """The metric (maximised) is the scheduler's own; Tune's (the same) is accepted."""
        return True

    def __getstate__(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "study_ref": self.study_ref, "metric": self.metric_name,
                "max_epochs": self.max_epochs, "early_stopping": self.early_stopping, "asha": self.asha,
                "trial_numbers": dict(self._trial_numbers)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        _check_state_format(state, "scheduler")
        self._init_study(state["study_ref"], None)
        self._trial_numbers.update(state["trial_numbers"])
        self.metric_name, self.max_epochs = state["metric"], state["max_epochs"]
        self.early_stopping, self.asha = state["early_stopping"], state["asha"]

    def on_trial_add(self, tune_controller, trial) -> None:
        self._keep_in_experiment(trial)
        number = self._number_of(trial.trial_id, trial.config)
        if number is None:
            log.warning("Ray trial %s has no Optuna trial", trial.trial_id)
            return
        frozen = self.opened.frozen(number)
        if trial.status in ("TERMINATED", "ERROR"):  # restored as finished: Ray will not run it
            if frozen.state == TrialState.RUNNING:  # its end reached Ray's snapshot but not the study
                if trial.status == "ERROR":
                    self.study.tell(number, state=TrialState.FAIL)
                else:
                    self.on_trial_complete(tune_controller, trial, trial.last_result)
            return
        if frozen.state == TrialState.RUNNING:
            self.opened.set_user_attrs(number, {RAY_TRIAL_ATTR: trial.trial_id, SESSION_ATTR: SESSION})
        elif frozen.state == TrialState.FAIL:
            self._retry(frozen, trial.trial_id)

    def _retry(self, frozen: FrozenTrial, ray_trial_id: str) -> None:
        """Ray runs errored Optuna trial ``frozen`` again: with the same id from its checkpoint
        (``resume_errored``: its intermediate values and rungs go on), or with a new id from scratch
        (``restart_errored``). A fresh Optuna trial records the new attempt (Optuna's convention:
        system attribute ``failed_trial``, read by ``RetryFailedTrialCallback.retried_trial_number``)."""
        resumed = frozen.user_attrs.get(RAY_TRIAL_ATTR) == ray_trial_id
        kept = {k: v for k, v in frozen.user_attrs.items() if not is_rung_attr(k)}
        rungs = rung_attrs(rung_values(frozen)) if resumed else {}
        template = optuna.trial.create_trial(
            state=TrialState.RUNNING, params=frozen.params, distributions=frozen.distributions,
            intermediate_values=frozen.intermediate_values if resumed else None,
            user_attrs={**kept, **rungs, RAY_TRIAL_ATTR: ray_trial_id, SESSION_ATTR: SESSION},
            system_attrs={"failed_trial": frozen.number},
        )
        new_number = self.opened.add_running(template)
        self._trial_numbers[ray_trial_id] = new_number
        log.warning("Ray runs errored Optuna trial %d again as trial %d", frozen.number, new_number)

    def _keep_in_experiment(self, trial) -> None:
        """Give a new trial of a moved experiment the experiment's storage as it is now
        (:func:`mgfa_ray.compat.move_trial_storage`: Ray creates the new trials of a restored, moved
        experiment in its old directory), before the trial ever starts."""
        bound = _BOUND.get(self.study_ref.study_name)
        if bound is None or bound.experiment_path is None:
            return
        current = trial_experiment_path(trial)
        if current is not None and current != bound.experiment_path:
            move_trial_storage(trial, bound.experiment_path)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        number = self._number_of(trial.trial_id, trial.config)
        value, step = result.get(self.metric_name), result.get("training_iteration")
        if number is None or value is None or step is None:
            return TrialScheduler.CONTINUE
        frozen = self.opened.frozen(number)
        if frozen.state == TrialState.PRUNED:  # decided before a driver crash: decide the same
            return TrialScheduler.STOP
        if frozen.state != TrialState.RUNNING:
            return TrialScheduler.CONTINUE
        self.opened.report(number, int(step), float(value))
        if STOP_ATTR in frozen.user_attrs and step >= frozen.user_attrs[STOP_ATTR]:  # decided before a crash
            return TrialScheduler.STOP
        if not self.early_stopping or step >= self.max_epochs or not math.isfinite(value):
            return TrialScheduler.CONTINUE
        return self._decide(number, int(step))

    def _decide(self, number: int, step: int) -> str:
        """ASHA's decision for trial ``number`` after its value at ``step``, its new rungs (and a stop)
        recorded in the study before Ray hears it."""
        stop, rungs = self.asha.decide(self.opened.frozen(number), self.study.get_trials(deepcopy=False))
        attrs = rung_attrs(rungs)
        if stop:
            attrs[STOP_ATTR] = step
        self.opened.set_user_attrs(number, attrs)
        return TrialScheduler.STOP if stop else TrialScheduler.CONTINUE

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        number = self._number_of(trial.trial_id, trial.config)
        if number is None:
            return
        frozen = self.opened.frozen(number)
        if frozen.state != TrialState.RUNNING:
            return
        epochs = int((result or {}).get("training_iteration") or 0)
        value = (result or {}).get(self.metric_name)
        if epochs >= self.max_epochs and value is not None:
            if math.isfinite(value):
                self.study.tell(number, float(value))
            else:  # trained to the end but diverged (NaN/inf): no value to compare
                self.study.tell(number, state=TrialState.FAIL)
        elif frozen.intermediate_values:
            self.study.tell(number, state=TrialState.PRUNED)
        else:  # stopped before its first result (e.g. the search ended)
            self.study.tell(number, state=TrialState.FAIL)

    def on_trial_error(self, tune_controller, trial) -> None:
        # Ray also calls this when it is about to retry the trial from its checkpoint
        # (FailureConfig.max_failures): the trial is then already stopped (ERROR) and may recover.
        # The attempt goes on, so the Optuna trial stays RUNNING and ends as the retry ends.
        if trial.status == "ERROR" and trial.should_recover():
            return
        number = self._number_of(trial.trial_id, trial.config)
        if number is not None and self.opened.frozen(number).state == TrialState.RUNNING:
            self.study.tell(number, state=TrialState.FAIL)

    def on_trial_remove(self, tune_controller, trial) -> None:
        self.on_trial_error(tune_controller, trial)


def copy_trials(source: StudyRef, target: optuna.Study) -> int:
    """Warm start: add ``source``'s COMPLETE and PRUNED trials to ``target`` (parameters,
    values, intermediate values and the ASHA rungs :mod:`mgfa_ray.search.asha` recorded; a study
    another tool wrote has none), marked with user attribute ``warm_start_from``.
    Trials whose parameters do not fit ``target``'s distributions are left out by TPE itself.

    Returns:
        The number of trials copied.

    Raises:
        KeyError: No such study in ``source``.
    """
    src = source.load()
    copied = 0
    for t in src.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        target.add_trial(optuna.trial.create_trial(
            state=t.state, value=t.value, params=t.params, distributions=t.distributions,
            intermediate_values=t.intermediate_values,
            user_attrs={WARM_START_ATTR: f"{source.storage} {source.study_name} #{t.number}",
                        **rung_attrs(rung_values(t))},
        ))
        copied += 1
    return copied


def search_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The study's trials run by this search's Ray trials: the newest Optuna trial of each Ray
    trial, without warm-start copies and without failed attempts that a later trial retried
    (system attribute ``failed_trial``)."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.system_attrs["failed_trial"] for t in trials if "failed_trial" in t.system_attrs}
    newest: dict[str, FrozenTrial] = {}
    for t in trials:
        rid = t.user_attrs.get(RAY_TRIAL_ATTR)
        if rid is not None and t.number not in retried and (rid not in newest or t.number > newest[rid].number):
            newest[rid] = t
    return sorted(newest.values(), key=lambda t: t.number)


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """The search's best trial: the COMPLETE trial of :func:`search_trials` with the highest value
    (ties: the lowest number); ``None`` when none is COMPLETE. This is the one definition the export
    and every check use."""
    done = [t for t in search_trials(study) if t.state == TrialState.COMPLETE and t.value is not None]
    return max(done, key=lambda t: (t.value, -t.number)) if done else None
