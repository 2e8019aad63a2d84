"""The export's pictures of a search: every trial, pruned ones included (:func:`write_search_plots`).

Optuna's own plots draw COMPLETE trials only, which under ASHA hides most of a search (the main
job: one dot of 16 trials). These draw what ran:

* ``trial_curves.png`` — every trial's validation metric per epoch (the export's ``trial_epochs``
  table), coloured by final state, the scheduler's rungs as vertical lines, and each trial's stop
  point marked: ``x`` stopped at a rung (PRUNED), ``o`` ran ``max_epochs`` (COMPLETE), a square
  FAIL, a triangle still RUNNING;
* ``optimization_history.png`` — each trial's value by trial number: COMPLETE trials' final value,
  PRUNED trials' value where they were stopped (with its epoch), and the best COMPLETE value so far;
* ``param_importances.png`` — importances by PED-ANOVA (Optuna's default
  ``PedAnovaImportanceEvaluator``, deterministic, no scikit-learn) of the sampled parameters (Optuna's names: the simplex as its cuts ``simplex/u<i>``) for the
  metric at the first rung, which every trial reached, over all trials; beside them the same over
  COMPLETE trials' final values when at least two are COMPLETE;
* ``parallel_coordinate.png`` — Optuna's parallel coordinates of all trials at the first rung.

The first rung is the common ground: a PRUNED trial's last value is one or more epochs short of a
COMPLETE trial's, so mixing the two would rank parameters by how long their trials ran.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from mgfa_ray.storage import atomic_write_bytes

STATE_STYLE = {  # colour, stop marker
    "COMPLETE": ("tab:blue", "o"),
    "PRUNED": ("tab:orange", "x"),
    "FAIL": ("tab:red", "s"),
    "RUNNING": ("tab:green", "^"),
}


def write_search_plots(trials: list[FrozenTrial], table: pd.DataFrame, epochs: pd.DataFrame | None, *,
                       metric: str, rungs: list[int], out: Path) -> list[Path]:
    """Write the search's PNGs (module docstring) into ``out``, atomically; return their paths.

    Args:
        trials: The search's Optuna trials (:func:`mgfa_ray.search.study.search_trials`): parameters,
            distributions, state, value and one intermediate value per epoch.
        table: The export's ``trials`` table (``trial``, ``optuna_trial``, ``state``, ``epochs_run``).
        epochs: The export's ``trial_epochs`` table (``trial``, ``training_iteration``, ``metric``),
            or ``None`` when no epoch ran.
        metric: The search metric (e.g. ``eval_top1``, top-1 accuracy in [0, 1]).
        rungs: The scheduler's rungs and ``max_epochs`` (:func:`mgfa_ray.search.asha.rung_epochs`).
        out: Export directory.

    A plot that cannot be drawn (e.g. importances from fewer than two trials) is skipped with a
    printed line.
    """
    import matplotlib

    matplotlib.use("Agg")
    written = []
    for name, draw in (("trial_curves", lambda: _curves(table, epochs, metric, rungs)),
                       ("optimization_history", lambda: _history(table, trials, metric)),
                       ("param_importances", lambda: _importances(trials, metric, rungs[0])),
                       ("parallel_coordinate", lambda: _parallel(trials, metric, rungs[0]))):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
            try:
                fig = draw()
            except (ValueError, RuntimeError, ZeroDivisionError) as err:
                print(f"plot {name} skipped: {err}", flush=True)
                continue
        written.append(_save(fig, out / f"{name}.png"))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _curves(table: pd.DataFrame, epochs: pd.DataFrame | None, metric: str, rungs: list[int]):
    import matplotlib.pyplot as plt

    if epochs is None or not len(epochs):
        raise ValueError("no trial reported an epoch")
    fig, ax = plt.subplots(figsize=(10, 6))
    for m in rungs[:-1]:
        ax.axvline(m, color="0.8", lw=1, ls="--", zorder=0)
    state_of = dict(zip(table["trial"], table["state"]))
    number_of = dict(zip(table["trial"], table["optuna_trial"]))
    seen = set()
    for rid, curve in epochs.sort_values("training_iteration").groupby("trial", sort=False):
        state = state_of.get(rid, "RUNNING")
        colour, marker = STATE_STYLE.get(state, ("tab:gray", "."))
        x, y = curve["training_iteration"].to_numpy(), curve[metric].to_numpy()
        ax.plot(x, y, color=colour, alpha=0.6, lw=1.2)
        ax.plot(x[-1:], y[-1:], marker=marker, color=colour, ms=8, ls="none",
                label=None if state in seen else f"{state} ({sum(s == state for s in state_of.values())})")
        seen.add(state)
        if state == "PRUNED" or len(state_of) <= 20:
            ax.annotate(str(number_of.get(rid, "")), (x[-1], y[-1]), textcoords="offset points", xytext=(4, 2),
                        fontsize=7, color=colour)
    ax.set_xticks(sorted({*rungs, *range(1, rungs[-1] + 1, max(1, rungs[-1] // 12))}))
    ax.set_xlabel("epoch (dashed: the scheduler's rungs)")
    ax.set_ylabel(metric)
    ax.set_title(f"every trial's {metric} per epoch ({len(state_of)} trials; end marker: where it stopped, "
                 "labelled with its Optuna trial number)", fontsize=10)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    return fig


def _history(table: pd.DataFrame, trials: list[FrozenTrial], metric: str):
    import matplotlib.pyplot as plt

    if not trials:
        raise ValueError("no trial")
    fig, ax = plt.subplots(figsize=(10, 6))
    for state in ("COMPLETE", "PRUNED", "FAIL", "RUNNING"):
        pts = [(t.number, *_last(t)) for t in trials if t.state.name == state and t.intermediate_values]
        if not pts:
            continue
        colour, marker = STATE_STYLE[state]
        label = {"COMPLETE": "COMPLETE: final value", "PRUNED": "PRUNED: value where stopped (epoch)",
                 "FAIL": "FAIL: last value", "RUNNING": "RUNNING: value so far"}[state]
        ax.scatter([p[0] for p in pts], [p[2] for p in pts], color=colour, marker=marker, s=45,
                   label=f"{label} ({len(pts)})", zorder=3)
        if state == "PRUNED":
            for number, step, value in pts:
                ax.annotate(f"e{step}", (number, value), textcoords="offset points", xytext=(4, -10), fontsize=7,
                            color=colour)
    done = sorted((t.number, t.value) for t in trials if t.state == TrialState.COMPLETE and t.value is not None)
    if done:
        best, xs, ys = float("-inf"), [], []
        for number, value in done:
            best = max(best, value)
            xs.append(number)
            ys.append(best)
        ax.step(xs + [max(t.number for t in trials)], ys + ys[-1:], where="post", color="tab:blue", alpha=0.5,
                label="best COMPLETE so far")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("Optuna trial number")
    ax.set_ylabel(metric)
    ax.set_title(f"search history: all {len(trials)} trials", fontsize=10)
    ax.legend(loc="best")
    ax.grid(alpha=0.3)
    return fig


def _last(t: FrozenTrial) -> tuple[int, float]:
    step = max(t.intermediate_values)
    return step, t.intermediate_values[step]


def _study_at(trials: list[FrozenTrial], epoch: int | None) -> optuna.Study:
    """An in-memory study of ``trials`` as COMPLETE with their value at ``epoch`` (all trials that
    reached it) or, ``epoch=None``, the COMPLETE trials' final values."""
    study = optuna.create_study(direction="maximize")
    for t in trials:
        if epoch is None:
            value = t.value if t.state == TrialState.COMPLETE else None
        else:
            value = t.intermediate_values.get(epoch)
        if value is None or not t.params or value != value:  # no value, or NaN
            continue
        study.add_trial(optuna.trial.create_trial(params=t.params, distributions=t.distributions, value=value))
    return study


