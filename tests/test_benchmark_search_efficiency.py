"""The search-efficiency benchmark's yardstick (issue 32): a top set fixed from the table, epochs until
a trial of it finishes its schedule, a ratio of totals over the seeds where both methods got there
with a paired bootstrap interval, failures counted apart; and no curve replayed twice in a search.
Every expected number is worked out by hand in the test's docstring."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import search_efficiency  # noqa: E402
from replay_policies import PARAM_PREFIX, CurveTable, RayStockPolicy, StudyPolicy  # noqa: E402

from mgfa_ray.search.asha import Asha  # noqa: E402
from mgfa_ray.search.replay import simulate  # noqa: E402
from mgfa_ray.search.space import SearchSpace, define_by_run, load_search_space  # noqa: E402

# Four configurations, four epochs of one second each; final val top-1 A 0.90, B 0.85, C 0.80, D 0.50.
VALUES = {"A": [0.1, 0.2, 0.5, 0.90], "B": [0.6, 0.7, 0.8, 0.85], "C": [0.7, 0.75, 0.8, 0.80], "D": [0.2, 0.3, 0.4, 0.5]}
LR = {"A": 1e-3, "B": 1e-2, "C": 3e-2, "D": 1e-1}


def small_table() -> CurveTable:
    space = SearchSpace.model_validate({"scheduler": {"max_epochs": 4},
                                        "parameters": {"lr": {"type": "log_uniform", "low": 1e-3, "high": 1e-1}}})
    rows = [{"config": k, "epoch": e + 1, "eval_top1": v, "test_top1": v - 0.1, "time_total_s": e + 1.0,
             "param/lr": LR[k]} for k, vs in VALUES.items() for e, v in enumerate(vs)]
    return CurveTable.from_frame(pd.DataFrame(rows), space=space)


def synthetic_table(path: Path, n: int = 12, epochs: int = 20) -> None:
    """``n`` configurations sampled from the benchmark's space, each with a saturating curve whose
    level depends on lr (best near 3e-3), one second per epoch."""
    space = load_search_space(search_efficiency.SPACE)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    rows = []
    for config in range(n):
        trial = study.ask()
        define_by_run(trial, space=space)
        level = max(0.05, 0.9 - 0.15 * (math.log10(trial.params["lr"]) + 2.5) ** 2)
        for e in range(1, epochs + 1):
            value = level * (1 - 0.8 ** e)
            rows.append({"config": config, "epoch": e, "eval_top1": value, "test_top1": value - 0.01,
                         "time_total_s": float(e), **{PARAM_PREFIX + k: v for k, v in trial.params.items()}})
    pd.DataFrame(rows).to_parquet(path)


def test_top_set_is_the_best_within_validation_noise():
    """40 photos: one standard error of a difference of two top-1 values at 0.90 is
    sqrt(2 x 0.9 x 0.1 / 40) = 0.067, so B (0.85) is in, C (0.80) out. 400 photos: 0.021, A alone."""
    top = search_efficiency.top_set(small_table())
    assert top["keys"] == ["A", "B"] and top["best"] == 0.9
    assert top["noise"] == pytest.approx(math.sqrt(2 * 0.9 * 0.1 / 40))
    assert search_efficiency.top_set(small_table(), val_photos=400)["keys"] == ["A"]


def test_yardstick_a_method_that_proposes_a_top_configuration_first_against_random_order():
    """One worker, no stopping. Proposing A first: A finishes its 4th epoch at epoch 4, t = 4 s.
    In the order C, D, B, A: B (in the top set) finishes at epoch 12, t = 12 s. With ASHA (grace 1,
    factor 2) and the order C, B, A, D: B stops at epoch 1 (0.6 < C's 0.7), A at epoch 1 (0.1, the
    worst of 3), so no top-set trial ever finishes: not reached, and no epoch count at all."""
    table, top = small_table(), {"A", "B"}

    def run(order, asha=None):
        policy = StudyPolicy(table, sampler=optuna.samplers.RandomSampler(seed=0), asha=asha,
                             enqueue=[{"lr": LR[k]} for k in order])
        events, runs = simulate(policy, workers=1, max_trials=len(table.curves), max_total_epochs=1000)
        assert [r.key for r in runs] == list(order)
        return search_efficiency.reach_top(events, top, max_epochs=4)

    first, rand = run("ACDB"), run("CDBA")
    assert (first["epochs_to_top"], first["sim_seconds_to_top"], first["config"]) == (4, 4.0, "A")
    assert (rand["epochs_to_top"], rand["sim_seconds_to_top"], rand["config"]) == (12, 12.0, "B")
    stopped = run("CBAD", asha=Asha(grace_period=1, reduction_factor=2))
    assert not stopped["reached"] and stopped["epochs_to_top"] is None
    assert search_efficiency.ratio_of_totals([4], [12])["ratio"] == pytest.approx(1 / 3)


def test_ratio_of_totals_counts_failures_apart_never_as_the_budget():
    """Seeds 0-2: the method reaches the top set in 4 and 4 epochs and fails on seed 2; random in 12,
    8 and 16. Ratio over seeds 0-1 only: (4 + 4) / (12 + 8) = 0.4; success 2 of 3. (Charging the
    failure as a 2000-epoch budget would give 2008 / 36 = 55.8.)"""
    r = search_efficiency.ratio_of_totals([4, 4, None], [12, 8, 16])
    assert r["ratio"] == pytest.approx(0.4) and r["seeds_both"] == 2 and r["success_rate"] == pytest.approx(2 / 3)
    assert search_efficiency.ratio_of_totals([None, None], [12, 8])["ratio"] is None


def test_bootstrap_interval_contains_the_ratio_of_totals_and_excludes_the_mean_of_ratios():
    """100 seeds: 50 where random needs 100 epochs and the method 10, 50 where random needs 1000 and
    the method 900. Ratio of totals (500 + 45000) / (5000 + 50000) = 0.827; the mean of per-seed
    ratios would be 0.5. The paired interval holds 0.827 and neither 0.5 nor parity; the same
    searches on both sides give exactly 1."""
    method, random = [10, 900] * 50, [100, 1000] * 50
    r = search_efficiency.ratio_of_totals(method, random)
    assert r["ratio"] == pytest.approx(45500 / 55000)
    low, high = r["ci95"]
    assert low < 45500 / 55000 < high and 0.5 < low and high < 1.0
    assert search_efficiency.ratio_of_totals(random, random)["ci95"] == [1.0, 1.0]


@pytest.mark.parametrize("name", ["random", "random+asha", "tpe+asha, startup 10", "ray stock (OptunaSearch+ASHAScheduler)",
                                  "ray ASHAScheduler, random proposals"])
def test_no_curve_is_replayed_twice_in_a_simulated_search(tmp_path, name):
    """12 configurations, 4 workers, an epoch budget larger than the table: every search runs each
    configuration at most once and ends when the table is exhausted (12 distinct trials)."""
    synthetic_table(tmp_path / "t.parquet")
    table = CurveTable.from_frame(pd.read_parquet(tmp_path / "t.parquet"), space=load_search_space(search_efficiency.SPACE))
    np.random.seed(0)
    policy = search_efficiency.methods(1, 2, 20, 12)[name](table, 0)
    _, runs = simulate(policy, workers=4, max_trials=len(table.curves), max_total_epochs=10_000)
    keys = [r.key for r in runs]
    assert sorted(keys) == sorted(c.key for c in table.curves)  # each exactly once


def test_compare_on_a_synthetic_table(tmp_path):
    """The whole compare step: random is its own baseline (ratio 1, interval [1, 1]); no method
    runs more trials than the table has; a reached search's epochs fit in the table."""
    synthetic_table(tmp_path / "t.parquet")
    _, s = search_efficiency.parse_args(["compare", "--preset", "smoke", "--table", str(tmp_path / "t.parquet"),
                                         "--seeds", "0", "1", "2", "--grace", "1", "--factor", "2",
                                         "--methods", "random+asha", "ray stock (OptunaSearch+ASHAScheduler)"])
    doc = search_efficiency.compare(s)
    assert doc["top_set"]["keys"] and set(doc["summary"]) == {
        "random@0x0", "random+asha@1x2", "ray stock (OptunaSearch+ASHAScheduler)@1x2"}
    base = doc["summary"]["random@0x0"]
    assert base["ratio_epochs"]["ratio"] == 1.0 and base["ratio_epochs"]["ci95"] == [1.0, 1.0] and base["success"] == 3
    vs = doc["summary"]["random+asha@1x2"]["ratio_epochs_vs_ray_stock"]
    assert vs["seeds_both"] <= 3 and doc["summary"]["ray stock (OptunaSearch+ASHAScheduler)@1x2"]["ratio_epochs_vs_ray_stock"] is None
    for seed in doc["per_seed"]:
        for run in seed["runs"].values():
            assert run["trials"] <= 12 and (run["epochs_to_top"] is None or run["epochs_to_top"] <= 12 * 20)
            assert run["reached"] == (run["config"] in doc["top_set"]["keys"])


