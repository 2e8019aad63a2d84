"""Search efficiency on recorded learning curves: every search method side by side, same epoch budget.

The tabulated-benchmark method (HPOBench; Syne Tune's blackbox repository). A table of real
learning curves is recorded once — configurations sampled at random from the shipped default space,
each trained for the proxy's whole 20-epoch schedule through this project's trial function by a
real search (``record``) — and every method is then replayed on it with ``mgfa_ray.search.replay.simulate``:
asynchronous workers, each epoch costing its recorded time, results reaching the method in time
order, a proposal answered by the nearest recorded configuration (see :mod:`mgfa_ray.search.replay`).

Steps::

    # 1. the table's search (CPU: ~1 h on 2 cores): random configurations, never stopped
    mgfa-ray run jobs/leafsnap20_fewshot.yaml --output-dir outputs/curve_table \\
        --set search.space=benchmarks/spaces/curve_table_fewshot.yaml --set search.num_samples=64 \\
        --set search.sampler=random --set search.seed=17 --accept-weak
    # 2. the table as Parquet (results/benchmarks/curve_table_fewshot.parquet)
    python benchmarks/search_efficiency.py record outputs/curve_table/search/leafsnap20_fewshot
    # 3. every method, seeds x budget (minutes)
    python benchmarks/search_efficiency.py compare
    # 4. the simulator against one live Ray Tune search on the same table
    python benchmarks/search_efficiency.py live-check

``compare --preset smoke`` is the plumbing check (seconds).
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
from common import REPO, new_document

from mgfa_ray.search.asha import Asha
from mgfa_ray.search.replay import simulate
from replay_policies import PARAM_PREFIX, CurveTable, RayStockPolicy, StudyPolicy
from mgfa_ray.search.space import load_search_space
from mgfa_ray.storage import atomic_write_json

TABLE = REPO / "results" / "benchmarks" / "curve_table_fewshot.parquet"
TABLE_DOC = REPO / "results" / "benchmarks" / "curve_table_fewshot.json"
SPACE = REPO / "benchmarks" / "spaces" / "curve_table_fewshot.yaml"
OUT = REPO / "results" / "benchmarks" / "search_efficiency_sim.json"
TARGET_RATIO = 1.0 / 3.0

MEASURED = {
    "replay": "mgfa_ray.search.replay.simulate: `workers` asynchronous workers; an epoch costs its recorded Ray time "
              "(difference of time_total_s: set-up in the first, evaluation + checkpoint + report in each); results "
              "reach the method in time order; a proposal is answered by the nearest recorded configuration (1-NN "
              "in the unit cube of the space: log scale for log ranges, sorted simplex cuts, categoricals one-hot). "
              "A search ends when it has run `budget_epochs` epochs (no epoch past it).",
    "target": "per seed: random search's final best = the highest final-epoch eval_top1 among the random search's "
              "trials (each ran max_epochs).",
    "epochs_to_target": "epochs run (in time order, all workers) until a trial *finished its whole schedule* with "
                        "eval_top1 >= target (a fully trained configuration that good exists); `_any_epoch`: until any "
                        "epoch of any trial reached it. A method that never does counts the whole budget, reached false.",
    "gpu_hours_to_target": "the recorded seconds of every epoch run until then, summed over workers, / 3600 (the "
                           "table was recorded on CPU: read them as the relative cost, not GPU-hours of a GPU run).",
    "best_at_budget": "at each fraction of the budget: the best final eval_top1 among trials that finished their "
                      "schedule by then, and the test_top1 of that trial's last epoch (chosen on val, reported on "
                      "test).",
    "ratio": "per seed: method epochs_to_target / random's epochs_to_target; mean over seeds with a 95% t interval.",
    "near_target": "target - tolerance (default 0.05: about one standard error of a top-1 near 0.85 on the proxy's "
                   "40 validation photos, sqrt(0.85 x 0.15 / 40) = 0.056): the same counts (`near`, `ratio_near`) "
                   "for reaching random search's best within its measurement noise, not one particular lucky curve.",
    "floor": "per seed: the epochs an omniscient search with the same workers needs to the target — trial 0 is the "
             "table configuration that ends at or above the target in the fewest epochs, every other trial is "
             "stopped after one epoch (averaged over every configuration as that other trial) — and its ratio to "
             "random's epochs. No method that keeps its workers busy can do better on this measure.",
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
    return {
        "val loss": lambda k, e, v: -float(loss[k][e - 1]),
        "best-so-far": lambda k, e, v: max(v),
        "mean of last 2": lambda k, e, v: sum(v[-2:]) / len(v[-2:]),
        "top-1 + loss tie-break": lambda k, e, v: v[-1] - 0.01 * float(loss[k][e - 1]),
        "top-1 - 0.1 loss": lambda k, e, v: v[-1] - 0.1 * float(loss[k][e - 1]),
        # every trial at a rung reached the same epoch, so a signal may change with the epoch
        "val loss to half, top-1 after": lambda k, e, v: -float(loss[k][e - 1]) if 2 * e <= last else v[-1],
        # not a method: the bound any rung signal could reach (ranks on the final val top-1, known in advance)
        "oracle final top-1": lambda k, e, v: float(final[k]),
    }


class _Omniscient:
    """The floor's policy: trial 0 runs table curve ``best`` to the end, every other trial runs
    curve ``other`` for one epoch."""

    def __init__(self, table: CurveTable, best: int, other: int):
        self.table, self.best, self.other = table, best, other

    def start(self, trial: int):
        return self.table.curves[self.best if trial == 0 else self.other]

    def result(self, trial: int, epoch: int, value: float) -> bool:
        return trial != 0

    def complete(self, *args: Any) -> None:
        pass


def omniscient_epochs(table: CurveTable, target: float, *, workers: int, budget: int) -> float:
    """Epochs until an omniscient search finishes a configuration at ``target`` (see MEASURED floor)."""
    last = len(table.curves[0].values)
    best = math.inf
    for g in (j for j, c in enumerate(table.curves) if c.values[-1] >= target):
        runs = [simulate(_Omniscient(table, g, o), workers=workers, max_total_epochs=budget)[0]
                for o in range(len(table.curves))]
        best = min(best, statistics.mean(next(e.cumulative_epochs for e in ev if e.trial == 0 and e.epoch == last)
                                         for ev in runs))
    return best


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
    }
    return {name: {str(e): float(spearmanr(x[e], final).statistic) for e in epochs} for name, x in candidates.items()}


def methods(grace: int, factor: int, max_epochs: int, budget_trials: int,
            signals: dict[str, Any] | None = None) -> dict[str, Any]:
    """name → a factory ``(table, seed) -> Policy`` (see ``MEASURED`` and the README).

    ``random+asha`` is the search's default (``search.sampler: random``); ``tpe+asha, startup 1/2``
    is ``search.sampler: tpe`` with its default start-up; ``signals`` (:func:`rung_signals`) add
    random + ASHA ranking the rungs on each other signal."""
    asha = Asha(grace_period=grace, reduction_factor=factor)
    startup3, startup2 = max(10, budget_trials // 3), max(10, budget_trials // 2)

    def tpe(seed: int, **kw) -> optuna.samplers.BaseSampler:
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, **kw)

    def rnd(seed: int) -> optuna.samplers.BaseSampler:
        return optuna.samplers.RandomSampler(seed=seed)

    def bohb(seed: int):  # TPE fit on the highest rung holding 10 values; every third trial random (Falkner et al.)
        return lambda i: None if i % 3 == 2 else tpe(seed * 100_003 + i, n_startup_trials=0)

    return {
        "random": lambda t, s: StudyPolicy(t, sampler=rnd(s), asha=None),
        "tpe": lambda t, s: StudyPolicy(t, sampler=tpe(s), asha=None),
        "random+asha": lambda t, s: StudyPolicy(t, sampler=rnd(s), asha=asha),
        "tpe+asha, startup 10": lambda t, s: StudyPolicy(t, sampler=tpe(s), asha=asha),
        "tpe+asha, startup 1/3": lambda t, s: StudyPolicy(t, sampler=tpe(s, n_startup_trials=startup3), asha=asha),
        "tpe+asha, startup 1/2": lambda t, s: StudyPolicy(t, sampler=tpe(s, n_startup_trials=startup2), asha=asha),
        "ray stock (OptunaSearch+ASHAScheduler)": lambda t, s: RayStockPolicy(
            t, seed=s, grace_period=grace, reduction_factor=factor, max_t=max_epochs),
        "ray stock, 3 brackets": lambda t, s: RayStockPolicy(
            t, seed=s, grace_period=grace, reduction_factor=factor, max_t=max_epochs, brackets=3),
        "random+asha, 3 brackets": lambda t, s: StudyPolicy(t, sampler=rnd(s), asha=asha, brackets=3),
        "tpe+asha, startup 1/3, 3 brackets": lambda t, s: StudyPolicy(
            t, sampler=tpe(s, n_startup_trials=startup3), asha=asha, brackets=3),
        "bohb-style (tpe on rungs)+asha": lambda t, s: StudyPolicy(t, sampler=rnd(s), asha=asha, rung_model=bohb(s)),
        "tpe+asha, constant_liar": lambda t, s: StudyPolicy(t, sampler=tpe(s, constant_liar=True), asha=asha),
        "independent tpe+asha": lambda t, s: StudyPolicy(t, sampler=optuna.samplers.TPESampler(seed=s), asha=asha),
        **{f"random+asha, rung on {n}": (lambda f: lambda t, s: StudyPolicy(t, sampler=rnd(s), asha=asha,
                                                                            rung_value=f))(f)
           for n, f in (signals or {}).items()},
    }


def run_one(policy, *, workers: int, budget: int, max_epochs: int) -> dict[str, Any]:
    """One simulated search: its events in time order (compact) and trial counts."""
    events, runs = simulate(policy, workers=workers, max_total_epochs=budget)
    return {"events": events, "trials": len(runs), "trials_full": sum(r.epochs == max_epochs for r in runs)}


def reach(events, target: float, max_epochs: int, budget: int) -> dict[str, Any]:
    """Epochs and recorded hours until ``target`` (see MEASURED)."""
    full = next((e for e in events if e.epoch == max_epochs and e.value >= target), None)
    anye = next((e for e in events if e.value >= target), None)
    return {"reached": full is not None, "epochs_to_target": full.cumulative_epochs if full else budget,
            "gpu_hours_to_target": (full or events[-1]).compute_seconds / 3600,
            "reached_any_epoch": anye is not None,
            "epochs_to_target_any_epoch": anye.cumulative_epochs if anye else budget}


def best_at(events, fractions: list[float], budget: int, max_epochs: int) -> dict[str, Any]:
    """Best finished trial (val) and its test top-1 at each budget fraction."""
    out = {}
    for f in fractions:
        done = [e for e in events if e.cumulative_epochs <= f * budget and e.epoch == max_epochs]
        best = max(done, key=lambda e: e.value, default=None)
        out[f"{f:g}"] = {"val": best.value if best else None, "test": best.test if best else None}
    return out


def interval(xs: list[float]) -> dict[str, float]:
    """Mean, standard deviation and 95% t interval (scipy) of ``xs``."""
    from scipy import stats

    m = statistics.mean(xs)
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    half = stats.t.ppf(0.975, len(xs) - 1) * sd / len(xs) ** 0.5 if len(xs) > 1 else float("nan")
    return {"mean": m, "sd": sd, "ci95": [m - half, m + half], "min": min(xs), "max": max(xs)}


def compare(s: dict[str, Any]) -> dict[str, Any]:
    """Every method x seed on the table; the JSON document."""
    started = time.perf_counter()
    space = load_search_space(SPACE)
    frame = pd.read_parquet(s["table"])
    table = CurveTable.from_frame(frame, space=space)
    signals = rung_signals(frame) if "eval_loss_ce" in frame else {}
    max_epochs = len(table.curves[0].values)
    budget = s["budget_trials"] * max_epochs
    doc = new_document("search_efficiency_sim", settings={k: str(v) if isinstance(v, Path) else v for k, v in s.items()},
                       measured=MEASURED)
    doc["table"] = {"file": _shown(Path(s["table"])), "configurations": len(table.curves), "max_epochs": max_epochs}
    if "eval_loss_ce" in frame:
        doc["rung_signals"] = signal_correlations(frame, [1, 2, 3, 4, 5, 6, 8, 10])
    settings = [(g, f) for g in s["grace"] for f in s["factor"]]
    per_setting = []
    floors: dict[int, dict[str, float]] = {}  # seed -> the floor (the same random search at every setting)
    for grace, factor in settings:
        factories = methods(grace, factor, max_epochs, s["budget_trials"], signals)
        names = [n for n in factories if not s["methods"] or n in s["methods"]]
        seeds = []
        for seed in s["seeds"]:
            np.random.seed(seed)  # Ray's ASHAScheduler draws brackets from numpy's global generator
            runs = {n: run_one(factories[n](table, seed), workers=s["workers"], budget=budget, max_epochs=max_epochs)
                    for n in names}
            target = max(e.value for e in runs["random"]["events"] if e.epoch == max_epochs)
            near = target - s["tolerance"]
            if seed not in floors:
                epochs = omniscient_epochs(table, target, workers=s["workers"], budget=budget)
                random_epochs = reach(runs["random"]["events"], target, max_epochs, budget)["epochs_to_target"]
                floors[seed] = {"seed": seed, "epochs_to_target": epochs, "ratio": epochs / random_epochs}
            seeds.append({"seed": seed, "target": target, "near_target": near, "methods": {
                n: {"trials": r["trials"], "trials_full": r["trials_full"],
                    **reach(r["events"], target, max_epochs, budget),
                    "near": reach(r["events"], near, max_epochs, budget),
                    "best_at_budget": best_at(r["events"], s["fractions"], budget, max_epochs)}
                for n, r in runs.items()}})
            log(f"grace {grace} factor {factor} seed {seed}: target {target:.3f}; " + ", ".join(
                f"{n} {seeds[-1]['methods'][n]['epochs_to_target']}" for n in names))
        summary = {}
        for n in names:
            ratios = [x["methods"][n]["epochs_to_target"] / x["methods"]["random"]["epochs_to_target"] for x in seeds]
            summary[n] = {
                "ratio": interval(ratios), "per_seed_ratio": ratios,
                "epochs_to_target": interval([x["methods"][n]["epochs_to_target"] for x in seeds]),
                "gpu_hours_to_target": interval([x["methods"][n]["gpu_hours_to_target"] for x in seeds]),
                "reached_every_seed": all(x["methods"][n]["reached"] for x in seeds),
                "reached_seeds": sum(x["methods"][n]["reached"] for x in seeds),
                "ratio_near": interval([x["methods"][n]["near"]["epochs_to_target"]
                                        / x["methods"]["random"]["near"]["epochs_to_target"] for x in seeds]),
                "epochs_to_near_target": interval([x["methods"][n]["near"]["epochs_to_target"] for x in seeds]),
                "reached_near_every_seed": all(x["methods"][n]["near"]["reached"] for x in seeds),
                "ratio_any_epoch": interval([x["methods"][n]["epochs_to_target_any_epoch"]
                                             / x["methods"]["random"]["epochs_to_target_any_epoch"] for x in seeds]),
                "trials": interval([x["methods"][n]["trials"] for x in seeds]),
                "best_val_at_budget": {f"{f:g}": interval([x["methods"][n]["best_at_budget"][f"{f:g}"]["val"] or 0.0
                                                            for x in seeds]) for f in s["fractions"]},
                "best_test_at_budget": {f"{f:g}": interval([x["methods"][n]["best_at_budget"][f"{f:g}"]["test"] or 0.0
                                                             for x in seeds]) for f in s["fractions"]},
            }
        per_setting.append({"grace_period": grace, "reduction_factor": factor, "summary": summary, "per_seed": seeds})
    doc["results"] = per_setting
    doc["floor"] = {"ratio": interval([f["ratio"] for f in floors.values()]), "per_seed": list(floors.values())}
    doc["total_seconds"] = time.perf_counter() - started
    return doc


# --- live check -------------------------------------------------------------------------------

def table_trainable(config: dict, *, base: dict, cache_dir: str | None = None, table_file: str, scale: float) -> None:
    """Ray function trainable replaying the nearest table configuration's curve, each epoch sleeping
    its recorded time x ``scale`` (cloudpickled by value from this script)."""
    import time as _time

    import pandas as _pd
    from ray import tune

    from replay_policies import CurveTable as _Table
    from replay_policies import flat_params
    from mgfa_ray.search.space import load_search_space as _load

    tab = _Table.from_frame(_pd.read_parquet(table_file), space=_load(SPACE))
    params = {k: v for k, v in flat_params(config).items() if k in tab.params[0]}
    curve = tab.curve_for(params)
    for epoch, (value, seconds) in enumerate(zip(curve.values, curve.epoch_seconds, strict=True), 1):
        _time.sleep(seconds * scale)
        tune.report({"eval_top1": value, "table_config": int(curve.key), "epoch": epoch})


def live_check(s: dict[str, Any]) -> dict[str, Any]:
    """One live search (Ray Tune, StudySearch + StudyScheduler) on the table against its simulation."""
    import ray
    import yaml

    from mgfa_ray.config import SearchConfig, TrainConfig
    from mgfa_ray.search.driver import create_search, run_search
    from mgfa_ray.search.study import StudyRef

    grace, factor = s["grace"][0], s["factor"][0]
    space_doc = yaml.safe_load(SPACE.read_text())
    space_doc["scheduler"].update(grace_period=grace, reduction_factor=factor, early_stopping=True)
    work = Path(tempfile.mkdtemp(prefix="mgfa-live-check-"))
    space_file = work / "space.yaml"
    space_file.write_text(yaml.safe_dump(space_doc))
    space = load_search_space(space_file)
    table = CurveTable.from_frame(pd.read_parquet(s["table"]), space=space)
    seed = s["seeds"][0]
    search = SearchConfig(space=str(space_file), num_samples=s["live_trials"], max_concurrent=s["workers"],
                          cpus_per_trial=1, seed=seed, sampler="tpe", max_failures=0)
    base = TrainConfig(manifest="table", masks="table", weights=None)
    search_dir = create_search(name="live", space=space, space_file=str(space_file), search=search, base=base,
                               storage_path=str(work / "searches"))
    ray.init(num_cpus=s["workers"], include_dashboard=False, configure_logging=False)
    t0 = time.time()
    run_search(search_dir, trainable=functools.partial(table_trainable, table_file=str(Path(s["table"]).resolve()),
                                                       scale=s["scale"]))
    wall = time.time() - t0
    ray.shutdown()
    from mgfa_ray.search.driver import read_record

    rec = read_record(search_dir)
    study = StudyRef(rec.study.storage, rec.study.study_name).load()
    live = [(table.nearest(t.params), len(t.intermediate_values), t.state.name) for t in study.trials]
    policy = StudyPolicy(table, sampler=optuna.samplers.TPESampler(seed=seed, multivariate=True),
                         asha=Asha(grace_period=grace, reduction_factor=factor))
    _, runs = simulate(policy, workers=s["workers"], max_trials=s["live_trials"])
    sim = [(table.nearest(t.params), len(t.intermediate_values), t.state.name) for t in policy.study.trials]
    same = [a == b for a, b in zip(live, sim, strict=True)]
    first_diff = same.index(False) if False in same else None
    doc = new_document("search_efficiency_live_check", settings={"grace": grace, "factor": factor, "seed": seed,
                                                                 "workers": s["workers"], "trials": s["live_trials"],
                                                                 "scale": s["scale"]}, measured={
        "what": "a live Ray Tune search (mgfa_ray.search.driver.run_search: StudySearch + StudyScheduler, TPE seed, ASHA) whose "
                "trainable replays the nearest table configuration's curve, each epoch sleeping its recorded time x "
                "scale, against mgfa_ray.search.replay.simulate of the same method and seed; per trial (table config, epochs "
                "run, Optuna state) compared in trial order; proposals agree while the results reached the sampler in "
                "the same order"})
    doc.update(live=live, simulated=sim, agreeing_trials=sum(same), trials=len(same), first_difference=first_diff,
               live_epochs=sum(x[1] for x in live), simulated_epochs=sum(x[1] for x in sim), live_wall_seconds=wall)
    return doc


def _shown(path: Path) -> str:
    """``path`` relative to the repository when inside it (JSON that holds no machine's paths)."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def log(msg: str) -> None:
    print(f"[search_efficiency] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> tuple[str, dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("action", choices=["record", "compare", "live-check"], nargs="?", default="compare")
    p.add_argument("search_dir", nargs="?", help="record: the finished table search")
    p.add_argument("--preset", choices=["smoke", "full"], default="full")
    p.add_argument("--partial", action="store_true", help="record: the trials finished so far only")
    p.add_argument("--table", type=Path, default=TABLE)
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--workers", type=int, default=4, help="simulated workers (default 4)")
    p.add_argument("--budget-trials", type=int, help="budget in whole trials: epochs = this x max_epochs (default 100)")
    p.add_argument("--grace", type=int, nargs="+", help="ASHA first rungs to compare (default 2: default.yaml's tenth)")
    p.add_argument("--factor", type=int, nargs="+", help="ASHA reduction factors (default 3)")
    p.add_argument("--methods", nargs="+", help="only these methods (random is always run)")
    p.add_argument("--tolerance", type=float, default=0.05, help="near target = target - this (default 0.05)")
    p.add_argument("--live-trials", type=int, default=24)
    p.add_argument("--scale", type=float, default=0.1, help="live-check: sleep = recorded epoch time x scale")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    smoke = a.preset == "smoke"
    s = {"table": a.table, "seeds": a.seeds or ([0] if smoke else [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]),
         "workers": a.workers, "budget_trials": a.budget_trials or (10 if smoke else 100),
         "grace": a.grace or [2], "factor": a.factor or [3], "fractions": [0.125, 0.25, 0.5, 1.0],
         "methods": ["random", *a.methods] if a.methods else None, "tolerance": a.tolerance, "live_trials": a.live_trials, "scale": a.scale,
         "search_dir": a.search_dir, "partial": a.partial}
    s["out"] = a.out or (OUT if a.action == "compare" and not smoke else
                         OUT.with_name("search_efficiency_live_check.json") if a.action == "live-check" else
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
    doc = compare(s) if action == "compare" else live_check(s)
    atomic_write_json(s["out"], doc)
    log(f"wrote {s['out']}")


if __name__ == "__main__":
    main()
