"""Config validation: unknown keys, bad values and a missing data root fail naming what and where."""

import shutil
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from mgfa_ray.cli import main
from mgfa_ray.config import (
    ConfigError,
    JobConfig,
    RegionWeights,
    TrainConfig,
    TrainParams,
    load_config,
    resolve_data_root,
    to_dict,
    validate,
)
from mgfa_ray.pipeline import check_job

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("job", sorted((REPO / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_job_loads(job, monkeypatch):
    monkeypatch.chdir(REPO)  # search.space paths are relative to the repository root
    cfg = load_config(JobConfig, job)
    assert load_config(JobConfig, job) == cfg  # deterministic, frozen
    space, template = check_job(cfg, source=str(job))  # trial defaults, region classes and space agree
    assert template.region_classes == cfg.regions.classes and space.scheduler.max_epochs >= 1


def test_paper_jobs_use_the_papers_settings():
    for name, kinds in (("cotton80_paper", 1), ("soylocal_paper", 2)):
        cfg = load_config(JobConfig, REPO / "jobs" / f"{name}.yaml")
        t = cfg.train
        assert (t.backbone, t.resize, t.train_crop, t.lr, t.momentum, t.lr_step) == ("resnet50", 512, 448, 0.003, 0.938, 100)
        assert t.eval_input_size == 448 and t.eval_crop == "resize"  # test: resized to 448
        assert cfg.detector.imgsz == 480 and cfg.dataset.layout == "ufg" and len(cfg.regions.classes) == kinds
        assert cfg.regions.max_images == {1: 30, 2: 70}[kinds]


def test_job_whose_space_does_not_fit_its_region_kinds_is_rejected(monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = load_config(JobConfig, REPO / "jobs" / "cotton80_paper.yaml")
    two_kind_space = cfg.model_copy(update={"search": cfg.search.model_copy(update={"space": "search_spaces/paper.yaml"})})
    with pytest.raises(ConfigError, match=r"(?s)paper.yaml.*gamma and lam must be 0"):
        check_job(two_kind_space)
    bad_train = cfg.model_copy(update={"train": cfg.train.model_copy(update={"gamma": 0.2, "beta": 0.5})})
    with pytest.raises(ConfigError, match=r"(?s)train \(with regions.classes \['region'\]\)"):
        check_job(bad_train)


@pytest.mark.parametrize("path", sorted(p for p in (REPO / "results").glob("*/*.yaml") if p.name != "job.yaml"),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_published_train_configs_are_valid(path):
    cfg = load_config(TrainConfig, path)
    assert abs(cfg.alpha + cfg.beta + cfg.gamma - 1.0) <= 1e-9


@pytest.mark.parametrize("path", sorted((REPO / "results").glob("*/job.yaml")), ids=lambda p: p.parent.name)
def test_published_job_configs_are_valid_job_files(path):
    load_config(JobConfig, path)


def test_unknown_key_names_file_and_field(tmp_path):
    doc = yaml.safe_load((REPO / "jobs" / "leafsnap20.yaml").read_text())
    doc["train"]["learning_rate"] = 0.1
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError) as err:
        load_config(JobConfig, path)
    assert str(path) in str(err.value) and "train.learning_rate: unknown key" in str(err.value)


def test_simplex_and_ranges_are_checked():
    with pytest.raises(ValueError, match="alpha \\+ beta \\+ gamma must equal 1"):
        TrainParams(alpha=0.5, beta=0.5, gamma=0.2)
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        TrainParams(alpha=1.2, beta=-0.2, gamma=0.0)
    with pytest.raises(ValueError, match=r"train_crop \(96\) must be <= resize \(64\)"):
        TrainParams(resize=64, train_crop=96)
    with pytest.raises(ValueError, match=r"eval_size \(96\) must be <= resize \(64\)"):
        TrainParams(resize=64, train_crop=48, eval_size=96)


def test_training_crop_and_evaluation_size():
    """The test-time input is ``eval_size``, by default the training crop ``train_crop``."""
    assert TrainParams(train_crop=96, resize=128).eval_input_size == 96  # eval_size None follows train_crop
    assert TrainParams(train_crop=96, eval_size=112, resize=128).eval_input_size == 112


def test_crop_is_an_unknown_key(tmp_path):
    """``crop`` is no trial parameter (the training crop is ``train_crop``): in a file or on the
    command line it is the ordinary unknown-key error."""
    from mgfa_ray.cli import load_job

    with pytest.raises(ConfigError, match=r"t.yaml: invalid configuration\n  crop: unknown key"):
        validate(TrainParams, {"resize": 128, "crop": 96}, source="t.yaml")
    with pytest.raises(ConfigError, match=r"train.crop: unknown key"):
        load_job(REPO / "jobs" / "leafsnap20.yaml", ["train.crop=96"])


def test_region_kinds_and_their_weights():
    paths = {"manifest": "m.parquet", "masks": "masks"}
    two = TrainConfig(**paths)
    assert two.feature_weights() == (0.5, 0.2) and two.mask_loss_weights() == (0.1, 0.1)
    one = TrainConfig(**paths, region_classes=["region"], alpha=0.3, beta=0.7, gamma=0.0, lam=0.0)
    assert one.feature_weights() == (0.7,) and one.mask_loss_weights() == (0.1,)
    three = TrainConfig(**paths, region_classes=["vein", "contour", "tip"], alpha=0.3, beta=0.4, gamma=0.2,
                        extra_regions=[RegionWeights(feature=0.1, mask_loss=0.05)])
    assert three.feature_weights() == (0.4, 0.2, 0.1) and three.mask_loss_weights() == (0.1, 0.1, 0.05)
    assert TrainConfig(**to_dict(three)) == three  # the exported document loads back
    with pytest.raises(ValueError, match="need 1 extra_regions entries"):
        TrainConfig(**paths, region_classes=["vein", "contour", "tip"])
    with pytest.raises(ValueError, match=r"extra_regions\[\].feature must equal 1"):
        TrainConfig(**paths, region_classes=["vein", "contour", "tip"], extra_regions=[{"feature": 0.1, "mask_loss": 0}])
    with pytest.raises(ValueError, match="gamma and lam must be 0"):
        TrainConfig(**paths, region_classes=["region"])
    with pytest.raises(ValueError, match="each once"):
        TrainConfig(**paths, region_classes=["vein", "vein"])
    with pytest.raises(ValueError, match=r"loss \(Eq. 8\) would be empty"):
        TrainConfig(**paths, mu=0.0, delta=0.0, lam=0.0)
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainParams(lr_schedule="linear")


def test_config_is_frozen_and_round_trips():
    p = TrainParams()
    with pytest.raises(ValidationError, match=r"(?s)lr.*Instance is frozen"):
        p.lr = 1.0
    assert TrainParams(**to_dict(p)) == p


def test_missing_data_root_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MGFA_DATA_ROOT", str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=r"nowhere.*MGFA_DATA_ROOT"):
        resolve_data_root(None)


def test_cli_reports_bad_job_file_with_exit_2(tmp_path, capsys):
    path = tmp_path / "job.yaml"
    shutil.copy(REPO / "jobs" / "leafsnap20.yaml", path)
    path.write_text(path.read_text().replace("imgsz: 320", "imgsz: 320\n  colour: red"))
    assert main(["run", str(path)]) == 2
    assert "detector.colour: unknown key" in capsys.readouterr().err


def test_search_config_resources_and_checkpoints():
    from mgfa_ray.config import SearchConfig

    assert SearchConfig(space="s.yaml", gpus_per_trial=0.25).gpus_per_trial == 0.25  # four trials share a GPU
    assert SearchConfig(space="s.yaml", gpus_per_trial=2).gpus_per_trial == 2
    with pytest.raises(ValueError, match="gpus_per_trial above 1 must be a whole number, got 1.5"):
        SearchConfig(space="s.yaml", gpus_per_trial=1.5)
    with pytest.raises(ValueError, match="checkpoints_to_keep"):
        SearchConfig(space="s.yaml", checkpoints_to_keep=1)  # with 1 Ray re-snapshots repeatedly (ray#31613)
    with pytest.raises(ValueError, match="sampler"):
        SearchConfig(space="s.yaml", sampler="grid")


def test_default_sampler_is_random_and_a_warm_start_needs_tpe():
    """Random proposals by default (the search-efficiency replay, issue 17); a warm start seeds a
    model, so it is refused with a sampler that has none."""
    from mgfa_ray.config import SearchConfig

    warm = {"storage": "old.journal", "study_name": "old"}
    assert SearchConfig(space="s.yaml").sampler == "random"
    assert SearchConfig(space="s.yaml", sampler="tpe", warm_start=warm).warm_start.study_name == "old"
    with pytest.raises(ValueError, match="warm_start seeds the sampler's model, but sampler is 'random'.*"
                                         "set search.sampler: tpe"):
        SearchConfig(space="s.yaml", warm_start=warm)


def test_tpe_startup_trials_default_to_half_of_the_trials_and_shape_the_sampler():
    """Start-up trials: half of num_samples, at least 10, unless set; the sampler proposes at
    random exactly that long (two samplers of one seed agree until the shorter start-up ends)."""
    import optuna

    from mgfa_ray.config import SearchConfig
    from mgfa_ray.search.study import make_sampler

    assert SearchConfig(space="s.yaml", num_samples=100).tpe_startup_trials == 50
    assert SearchConfig(space="s.yaml", num_samples=101).tpe_startup_trials == 50
    assert SearchConfig(space="s.yaml", num_samples=16).tpe_startup_trials == 10
    assert SearchConfig(space="s.yaml", num_samples=100, startup_trials=4).tpe_startup_trials == 4
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    proposals = []
    for startup in (3, 8):
        study = optuna.create_study(sampler=make_sampler("tpe", 0, startup_trials=startup))
        xs = []
        for _ in range(6):
            trial = study.ask()
            xs.append(trial.suggest_float("x", 0.0, 1.0))
            study.tell(trial, (xs[-1] - 0.2) ** 2)
        proposals.append(xs)
    assert proposals[0][:3] == proposals[1][:3] and proposals[0][3:] != proposals[1][3:]
