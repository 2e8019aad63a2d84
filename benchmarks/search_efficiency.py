"""Search efficiency on recorded learning curves: every search method side by side, same epoch budget.

The tabulated-benchmark method (HPOBench; Syne Tune's blackbox repository). A table of real
learning curves is recorded once — configurations sampled at random from the shipped default space,
each trained for the proxy's whole 20-epoch schedule through this project's trial function by a
real search (``record``) — and every method is then replayed on it with ``mgfa_ray.search.replay.simulate``:
asynchronous workers, each epoch costing its recorded time, results reaching the method in time
order, a proposal answered by the nearest recorded configuration not yet run in that search (no
curve is replayed twice; see :mod:`mgfa_ray.search.replay` and ``replay_policies``). Every method is
measured on one yardstick fixed from the table (:func:`top_set`, :func:`reach_top`,
:func:`ratio_of_totals`; ``MEASURED``).

Steps::

    # 1. the table's search (CPU: ~1 h on 2 cores): random configurations, never stopped
    mgfa-ray run jobs/leafsnap20_fewshot.yaml --output-dir outputs/curve_table \\
        --set search.space=benchmarks/spaces/curve_table_fewshot.yaml --set search.num_samples=64 \\
        --set search.sampler=random --set search.seed=17 --accept-weak
    # 2. the table as Parquet (results/benchmarks/curve_table_fewshot.parquet)
    python benchmarks/search_efficiency.py record outputs/curve_table/search/leafsnap20_fewshot
    # 3. every method, 100 seeds (minutes)
    python benchmarks/search_efficiency.py compare --processes 2
    # 4. live searches on the proxy (real training; CPU: ~10 min each on 2 cores) against the simulator
    ray start --head --num-cpus 4      # 4 trials at once on a 2-core machine
    for s in 0 1 2; do mgfa-ray run jobs/leafsnap20_fewshot.yaml --output-dir outputs/live_proxy/s$s \
        --set search.space=benchmarks/spaces/live_check_fewshot.yaml --set search.num_samples=32 \
        --set search.max_concurrent=4 --set search.sampler=random --set search.seed=$s --accept-weak; done
    python benchmarks/search_efficiency.py live-proxy outputs/live_proxy/s{0,1,2}/search/leafsnap20_fewshot
    # 5. the table's search again on today's proxy (same sampler seed: the same configurations), against the table
    mgfa-ray run jobs/leafsnap20_fewshot.yaml --output-dir outputs/curve_table_v2 \
        --set search.space=benchmarks/spaces/curve_table_fewshot.yaml --set search.num_samples=200 \
        --set search.sampler=random --set search.seed=17 --accept-weak
    python benchmarks/search_efficiency.py record outputs/curve_table_v2/search/leafsnap20_fewshot --partial \
        --table results/benchmarks/curve_table_fewshot_rerun.parquet
    python benchmarks/search_efficiency.py compare-tables --rerun results/benchmarks/curve_table_fewshot_rerun.parquet

``compare --preset smoke`` is the plumbing check (seconds).
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import sys
import time
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
from common import REPO, new_document
from curve_predictors import pow3_predictions, ridge_predictions
from replay_policies import PARAM_PREFIX, CurveTable, RayStockPolicy, StudyPolicy, flat_params
from syne_policies import syne_methods

from mgfa_ray.search.asha import Asha
from mgfa_ray.search.replay import simulate
from mgfa_ray.search.space import load_search_space
from mgfa_ray.storage import atomic_write_json

TABLE = REPO / "results" / "benchmarks" / "curve_table_fewshot.parquet"
TABLE_DOC = REPO / "results" / "benchmarks" / "curve_table_fewshot.json"
SPACE = REPO / "benchmarks" / "spaces" / "curve_table_fewshot.yaml"
OUT = REPO / "results" / "benchmarks" / "search_efficiency_sim.json"
TARGET_RATIO = 1.0 / 3.0

VAL_PHOTOS = 40  # the proxy's validation split: 2 photos x 20 species (jobs/leafsnap20_fewshot.yaml)

MEASURED = {
    "replay": "mgfa_ray.search.replay.simulate: `workers` asynchronous workers; an epoch costs its recorded Ray time "
              "(difference of time_total_s: set-up in the first, evaluation + checkpoint + report in each); results "
              "reach the method in time order; a proposal is answered by the nearest recorded configuration NOT YET "
              "RUN in this search (1-NN in the unit cube of the space: log scale for log ranges, sorted simplex cuts, "
              "categoricals one-hot), so no curve is replayed twice; a search ends when it has run every "
              "configuration of the table or `budget_epochs` epochs (no epoch past it).",
    "top_set": "fixed before any search, the same for every method and seed: the table's configurations whose final "
               "(epoch max_epochs) eval_top1 is within one standard error of a difference of two top-1 values from the "
               "table's best: best - v <= sqrt(2 p (1 - p) / n), p = the best's top-1, n = val_photos.",
    "reached": "the first trial of a top-set configuration to finish its whole schedule (its epoch max_epochs is "
               "run: it was never stopped) within the search; false when the search ends (table exhausted or "
               "budget spent) without one.",
    "epochs_to_top": "epochs run (all workers, in time order) up to and including that last epoch; "
                     "`sim_seconds_to_top`: its simulated time (recorded seconds, workers in parallel); "
                     "`worker_seconds_to_top`: recorded seconds of every epoch run until then, summed over workers. "
                     "None when not reached: a failure is never counted as the budget.",
    "ratio": "per method: sum over seeds of epochs_to_top / sum of random search's epochs_to_top over the same seeds, "
             "the seeds where both reached the top set; 95% interval: scipy.stats.bootstrap, paired resampling of "
             "those seeds (BCa, 9999 resamples, rng seed 0). `success_rate`: seeds reached / seeds. `ratio_time`: "
             "the same for sim_seconds_to_top.",
    "ratio_epochs_vs_ray_stock": "the same ratio of totals and paired interval with Ray's stock OptunaSearch + "
                                 "ASHAScheduler at the same rungs in place of random search (below 1: fewer epochs "
                                 "than Ray's stock setup).",
    "syne_tune": "syne-tune 0.16.0's baselines (benchmarks/syne_policies.py) driven through their public API as syne-tune's "
                 "Tuner does: suggest, on_trial_add, on_trial_result after each epoch (STOP -> on_trial_remove), "
                 "on_trial_complete at a curve's end; grace_period and reduction_factor as the other methods, max_t = "
                 "the table's epochs, random_seed = the simulation seed; maximised eval_top1 (do_minimize False). "
                 "Stopping type only (syne-tune's ASHA answers CONTINUE or STOP; no pause/resume).",
    "best_at_end": "the best final eval_top1 among trials that finished their schedule, and that trial's test_top1 "
                   "(chosen on val, reported on test), mean over seeds.",
    "rung_signals": "Spearman rank correlation over the table's configurations of each candidate rung signal at "
                    "epoch e with the final val top-1 (what ASHA's cut at a rung needs to be high).",
}


def record(search_dir: str, out: Path, *, partial: bool = False) -> dict[str, Any]:
    """The finished table search → the long-form Parquet table and its JSON description
    (``partial``: only the trials that ran every epoch so far, for a look before it finishes)."""
    from mgfa_ray.search.driver import read_record
    from mgfa_ray.search.replay_report import recorded_trials

    trials, info = recorded_trials(search_dir)
    rec = read_record(search_dir)
    full = [t for t in trials if len(t.curve.values) == info["max_epochs"]]
    if len(full) < len(trials) and not partial:
        raise SystemExit(f"error: {len(trials) - len(full)} trials of {search_dir} did not run all "
                         f"{info['max_epochs']} epochs; a curve table needs whole curves (resume the search first)")
    from mgfa_ray.search.driver import ray_trials

    rows = []
    for row in ray_trials(search_dir).to_dict("records"):
        h = row["history"]
        if h is None or not len(h):
            continue
        number = int(row["optuna_trial"])
        if len(h) < info["max_epochs"]:
            continue
        params = next(t.params for t in trials if t.number == number)
        for rec_epoch in h.to_dict("records"):
            rows.append({"config": number, "epoch": int(rec_epoch["training_iteration"]),
                         **{k: float(rec_epoch[k]) for k in ("eval_top1", "test_top1", "train_loss", "eval_loss_ce",
                                                              "epoch_seconds", "setup_seconds", "time_total_s")},
                         **{f"{PARAM_PREFIX}{k}": v for k, v in params.items()}})
    frame = pd.DataFrame(rows).sort_values(["config", "epoch"]).reset_index(drop=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.parquet")
    frame.to_parquet(tmp, index=False)
    tmp.replace(out)
    finals = frame[frame["epoch"] == info["max_epochs"]]
    doc = new_document("curve_table", settings=None, measured={
        "how": "a real search (mgfa-ray run, Ray Tune, 2 trials at once, one CPU thread each) of "
               f"{len(full)} configurations drawn by Optuna's RandomSampler(seed {rec.search.seed}) from {SPACE.name} "
               f"(the shipped default space on the proxy's {info['max_epochs']}-epoch schedule), never stopped; "
               "one row per (config, epoch) with the trial function's metrics and Ray's time_total_s."})
    doc.update(table=_shown(out), search_dir=search_dir, job="jobs/leafsnap20_fewshot.yaml",
               configurations=len(full), epochs=info["max_epochs"], rows=len(frame),
               final_eval_top1={"min": float(finals["eval_top1"].min()), "median": float(finals["eval_top1"].median()),
                                "max": float(finals["eval_top1"].max())},
               recorded_seconds=float(frame.groupby("config")["time_total_s"].max().sum()))
    atomic_write_json(out.with_suffix(".json"), doc)
    return doc


# --- methods ----------------------------------------------------------------------------------

def rung_signals(frame: pd.DataFrame) -> dict[str, Any]:
    """Rung signals other than val top-1 for ``StudyPolicy(rung_value=...)``: name → ``(key, epoch,
    values so far) -> float`` (maximised)."""
    loss = {k: rows.sort_values("epoch")["eval_loss_ce"].to_numpy() for k, rows in frame.groupby("config")}
    last = int(frame["epoch"].max())
    final = frame[frame["epoch"] == last].set_index("config")["eval_top1"]
    pow3, ridge = curve_predictions(frame)
    return {
        "val loss": lambda k, e, v: -float(loss[k][e - 1]),
        "best-so-far": lambda k, e, v: max(v),
        "mean of last 2": lambda k, e, v: sum(v[-2:]) / len(v[-2:]),
        "top-1 + loss tie-break": lambda k, e, v: v[-1] - 0.01 * float(loss[k][e - 1]),
        "top-1 - 0.1 loss": lambda k, e, v: v[-1] - 0.1 * float(loss[k][e - 1]),
        # every trial at a rung reached the same epoch, so a signal may change with the epoch
        "val loss to half, top-1 after": lambda k, e, v: -float(loss[k][e - 1]) if 2 * e <= last else v[-1],
        # learning-curve predictors of the final val top-1 (curve_predictors.py; issue 32, item 4)
        "pow3 extrapolation": lambda k, e, v: float(pow3[k][e - 1]),
        "ridge on the other curves": lambda k, e, v: float(ridge[k][e - 1]),
        # not a method: the bound any rung signal could reach (ranks on the final val top-1, known in advance)
        "oracle final top-1": lambda k, e, v: float(final[k]),
    }


def curve_predictions(frame: pd.DataFrame) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """(pow3, ridge) predictions of every configuration after every epoch (``curve_predictors``)."""
    return pow3_predictions(frame), ridge_predictions(frame)


def signal_correlations(frame: pd.DataFrame, epochs: list[int]) -> dict[str, dict[str, float]]:
    """Spearman (scipy) of each candidate rung signal at each epoch with the final val top-1."""
    from scipy.stats import spearmanr

    wide = lambda c: frame.pivot(index="config", columns="epoch", values=c)  # noqa: E731
    top, loss = wide("eval_top1"), wide("eval_loss_ce")
    final = top[top.columns.max()]
    candidates = {
        "val top-1": top, "-val loss": -loss, "-train loss": -wide("train_loss"),
        "best-so-far val top-1": top.cummax(axis=1), "mean of last 2 val top-1": top.T.rolling(2, min_periods=1).mean().T,
        "val top-1 - 0.1 val loss": top - 0.1 * loss,
        **{name: pd.DataFrame.from_dict(pred, orient="index", columns=top.columns).loc[top.index]
           for name, pred in zip(("pow3 extrapolation", "ridge on the other curves"), curve_predictions(frame),
                                 strict=True)},
    }
    return {name: {str(e): float(spearmanr(x[e], final).statistic) for e in epochs} for name, x in candidates.items()}


def top_set(table: CurveTable, *, val_photos: int = VAL_PHOTOS) -> dict[str, Any]:
    """The yardstick's top set (see ``MEASURED["top_set"]``): keys, best, threshold, rule."""
    finals = {c.key: c.values[-1] for c in table.curves}
    best = max(finals.values())
    noise = math.sqrt(2 * best * (1 - best) / val_photos)
    threshold = best - noise
    keys = sorted(k for k, v in finals.items() if v >= threshold - 1e-12)
    return {"keys": keys, "best": best, "noise": noise, "threshold": threshold, "val_photos": val_photos,
            "finals": {str(k): finals[k] for k in keys}}