def test_live_searches_are_placed_in_the_simulated_distribution(tmp_path):
    """1 live success in 3 against a simulated 99 of 100 is P = 1 - 0.99^3 - 3 x 0.99^2 x 0.01 ≈ 3e-4;
    epochs run 150, 160, 170 lie inside the range of a mean of 3 drawn from 100..300."""
    def run(reached: bool, epochs: int, full: int) -> dict:
        return {"reached": reached, "epochs": epochs, "trials_full": full, "epochs_to_top": 90 if reached else None}

    live = [run(False, 150, 2), run(True, 160, 3), run(False, 170, 2)]
    sim = [run(i > 0, 100 + 2 * i, 2 + i % 4) for i in range(100)]
    doc = search_efficiency._live_vs_sim(live, sim, s={"seeds": list(range(100)), "table": tmp_path / "t.parquet"},
                                         top={"threshold": 0.83}, n_trials=32, n_workers=4, grace=2, factor=3)
    agreement = doc["agreement"]
    assert doc["prediction"]["success_rate"] == 0.99
    assert agreement["live_successes"] == 1
    assert agreement["p_at_most_live_successes"] == pytest.approx(1 - 0.99 ** 3 - 3 * 0.99 ** 2 * 0.01)
    assert agreement["live_mean_epochs"] == 160 and agreement["live_mean_epochs_inside"] is True
    low, high = doc["prediction"]["mean_epochs_of_3_searches_95"]
    assert 100 < low < 199 < high < 298


