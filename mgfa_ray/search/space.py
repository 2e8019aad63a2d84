"""Search spaces: YAML documents turned into Optuna calls by one validating function.

Schema (every key checked; unknown keys rejected)::

    scheduler:              # ASHA (Li et al., MLSys 2020), epochs as the time unit
      max_epochs: 6         # epochs of a trial that is never stopped
      grace_period: 1       # epochs before a trial can be stopped
      reduction_factor: 2   # integer >= 2
      early_stopping: true  # false: every trial runs max_epochs
    simplex: [alpha, beta, gamma]   # sampled uniformly on alpha + beta + gamma = 1 (optional)
    parameters:             # TrainParams fields
      lr: {type: log_uniform, low: 1.0e-3, high: 0.1}
      momentum: {type: uniform, low: 0.8, high: 0.95}
      batch_size: {type: categorical, choices: [16, 32]}
      lr_step: {type: int, low: 2, high: 6}
      activation: softmax   # a plain value is fixed, not searched
    points_to_evaluate:     # tried first, in order (e.g. the paper's values)
      - {alpha: 0.3, beta: 0.5, gamma: 0.2, lr: 0.003}

The simplex is sampled with n - 1 uniform cuts of [0, 1]: the sorted cuts' spacings are the n
weights, so they are >= 0 and sum to 1 up to float rounding (the last weight is 1 minus the others).
The cuts are Optuna parameters ``simplex/u<i>``; Ray nests them under the config key ``simplex``,
which :func:`trial_params` removes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, Field, TypeAdapter, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from mgfa_ray.config import ConfigError, FrozenModel, TrainParams, load_yaml, validate

SIMPLEX_KEY = "simplex"
OPTUNA_TRIAL_KEY = "optuna_trial"
"""Ray config key holding the Optuna trial number of a Ray trial (:mod:`mgfa_ray.search.study`)."""


class FloatRange(FrozenModel):
    """A float range ``low < high``: what :class:`Uniform` and :class:`LogUniform` share."""

    low: float
    high: float

    @model_validator(mode="after")
    def _range(self):
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be < high ({self.high})")
        return self


class Uniform(FloatRange):
    """``{type: uniform, low, high}``: a float drawn uniformly from [low, high), low < high."""

    type: Literal["uniform"]


class LogUniform(FloatRange):
    """``{type: log_uniform, low, high}``: a float uniform in log space, 0 < low < high."""

    type: Literal["log_uniform"]

    @model_validator(mode="after")
    def _positive(self):
        if self.low <= 0:
            raise ValueError(f"log_uniform needs low > 0, got {self.low}")
        return self


class IntRange(FrozenModel):
    """``{type: int, low, high, log}``: an integer in [low, high], optionally log-spaced (low > 0)."""

    type: Literal["int"]
    low: int
    high: int
    log: bool = False

    @model_validator(mode="after")
    def _range(self):
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be < high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"log int range needs low > 0, got {self.low}")
        return self


class Categorical(FrozenModel):
    """``{type: categorical, choices: [...]}``: one of at least one listed value."""

    type: Literal["categorical"]
    choices: list[Any]

    @model_validator(mode="after")
    def _some(self):
        if not self.choices:
            raise ValueError("categorical needs at least one value in choices")
        return self


Distribution = Annotated[Union[Uniform, LogUniform, IntRange, Categorical], Field(discriminator="type")]
Fixed = Union[bool, int, float, str, None]
_DISTRIBUTION = TypeAdapter(Distribution)
_TYPES = "uniform, log_uniform, int or categorical"


def _fail(errors: list[tuple[tuple, str, Any]]) -> None:
    """Raise one pydantic error per ``(loc, message, input)``, each shown as ``loc: message``
    (no "Value error," prefix, no alternatives of a union)."""
    raise ValidationError.from_exception_data("SearchSpace", [
        InitErrorDetails(type=PydanticCustomError("search_space", msg.replace("{", "{{").replace("}", "}}")),
                         loc=loc, input=value)
        for loc, msg, value in errors])


def _entry_errors(name: str, value: Any) -> list[tuple[tuple, str, Any]]:
    """The errors of one ``parameters`` entry, checked as the one kind it is (a mapping is a
    distribution, anything else a fixed value), so a user sees only the error that applies."""
    if not isinstance(value, dict):
        if isinstance(value, (bool, int, float, str)) or value is None:
            return []
        return [((name,), f"a fixed value is a boolean, number, string or null; a searched parameter is a "
                          f"mapping with type: {_TYPES}", value)]
    if "type" not in value:
        return [((name, "type"), f"missing: a searched parameter needs type: {_TYPES}", value)]
    if value["type"] not in ("uniform", "log_uniform", "int", "categorical"):
        return [((name, "type"), f"{value['type']!r} is not one of {_TYPES}", value)]
    try:
        _DISTRIBUTION.validate_python(value)
    except ValidationError as err:
        out = []
        for e in err.errors():
            loc = (name, *e["loc"][1:])  # without the union's tag (the entry's own type)
            msg = str(e["ctx"]["error"]) if e["type"] == "value_error" else e["msg"]
            if e["type"] == "extra_forbidden":
                msg = "unknown key (not a field of this section)"
            out.append((loc, msg, e.get("input")))
        return out
    return []


def _point_error(name: str, value: Any, dist: Any) -> str | None:
    """Why ``value`` is not a value of ``dist`` (a distribution, or ``None`` for a simplex
    weight, which lies in [0, 1]); ``None`` when it is."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(dist, Categorical):
        return None if value in dist.choices else f"{name} = {value!r} is not one of the choices {dist.choices}"
    if not number:
        return f"{name} = {value!r} is not a number"
    if isinstance(dist, IntRange) and not float(value).is_integer():
        return f"{name} = {value!r} is not an integer"
    low, high, kind = (0.0, 1.0, "simplex weight") if dist is None else (dist.low, dist.high, dist.type)
    if not low <= value <= high:
        return f"{name} = {value!r} is outside {kind} [{low!r}, {high!r}]"
    return None


