"""ASHA on rungs the project owns (mgfa_ray.search.asha): the same decisions as Optuna's
SuccessiveHalvingPruner, and the same decisions again from a scheduler started after a crash; the
searcher's and scheduler's pickled states (what Ray saves and restores) round-trip, and a state of
another format is refused naming what to do."""

from __future__ import annotations

import random
from types import SimpleNamespace

import optuna
import pytest
from optuna.trial import TrialState

from mgfa_ray.search.asha import RUNG_ATTR_PREFIX, STOP_ATTR, Asha, rung_values
from mgfa_ray.search.study import STATE_FORMAT, StateFormatError, StudyRef
from mgfa_ray.search.scheduler import StudyScheduler
from mgfa_ray.search.searcher import StudySearch


def _optuna_rungs(trial) -> dict[int, float]:
    """``{rung: value}`` Optuna's ``SuccessiveHalvingPruner`` recorded on ``trial``: its internal
    system attributes ``completed_rung_<k>``."""
    prefix = "completed_rung_"
    return {int(k[len(prefix):]): float(v) for k, v in trial.system_attrs.items()
            if k.startswith(prefix) and k[len(prefix):].isdigit()}


@pytest.mark.parametrize("grace, eta, seed", [(1, 2, 0), (1, 3, 1), (2, 2, 2), (1, 4, 3)])
def test_decisions_equal_optunas_successive_halving_pruner(grace, eta, seed):
    """Interleaved trials reporting random curves: every stop/continue decision and every rung value
    equals what Optuna's pruner decides and records on a twin study."""
    rng = random.Random(seed)
    pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=grace, reduction_factor=eta,
                                                    min_early_stopping_rate=0)
    theirs = optuna.create_study(direction="maximize", pruner=pruner)
    ours = optuna.create_study(direction="maximize")
    asha = Asha(grace_period=grace, reduction_factor=eta)
    max_epochs, decisions, started, stops = 9, 0, 0, 0
    active = {}  # number -> (their trial, our trial, next epoch); three at a time, 14 in all
    while active or started < 14:
        while len(active) < 3 and started < 14:
            active[started] = (theirs.ask(), ours.ask(), 1)
            started += 1
        number = rng.choice(sorted(active))
        their, our, epoch = active[number]
        value = round(rng.random(), 2)  # ties too
        their.report(value, epoch)
        our.report(value, epoch)
        stop, rungs = asha.decide(ours.trials[number], ours.get_trials(deepcopy=False))
        for rung, v in rungs.items():
            our.set_user_attr(f"{RUNG_ATTR_PREFIX}{rung}", v)
        assert stop == their.should_prune(), f"trial {number} epoch {epoch}"
        assert rung_values(ours.trials[number]) == _optuna_rungs(theirs.trials[number])
        decisions += 1
        stops += stop
        if stop or epoch == max_epochs:
            del active[number]
        else:
            active[number] = (their, our, epoch + 1)
    assert decisions > 30 and 0 < stops < started  # both decisions were taken


def test_a_nan_at_a_rung_stops_and_records_nothing():
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    trial.report(float("nan"), 1)
    assert Asha(1, 2).decide(study.trials[0], study.trials) == (True, {})
    assert Asha(2, 2).decide(study.trials[0], study.trials) == (False, {})  # before its first rung


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="reduction_factor >= 2"):
        Asha(1, 1)


def _trial(name: str, number: int, status: str = "RUNNING"):
    return SimpleNamespace(trial_id=name, config={"optuna_trial": number}, status=status)


def test_scheduler_stops_by_asha_and_a_restarted_scheduler_decides_the_same(tmp_path):
    """Rungs and the stop decision live in the study: a scheduler of a driver started after a crash
    (before Ray recorded the stop) stops the rerun trial again, and keeps the rung of the others."""
    ref = StudyRef(str(tmp_path / "study.journal"), "s")
    study = ref.load(create=True)

    def scheduler():
        return StudyScheduler(study=ref, metric="eval_top1", max_epochs=4, grace_period=1, reduction_factor=2)

    first = scheduler()
    good, bad = (_trial(name, study.ask().number) for name in ("good", "bad"))
    for trial in (good, bad):
        first.on_trial_add(None, trial)
    assert first.on_trial_result(None, good, {"eval_top1": 0.8, "training_iteration": 1}) == "CONTINUE"
    assert first.on_trial_result(None, bad, {"eval_top1": 0.2, "training_iteration": 1}) == "STOP"
    trials = ref.load().trials
    assert trials[1].user_attrs[STOP_ATTR] == 1 and trials[1].state == TrialState.RUNNING  # Ray not told yet
    assert rung_values(trials[0]) == {0: 0.8} and rung_values(trials[1]) == {0: 0.2}

    again = scheduler()  # the driver crashed; Ray reruns "bad" from its epoch-1 checkpoint
    again.on_trial_add(None, bad)
    assert again.on_trial_result(None, bad, {"eval_top1": 0.9, "training_iteration": 2}) == "STOP"
    again.on_trial_complete(None, bad, {"eval_top1": 0.9, "training_iteration": 2})
    assert again.on_trial_result(None, good, {"eval_top1": 0.7, "training_iteration": 2}) == "CONTINUE"
    trials = ref.load().trials
    assert trials[1].state == TrialState.PRUNED and trials[1].intermediate_values == {1: 0.2, 2: 0.9}
    assert rung_values(trials[0]) == {0: 0.8, 1: 0.7}


