"""Asynchronous successive halving (ASHA; Li et al., MLSys 2020) over an Optuna study, with the rung
bookkeeping in user attributes the project owns.

A trial that reaches rung ``k`` — step ``grace_period · reduction_factorᵏ`` — records its value
there (user attribute ``asha_rung_<k>``) and goes on only when that value is in the top
``1/reduction_factor`` of the values recorded at rung ``k`` so far (among fewer than
``reduction_factor`` values, only when it is the best). The rule is Optuna's
``SuccessiveHalvingPruner`` with ``min_early_stopping_rate=0`` and ``bootstrap_count=0``, decision
for decision (Optuna keeps its rungs in its own internal system attributes, which this module
never reads; its ``min_resource`` is the grace period here). Because the rungs live in the study, a
driver restarted after a crash decides as the one before.

Ray Tune's ``ASHAScheduler`` is another variant: it stops a trial below the ``1 - 1/reduction_factor``
quantile of the values recorded at the rung, so the first trial to reach a rung always goes on,
where here a trial among fewer than ``reduction_factor`` values goes on only when it is the best.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from optuna.trial import FrozenTrial

RUNG_ATTR_PREFIX = "asha_rung_"
"""User attribute ``asha_rung_<k>``: the trial's value when it reached rung ``k``."""

STOP_ATTR = "asha_stopped_at"
"""User attribute: the step at which ASHA decided to stop the trial (a trial rerun from an earlier
checkpoint after a driver crash is stopped there again, whatever the rungs hold by then)."""


def rung_values(trial: FrozenTrial) -> dict[int, float]:
    """``{rung: value}`` recorded for ``trial`` (its ``asha_rung_<k>`` user attributes)."""
    return {int(k[len(RUNG_ATTR_PREFIX):]): float(v) for k, v in trial.user_attrs.items()
            if k.startswith(RUNG_ATTR_PREFIX) and k[len(RUNG_ATTR_PREFIX):].isdigit()}


def rung_attrs(values: dict[int, float]) -> dict[str, float]:
    """The user attributes recording ``{rung: value}``."""
    return {f"{RUNG_ATTR_PREFIX}{rung}": float(value) for rung, value in values.items()}


def is_rung_attr(key: str) -> bool:
    """Whether user attribute ``key`` is ASHA bookkeeping (a rung value or the stop step)."""
    return key.startswith(RUNG_ATTR_PREFIX) or key == STOP_ATTR


def _promotable(value: float, competing: list[float], reduction_factor: int) -> bool:
    """Whether ``value`` is in the top ``1/reduction_factor`` of ``competing`` (which holds it);
    among fewer than ``reduction_factor`` values, whether it is the best (maximising)."""
    index = max(len(competing) // reduction_factor - 1, 0)
    return value >= sorted(competing)[-(index + 1)]


@dataclass(frozen=True)
class Asha:
    """The ASHA rule, maximising.

    Attributes:
        grace_period: Steps (epochs) before the first rung (the grace period), >= 1.
        reduction_factor: Integer >= 2: the fraction ``1/reduction_factor`` goes on at each rung.
    """

    grace_period: int
    reduction_factor: int

    def __post_init__(self):
        if self.grace_period < 1 or self.reduction_factor < 2:
            raise ValueError(f"ASHA needs grace_period >= 1 and reduction_factor >= 2, got "
                             f"{self.grace_period} and {self.reduction_factor}")

    def rung_epoch(self, rung: int) -> int:
        """The step (epoch) of rung ``rung`` >= 0: ``grace_period · reduction_factor^rung``."""
        return self.grace_period * self.reduction_factor ** rung

    def decide(self, trial: FrozenTrial, trials: list[FrozenTrial],
               value: float | None = None) -> tuple[bool, dict[int, float]]:
        """Whether to stop ``trial`` after its last intermediate value, and the rung values it
        reaches with it (to record before the next decision of any trial).

        Args:
            trial: The trial, with its latest intermediate value.
            trials: The study's trials (their recorded rung values compete).
            value: The value to rank at the rungs instead of the latest intermediate value (a
                rung signal other than the searched metric, e.g. minus the validation loss;
                maximised). None: the intermediate value.

        Returns:
            ``(stop, {rung: value})``. A NaN value at a rung stops the trial and records nothing.
        """
        step = trial.last_step
        if step is None:
            return False, {}
        done = rung_values(trial)
        rung = 0
        while rung in done:
            rung += 1
        if value is None:
            value = trial.intermediate_values[step]
        recorded = [rung_values(t) for t in trials]
        new: dict[int, float] = {}
        while step >= self.rung_epoch(rung):
            if math.isnan(value):
                return True, new
            new[rung] = value
            competing = [r[rung] for r in recorded if rung in r] + [value]
            if not _promotable(value, competing, self.reduction_factor):
                return True, new
            rung += 1
        return False, new


def first_rung(grace_period: int, max_epochs: int) -> int:
    """The first rung in epochs as the scheduler uses it: the grace period, at most
    ``max_epochs`` and at least 1."""
    return max(1, min(grace_period, max_epochs))


def rung_epochs(max_epochs: int, grace_period: int, reduction_factor: int, early_stopping: bool) -> list[int]:
    """The scheduler's rungs in epochs: the rungs of :class:`Asha` from
    :func:`first_rung` below ``max_epochs`` (Optuna's ``SuccessiveHalvingPruner`` with
    ``min_early_stopping_rate=0``), then ``max_epochs``; only ``[max_epochs]`` without early stopping."""
    rungs: list[int] = []
    if early_stopping:
        asha = Asha(grace_period=first_rung(grace_period, max_epochs), reduction_factor=reduction_factor)
        while asha.rung_epoch(len(rungs)) < max_epochs:
            rungs.append(asha.rung_epoch(len(rungs)))
    return [*rungs, max_epochs]
