"""Search methods for the replay simulator (:func:`mgfa_ray.search.replay.simulate`), used by
``benchmarks/search_efficiency.py`` and its tests only, so they are not shipped in the package: a
table of recorded learning curves (:class:`CurveTable`), the project's Optuna + ASHA search
(:class:`StudyPolicy`) and Ray's stock ``OptunaSearch`` + ``ASHAScheduler`` (:class:`RayStockPolicy`),
each proposal mapped to the nearest configuration of the table *not yet run in this search*: no
search ever replays a curve twice (a real search would train a second point there and get a curve of
its own, not a copy of the first), so a search ends when it has run every configuration of the table
(:attr:`Unrun.exhausted`; simulate with ``max_trials=len(table.curves)``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import optuna
import pandas as pd
from optuna.trial import TrialState

from mgfa_ray.search.asha import Asha, rung_attrs, rung_values
from mgfa_ray.search.replay import Curve, bracket_rules, ray_epoch_seconds
from mgfa_ray.search.space import SIMPLEX_KEY, Categorical, IntRange, LogUniform, SearchSpace, Uniform

PARAM_PREFIX = "param/"


SIMPLEX_PREFIX = f"{SIMPLEX_KEY}/u"


BRACKET_ATTR = "asha_bracket"


def _unit(space: SearchSpace, params: dict[str, Any]) -> np.ndarray:
    """``params`` (Optuna names) → coordinates in [0, 1] (categoricals one-hot, simplex cuts sorted)."""
    out: list[float] = []
    for name, dist in space.parameters.items():
        if isinstance(dist, LogUniform):
            out.append((math.log(params[name]) - math.log(dist.low)) / (math.log(dist.high) - math.log(dist.low)))
        elif isinstance(dist, Uniform):
            out.append((params[name] - dist.low) / (dist.high - dist.low))
        elif isinstance(dist, IntRange):
            lo, hi, x = ((math.log(v) for v in (dist.low, dist.high, params[name])) if dist.log
                         else (dist.low, dist.high, params[name]))
            out.append((x - lo) / (hi - lo) if hi > lo else 0.0)
        elif isinstance(dist, Categorical):
            out += [float(params[name] == c) / math.sqrt(2) for c in dist.choices]
    if space.simplex:
        out += sorted(float(params[f"{SIMPLEX_PREFIX}{i}"]) for i in range(len(space.simplex) - 1))
    return np.asarray(out, dtype=np.float64)


def flat_params(config: dict[str, Any]) -> dict[str, Any]:
    """A config as Ray's OptunaSearch returns it (``{"simplex": {"u0": …}}``) → Optuna names."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update({f"{key}/{k}": v for k, v in flat_params(value).items()})
        else:
            out[key] = value
    return out


