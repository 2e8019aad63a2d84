"""Replaying recorded learning curves: a simulator of asynchronous search workers.

The tabulated-benchmark method (HPOBench; Syne Tune's blackbox repository): learning curves are
recorded once — every configuration of a table trained for the whole schedule through this
project's trial function — and a search is then replayed on them in simulated time. Each of
``workers`` workers runs one trial at a time; a trial's epoch ``e`` finishes its recorded
``epoch_seconds`` after epoch ``e - 1`` (the first after its ``setup_seconds``); results reach the
search policy in the order they finish, as they reach a Ray Tune driver; a policy stops a trial
after any epoch, and the freed worker starts the next trial at once.

Policies (:class:`Policy`): :class:`SequencePolicy` replays a fixed sequence of recorded trials
(``mgfa-ray search replay``), with no, one or several ASHA brackets (:func:`bracket_rules`). The
search methods the efficiency benchmark compares on a table of curves (this project's study, Ray's
stock ``OptunaSearch`` + ``ASHAScheduler``) are policies too; they live with that benchmark, in
``benchmarks/replay_policies.py``, not in the package.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any, Protocol

import optuna
from optuna.trial import TrialState

from mgfa_ray.search.asha import Asha, rung_attrs

"""Columns ``param/<name>`` of a curve table hold a configuration's Optuna parameters."""


"""User attribute of :class:`StudyPolicy` with ``brackets`` > 1: the trial's bracket."""


@dataclass(frozen=True)
class Curve:
    """One configuration's recorded learning curve.

    Attributes:
        values: The maximised metric after epochs 1..n (e.g. validation top-1 in [0, 1]).
        epoch_seconds: Seconds each epoch took (same length as ``values``), > 0.
        setup_seconds: Seconds before the first epoch (process start, data load).
        test: Optional second metric per epoch (e.g. test top-1), reported, never searched on.
        key: The configuration's id in its table (or the recorded trial's id).
    """

    values: tuple[float, ...]
    epoch_seconds: tuple[float, ...]
    setup_seconds: float = 0.0
    test: tuple[float, ...] | None = None
    key: Any = None

    def __post_init__(self):
        if not self.values or len(self.epoch_seconds) != len(self.values):
            raise ValueError(f"curve {self.key!r}: {len(self.values)} values and {len(self.epoch_seconds)} "
                             "epoch times; need as many, at least one")


def ray_epoch_seconds(time_total_s) -> list[float]:
    """Per-epoch seconds as the worker spent them: differences of Ray's ``time_total_s`` (the
    first includes the trial's set-up; each its evaluation, checkpoint and report)."""
    total = [float(x) for x in time_total_s]
    return [max(b - a, 1e-9) for a, b in zip([0.0, *total], total)]


class Policy(Protocol):
    """A search as the simulator drives it (one call per event, in simulated-time order)."""

    def start(self, trial: int) -> Curve:
        """Choose the configuration of new trial ``trial`` (0, 1, …)."""

    def result(self, trial: int, epoch: int, value: float) -> bool:
        """The trial's value after ``epoch``; True stops it early (never at the trial's last epoch)."""

    def complete(self, trial: int, epoch: int, value: float, stopped: bool) -> None:
        """The trial ended after ``epoch`` (``stopped``: by the policy; else its curve ran out)."""


@dataclass(frozen=True)
class Event:
    """One finished epoch: simulated time ``t`` (seconds), ``cumulative_epochs`` (1-based, in time
    order), ``compute_seconds`` (all workers' busy seconds so far, set-up included)."""

    t: float
    trial: int
    epoch: int
    value: float
    test: float | None
    cumulative_epochs: int
    compute_seconds: float
    key: Any


@dataclass
class SimulatedTrial:
    """A simulated trial: its configuration key, epochs run, and whether the policy stopped it."""

    trial: int
    key: Any
    start: float
    epochs: int = 0
    stopped: bool = False
    values: list[float] = field(default_factory=list)
    max_epochs: int = 0


