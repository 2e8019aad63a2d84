"""Ray Tune's ``TrialScheduler`` on the study (:class:`StudyScheduler`): every epoch's metric becomes an
intermediate value, trials stop by ASHA (:mod:`mgfa_ray.search.asha`) from rungs recorded in the
study, and each trial's final state is told to it. See :mod:`mgfa_ray.search.study`.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from mgfa_ray.compat import move_trial_storage, trial_experiment_path
from mgfa_ray.search.asha import STOP_ATTR, Asha, is_rung_attr, rung_attrs, rung_values
from mgfa_ray.search.study import (
    RAY_TRIAL_ATTR,
    SESSION,
    SESSION_ATTR,
    STATE_FORMAT,
    StudyRef,
    StudyUser,
    binding,
    check_state_format,
)

log = logging.getLogger(__name__)




class StudyScheduler(StudyUser, FIFOScheduler):
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
        self.asha = Asha(grace_period=grace_period, reduction_factor=reduction_factor)

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
        check_state_format(state, "scheduler")
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
        bound = binding(self.study_ref.study_name)
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
