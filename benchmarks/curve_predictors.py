"""Learning-curve predictors as ASHA's rung signal (issue 32, item 4), for ``search_efficiency.py``.

A rung signal is what successive halving ranks the trials at a rung by; raw val top-1 after ``e``
epochs is the default. A learning-curve predictor replaces it by a prediction of the *final* val
top-1 from the curve so far. Two families, each evaluated on the recorded table:

- :func:`pow3_predictions`: each curve extrapolated on its own, y(t) = c - a * t^(-alpha), fitted by
  least squares (``scipy.optimize.curve_fit``) to the epochs seen so far — the parametric family of
  Domhan et al. (IJCAI 2015) that LC-PFN (Adriaensen et al., NeurIPS 2023) is compared with. It needs
  no other curves, so a search can use it from its first trial.
- :func:`ridge_predictions`: a linear model from the prefix (val top-1 and val loss of epochs
  1..e) to the final val top-1, fitted on the *other* configurations' whole curves of the table
  (leave one configuration out; ``sklearn.linear_model.RidgeCV``). A search has no such curves
  when it starts, so this is a bound on what a predictor trained on curves of this very task could
  rank — the role LC-PFN's prior plays, here with the task's own curves.

LC-PFN itself (``lcpfn`` on PyPI) requires ``torch<=1.11``, which has no wheel for Python 3.11
(checked with ``uv pip install --dry-run lcpfn``, 2026-12-07); syne-tune 0.16.0 ships no
learning-curve model (its Gaussian-process searchers were removed).

Both return ``{config: array of shape (max_epochs,)}``: the prediction of the final val top-1
after epochs 1..max_epochs (float64, in [0, 1] where the fit allows; index e - 1 for epoch e).
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd


def _pow3(t: np.ndarray, c: float, a: float, alpha: float) -> np.ndarray:
    return c - a * np.power(t, -alpha)


def pow3_extrapolate(values: np.ndarray, *, horizon: int) -> float:
    """The pow3 curve through ``values`` (val top-1 of epochs 1..n, shape (n,)) evaluated at epoch
    ``horizon``; with fewer than 3 epochs (3 parameters) the last value. Bounds: c in [0, 1],
    a in [0, 2], alpha in [0.01, 3]; a fit that fails (no convergence) also gives the last value.

    Raises:
        ValueError: ``values`` empty or ``horizon`` < len(values).
    """
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0 or horizon < values.size:
        raise ValueError(f"need 1 <= len(values) <= horizon, got {values.size} values, horizon {horizon}")
    if values.size < 3:
        return float(values[-1])
    from scipy.optimize import curve_fit

    t = np.arange(1, values.size + 1, dtype=np.float64)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p, _ = curve_fit(_pow3, t, values, p0=(min(1.0, values.max() + 0.05), 0.5, 0.5),
                             bounds=([0.0, 0.0, 0.01], [1.0, 2.0, 3.0]), maxfev=2000)
    except (RuntimeError, ValueError):
        return float(values[-1])
    return float(_pow3(np.float64(horizon), *p))


def _wide(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    return frame.pivot(index="config", columns="epoch", values=column).sort_index(axis=1)


def pow3_predictions(frame: pd.DataFrame) -> dict[int, np.ndarray]:
    """:func:`pow3_extrapolate` of every table configuration after every epoch (see the module)."""
    top = _wide(frame, "eval_top1")
    last = int(top.columns.max())
    return {int(k): np.array([pow3_extrapolate(row[:e], horizon=last) for e in range(1, last + 1)])
            for k, row in zip(top.index, top.to_numpy(), strict=True)}


def ridge_predictions(frame: pd.DataFrame) -> dict[int, np.ndarray]:
    """The leave-one-configuration-out ridge prediction of the final val top-1 after every epoch
    (features: val top-1 and val cross-entropy of epochs 1..e; see the module)."""
    from sklearn.linear_model import RidgeCV

    wide_top = _wide(frame, "eval_top1")
    top, loss = wide_top.to_numpy(), _wide(frame, "eval_loss_ce").to_numpy()
    keys = [int(k) for k in wide_top.index]
    last = top.shape[1]
    out = {k: np.empty(last) for k in keys}
    for e in range(1, last + 1):
        x = np.hstack([top[:, :e], loss[:, :e]])
        for i, k in enumerate(keys):
            rest = np.arange(len(keys)) != i
            model = RidgeCV(alphas=np.logspace(-3, 3, 13)).fit(x[rest], top[rest, -1])
            out[k][e - 1] = float(model.predict(x[i:i + 1])[0])
    return out
