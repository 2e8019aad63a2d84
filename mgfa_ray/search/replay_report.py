"""``mgfa-ray search replay DIR``: an earlier search's recorded trials replayed under other ASHA
settings, to choose the stopping policy on curves already paid for.

The trials are replayed in the order the search started them (Optuna trial number), each with the
configuration it had, on as many simulated workers as the search ran at once, every epoch taking
its recorded time (:func:`mgfa_ray.search.replay.simulate`, :class:`mgfa_ray.search.replay.SequencePolicy`). For
each setting the report gives what would have been stopped where, what kept to the end, the
epochs used and the best trial found. It is exact only where the curves exist: a trial the live
search stopped at epoch k has no epochs after k, so a policy that would keep it longer leaves it
"cut short" (its end is unknown, and it is not counted as found). The sampler is not replayed: a
search that stopped other trials would have proposed other configurations after the first few.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from mgfa_ray.search.asha import Asha
from mgfa_ray.search.replay import Curve, SequencePolicy, ray_epoch_seconds, simulate


@dataclass(frozen=True)
class RecordedTrial:
    """One trial of a finished search: its Optuna number and state, Optuna parameters and curve."""

    number: int
    state: str
    params: dict[str, Any]
    curve: Curve


def recorded_trials(search_dir: str) -> tuple[list[RecordedTrial], dict[str, Any]]:
    """Every trial of the search with at least one epoch, in start order, and the search's settings.

    Returns:
        ``(trials, info)``; ``info`` holds ``metric``, ``max_epochs``, ``max_concurrent``,
        ``grace_period``, ``reduction_factor``, ``early_stopping`` (the live settings),
        ``space`` (:class:`~mgfa_ray.search.space.SearchSpace`) and ``skipped`` (trials without epochs).

    Raises:
        ConfigError: No search at ``search_dir``.
    """
    from mgfa_ray.search.driver import ray_trials, read_record
    from mgfa_ray.search.study import RAY_TRIAL_ATTR, StudyRef, search_trials

    rec = read_record(search_dir)
    metric = rec.search.metric
    study = StudyRef(rec.study.storage, rec.study.study_name).load()
    by_ray = {t.user_attrs.get(RAY_TRIAL_ATTR): t for t in search_trials(study)}
    out, skipped = [], 0
    for row in ray_trials(search_dir).to_dict("records"):
        history, frozen = row["history"], by_ray.get(row["trial"])
        if history is None or not len(history) or frozen is None:
            skipped += 1
            continue
        test = [float(x) for x in history["test_top1"]] if "test_top1" in history else None
        curve = Curve(values=tuple(float(x) for x in history[metric]),
                      epoch_seconds=tuple(ray_epoch_seconds(history["time_total_s"])),
                      test=tuple(test) if test else None, key=frozen.number)
        out.append(RecordedTrial(number=frozen.number, state=frozen.state.name, params=dict(frozen.params),
                                 curve=curve))
    out.sort(key=lambda t: t.number)
    sched = rec.space.scheduler
    info = {"metric": metric, "max_epochs": rec.max_epochs, "max_concurrent": rec.search.max_concurrent,
            "grace_period": sched.grace_period, "reduction_factor": sched.reduction_factor,
            "early_stopping": sched.early_stopping, "space": rec.space, "skipped": skipped}
    return out, info


def replay_setting(trials: list[RecordedTrial], *, max_epochs: int, workers: int, grace_period: int | None,
                   reduction_factor: int, brackets: int = 1) -> dict[str, Any]:
    """One setting replayed on ``trials``: per trial the epochs it would run and why it ended.

    Args:
        trials: :func:`recorded_trials`.
        max_epochs: Epochs of a trial never stopped.
        workers: Trials at once.
        grace_period: ASHA's first rung (epochs); None replays without early stopping.
        reduction_factor: ASHA's reduction factor (>= 2).
        brackets: Asynchronous Hyperband brackets (>= 1), round robin.

    Returns:
        ``setting``, ``trials`` (``number``, ``epochs``, ``outcome`` in ``kept`` / ``stopped`` /
        ``cut_short``, ``final``: the value at its last epoch), ``epochs`` (total), ``compute_seconds``,
        ``wall_seconds`` (simulated), counts per outcome and ``best`` (the kept trial with the
        highest final value, exact).
    """
    asha = None if grace_period is None else Asha(grace_period=grace_period, reduction_factor=reduction_factor)
    policy = SequencePolicy([t.curve for t in trials], max_epochs=max_epochs, asha=asha, brackets=brackets)
    events, runs = simulate(policy, workers=workers, max_trials=len(trials))
    rows: list[dict[str, Any]] = []
    for run in runs:
        outcome = ("cut_short" if run.trial in policy.cut_short else "stopped" if run.stopped else "kept")
        rows.append({"number": trials[run.trial].number, "epochs": run.epochs, "outcome": outcome,
                     "final": run.values[-1]})
    kept = [r for r in rows if r["outcome"] == "kept" and r["epochs"] == max_epochs]
    best = max(kept, key=lambda r: r["final"], default=None)
    return {
        "setting": {"grace_period": grace_period, "reduction_factor": reduction_factor, "brackets": brackets,
                    "early_stopping": grace_period is not None},
        "trials": rows, "epochs": len(events),
        "compute_seconds": events[-1].compute_seconds if events else 0.0,
        "wall_seconds": events[-1].t if events else 0.0,
        **{outcome: sum(r["outcome"] == outcome for r in rows) for outcome in ("kept", "stopped", "cut_short")},
        "best": best,
    }


def replay_search(search_dir: str, *, grace_periods: list[int] | None = None,
                  reduction_factors: list[int] | None = None, brackets: list[int] | None = None,
                  workers: int | None = None) -> dict[str, Any]:
    """The live setting and every combination of the given ones replayed on the search's trials.

    Args:
        search_dir: A search directory or URI.
        grace_periods, reduction_factors, brackets: Settings to try (each defaults to the live one;
            brackets to 1); a grace period of 0 means no early stopping.
        workers: Trials at once (default: the search's ``max_concurrent``).

    Returns:
        ``search``, ``metric``, ``max_epochs``, ``workers``, ``live`` (the recorded trials as they
        ran: epochs per trial and state), ``settings`` (:func:`replay_setting` of each; the first is
        the live setting), ``skipped`` and ``note`` (what is exact).

    Raises:
        ValueError: A grace period above ``max_epochs``, a reduction factor below 2, brackets below 1.
        ConfigError: No search there.
    """
    trials, info = recorded_trials(search_dir)
    max_epochs = info["max_epochs"]
    live_grace = info["grace_period"] if info["early_stopping"] else 0
    grid = list(itertools.product(grace_periods or [live_grace], reduction_factors or [info["reduction_factor"]],
                                  brackets or [1]))
    for grace, factor, nb in grid:
        if not 0 <= grace <= max_epochs or factor < 2 or nb < 1:
            raise ValueError(f"replay setting grace_period={grace}, reduction_factor={factor}, brackets={nb}: need "
                             f"0 <= grace_period <= max_epochs ({max_epochs}), reduction_factor >= 2, brackets >= 1")
    live = (live_grace, info["reduction_factor"], 1)
    # without early stopping, factor and brackets mean nothing: one such setting
    grid = list(dict.fromkeys((g, f, b) if g else (0, info["reduction_factor"], 1) for g, f, b in grid))
    workers = workers or info["max_concurrent"]
    settings = [replay_setting(trials, max_epochs=max_epochs, workers=workers, grace_period=g or None,
                               reduction_factor=f, brackets=b) for g, f, b in [live, *[s for s in grid if s != live]]]
    return {
        "search": search_dir, "metric": info["metric"], "max_epochs": max_epochs, "workers": workers,
        "live": [{"number": t.number, "epochs": len(t.curve.values), "state": t.state} for t in trials],
        "settings": settings, "skipped": info["skipped"],
        "note": ("exact only where the curves exist: a trial the live search stopped has no epochs after its stop, "
                 "so a setting that would keep it longer leaves it cut_short (end unknown, not counted as found); "
                 "the sampler is not replayed (other stops would have led it to other configurations)"),
    }


def format_replay(report: dict[str, Any]) -> str:
    """The report as text: one line per setting, then the trials each stops differently from the live run."""
    lines = [f"search {report['search']}: {len(report['live'])} recorded trials, {report['max_epochs']} epochs max, "
             f"{report['workers']} at once; {report['metric']} maximised",
             f"{'grace':>5} {'factor':>6} {'brackets':>8} {'kept':>5} {'stopped':>7} {'cut short':>9} {'epochs':>7} "
             f"{'trial-h':>7} {'best trial':>10} {'best':>7}"]
    for s in report["settings"]:
        st, best = s["setting"], s["best"]
        grace = st["grace_period"] if st["early_stopping"] else "-"
        at_least = "≥" if s["cut_short"] else ""  # a cut-short curve's end is unknown: a lower bound
        lines.append(f"{grace!s:>5} {st['reduction_factor']:>6} {st['brackets']:>8} {s['kept']:>5} {s['stopped']:>7} "
                     f"{s['cut_short']:>9} {at_least + str(s['epochs']):>7} "
                     f"{at_least + format(s['compute_seconds'] / 3600, '.3f'):>7} "
                     f"{best['number'] if best else '-':>10} "
                     f"{format(best['final'], '.4f') if best else '-':>7}")
    live = {t["number"]: t["epochs"] for t in report["live"]}
    for i, s in enumerate(report["settings"]):
        changed = [f"{r['number']}:{live[r['number']]}→{r['epochs']}{'?' if r['outcome'] == 'cut_short' else ''}"
                   for r in s["trials"] if r["epochs"] != live[r["number"]] or r["outcome"] == "cut_short"]
        st = s["setting"]
        if changed:
            head = ("the live setting replayed differs from the live run (its results reached the driver in "
                    "another order than the recorded times give, or trials still run)" if i == 0 else
                    f"grace {st['grace_period']}, factor {st['reduction_factor']}, brackets {st['brackets']}")
            lines.append(f"{head}: trial:epochs live→replay " + ", ".join(changed))
    lines.append("note: " + report["note"] + " (`?`: cut short; `≥`: epochs and hours of a setting with cut-short "
                 "trials are lower bounds). trial-h: the recorded epoch and set-up seconds summed over trials, on "
                 "the machine and device the search ran on (CPU or GPU).")
    if report["skipped"]:
        lines.append(f"{report['skipped']} trial(s) without a recorded epoch are not replayed")
    return "\n".join(lines)