def reach_top(events, top: Collection[Any], max_epochs: int) -> dict[str, Any]:
    """When the first trial of a ``top`` configuration finished its schedule (see ``MEASURED``)."""
    hit = next((e for e in events if e.epoch == max_epochs and e.key in top), None)
    return {"reached": hit is not None, "epochs_to_top": hit.cumulative_epochs if hit else None,
            "sim_seconds_to_top": hit.t if hit else None, "worker_seconds_to_top": hit.compute_seconds if hit else None,
            "config": hit.key if hit else None}


def ratio_of_totals(method: Sequence[float | None], baseline: Sequence[float | None], *, n_resamples: int = 9999,
                    seed: int = 0) -> dict[str, Any]:
    """Sum of ``method`` over sum of ``baseline`` over the seeds where both are not None (reached),
    with a paired bootstrap 95% interval over those seeds (scipy.stats.bootstrap, BCa)."""
    from scipy.stats import bootstrap

    both = [(m, b) for m, b in zip(method, baseline, strict=True) if m is not None and b is not None]
    out: dict[str, Any] = {"seeds_both": len(both), "success_rate": sum(m is not None for m in method) / len(method),
                           "ratio": None, "ci95": [None, None]}
    if not both:
        return out
    m, b = (np.asarray(x, dtype=np.float64) for x in zip(*both, strict=True))
    out["ratio"] = float(m.sum() / b.sum())
    if len(both) < 2 or np.allclose(m, b * out["ratio"]):  # no spread: the interval is the point
        out["ci95"] = [out["ratio"], out["ratio"]] if len(both) >= 2 else [None, None]
        return out
    res = bootstrap((m, b), lambda x, y, axis=-1: x.sum(axis=axis) / y.sum(axis=axis), paired=True, vectorized=True,
                    n_resamples=n_resamples, confidence_level=0.95, method="BCa", rng=np.random.default_rng(seed))
    out["ci95"] = [float(res.confidence_interval.low), float(res.confidence_interval.high)]
    return out