class SchedulerSpec(FrozenModel):
    """ASHA settings in epochs (Li et al., MLSys 2020): ``max_epochs`` >= 1,
    1 <= ``grace_period`` <= ``max_epochs``, integer ``reduction_factor`` >= 2 (rungs at
    grace_period x reduction_factor^k epochs; at each rung a trial continues only in the top
    1/reduction_factor). ``early_stopping: false`` runs every trial to ``max_epochs``."""

    max_epochs: int = Field(ge=1)
    grace_period: int = Field(1, ge=1)
    reduction_factor: int = Field(2, ge=2)
    early_stopping: bool = True

    @model_validator(mode="after")
    def _grace(self):
        if self.grace_period > self.max_epochs:
            raise ValueError(f"grace_period ({self.grace_period}) must be <= max_epochs ({self.max_epochs})")
        return self


class SearchSpace(FrozenModel):
    """A validated search space (see the module docstring for the YAML schema)."""

    scheduler: SchedulerSpec
    simplex: list[str] = []
    parameters: dict[str, Union[Distribution, Fixed]] = {}
    points_to_evaluate: list[dict[str, Any]] = []

    @field_validator("parameters", mode="before")
    @classmethod
    def _entries(cls, value):
        if isinstance(value, dict):
            errors = [e for name, v in value.items() for e in _entry_errors(str(name), v)]
            if errors:
                _fail(errors)
        return value

    @model_validator(mode="after")
    def _names(self):
        known = set(TrainParams.model_fields)
        for name in [*self.simplex, *self.parameters]:
            if name not in known:
                raise ValueError(f"parameter {name!r} is not a trial parameter; known: {sorted(known)}")
        if self.simplex and len(self.simplex) < 2:
            raise ValueError(f"simplex needs at least 2 parameters, got {self.simplex}")
        both = set(self.simplex) & set(self.parameters)
        if both:
            raise ValueError(f"{sorted(both)} appear in both simplex and parameters")
        if "epochs" in self.parameters:
            raise ValueError("'epochs' is set by scheduler.max_epochs, not a parameter")
        searched = set(self.simplex) | {k for k, v in self.parameters.items() if isinstance(v, BaseModel)}
        for i, point in enumerate(self.points_to_evaluate):
            extra = set(point) - searched
            if extra:
                raise ValueError(f"points_to_evaluate[{i}]: {sorted(extra)} are not searched parameters")
            if self.simplex and set(point) & set(self.simplex) and not set(self.simplex) <= set(point):
                raise ValueError(f"points_to_evaluate[{i}]: give all of the simplex {self.simplex} or none")
            if self.simplex and set(self.simplex) <= set(point):
                total = sum(point[k] for k in self.simplex)
                if not math.isclose(total, 1.0, abs_tol=1e-9):
                    raise ValueError(f"points_to_evaluate[{i}]: simplex values sum to {total}, not 1")
        self._check_points()
        return self

    def _check_points(self) -> None:
        """Every value of every point lies in its parameter's range (Optuna would only warn and
        run it anyway)."""
        errors = []
        for i, point in enumerate(self.points_to_evaluate):
            for name, value in point.items():
                why = _point_error(name, value, None if name in self.simplex else self.parameters[name])
                if why:
                    errors.append(((f"points_to_evaluate[{i}]",), f"{why} (parameters.{name})"
                                   if name not in self.simplex else why, point))
        if errors:
            _fail(errors)

    def fixed(self) -> dict[str, Any]:
        """Parameters given a plain value."""
        return {k: v for k, v in self.parameters.items() if not isinstance(v, BaseModel)}

    def optuna_points(self) -> list[dict[str, Any]]:
        """``points_to_evaluate`` in Optuna's parameter names (simplex as its cuts)."""
        out = []
        for point in self.points_to_evaluate:
            p = {k: v for k, v in point.items() if k not in self.simplex}
            if self.simplex and self.simplex[0] in point:
                acc = 0.0
                for i, name in enumerate(self.simplex[:-1]):
                    acc += point[name]
                    p[f"{SIMPLEX_KEY}/u{i}"] = min(1.0, acc)
            out.append(p)
        return out