def test_compare_tables_reads_the_same_configurations_twice(tmp_path):
    """Configurations 0-3 at finals 0.5, 0.6, 0.7, 0.9 and again at 0.4, 0.5, 0.7, 0.8 (4 only in the
    rerun): 4 in common, ranks equal (Spearman 1), mean difference -0.075; the top set is {3} in both
    (40 photos: 0.9 - 0.067 and 0.8 - 0.089 leave only the best)."""
    def table(path: Path, finals: dict[int, float]) -> Path:
        rows = [{"config": k, "epoch": e, "eval_top1": v * e / 20} for k, v in finals.items() for e in range(1, 21)]
        pd.DataFrame(rows).to_parquet(path)
        return path

    old = table(tmp_path / "old.parquet", {0: 0.5, 1: 0.6, 2: 0.7, 3: 0.9})
    new = table(tmp_path / "new.parquet", {0: 0.4, 1: 0.5, 2: 0.7, 3: 0.8, 4: 0.95})
    doc = search_efficiency.compare_tables({"table": old, "rerun": new})
    assert doc["configurations"] == 4 and doc["spearman_final_val"] == pytest.approx(1.0)
    assert doc["mean_difference"] == pytest.approx(-0.075)
    low, high = doc["mean_difference_ci95"]
    assert low < -0.075 < high < 0.01
    assert doc["top_set_old"] == [3] and doc["top_set_new"] == [3]
    with pytest.raises(SystemExit, match="need at least 3"):
        search_efficiency.compare_tables({"table": old, "rerun": table(tmp_path / "few.parquet", {0: 0.5, 9: 0.1})})