def test_errored_trial_resumed_keeps_its_rungs_restarted_starts_without(tmp_path):
    ref = StudyRef(str(tmp_path / "study.journal"), "s")
    study = ref.load(create=True)
    sched = StudyScheduler(study=ref, metric="eval_top1", max_epochs=4, grace_period=1, reduction_factor=2)
    trial = _trial("a", study.ask().number)
    sched.on_trial_add(None, trial)
    sched.on_trial_result(None, trial, {"eval_top1": 0.5, "training_iteration": 1})
    study.tell(0, state=TrialState.FAIL)
    sched.on_trial_add(None, _trial("a", 0, status="PENDING"))  # resume_errored: same Ray id
    sched.on_trial_add(None, _trial("b", 0, status="PENDING"))  # restart_errored: a new Ray id
    _, resumed, restarted = ref.load().trials
    assert resumed.system_attrs["failed_trial"] == 0 and restarted.system_attrs["failed_trial"] == 0
    assert rung_values(resumed) == {0: 0.5} and resumed.intermediate_values == {1: 0.5}
    assert rung_values(restarted) == {} and restarted.intermediate_values == {}
    assert (resumed.user_attrs["ray_trial_id"], restarted.user_attrs["ray_trial_id"]) == ("a", "b")


def _search_and_scheduler(tmp_path):
    from mgfa_ray.search.space import SearchSpace

    ref = StudyRef(str(tmp_path / "s.journal"), "s")
    ref.load(create=True)
    space = SearchSpace.model_validate({"scheduler": {"max_epochs": 2}, "parameters": {"lr": 0.01}})
    searcher = StudySearch(space=space, study=ref, metric="eval_top1", sampler="random", seed=0, run="run-1")
    searcher.suggest("a")
    scheduler = StudyScheduler(study=ref, metric="eval_top1", max_epochs=4, grace_period=2, reduction_factor=3,
                               early_stopping=False)
    scheduler.on_trial_add(None, _trial("a", 0))
    return ref, space, searcher, scheduler


def test_searcher_and_scheduler_states_round_trip(tmp_path):
    """The states Ray pickles (the Tuner's, and the searcher's own save / restore file) give back
    the same study, space, run, metric, ASHA settings and Ray-to-Optuna trial numbers."""
    import pickle

    ref, space, searcher, scheduler = _search_and_scheduler(tmp_path)
    again = pickle.loads(pickle.dumps(searcher))
    assert (again.metric, again.mode, again.run, again.study_ref) == ("eval_top1", "max", "run-1", ref)
    assert again._number_of("a", None) == 0 and again.space_spec == space
    path = tmp_path / "searcher-state.pkl"
    searcher.save(str(path))  # what Ray's save_to_dir / restore_from_dir hand over
    restored = StudySearch.__new__(StudySearch)
    restored.restore(str(path))
    assert (restored.run, restored.study_ref, restored._number_of("a", None)) == ("run-1", ref, 0)
    again = pickle.loads(pickle.dumps(scheduler))
    assert (again.metric, again.max_epochs, again.early_stopping, again.asha) == ("eval_top1", 4, False, Asha(2, 3))
    assert again.study_ref == ref and again._number_of("a", None) == 0


@pytest.mark.parametrize("change", ["older", "newer"])
def test_a_state_of_another_format_is_refused_naming_what_to_do(tmp_path, change):
    """A searcher or scheduler state pickled by another mgfa-ray version (format 1 had no ``format``
    key) is an error that says so, not a KeyError from inside Ray's restore."""
    import pickle

    _, _, searcher, scheduler = _search_and_scheduler(tmp_path)
    for obj, what in ((searcher, "searcher"), (scheduler, "scheduler")):
        state = obj.__getstate__()
        if change == "older":
            del state["format"]
        else:
            state["format"] = STATE_FORMAT + 1
        found = 1 if change == "older" else STATE_FORMAT + 1
        message = (rf"Ray's saved {what} state was written by another mgfa-ray version \(format {found}, this "
                   rf"version reads {STATE_FORMAT}\): start a new search directory")
        with pytest.raises(StateFormatError, match=message):
            type(obj).__new__(type(obj)).__setstate__(state)
        if what == "searcher":  # also through the searcher's own state file (Ray's restore_from_dir)
            path = tmp_path / "searcher-state.pkl"
            path.write_bytes(pickle.dumps(state))
            with pytest.raises(StateFormatError, match=message):
                StudySearch.__new__(StudySearch).restore(str(path))