def _importances(trials: list[FrozenTrial], metric: str, first_rung: int):
    import matplotlib.pyplot as plt
    import numpy as np

    evaluator = optuna.importance.PedAnovaImportanceEvaluator()
    series = {}
    at_rung = _study_at(trials, first_rung)
    if len(at_rung.trials) < 2:
        raise ValueError(f"fewer than 2 trials reached epoch {first_rung}")
    series[f"all {len(at_rung.trials)} trials, {metric} at epoch {first_rung} (first rung)"] = \
        optuna.importance.get_param_importances(at_rung, evaluator=evaluator)
    final = _study_at(trials, None)
    if len(final.trials) >= 2:
        series[f"{len(final.trials)} COMPLETE trials, final {metric}"] = \
            optuna.importance.get_param_importances(final, evaluator=evaluator)
    names = list(next(iter(series.values())))[::-1]  # most important on top
    fig, ax = plt.subplots(figsize=(10, max(3, 0.6 * len(names) * len(series) + 1.5)))
    height = 0.8 / len(series)
    for i, (label, imp) in enumerate(series.items()):
        y = np.arange(len(names)) + i * height
        ax.barh(y, [imp.get(n, 0.0) for n in names], height=height, label=label)
    ax.set_yticks(np.arange(len(names)) + height * (len(series) - 1) / 2)
    ax.set_yticklabels([n + (" (simplex cut)" if n.startswith("simplex/") else "") for n in names])
    ax.set_xlabel("PED-ANOVA importance (normalised to sum to 1 per series)")
    ax.set_title("parameter importances", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3, axis="x")
    return fig


def _parallel(trials: list[FrozenTrial], metric: str, first_rung: int):
    import optuna.visualization.matplotlib as ovm
    from matplotlib.figure import Figure

    study = _study_at(trials, first_rung)
    if not study.trials:
        raise ValueError(f"no trial reached epoch {first_rung}")
    ax = ovm.plot_parallel_coordinate(study, target_name=f"{metric} at epoch {first_rung}")
    fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
    if not isinstance(fig, Figure):  # a subfigure's axes: size the figure that holds it
        fig = fig.get_figure(root=True)
    fig.set_size_inches(10, 6)
    ax.set_title(f"parallel coordinates: all {len(study.trials)} trials, {metric} at epoch {first_rung} (first rung)")
    return fig


def figure_png(fig, axes, *, title: str) -> bytes:
    """Finish a figure of image panels (axes off, title, tight layout) and return it as PNG bytes."""
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