def simulate(policy: Policy, *, workers: int, max_trials: int | None = None,
             max_total_epochs: int | None = None) -> tuple[list[Event], list[SimulatedTrial]]:
    """Replay a search on recorded curves with ``workers`` asynchronous workers.

    Args:
        policy: The search (sampler and scheduler).
        workers: Trials at once, >= 1 (Ray Tune's ``max_concurrent_trials``).
        max_trials: Trials to start in all.
        max_total_epochs: Epoch budget: no epoch is run past it (at least one limit is needed).

    Returns:
        ``(events, trials)``: every finished epoch in time order (ties: lower trial first), and
        every started trial.

    Raises:
        ValueError: ``workers < 1`` or no limit.
    """
    if workers < 1 or (max_trials is None and max_total_epochs is None):
        raise ValueError(f"simulate needs workers >= 1 and a trial or epoch limit, got workers={workers}, "
                         f"max_trials={max_trials}, max_total_epochs={max_total_epochs}")
    heap: list[tuple[float, int, int]] = []
    runs: list[SimulatedTrial] = []
    curves: list[Curve] = []
    events: list[Event] = []
    busy = 0.0

    def launch(now: float) -> None:
        nonlocal busy
        if max_trials is not None and len(runs) >= max_trials:
            return
        if max_total_epochs is not None and len(events) + len(heap) >= max_total_epochs:
            return
        index = len(runs)
        curve = policy.start(index)
        runs.append(SimulatedTrial(trial=index, key=curve.key, start=now, max_epochs=len(curve.values)))
        curves.append(curve)
        busy += curve.setup_seconds
        heapq.heappush(heap, (now + curve.setup_seconds + curve.epoch_seconds[0], index, 1))

    for _ in range(workers):
        launch(0.0)
    while heap:
        now, index, epoch = heapq.heappop(heap)
        run, curve = runs[index], curves[index]
        value = curve.values[epoch - 1]
        busy += curve.epoch_seconds[epoch - 1]
        run.epochs, run.values = epoch, [*run.values, value]
        events.append(Event(t=now, trial=index, epoch=epoch, value=value,
                            test=curve.test[epoch - 1] if curve.test else None,
                            cumulative_epochs=len(events) + 1, compute_seconds=busy, key=curve.key))
        stop = policy.result(index, epoch, value)
        budget_left = max_total_epochs is None or len(events) + len(heap) < max_total_epochs
        if stop or epoch == len(curve.values) or not budget_left:
            run.stopped = stop
            policy.complete(index, epoch, value, stop)
            if budget_left:
                launch(now)
        else:
            heapq.heappush(heap, (now + curve.epoch_seconds[epoch], index, epoch + 1))
    return events, runs


def bracket_rules(asha: Asha | None, brackets: int) -> list[Asha | None]:
    """The stopping rule of each of ``brackets`` round-robin brackets: bracket ``b`` starts at rung
    ``grace_period · reduction_factor^b`` (asynchronous Hyperband); ``[None] * brackets`` without ASHA."""
    return [None if asha is None else Asha(grace_period=asha.rung_epoch(b), reduction_factor=asha.reduction_factor)
            for b in range(brackets)]


class SequencePolicy:
    """A fixed sequence of recorded trials (a finished search's, in the order they started) under
    an ASHA rule, for ``mgfa-ray search replay``: trial ``i`` gets ``curves[i]``; with ``brackets``
    > 1, trial ``i`` goes to bracket ``i mod brackets``, whose first rung is
    ``grace_period · reduction_factor^b`` (asynchronous Hyperband, Li et al. MLSys 2020, with a
    round-robin bracket instead of a random one). A recorded curve that ends before the policy
    would stop it (the live search stopped it earlier) cannot be replayed on: it ends there and is
    listed in :attr:`cut_short`.
    """

    def __init__(self, curves: list[Curve], *, max_epochs: int, asha: Asha | None, brackets: int = 1):
        if brackets < 1:
            raise ValueError(f"brackets must be >= 1, got {brackets}")
        self.curves, self.max_epochs, self.brackets = curves, max_epochs, brackets
        self.rules = bracket_rules(asha, brackets)
        self.studies = [optuna.create_study(direction="maximize") for _ in range(brackets)]
        self._trials: dict[int, optuna.trial.Trial] = {}
        self.cut_short: set[int] = set()

    def start(self, trial: int) -> Curve:
        self._trials[trial] = self.studies[trial % self.brackets].ask()
        return self.curves[trial]

    def result(self, trial: int, epoch: int, value: float) -> bool:
        study, rule, ask = self.studies[trial % self.brackets], self.rules[trial % self.brackets], self._trials[trial]
        ask.report(value, epoch)
        stop = False
        if rule is not None and epoch < self.max_epochs:
            trials = study.get_trials(deepcopy=False)
            stop, rungs = rule.decide(next(t for t in trials if t.number == ask.number), trials)
            for key, v in rung_attrs(rungs).items():
                ask.set_user_attr(key, v)
        if not stop and epoch == len(self.curves[trial].values) and epoch < self.max_epochs:
            self.cut_short.add(trial)
        return stop

    def complete(self, trial: int, epoch: int, value: float, stopped: bool) -> None:
        study, ask = self.studies[trial % self.brackets], self._trials.pop(trial)
        study.tell(ask, state=TrialState.PRUNED) if stopped else study.tell(ask, value)
