"""The simulator of asynchronous workers (mgfa_ray.search.replay) on a hand-made table of curves whose
ASHA decisions are worked out by hand in each test's docstring."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest

from mgfa_ray.search.asha import Asha
from mgfa_ray.search.replay import Curve, SequencePolicy, simulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the benchmark's search policies
from replay_policies import CurveTable, RayStockPolicy, StudyPolicy  # noqa: E402
from mgfa_ray.search.space import SearchSpace

# Four configurations, four epochs of one second each. With ASHA (grace 1, factor 2) the rungs are
# epochs 1 and 2 (epoch 4 ends the trial):
#   A continues (alone at both rungs) and runs 4 epochs;
#   B (0.3 at epoch 1, below A's 0.5 among 2 values) stops after 1;
#   C (0.6, best of 3 at epoch 1) goes on, then 0.5 < A's 0.6 at epoch 2 stops it after 2;
#   D (0.2, below the second best 0.5 of 4 values at epoch 1) stops after 1.
VALUES = {"A": [0.5, 0.6, 0.7, 0.8], "B": [0.3, 0.4, 0.5, 0.6], "C": [0.6, 0.5, 0.9, 0.9], "D": [0.2, 0.9, 0.9, 0.9]}
LR = {"A": 1e-3, "B": 1e-2, "C": 3e-2, "D": 1e-1}
EXPECTED_EPOCHS = {"A": 4, "B": 1, "C": 2, "D": 1}


def space() -> SearchSpace:
    return SearchSpace.model_validate({"scheduler": {"max_epochs": 4},
                                       "parameters": {"lr": {"type": "log_uniform", "low": 1e-3, "high": 1e-1}}})


def table() -> CurveTable:
    rows = [{"config": k, "epoch": e + 1, "eval_top1": v, "test_top1": v - 0.1, "time_total_s": e + 1.0,
             "param/lr": LR[k]} for k, vs in VALUES.items() for e, v in enumerate(vs)]
    return CurveTable.from_frame(pd.DataFrame(rows), space=space())


def curves() -> list[Curve]:
    return [Curve(values=tuple(v), epoch_seconds=(1.0,) * 4, key=k) for k, v in VALUES.items()]


def epochs_by_key(runs) -> dict:
    return {r.key: r.epochs for r in runs}


@pytest.mark.parametrize("workers", [1, 2])
def test_fixed_sequence_stops_where_asha_says(workers):
    """One worker: A ends at t=4, B at 5, C at 7, D at 8. Two workers: A and B start at 0, B stops
    at t=1 and C starts, C stops at t=3 and D starts, D stops at t=4 beside A's last epoch."""
    policy = SequencePolicy(curves(), max_epochs=4, asha=Asha(grace_period=1, reduction_factor=2))
    events, runs = simulate(policy, workers=workers, max_trials=4)
    assert epochs_by_key(runs) == EXPECTED_EPOCHS
    assert [r.stopped for r in runs] == [False, True, True, True]
    assert [e.cumulative_epochs for e in events] == list(range(1, 9))
    ends = {r.key: max(e.t for e in events if e.trial == r.trial) for r in runs}
    assert ends == ({"A": 4.0, "B": 5.0, "C": 7.0, "D": 8.0} if workers == 1 else
                    {"A": 4.0, "B": 1.0, "C": 3.0, "D": 4.0})
    assert [e.t for e in events] == sorted(e.t for e in events)
    assert not policy.cut_short


def test_without_asha_every_trial_runs_its_curve_and_time_and_compute_add_up():
    events, runs = simulate(SequencePolicy(curves(), max_epochs=4, asha=None), workers=2, max_trials=4)
    assert epochs_by_key(runs) == {k: 4 for k in VALUES}
    assert events[-1].t == 8.0 and events[-1].compute_seconds == 16.0


def test_epoch_budget_stops_the_replay_at_exactly_that_many_epochs():
    events, runs = simulate(SequencePolicy(curves(), max_epochs=4, asha=None), workers=2, max_total_epochs=6)
    assert len(events) == 6 and len(runs) == 2 and epochs_by_key(runs) == {"A": 3, "B": 3}


def test_a_curve_cut_short_by_the_live_run_is_flagged():
    """B recorded only 1 epoch (the live run stopped it); without ASHA the replay would go on."""
    cut = curves()
    cut[1] = Curve(values=(0.3,), epoch_seconds=(1.0,), key="B")
    policy = SequencePolicy(cut, max_epochs=4, asha=None)
    _, runs = simulate(policy, workers=1, max_trials=4)
    assert policy.cut_short == {1} and epochs_by_key(runs)["B"] == 1


