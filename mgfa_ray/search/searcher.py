"""Ray Tune's ``Searcher`` on the study (:class:`StudySearch`): asks the study for new trials, and after
a driver crash first hands out the orphans (RUNNING in the study, unknown to the restored Ray
experiment), so no trial is lost or run twice. See :mod:`mgfa_ray.search.study`.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from optuna.trial import FrozenTrial, TrialState
from ray.tune.search import Searcher

from mgfa_ray.search.space import OPTUNA_TRIAL_KEY, SearchSpace
from mgfa_ray.search.study import (
    RAY_TRIAL_ATTR,
    RUN_ATTR,
    SESSION,
    SESSION_ATTR,
    STATE_FORMAT,
    StudyRef,
    StudyUser,
    check_state_format,
    make_sampler,
    sample_config,
)

log = logging.getLogger(__name__)


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


class StudySearch(StudyUser, Searcher):
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
        check_state_format(state, "searcher")
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
