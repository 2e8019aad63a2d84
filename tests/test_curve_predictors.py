"""Learning-curve predictors as rung signals (issue 32, item 4): each predicts a final value it can
know on curves built so that it must."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from curve_predictors import pow3_extrapolate, pow3_predictions, ridge_predictions  # noqa: E402


def _pow3(t, c, a, alpha):
    return c - a * np.power(np.asarray(t, dtype=np.float64), -alpha)


def test_pow3_recovers_the_asymptote_of_a_pow3_curve():
    """Eight epochs of c - a t^-alpha (c 0.85, a 0.6, alpha 0.8) predict epoch 20 to 1e-4; the raw
    value after epoch 8 is 0.13 lower."""
    values = _pow3(np.arange(1, 9), 0.85, 0.6, 0.8)
    assert pow3_extrapolate(values, horizon=20) == pytest.approx(_pow3(20, 0.85, 0.6, 0.8), abs=1e-4)
    assert _pow3(20, 0.85, 0.6, 0.8) - values[-1] > 0.05


def test_pow3_with_fewer_points_than_parameters_is_the_last_value():
    assert pow3_extrapolate([0.2, 0.4], horizon=20) == 0.4
    with pytest.raises(ValueError, match="horizon"):
        pow3_extrapolate([0.2, 0.4, 0.5], horizon=2)
    with pytest.raises(ValueError):
        pow3_extrapolate([], horizon=2)


def _frame(finals: list[float], epochs: int = 6) -> pd.DataFrame:
    """Curves c_k - 0.5 t^-1 with val loss 1 - value: the first epoch alone fixes the final value."""
    rows = [{"config": k, "epoch": e, "eval_top1": float(_pow3(e, c, 0.5, 1.0)), "eval_loss_ce": float(1 - _pow3(e, c, 0.5, 1.0))}
            for k, c in enumerate(finals) for e in range(1, epochs + 1)]
    return pd.DataFrame(rows)


def test_ridge_leaves_the_predicted_configuration_out():
    """On curves where the final value is a linear function of the first epoch, the leave-one-out
    ridge predicts each configuration's final value after one epoch (within its shrinkage), and
    a configuration far outside the others is not predicted from its own curve."""
    finals = list(np.linspace(0.55, 0.9, 12))
    frame = _frame(finals)
    pred = ridge_predictions(frame)
    last = frame["epoch"].max()
    truth = frame[frame.epoch == last].set_index("config")["eval_top1"]
    for k in range(1, 11):  # inside the others' range
        assert pred[k][0] == pytest.approx(truth[k], abs=0.02)
    order = np.argsort([pred[k][0] for k in range(12)])
    assert list(order) == list(range(12))  # it ranks them as the final values do


def test_pow3_predictions_cover_every_epoch():
    frame = _frame([0.6, 0.8], epochs=5)
    pred = pow3_predictions(frame)
    assert set(pred) == {0, 1} and all(p.shape == (5,) for p in pred.values())
    assert pred[0][1] == pytest.approx(frame.query("config == 0 and epoch == 2")["eval_top1"].item())  # 2 epochs: raw
    assert pred[1][4] == pytest.approx(0.8 - 0.5 / 5, abs=1e-3)  # 5 epochs: the curve's own epoch 5