def test_brackets_raise_the_first_rung():
    """Two brackets, round robin: A and C in bracket 0 (rungs 1, 2), B and D in bracket 1 (rung 2):
    B alone at epoch 2 goes on to 4; D's 0.9 at epoch 2 beats B's 0.4 and goes on; C stops at
    epoch 2 below A's 0.6."""
    policy = SequencePolicy(curves(), max_epochs=4, asha=Asha(grace_period=1, reduction_factor=2), brackets=2)
    _, runs = simulate(policy, workers=1, max_trials=4)
    assert epochs_by_key(runs) == {"A": 4, "B": 4, "C": 2, "D": 4}


def test_nearest_configuration_answers_a_proposal():
    t = table()
    assert [t.curve_for({"lr": x}).key for x in (1e-3, 1.5e-3, 8e-3, 2.5e-2, 0.09)] == ["A", "A", "B", "C", "D"]
    assert t.curves[0].test == pytest.approx((0.4, 0.5, 0.6, 0.7))


def test_study_policy_decides_as_the_sequence_on_the_table_points():
    """The project's policy (sampler + ASHA in the study), proposals enqueued at the table's own
    points: the same decisions as the fixed sequence, and the study holds them (A COMPLETE with
    its last value, the rest PRUNED)."""
    policy = StudyPolicy(table(), sampler=optuna.samplers.RandomSampler(seed=0),
                         asha=Asha(grace_period=1, reduction_factor=2), enqueue=[{"lr": LR[k]} for k in VALUES])
    _, runs = simulate(policy, workers=1, max_trials=4)
    assert epochs_by_key(runs) == EXPECTED_EPOCHS
    states = [t.state.name for t in policy.study.trials]
    assert states == ["COMPLETE", "PRUNED", "PRUNED", "PRUNED"] and policy.study.trials[0].value == 0.8


def test_study_policy_brackets_decide_as_the_sequence_brackets():
    """Our ASHA in two round-robin brackets (first rungs at epochs 1 and 2): the decisions of
    test_brackets_raise_the_first_rung, each bracket's rungs kept apart in the study."""
    policy = StudyPolicy(table(), sampler=optuna.samplers.RandomSampler(seed=0),
                         asha=Asha(grace_period=1, reduction_factor=2), enqueue=[{"lr": LR[k]} for k in VALUES],
                         brackets=2)
    _, runs = simulate(policy, workers=1, max_trials=4)
    assert epochs_by_key(runs) == {"A": 4, "B": 4, "C": 2, "D": 4}
    assert [t.user_attrs["asha_bracket"] for t in policy.study.trials] == [0, 1, 0, 1]


def test_study_policy_ranks_the_rungs_on_another_signal():
    """Rungs ranked on a signal fixed per configuration (A 0.8, B 0.6, C 0.9, D 0.7) instead of the
    epoch's top-1: B (0.6 < A's 0.8 of 2) stops at epoch 1; C (best of 3, then best of 2 at epoch
    2) now runs all 4 epochs; D (0.7, below the second best 0.8 of 4) stops at epoch 1. The study
    still records the reported top-1."""
    signal = {"A": 0.8, "B": 0.6, "C": 0.9, "D": 0.7}
    policy = StudyPolicy(table(), sampler=optuna.samplers.RandomSampler(seed=0),
                         asha=Asha(grace_period=1, reduction_factor=2), enqueue=[{"lr": LR[k]} for k in VALUES],
                         rung_value=lambda key, epoch, values: signal[key])
    _, runs = simulate(policy, workers=1, max_trials=4)
    assert epochs_by_key(runs) == {"A": 4, "B": 1, "C": 4, "D": 1}
    assert policy.study.trials[2].value == 0.9 and policy.study.trials[1].intermediate_values == {1: 0.3}


def test_study_policy_rung_model_proposes_once_a_rung_holds_enough_values():
    """BOHB-style: from the third trial on, rung 0 holds 2 values (A's, B's), so the proposal comes
    from the rung model — here a sampler whose only point is C's learning rate. The fourth proposal
    is C's again; C has been run, so the nearest configuration not yet run (D) answers it."""
    policy = StudyPolicy(table(), sampler=optuna.samplers.RandomSampler(seed=0),
                         asha=Asha(grace_period=1, reduction_factor=2), enqueue=[{"lr": LR["A"]}, {"lr": LR["B"]}],
                         rung_model_min=2,
                         rung_model=lambda trial: optuna.samplers.GridSampler({"lr": [LR["C"]]}, seed=0))
    _, runs = simulate(policy, workers=1, max_trials=4)
    assert [r.key for r in runs] == ["A", "B", "C", "D"]
    assert [t.params["lr"] for t in policy.study.trials][2:] == [LR["C"], LR["C"]]


