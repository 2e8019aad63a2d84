"""Search-space YAML: every shipped file loads; invalid files name the key; simplex sums to 1."""

from pathlib import Path

import optuna
import pytest
import yaml

from mgfa_ray.config import ConfigError, TrainParams
from mgfa_ray.search.space import define_by_run, load_search_space, simplex_from_cuts, trial_params

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "search_spaces").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_space_loads_and_samples_valid_configs(path):
    space = load_search_space(path)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    for point in space.optuna_points():
        study.enqueue_trial(point)
    for _ in range(5):
        trial = study.ask()
        params = {**trial_params(trial.params), **define_by_run(trial, space=space)}
        cfg = TrainParams(**{k: v for k, v in params.items() if "/" not in k})
        assert abs(cfg.alpha + cfg.beta + cfg.gamma - 1.0) <= 1e-12
        study.tell(trial, 0.0)


def test_points_to_evaluate_come_first_with_paper_weights():
    space = load_search_space(REPO / "search_spaces" / "leafsnap20.yaml")
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial(space.optuna_points()[0])
    consts = define_by_run(study.ask(), space=space)
    assert consts["alpha"] == pytest.approx(0.3) and consts["beta"] == pytest.approx(0.5) and consts["gamma"] == pytest.approx(0.2)


def test_simplex_from_cuts():
    assert simplex_from_cuts([0.8, 0.3]) == pytest.approx([0.3, 0.5, 0.2])
    w = simplex_from_cuts([0.123456789, 0.987654321])
    assert min(w) >= 0 and sum(w) == pytest.approx(1.0, abs=1e-15)


def _write(tmp_path, doc):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


BASE = {"scheduler": {"max_epochs": 4}}


@pytest.mark.parametrize("doc, message", [
    ({**BASE, "paramters": {}}, "paramters: unknown key"),
    ({**BASE, "parameters": {"lr": {"type": "uniform", "low": 0.1, "high": 0.01}}}, "low \\(0.1\\) must be < high"),
    ({**BASE, "parameters": {"lr": {"type": "log_uniform", "low": 0.0, "high": 0.1}}}, "log_uniform needs low > 0"),
    ({**BASE, "parameters": {"learning_rate": {"type": "uniform", "low": 0.0, "high": 0.1}}}, "'learning_rate' is not a trial parameter"),
    ({**BASE, "parameters": {"lr": {"type": "normal", "low": 0.0, "high": 0.1}}}, "parameters.lr"),
    ({**BASE, "parameters": {"momentum": {"type": "uniform", "low": 0.5, "high": 1.5}}}, "parameters.momentum.high"),
    ({**BASE, "simplex": ["alpha", "beta"], "points_to_evaluate": [{"alpha": 0.5, "beta": 0.6}]}, "sum to 1.1"),
    ({"scheduler": {"max_epochs": 2, "grace_period": 3}}, "grace_period"),
    ({"scheduler": {"max_epochs": 4, "reduction_factor": 1.5}}, "scheduler.reduction_factor"),
    ({"scheduler": {"max_epochs": 4, "early_stoping": False}}, "scheduler.early_stoping: unknown key"),
    ({**BASE, "parameters": {"batch_size": {"type": "categorical", "choices": [16, 0]}}}, "parameters.batch_size.choices"),
    ({**BASE, "points_to_evaluate": [{"lr": 0.01}]}, "points_to_evaluate\\[0\\]: \\['lr'\\] are not searched"),
])
def test_invalid_spaces_name_the_key(tmp_path, doc, message):
    path = _write(tmp_path, doc)
    with pytest.raises(ConfigError, match=message) as err:
        load_search_space(path)
    assert str(path) in str(err.value)


LR = {"lr": {"type": "log_uniform", "low": 1e-3, "high": 0.1}}


@pytest.mark.parametrize("params, point, message", [
    (LR, {"lr": 0.5}, r"points_to_evaluate\[0\]: lr = 0.5 is outside log_uniform \[0.001, 0.1\]"),
    ({"momentum": {"type": "uniform", "low": 0.8, "high": 0.95}}, {"momentum": 0.5},
     r"points_to_evaluate\[0\]: momentum = 0.5 is outside uniform \[0.8, 0.95\]"),
    ({"lr_step": {"type": "int", "low": 2, "high": 6}}, {"lr_step": 7},
     r"points_to_evaluate\[0\]: lr_step = 7 is outside int \[2, 6\]"),
    ({"lr_step": {"type": "int", "low": 2, "high": 6}}, {"lr_step": 2.5},
     r"points_to_evaluate\[0\]: lr_step = 2.5 is not an integer"),
    ({"batch_size": {"type": "categorical", "choices": [16, 32]}}, {"batch_size": 64},
     r"points_to_evaluate\[0\]: batch_size = 64 is not one of the choices \[16, 32\]"),
    (LR, {"lr": "fast"}, r"points_to_evaluate\[0\]: lr = 'fast' is not a number"),
])
def test_point_outside_its_parameter_range_is_rejected(tmp_path, params, point, message):
    """Defect 1 of issue 15: such a point ran anyway (only an Optuna warning)."""
    doc = {**BASE, "parameters": params, "points_to_evaluate": [point]}
    with pytest.raises(ConfigError, match=message) as err:
        load_search_space(_write(tmp_path, doc))
    assert str(err.value).count("\n") == 1  # the source line and exactly one error


def test_point_index_names_the_bad_point(tmp_path):
    doc = {**BASE, "parameters": LR, "points_to_evaluate": [{"lr": 0.01}, {"lr": 1e-4}]}
    with pytest.raises(ConfigError, match=r"points_to_evaluate\[1\]: lr = 0.0001 is outside"):
        load_search_space(_write(tmp_path, doc))


@pytest.mark.parametrize("params, message", [
    ({"lr": {"type": "uniform", "low": 0.1, "high": 0.001}}, r"parameters\.lr: low \(0.1\) must be < high \(0.001\)"),
    ({"batch_size": {"type": "categorical", "choices": []}},
     r"parameters\.batch_size: categorical needs at least one value in choices"),
    ({"lr": [0.1, 0.2]}, r"parameters\.lr: a fixed value is a boolean, number, string or null"),
    ({"lr": {"type": "normal", "low": 0.0, "high": 0.1}}, r"parameters\.lr\.type: 'normal' is not one of"),
    ({"lr": {"low": 0.0, "high": 0.1}}, r"parameters\.lr\.type: missing"),
])
def test_search_space_errors_are_one_line_without_union_noise(tmp_path, params, message):
    """Weak message of issue 15: the real error was buried under four 'Input should be a valid …' lines."""
    with pytest.raises(ConfigError, match=message) as err:
        load_search_space(_write(tmp_path, {**BASE, "parameters": params}))
    text = str(err.value)
    assert "Input should be" not in text and "tagged-union" not in text and "Value error" not in text
    assert text.count("\n") == 1, text