def methods(grace: int, factor: int, max_epochs: int, num_samples: int,
            signals: dict[str, Any] | None = None) -> dict[str, Any]:
    """name -> a factory ``(table, seed) -> Policy`` (see the README).

    ``random+asha`` is the search's default (``search.sampler: random``); ``tpe+asha`` is
    ``search.sampler: tpe`` with its default start-up (half of ``num_samples``, at least 10);
    ``signals`` (:func:`rung_signals`) add random + ASHA ranking the rungs on each other signal."""
    asha = Asha(grace_period=grace, reduction_factor=factor)
    half = max(10, num_samples // 2)

    def tpe(seed: int, **kw) -> optuna.samplers.BaseSampler:
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, **kw)

    def rnd(seed: int) -> optuna.samplers.BaseSampler:
        return optuna.samplers.RandomSampler(seed=seed)

    return {
        "random": lambda t, s: StudyPolicy(t, sampler=rnd(s), asha=None),
        "random+asha": lambda t, s: StudyPolicy(t, sampler=rnd(s), asha=asha),
        "tpe+asha": lambda t, s: StudyPolicy(t, sampler=tpe(s, n_startup_trials=half), asha=asha),
        "tpe+asha, startup 10": lambda t, s: StudyPolicy(t, sampler=tpe(s), asha=asha),
        "ray stock (OptunaSearch+ASHAScheduler)": lambda t, s: RayStockPolicy(
            t, seed=s, grace_period=grace, reduction_factor=factor, max_t=max_epochs),
        "ray ASHAScheduler, random proposals": lambda t, s: RayStockPolicy(
            t, seed=s, grace_period=grace, reduction_factor=factor, max_t=max_epochs, sampler=rnd(s)),
        "tpe": lambda t, s: StudyPolicy(t, sampler=tpe(s, n_startup_trials=half), asha=None),
        **{f"random+asha, rung on {n}": (lambda f: lambda t, s: StudyPolicy(t, sampler=rnd(s), asha=asha,
                                                                            rung_value=f))(f)
           for n, f in (signals or {}).items()},
        # maintained multi-fidelity optimisers (issue 32, item 3): syne-tune's schedulers, same rungs, same Unrun mapping
        **syne_methods(grace, factor, max_epochs),
    }