@dataclass(frozen=True)
class CurveTable:
    """Recorded configurations of one search space and their curves (see the module docstring).

    Attributes:
        space: The search space the configurations were sampled from.
        curves: One :class:`Curve` per configuration.
        params: Each configuration's Optuna parameters (same order as ``curves``).
    """

    space: SearchSpace
    curves: tuple[Curve, ...]
    params: tuple[dict[str, Any], ...]
    _coords: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if not self.curves or len(self.curves) != len(self.params):
            raise ValueError(f"a curve table needs one parameter set per curve, got {len(self.curves)} curves and "
                             f"{len(self.params)} parameter sets")
        object.__setattr__(self, "_coords", np.stack([_unit(self.space, p) for p in self.params]))

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, *, space: SearchSpace, metric: str = "eval_top1",
                   test_metric: str | None = "test_top1", clock: str = "ray") -> CurveTable:
        """A table from its long form: one row per (``config``, ``epoch``) with ``metric``, the
        clock's columns and ``param/<name>`` columns (the Parquet file that
        ``benchmarks/search_efficiency.py record`` writes).

        Args:
            clock: ``ray``: an epoch costs the difference of Ray's ``time_total_s`` (set-up in the
                first; evaluation, checkpoint and report in each), ``trial``: the trial function's
                ``epoch_seconds`` after ``setup_seconds``.

        Raises:
            ValueError: A configuration whose epochs are not 1..n, a missing column, an unknown clock.
        """
        if clock not in ("ray", "trial"):
            raise ValueError(f"clock must be 'ray' or 'trial', got {clock!r}")
        needed = {"config", "epoch", metric, *(("time_total_s",) if clock == "ray" else ("epoch_seconds", "setup_seconds"))}
        if missing := needed - set(frame.columns):
            raise ValueError(f"curve table lacks the columns {sorted(missing)}")
        pcols = [c for c in frame.columns if c.startswith(PARAM_PREFIX)]
        curves, params = [], []
        for key, rows in frame.sort_values(["config", "epoch"]).groupby("config", sort=True):
            if list(rows["epoch"]) != list(range(1, len(rows) + 1)):
                raise ValueError(f"curve table: configuration {key!r} has epochs {list(rows['epoch'])}, not 1..n")
            test = tuple(map(float, rows[test_metric])) if test_metric and test_metric in rows else None
            if clock == "ray":
                seconds, setup = ray_epoch_seconds(rows["time_total_s"]), 0.0
            else:
                seconds, setup = list(map(float, rows["epoch_seconds"])), float(rows["setup_seconds"].iloc[0])
            curves.append(Curve(values=tuple(map(float, rows[metric])), epoch_seconds=tuple(seconds),
                                setup_seconds=setup, test=test, key=key))
            first = rows.iloc[0]
            params.append({c[len(PARAM_PREFIX):]: _plain(first[c]) for c in pcols})
        return cls(space=space, curves=tuple(curves), params=tuple(params))

    def nearest(self, params: dict[str, Any], exclude: Collection[int] = ()) -> int:
        """Index of the recorded configuration nearest to ``params`` (Optuna names; ties: lowest
        index) among those not in ``exclude`` (indices).

        Raises:
            ValueError: ``exclude`` holds every configuration.
        """
        d = np.linalg.norm(self._coords - _unit(self.space, params)[None, :], axis=1)
        if exclude:
            if len(set(exclude)) >= len(d):
                raise ValueError(f"every one of the table's {len(d)} configurations has been run")
            d[list(exclude)] = np.inf
        return int(np.argmin(d))

    def curve_for(self, params: dict[str, Any]) -> Curve:
        """The recorded curve answering a proposal (:meth:`nearest`)."""
        return self.curves[self.nearest(params)]


class Unrun:
    """The table's configurations a search has not run yet: :meth:`take` maps a proposal to the
    nearest of them and marks it run, so that no curve is replayed twice in one search."""

    def __init__(self, table: CurveTable):
        self.table, self.run = table, []

    @property
    def exhausted(self) -> bool:
        """Every configuration has been run (the search must end)."""
        return len(self.run) >= len(self.table.curves)

    def take(self, params: dict[str, Any]) -> Curve:
        """The curve answering ``params``: the nearest configuration not run yet, now marked run.

        Raises:
            ValueError: The table is exhausted.
        """
        index = self.table.nearest(params, exclude=self.run)
        self.run.append(index)
        return self.table.curves[index]


def _plain(value: Any) -> Any:
    """numpy scalars → Python (Optuna compares categorical choices by ==, JSON needs plain types)."""
    return value.item() if hasattr(value, "item") else value