@pytest.mark.parametrize("make", [
    lambda: StudyPolicy(table(), sampler=optuna.samplers.PartialFixedSampler(
        {"lr": LR["B"]}, optuna.samplers.RandomSampler(seed=0)), asha=None),
    lambda: RayStockPolicy(table(), seed=0, grace_period=1, reduction_factor=2, max_t=4,
                           points_to_evaluate=[{"lr": LR["B"]}] * 4),
], ids=["study", "ray-stock"])
def test_a_proposal_repeated_takes_the_nearest_configuration_not_yet_run(make):
    """Every proposal is B's learning rate: B, then its nearest neighbours not yet run in log-lr
    order (C at 3e-2 is nearer to 1e-2 than A at 1e-3 and D at 1e-1, which tie: the lower index,
    A), each curve once; the table then has nothing left and says so."""
    np.random.seed(0)
    policy = make()
    _, runs = simulate(policy, workers=1, max_trials=4)
    assert [r.key for r in runs] == ["B", "C", "A", "D"]
    assert policy.unrun.exhausted
    with pytest.raises(ValueError, match="every one"):
        policy.unrun.take({"lr": LR["B"]})


def test_ray_stock_policy_stops_the_same_trials_but_tells_optuna_complete():
    """Ray's ASHAScheduler reaches the same stops on this table; Ray's OptunaSearch then tells the
    study every stopped trial COMPLETE with its early value (what Ray Tune does)."""
    np.random.seed(0)
    policy = RayStockPolicy(table(), seed=0, grace_period=1, reduction_factor=2, max_t=4,
                            points_to_evaluate=[{"lr": LR[k]} for k in VALUES])
    _, runs = simulate(policy, workers=1, max_trials=4)
    assert epochs_by_key(runs) == EXPECTED_EPOCHS
    study = policy.study
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4
    assert [t.value for t in study.trials] == [0.8, 0.3, 0.5, 0.2]


def test_simulate_rejects_no_limit():
    with pytest.raises(ValueError, match="limit"):
        simulate(SequencePolicy(curves(), max_epochs=4, asha=None), workers=1)


def test_search_replay_of_a_finished_search_repeats_its_decisions(tmp_path, capsys, shared_cluster):
    """A real search (Ray Tune, StudySearch + StudyScheduler, ASHA rungs at epochs 1 and 2, one trial
    at a time; tests/search_driver.py's stand-in trials) replayed with its own settings stops every
    trial where the live search did; a later first rung keeps more and is flagged cut short where
    the live curve ends; the CLI prints the same."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import search_driver  # tests/search_driver.py

    from mgfa_ray import cli
    from mgfa_ray.search.replay_report import replay_search

    search_dir = search_driver.create(str(tmp_path / "searches"), "--num-samples", "6", "--max-concurrent", "1")
    env = {**os.environ, "MGFA_STANDIN_EPOCH_S": "0.05", "RAY_ADDRESS": shared_cluster}
    done = subprocess.run([sys.executable, str(Path(search_driver.__file__)), "run", search_dir], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = replay_search(search_dir, grace_periods=[1, 2], reduction_factors=[2])
    live = {t["number"]: t["epochs"] for t in report["live"]}
    assert len(live) == 6 and set(live.values()) > {4}  # some stopped early, some kept
    same, later = report["settings"]
    assert same["setting"] == {"grace_period": 1, "reduction_factor": 2, "brackets": 1, "early_stopping": True}
    assert {r["number"]: r["epochs"] for r in same["trials"]} == live and same["cut_short"] == 0
    states = {t["number"]: t["state"] for t in report["live"]}
    assert all((r["outcome"] == "kept") == (states[r["number"]] == "COMPLETE") for r in same["trials"]), (same["trials"], states)
    assert same["epochs"] == sum(live.values())
    assert later["setting"]["grace_period"] == 2
    for r in later["trials"]:  # no rung before epoch 2: a curve the live run ended at epoch 1 is cut short
        if live[r["number"]] < 2:
            assert (r["outcome"], r["epochs"]) == ("cut_short", live[r["number"]])
        else:
            assert r["outcome"] in ("kept", "stopped") and r["epochs"] >= 2
    assert later["cut_short"] == sum(e < 2 for e in live.values()) > 0
    assert cli.main(["search", "replay", search_dir, "--grace-period", "1", "2"]) == 0
    out = capsys.readouterr().out
    assert "6 recorded trials" in out and "exact only where the curves exist" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] in (["1"], ["2"])}
    assert rows["1"][6] == str(same["epochs"])  # exact: nothing cut short
    assert rows["2"][6] == f"≥{later['epochs']}" and rows["2"][7].startswith("≥")  # a lower bound, said so
    assert "GPU-h" not in out and "trial-h" in out  # the hours of whatever device ran the search