RAY_STOCK = "ray stock (OptunaSearch+ASHAScheduler)"
DEFAULT_METHODS = ["random", "random+asha", "tpe+asha", "tpe+asha, startup 10", "ray stock (OptunaSearch+ASHAScheduler)",
                   "ray ASHAScheduler, random proposals", "random+asha, rung on oracle final top-1",
                   "syne-tune ASHA", "syne-tune BOHB", "syne-tune BOHB, min points d+1",
                   "syne-tune ASHA-BORE"]  # BORE: ~20 s a seed (an XGBoost fit per proposal), < 2 s for the rest


def run_one(policy, table: CurveTable, *, workers: int, budget: int, max_epochs: int, top: Collection[Any],
            max_trials: int | None = None) -> dict[str, Any]:
    """One simulated search (at most one trial per table configuration; ``max_trials``: fewer) and what
    the yardstick reads of it."""
    events, runs = simulate(policy, workers=workers, max_trials=min(max_trials or len(table.curves), len(table.curves)),
                            max_total_epochs=budget)
    keys = [r.key for r in runs]
    if len(set(keys)) != len(keys):
        raise AssertionError("a curve was replayed twice in one search")
    done = [e for e in events if e.epoch == max_epochs]
    best = max(done, key=lambda e: e.value, default=None)
    return {"trials": len(runs), "trials_full": len(done), "epochs": len(events),
            "best_val": best.value if best else None, "best_test": best.test if best else None,
            **reach_top(events, top, max_epochs)}