class StudyPolicy:
    """This project's search on a curve table: the study's sampler proposes (through
    :func:`mgfa_ray.search.study.sample_config`, as :class:`~mgfa_ray.search.searcher.StudySearch` does), the table
    answers, :class:`~mgfa_ray.search.asha.Asha` decides after every epoch with its rungs recorded as user
    attributes, a stopped trial is told PRUNED and a finished one COMPLETE with its last value (as
    :class:`~mgfa_ray.search.scheduler.StudyScheduler` does). ``asha=None``: no early stopping.
    Each proposal is answered by the nearest configuration not yet run (:class:`Unrun`; its index in
    the user attribute ``table_config``); the study keeps the proposed parameters.

    Args:
        table: The recorded curves.
        sampler: An Optuna sampler (e.g. :func:`mgfa_ray.search.study.make_sampler`).
        asha: The stopping rule, or None.
        enqueue: Points the study tries first (Optuna parameter names, e.g.
            :meth:`SearchSpace.optuna_points`).
        rung_value: What ASHA ranks at the rungs instead of the reported value:
            ``(curve key, epoch, the trial's values so far) -> float`` (maximised); the study still
            records the reported values. None: the reported value.
        brackets: Round-robin brackets (trial ``i`` in bracket ``i % brackets``, first rung
            ``grace_period * reduction_factor ** bracket``, rungs compared within a bracket: the
            asynchronous Hyperband of Li et al., MLSys 2020); 1: plain ASHA.
        rung_model: BOHB-style proposals (Falkner et al., ICML 2018): ``trial index -> sampler``
            fit on the highest rung holding at least ``rung_model_min`` values (see
            ``_rung_model_point``); None from it lets the study's own sampler propose that trial.

    Raises:
        ValueError: ``brackets`` below 1.
    """

    def __init__(self, table: CurveTable, *, sampler: optuna.samplers.BaseSampler, asha: Asha | None,
                 enqueue: Sequence[dict[str, Any]] = (), rung_value: Callable[[Any, int, list[float]], float] | None = None,
                 brackets: int = 1, rung_model: Callable[[int], optuna.samplers.BaseSampler] | None = None,
                 rung_model_min: int = 10):
        from mgfa_ray.search.study import sample_config

        if brackets < 1:
            raise ValueError(f"brackets must be >= 1, got {brackets}")
        self._sample = sample_config
        self.table, self.rung_value, self.brackets = table, rung_value, brackets
        self.rules = bracket_rules(asha, brackets)
        self.rung_model, self.rung_model_min = rung_model, rung_model_min
        self.study = optuna.create_study(direction="maximize", sampler=sampler)
        for point in enqueue:
            self.study.enqueue_trial(point, skip_if_exists=True)
        self._trials: dict[int, optuna.trial.Trial] = {}
        self._lengths: dict[int, int] = {}
        self._keys: dict[int, Any] = {}
        self._values: dict[int, list[float]] = {}
        self.unrun = Unrun(table)

    def _rung_model_point(self, trial: int) -> dict[str, Any] | None:
        """BOHB-style proposal: a fresh sampler (``rung_model(trial)``; None: the study's own) fit on the values at the
        highest rung holding at least ``rung_model_min`` of them (every trial that reached it,
        COMPLETE with its rung value); None while no rung holds enough."""
        trials = self.study.get_trials(deepcopy=False)
        by_rung: dict[int, list[tuple[optuna.trial.FrozenTrial, float]]] = {}
        for t in trials:
            for rung, v in rung_values(t).items():
                by_rung.setdefault(rung, []).append((t, v))
        full = [(t, t.value) for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
        levels = sorted(by_rung.items(), reverse=True)
        if len(full) >= self.rung_model_min:
            levels.insert(0, (len(levels), full))
        chosen = next((obs for _, obs in levels if len(obs) >= self.rung_model_min), None)
        assert self.rung_model is not None
        sampler = None if chosen is None else self.rung_model(trial)
        if chosen is None or sampler is None:  # too few values yet, or rung_model asks for the study's own sampler
            return None
        shadow = optuna.create_study(direction="maximize", sampler=sampler)
        shadow.add_trials([optuna.trial.create_trial(params=t.params, distributions=t.distributions, value=v)
                           for t, v in chosen])
        ask = shadow.ask()
        self._sample(ask, self.table.space)
        return dict(ask.params)

    def start(self, trial: int) -> Curve:
        if self.rung_model is not None and (point := self._rung_model_point(trial)) is not None:
            self.study.enqueue_trial(point)
        ask = self.study.ask()
        self._sample(ask, self.table.space)
        if self.brackets > 1:
            ask.set_user_attr(BRACKET_ATTR, trial % self.brackets)
        self._trials[trial] = ask
        curve = self.unrun.take(ask.params)
        ask.set_user_attr("table_config", self.unrun.run[-1])
        self._lengths[trial], self._keys[trial], self._values[trial] = len(curve.values), curve.key, []
        return curve

    def result(self, trial: int, epoch: int, value: float) -> bool:
        ask = self._trials[trial]
        ask.report(value, epoch)
        self._values[trial].append(value)
        bracket = trial % self.brackets
        rule = self.rules[bracket]
        if rule is None or epoch >= self._lengths[trial]:  # no ASHA; or the last epoch completes the trial
            return False
        trials = self.study.get_trials(deepcopy=False)
        if self.brackets > 1:
            trials = [t for t in trials if t.user_attrs.get(BRACKET_ATTR) == bracket]
        signal = None if self.rung_value is None else self.rung_value(self._keys[trial], epoch, self._values[trial])
        stop, rungs = rule.decide(next(t for t in trials if t.number == ask.number), trials, signal)
        for key, v in rung_attrs(rungs).items():
            ask.set_user_attr(key, v)
        return stop

    def complete(self, trial: int, epoch: int, value: float, stopped: bool) -> None:
        ask = self._trials.pop(trial)
        if stopped:
            self.study.tell(ask, state=TrialState.PRUNED)
        else:
            self.study.tell(ask, value)


class RayStockPolicy:
    """Ray Tune's stock combination on a curve table: ``OptunaSearch`` (its default sampler, TPE
    seeded by ``seed``) over the same define-by-run space, ``ASHAScheduler`` (``brackets``, grace
    period, reduction factor, ``max_t``), each told what Tune's controller tells it: every result to
    both, and at a trial's end ``on_trial_complete`` with its last result — so a trial ASHA stopped
    reaches the study COMPLETE with its early value, as it does in a Ray Tune run. As in Tune's
    controller (``TuneController._process_trial_result``, ``stop_trial``), a result the scheduler
    answers STOP is not passed to the searcher's ``on_trial_result``, and every trial end reaches
    both ``on_trial_complete`` methods.
    ``ASHAScheduler`` picks a trial's bracket with numpy's global generator: seed it for a
    reproducible replay. Each proposal is answered by the nearest configuration not yet run
    (:class:`Unrun`). ``sampler``: another Optuna sampler for ``OptunaSearch`` (None: its default,
    TPE with Optuna's 10 start-up trials, seeded by ``seed``).
    """

    def __init__(self, table: CurveTable, *, seed: int, grace_period: int, reduction_factor: int, max_t: int,
                 brackets: int = 1, metric: str = "eval_top1", points_to_evaluate: list[dict[str, Any]] | None = None,
                 sampler: optuna.samplers.BaseSampler | None = None):
        import functools

        from ray.tune.schedulers import ASHAScheduler
        from ray.tune.search.optuna import OptunaSearch

        from mgfa_ray.compat import scheduler_trial
        from mgfa_ray.search.space import define_by_run

        self.table, self.metric, self.max_t, self._trial = table, metric, max_t, scheduler_trial
        storage = optuna.storages.InMemoryStorage()
        self.searcher = OptunaSearch(space=functools.partial(define_by_run, space=table.space), metric=metric,
                                     mode="max", seed=None if sampler is not None else seed, sampler=sampler,
                                     points_to_evaluate=points_to_evaluate,
                                     study_name="ray-stock", storage=storage)
        self.study = optuna.load_study(study_name="ray-stock", storage=storage)
        # Any: called with no TuneController, which the ASHA family never reads (compat.scheduler_trial)
        self.scheduler: Any = ASHAScheduler(time_attr="training_iteration", metric=metric, mode="max", max_t=max_t,
                                            grace_period=grace_period, reduction_factor=reduction_factor,
                                            brackets=brackets)
        self.unrun = Unrun(table)

    def _id(self, trial: int) -> str:
        return f"t{trial:05d}"

    def start(self, trial: int) -> Curve:
        config = self.searcher.suggest(self._id(trial))
        assert config is not None, "OptunaSearch ended without a trial limit"
        self.scheduler.on_trial_add(None, self._trial(self._id(trial)))
        return self.unrun.take(flat_params(config))

    def _result(self, epoch: int, value: float) -> dict[str, Any]:
        return {self.metric: value, "training_iteration": epoch}

    def result(self, trial: int, epoch: int, value: float) -> bool:
        res = self._result(epoch, value)
        decision = self.scheduler.on_trial_result(None, self._trial(self._id(trial)), res)
        if decision != "STOP":
            self.searcher.on_trial_result(self._id(trial), res)
        return decision == "STOP" and epoch < self.max_t  # at max_t Ray's STOP ends a trial that ran its course

    def complete(self, trial: int, epoch: int, value: float, stopped: bool) -> None:
        res = self._result(epoch, value)
        self.scheduler.on_trial_complete(None, self._trial(self._id(trial)), res)
        self.searcher.on_trial_complete(self._id(trial), res)
