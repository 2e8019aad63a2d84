"""syne-tune's multi-fidelity schedulers through the replay adapter (issue 32, item 3): each runs on a
small constructed table through the same mapping as the project's methods (no curve replayed twice),
and syne-tune's ASHA stops a trial where its rule, worked by hand, says it must."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests"))

import search_efficiency  # noqa: E402
from replay_policies import CurveTable  # noqa: E402
from syne_policies import SYNE_METHODS, SynePolicy, syne_config_space, syne_methods  # noqa: E402
from test_benchmark_search_efficiency import small_table, synthetic_table  # noqa: E402

from mgfa_ray.search.replay import simulate  # noqa: E402
from mgfa_ray.search.space import define_by_run, load_search_space  # noqa: E402


def test_config_space_has_the_optuna_names_of_the_other_policies():
    """The syne-tune space holds exactly the parameters define_by_run suggests (simplex as its cuts),
    with lr log-uniform over the same range."""
    space = load_search_space(search_efficiency.SPACE)
    trial = optuna.create_study().ask()
    define_by_run(trial, space=space)
    syne = syne_config_space(space)
    assert set(syne) == set(trial.params)
    draws = np.array(syne["lr"].sample(size=2000, random_state=np.random.RandomState(0)))
    assert 1e-4 <= draws.min() and draws.max() <= 3e-2
    assert 0.4 < np.mean(draws < np.sqrt(1e-4 * 3e-2)) < 0.6  # log-uniform: half below the geometric mean


@pytest.mark.parametrize("name", SYNE_METHODS)
def test_every_syne_method_runs_each_configuration_once(tmp_path, name):
    """12 configurations, 4 workers, an epoch budget larger than the table: the scheduler proposes,
    is told every result, and the search runs each configuration exactly once; at least one trial
    is stopped early (grace 1, factor 2 on 12 trials) and one runs its whole schedule."""
    synthetic_table(tmp_path / "t.parquet")
    table = CurveTable.from_frame(pd.read_parquet(tmp_path / "t.parquet"), space=load_search_space(search_efficiency.SPACE))
    np.random.seed(0)
    policy = syne_methods(1, 2, 20)[name](table, 0)
    events, runs = simulate(policy, workers=4, max_trials=len(table.curves), max_total_epochs=10_000)
    assert sorted(r.key for r in runs) == sorted(c.key for c in table.curves)
    assert len(policy.decisions) == len(events)
    assert any(r.stopped for r in runs) and any(r.epochs == 20 for r in runs)
    assert not policy._trials  # every trial was completed or removed


def test_syne_asha_stops_where_its_rule_says():
    """syne-tune's ASHA at a rung: a trial stops when the share of recorded values strictly better
    than its own exceeds 1 / reduction_factor; the first arrival always goes on. Rung 1, factor 3:
    trial 0 (0.6) first → continue; trial 1 (0.2): 1 of 2 better, 1/2 > 1/3 → STOP; trial 2 (0.7):
    none better → continue; trial 3 (0.65): 1 of 4 better, 1/4 ≤ 1/3 → continue. Factor 2, trial 1
    (0.2) after trial 0 (0.6): 1/2 is not > 1/2 → continue (a percentile cut, not Optuna's
    "with fewer than η results only the best goes on" of mgfa_ray.search.asha)."""
    table = small_table()
    np.random.seed(0)
    policy = syne_methods(1, 3, 4)["syne-tune ASHA"](table, 0)
    for t in range(4):
        policy.start(t)
    assert [policy.result(t, 1, v) for t, v in enumerate([0.6, 0.2, 0.7, 0.65])] == [False, True, False, False]
    assert [d for _, _, d in policy.decisions] == ["CONTINUE", "STOP", "CONTINUE", "CONTINUE"]
    policy.complete(1, 1, 0.2, True)  # stopped: removed, never completed (as syne-tune's Tuner)

    policy = syne_methods(1, 2, 4)["syne-tune ASHA"](table, 0)
    policy.start(0), policy.start(1)
    assert [policy.result(t, 1, v) for t, v in enumerate([0.6, 0.2])] == [False, False]


def test_stop_at_max_t_is_not_an_early_stop():
    """syne-tune's ASHA answers STOP at max_t; the adapter reports it as the trial's natural end."""
    table = small_table()
    policy = SynePolicy(table, max_t=4, make_scheduler=lambda space, metric, time_attr: __import__(
        "syne_tune.optimizer.baselines", fromlist=["ASHA"]).ASHA(
        config_space=space, metric=metric, time_attr=time_attr, max_t=4, do_minimize=False, random_seed=0,
        grace_period=4, reduction_factor=2))
    policy.start(0)
    assert [policy.result(0, e, 0.5) for e in (1, 2, 3, 4)] == [False] * 4
    assert policy.decisions[-1] == (0, 4, "STOP")
    policy.complete(0, 4, 0.5, False)