def _mean(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.mean(xs) if xs else None


def _seed_runs(job: tuple) -> tuple[int, dict[str, dict[str, Any]]]:
    """Every (setting, method) of one seed (a process pool's unit of work)."""
    s, seed = job
    table, frame = _load_table(s["table"])
    signals = _signals(s["table"])
    max_epochs = len(table.curves[0].values)
    budget = s["budget_trials"] * max_epochs
    top = set(top_set(table)["keys"])
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out: dict[str, dict[str, Any]] = {}
    for grace, factor in s["settings"]:
        factories = methods(grace, factor, max_epochs, len(table.curves), signals)
        for name in s["methods"]:
            if name not in factories:  # a rung signal the table has no column for
                continue
            if name in ("random", "tpe") and out.get(f"{name}@0x0") is not None:
                continue  # no stopping: the same search at every setting
            np.random.seed(seed)  # Ray's ASHAScheduler draws brackets from numpy's global generator
            label = f"{name}@0x0" if name in ("random", "tpe") else f"{name}@{grace}x{factor}"
            out[label] = run_one(factories[name](table, seed), table, workers=s["workers"], budget=budget,
                                 max_epochs=max_epochs, top=top)
    return seed, out


@functools.lru_cache(maxsize=2)
def _signals(path: str) -> dict[str, Any]:
    frame = _load_table(path)[1]
    return rung_signals(frame) if "eval_loss_ce" in frame else {}


@functools.lru_cache(maxsize=2)
def _load_table(path: str) -> tuple[CurveTable, pd.DataFrame]:
    frame = pd.read_parquet(path)
    return CurveTable.from_frame(frame, space=load_search_space(SPACE)), frame


def compare(s: dict[str, Any]) -> dict[str, Any]:
    """Every method x setting x seed on the table; the JSON document."""
    started = time.perf_counter()
    s = {**s, "table": str(s["table"])}
    table, frame = _load_table(s["table"])
    max_epochs = len(table.curves[0].values)
    top = top_set(table)
    doc = new_document("search_efficiency_sim", settings={k: str(v) if isinstance(v, Path) else v for k, v in s.items()},
                       measured=MEASURED)
    doc["table"] = {"file": _shown(Path(s["table"])), "configurations": len(table.curves), "max_epochs": max_epochs,
                    "budget_epochs": s["budget_trials"] * max_epochs}
    doc["top_set"] = top
    if "eval_loss_ce" in frame:
        doc["rung_signals"] = signal_correlations(frame, [1, 2, 3, 4, 5, 6, 8, 10])
    jobs = [(s, seed) for seed in s["seeds"]]
    if s["processes"] > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(s["processes"]) as pool:
            per_seed = dict(pool.imap_unordered(_seed_runs, jobs))
    else:
        per_seed = dict(map(_seed_runs, jobs))
    seeds = sorted(per_seed)
    labels = list(per_seed[seeds[0]])
    baseline = [per_seed[x]["random@0x0"] for x in seeds]
    summary = {}
    for label in labels:
        runs = [per_seed[x][label] for x in seeds]
        name, setting = label.rsplit("@", 1)
        stock = f"{RAY_STOCK}@{setting}"
        ray = [per_seed[x][stock] for x in seeds] if stock in labels and stock != label else None
        summary[label] = {
            "method": name, "grace_period": None if setting == "0x0" else int(setting.split("x")[0]),
            "reduction_factor": None if setting == "0x0" else int(setting.split("x")[1]),
            "ratio_epochs": ratio_of_totals([r["epochs_to_top"] for r in runs], [b["epochs_to_top"] for b in baseline]),
            "ratio_time": ratio_of_totals([r["sim_seconds_to_top"] for r in runs],
                                          [b["sim_seconds_to_top"] for b in baseline]),
            "ratio_epochs_vs_ray_stock": None if ray is None else ratio_of_totals(
                [r["epochs_to_top"] for r in runs], [b["epochs_to_top"] for b in ray]),
            "success": sum(r["reached"] for r in runs), "seeds": len(runs),
            "mean_epochs_to_top": _mean([r["epochs_to_top"] for r in runs]),
            "mean_trials": _mean([r["trials"] for r in runs]), "mean_epochs_run": _mean([r["epochs"] for r in runs]),
            "best_val_at_end": _mean([r["best_val"] for r in runs]), "best_test_at_end": _mean([r["best_test"] for r in runs]),
        }
        log(f"{label}: ratio {summary[label]['ratio_epochs']['ratio']} {summary[label]['ratio_epochs']['ci95']} "
            f"success {summary[label]['success']}/{len(runs)}")
    doc["summary"] = summary
    doc["per_seed"] = [{"seed": x, "runs": per_seed[x]} for x in seeds]
    doc["total_seconds"] = time.perf_counter() - started
    return doc


# --- live searches on the proxy ---------------------------------------------------------------

def live_search_reading(search_dir: str, *, threshold: float, max_epochs: int) -> dict[str, Any]:
    """What the yardstick reads of one finished live search (real training): its epochs in report
    order (``reported_at``, every worker), the first trial that finished ``max_epochs`` epochs at val
    top-1 >= ``threshold`` (the table's top-set bound), and the trials that failed before any epoch."""
    from mgfa_ray.search.driver import ray_trials

    rows, failed = [], 0
    for row in ray_trials(search_dir).to_dict("records"):
        h = row["history"]
        if h is None or not len(h):
            failed += 1
            continue
        rows += [(float(e["reported_at"]), int(row["optuna_trial"]), int(e["training_iteration"]), float(e["eval_top1"]),
                  float(e["test_top1"])) for e in h.to_dict("records")]
    rows.sort()
    hit = next((i for i, r in enumerate(rows, 1) if r[2] == max_epochs and r[3] >= threshold - 1e-12), None)
    full = [r for r in rows if r[2] == max_epochs]
    best = max(full, key=lambda r: r[3], default=None)
    return {"search_dir": _shown(Path(search_dir)), "trials": len({r[1] for r in rows}) + failed, "trials_failed_before_an_epoch": failed,
            "epochs": len(rows), "trials_full": len(full), "reached": hit is not None, "epochs_to_top": hit,
            "best_val": best[3] if best else None, "best_test": best[4] if best else None,
            "final_val_of_full_trials": sorted(r[3] for r in full)}


def live_proxy(s: dict[str, Any]) -> dict[str, Any]:
    """Live searches on the proxy (real training) against the simulator's prediction for the same method.

    The simulator replays the shipped default (random proposals + ASHA at the live space's rungs) with
    the live searches' trials and workers, over ``seeds``; its distribution of per-search figures is
    the prediction, and each live search is placed in it.

    Raises:
        SystemExit: the live searches differ in space, trials or workers, do not use random proposals,
            or their space does not stop early over the table's epochs."""
    from mgfa_ray.search.driver import read_record
    from mgfa_ray.search.space import load_search_space as _load

    recs = [read_record(d) for d in s["search_dirs"]]
    spaces = {r.search.space for r in recs}
    trials = {r.search.num_samples for r in recs}
    workers = {r.search.max_concurrent for r in recs}
    if len(spaces) != 1 or len(trials) != 1 or len(workers) != 1 or {r.search.sampler for r in recs} != {"random"}:
        raise SystemExit("error: the live searches must share one space, num_samples, max_concurrent and the random sampler")
    space = _load(spaces.pop())
    sched = space.scheduler
    table, _ = _load_table(s["table"])
    max_epochs = len(table.curves[0].values)
    if sched.max_epochs != max_epochs or not sched.early_stopping:
        raise SystemExit(f"error: the live space must stop early over the table's {max_epochs} epochs")
    top = top_set(table)
    n_trials, n_workers = trials.pop(), workers.pop()
    live = [live_search_reading(d, threshold=top["threshold"], max_epochs=max_epochs) for d in s["search_dirs"]]
    sim = []
    for seed in s["seeds"]:
        policy = StudyPolicy(table, sampler=optuna.samplers.RandomSampler(seed=seed),
                             asha=Asha(grace_period=sched.grace_period, reduction_factor=sched.reduction_factor))
        sim.append(run_one(policy, table, workers=n_workers, budget=n_trials * max_epochs, max_epochs=max_epochs,
                           top=set(top["keys"]), max_trials=n_trials))
    doc = _live_vs_sim(live, sim, s=s, top=top, n_trials=n_trials, n_workers=n_workers,
                       grace=sched.grace_period, factor=sched.reduction_factor)
    doc["top_set_retrained"] = [retrained_top_set(d, table, threshold=top["threshold"]) for d in s["retrained"] or []]
    return doc


def retrained_top_set(search_dir: str, table: CurveTable, *, threshold: float) -> dict[str, Any]:
    """The table's configurations retrained today (a never-stopped search of their exact values,
    ``benchmarks/spaces/table_top_set.yaml``) against their recorded curves: final val and test
    top-1 in both, and the mean absolute difference of the val curves; ``train_seed``: the
    training seed of the retrained runs."""
    from mgfa_ray.search.driver import read_record
    from mgfa_ray.search.replay_report import recorded_trials

    trials, _ = recorded_trials(search_dir)
    out: list[dict[str, Any]] = []
    for t in trials:
        rec = table.curves[table.nearest({k: v for k, v in flat_params(t.params).items() if k in table.params[0]})]
        now = t.curve.values
        out.append({"config": int(rec.key), "epochs": len(now), "table_final_val": rec.values[-1],
                    "retrained_final_val": now[-1], "table_final_test": rec.test[-1] if rec.test else None,
                    "retrained_final_test": t.curve.test[-1] if t.curve.test else None,
                    "retrained_in_top_set": now[-1] >= threshold - 1e-12,
                    "mean_abs_val_difference": float(np.mean(np.abs(np.subtract(now, rec.values[:len(now)]))))})
    return {"search_dir": _shown(Path(search_dir)), "train_seed": read_record(search_dir).trial_base.get("seed"),
            "configs": out}


def _live_vs_sim(live: list[dict[str, Any]], sim: list[dict[str, Any]], **info: Any) -> dict[str, Any]:
    """Where the live searches fall in the simulated distribution (see :func:`live_proxy`)."""
    from scipy.stats import binom

    p = sum(r["reached"] for r in sim) / len(sim)
    k, n = sum(r["reached"] for r in live), len(live)

    def band(values: list[float]) -> dict[str, Any]:
        a = np.asarray(values, dtype=np.float64)
        return {"mean": float(a.mean()), "p2.5": float(np.percentile(a, 2.5)), "p97.5": float(np.percentile(a, 97.5))}

    def mean_band(values: list[float], size: int) -> list[float]:  # 95% range of the mean of `size` searches
        rng = np.random.default_rng(0)
        means = rng.choice(np.asarray(values, dtype=np.float64), size=(20000, size)).mean(axis=1)
        return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]

    sim_epochs = [r["epochs"] for r in sim]
    sim_full = [r["trials_full"] for r in sim]
    sim_top = [r["epochs_to_top"] for r in sim if r["reached"]]
    live_epochs = [r["epochs"] for r in live]
    s = info.pop("s")
    doc = new_document("search_efficiency_live_proxy", settings={"seeds": s["seeds"], **info, "table": _shown(Path(s["table"]))},
                       measured=MEASURED_LIVE)
    doc.update(top_set_threshold=info["top"]["threshold"], live=live, simulated_seeds=len(sim), prediction={
        "success_rate": p, "epochs": band(sim_epochs), "trials_full": band(sim_full),
        "epochs_to_top_if_reached": band(sim_top) if sim_top else None,
        f"mean_epochs_of_{n}_searches_95": mean_band(sim_epochs, n),
        f"mean_trials_full_of_{n}_searches_95": mean_band(sim_full, n)},
        agreement={"live_successes": k, "live_searches": n,
                   "p_at_most_live_successes": float(binom.cdf(k, n, p)),
                   "p_at_least_live_successes": float(binom.sf(k - 1, n, p)),
                   "live_mean_epochs": float(np.mean(live_epochs)),
                   "live_mean_epochs_inside": bool(mean_band(sim_epochs, n)[0] <= np.mean(live_epochs) <= mean_band(sim_epochs, n)[1]),
                   "live_mean_trials_full": float(np.mean([r["trials_full"] for r in live])),
                   "live_epochs_to_top": [r["epochs_to_top"] for r in live]})
    return doc