def load_search_space(path: str | Path, *, base: TrainParams | None = None) -> SearchSpace:
    """Load, validate and check a search-space YAML against the trial's parameters.

    Args:
        path: The YAML file.
        base: Trial defaults; every distribution's bounds and every point are checked to form a
            valid config of ``type(base)`` with them (defaults: ``TrainParams()``). Pass a
            :class:`~mgfa_ray.config.TrainConfig` to check the region-kind rules too.

    Raises:
        ConfigError: Naming the file and the key, one line per error: unknown keys, low >= high,
            log ranges with low <= 0, empty ``choices``, parameters the trial does not know, a
            point's value outside its parameter's range or choices (naming the point's index,
            the parameter, the value and the range), or values the trial would reject.
    """
    space = validate(SearchSpace, load_yaml(path), source=str(path))
    base = base or TrainParams()
    base_dict = base.model_dump()
    simplex_mid = {k: 1.0 / len(space.simplex) for k in space.simplex}
    probes: list[tuple[str, dict]] = []
    for name, dist in space.parameters.items():
        if isinstance(dist, (FloatRange, IntRange)):
            probes += [(f"parameters.{name}.low", {name: dist.low}), (f"parameters.{name}.high", {name: dist.high})]
        elif isinstance(dist, Categorical):
            probes += [(f"parameters.{name}.choices", {name: c}) for c in dist.choices]
        else:
            probes.append((f"parameters.{name}", {name: dist}))
    probes += [(f"points_to_evaluate[{i}]", p) for i, p in enumerate(space.points_to_evaluate)]
    for where, values in probes:
        trial = {**base_dict, **simplex_mid, **space.fixed(), **values}
        try:
            validate(type(base), trial, source=f"{path}: {where}")
        except ConfigError as err:
            raise ConfigError(str(err)) from None
    return space


def define_by_run(trial, *, space: SearchSpace) -> dict[str, Any]:
    """Optuna define-by-run function: suggest every searched parameter of ``space``.

    Called on each asked trial by :class:`mgfa_ray.search.searcher.StudySearch` (:func:`mgfa_ray.search.study.sample_config`).

    Returns:
        Constants to add to the config: the simplex weights and the fixed parameters.
    """
    for name, dist in space.parameters.items():
        if isinstance(dist, LogUniform):
            trial.suggest_float(name, dist.low, dist.high, log=True)
        elif isinstance(dist, Uniform):
            trial.suggest_float(name, dist.low, dist.high)
        elif isinstance(dist, IntRange):
            trial.suggest_int(name, dist.low, dist.high, log=dist.log)
        elif isinstance(dist, Categorical):
            trial.suggest_categorical(name, dist.choices)
    out = space.fixed()
    if space.simplex:
        cuts = sorted(trial.suggest_float(f"{SIMPLEX_KEY}/u{i}", 0.0, 1.0) for i in range(len(space.simplex) - 1))
        weights = simplex_from_cuts(cuts)
        out.update(zip(space.simplex, weights))
    return out


def simplex_from_cuts(cuts: list[float]) -> list[float]:
    """Spacings of sorted cuts of [0, 1]: n - 1 cuts → n weights >= 0 summing to 1.

    The last weight is ``1 - sum(others)`` so the float sum is 1 up to one rounding.
    """
    points = [0.0, *sorted(cuts)]
    weights = [points[i + 1] - points[i] for i in range(len(points) - 1)]
    weights.append(1.0 - sum(weights))
    return [max(0.0, w) for w in weights]


def trial_params(config: dict[str, Any]) -> dict[str, Any]:
    """A Ray trial config without the simplex cut variables and the Optuna trial number: only
    TrainParams fields remain."""
    return {k: v for k, v in config.items() if k not in (SIMPLEX_KEY, OPTUNA_TRIAL_KEY)}

