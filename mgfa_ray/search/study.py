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

import logging
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from mgfa_ray.compat import running_trial
from mgfa_ray.errors import UserError
from mgfa_ray.runtime import configure
from mgfa_ray.search.asha import rung_attrs, rung_values
from mgfa_ray.search.journal import WholeRecordJournal, repair_journal
from mgfa_ray.search.space import OPTUNA_TRIAL_KEY, SearchSpace, define_by_run
from mgfa_ray.storage import is_uri

log = logging.getLogger(__name__)

RAY_TRIAL_ATTR = "ray_trial_id"
SESSION_ATTR = "driver_session"
RUN_ATTR = "run"
WARM_START_ATTR = "warm_start_from"

SESSION = uuid.uuid4().hex
"""This driver process's token: trials it claimed carry it in ``driver_session``."""


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
class Binding:
    """Where a search's study and Ray experiment are now (:func:`bound_study`)."""

    study: StudyRef
    experiment_path: str | None


_BOUND: dict[str, Binding] = {}  # study name → its binding, while bound_study is active in this process


def binding(study_name: str) -> Binding | None:
    """The :class:`Binding` :func:`bound_study` holds for ``study_name`` in this process, or ``None``."""
    return _BOUND.get(study_name)


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
    _BOUND[ref.study_name] = Binding(ref, experiment_path)
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


class StudyUser:
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
            bound = binding(self.study_ref.study_name)
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
a state of another format is refused (:func:`check_state_format`)."""


class StateFormatError(UserError):
    """A pickled searcher or scheduler state of another format than :data:`STATE_FORMAT`."""


def check_state_format(state: dict[str, Any], what: str) -> None:
    """Raise :class:`StateFormatError` when ``state`` (of the ``what``: searcher or scheduler) is
    not of :data:`STATE_FORMAT` (a state without ``format`` key is format 1)."""
    found = state.get("format", 1) if isinstance(state, dict) else "unknown"
    if found != STATE_FORMAT:
        raise StateFormatError(f"Ray's saved {what} state was written by another mgfa-ray version (format {found}, "
                               f"this version reads {STATE_FORMAT}): start a new search directory, or resume it "
                               "with the mgfa-ray version that started it")


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