MEASURED_LIVE = {
    "live": "each live search: a real search (mgfa-ray run, Ray Tune, real training on the proxy) read from its trial "
            "histories: epochs in the order they were reported (reported_at, all workers), epochs_to_top = epochs up to "
            "and including the first epoch max_epochs of a trial at val top-1 >= the table's top-set bound; trials "
            "that failed before an epoch are counted apart.",
    "prediction": "mgfa_ray.search.replay.simulate of random proposals + ASHA at the live space's rungs on the curve "
                  "table, the live searches' num_samples and max_concurrent, one search per simulation seed; success, "
                  "epochs run and trials that ran every epoch per search; 2.5/97.5 percentiles over the seeds, and the "
                  "95% range of the mean of as many searches as were run live (20 000 resamples).",
    "agreement": "binomial probability (scipy.stats.binom) of at most / at least the live successes given the "
                 "simulated success rate; whether the live mean of epochs run lies inside the simulated range.",
}


def compare_tables(s: dict[str, Any]) -> dict[str, Any]:
    """The same configurations recorded twice (the table, and a rerun of its search with the same
    sampler seed on today's proxy): final val top-1 of each configuration in both, their rank
    correlation and mean difference, and each table's top set over the configurations in both.

    Raises:
        SystemExit: fewer than 3 configurations have a whole curve in both tables."""
    from scipy.stats import spearmanr, ttest_rel

    old, new = (pd.read_parquet(p) for p in (s["table"], s["rerun"]))
    last = int(old["epoch"].max())
    finals = {name: f[f["epoch"] == last].set_index("config")["eval_top1"] for name, f in (("old", old), ("new", new))}
    common = sorted(set(finals["old"].index) & set(finals["new"].index))
    if len(common) < 3:
        raise SystemExit(f"error: {s['rerun']} shares {len(common)} whole curves with {s['table']}; need at least 3")
    a, b = finals["old"].loc[common].to_numpy(), finals["new"].loc[common].to_numpy()
    diff = ttest_rel(b, a)
    ci = diff.confidence_interval(0.95)

    def top(values: np.ndarray) -> list[int]:
        best = float(values.max())
        bound = best - math.sqrt(2 * best * (1 - best) / VAL_PHOTOS)
        return [int(k) for k, v in zip(common, values, strict=True) if v >= bound - 1e-12]

    doc = new_document("curve_table_rerun", settings={k: _shown(Path(s[k])) for k in ("table", "rerun")}, measured={
        "what": "final (epoch max) val top-1 of every configuration with a whole curve in both tables; spearman: "
                "scipy.stats.spearmanr; mean_difference: new - old with the paired t interval (scipy.stats.ttest_rel); "
                "top sets: the yardstick's rule (best - sqrt(2 p (1 - p) / 40)) on each table's common configurations."})
    doc.update(configurations=len(common), spearman_final_val=float(spearmanr(a, b).statistic),
               mean_old=float(a.mean()), mean_new=float(b.mean()), mean_difference=float((b - a).mean()),
               mean_difference_ci95=[float(ci.low), float(ci.high)], mean_abs_difference=float(np.abs(b - a).mean()),
               top_set_old=top(a), top_set_new=top(b), finals={str(k): [float(x), float(y)] for k, x, y in zip(common, a, b)})
    return doc


def _shown(path: Path) -> str:
    """``path`` relative to the repository when inside it (JSON that holds no machine's paths)."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def log(msg: str) -> None:
    print(f"[search_efficiency] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> tuple[str, dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("action", choices=["record", "compare", "live-proxy", "compare-tables"], nargs="?", default="compare")
    p.add_argument("search_dir", nargs="*", help="record: the finished table search; live-proxy: the live searches")
    p.add_argument("--preset", choices=["smoke", "full"], default="full")
    p.add_argument("--partial", action="store_true", help="record: the trials finished so far only")
    p.add_argument("--table", type=Path, default=TABLE)
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--workers", type=int, default=4, help="simulated workers (default 4)")
    p.add_argument("--budget-trials", type=int, help="budget in whole trials: epochs = this x max_epochs (default 100)")
    p.add_argument("--grace", type=int, nargs="+", help="ASHA first rungs to compare (default 2: default.yaml's tenth)")
    p.add_argument("--factor", type=int, nargs="+", help="ASHA reduction factors (default 3)")
    p.add_argument("--methods", nargs="+", help="only these methods (random is always run; default: DEFAULT_METHODS)")
    p.add_argument("--processes", type=int, default=1, help="seeds simulated in parallel processes (default 1)")
    p.add_argument("--rerun", type=Path, help="compare-tables: the table recorded again (record's Parquet)")
    p.add_argument("--retrained", nargs="*", help="live-proxy: searches that retrained the table's top set")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    smoke = a.preset == "smoke"
    s = {"table": a.table, "seeds": a.seeds or ([0, 1] if smoke else list(range(100))),
         "workers": a.workers, "budget_trials": a.budget_trials or (10 if smoke else 100),
         "grace": a.grace or [2], "factor": a.factor or [3],
         "methods": list(dict.fromkeys(["random", *(a.methods or DEFAULT_METHODS)])), "processes": a.processes,
         "search_dir": a.search_dir[0] if a.search_dir else None,
         "search_dirs": a.search_dir, "partial": a.partial, "retrained": a.retrained,
         "rerun": a.rerun}
    s["settings"] = [[g, f] for g in s["grace"] for f in s["factor"]]
    s["out"] = a.out or (OUT if a.action == "compare" and not smoke else
                         OUT.with_name("search_efficiency_live_proxy.json") if a.action == "live-proxy" else
                         OUT.with_name("curve_table_rerun.json") if a.action == "compare-tables" else
                         REPO / "outputs" / "bench" / f"search_efficiency_{a.action}_{a.preset}.json")
    return a.action, s


def main(argv: list[str] | None = None) -> None:
    action, s = parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if action == "record":
        if not s["search_dir"]:
            raise SystemExit("error: record needs the finished table search's directory")
        doc = record(s["search_dir"], s["table"], partial=s["partial"])
        log(f"wrote {s['table']} ({doc['configurations']} configurations x {doc['epochs']} epochs)")
        return
    doc = {"compare": compare, "live-proxy": live_proxy, "compare-tables": compare_tables}[action](s)
    atomic_write_json(s["out"], doc)
    log(f"wrote {s['out']}")


if __name__ == "__main__":
    main()
