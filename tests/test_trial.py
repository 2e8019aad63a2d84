"""The trial function without Ray: metrics, checkpoints, bit-exact resume, mask geometry."""

import pytest
import torch

from mgfa_ray.config import TrainConfig, to_dict
from mgfa_ray.masks import read_masks
from mgfa_ray.trial import augment, load_checkpoint, run_trial, save_checkpoint, train_to_dir


def test_augment_moves_masks_exactly_with_the_image():
    # Encode each pixel's position in the image and the same pattern in the mask.
    r = 16
    pattern = (torch.arange(r * r).view(r, r) % 251).to(torch.uint8)
    images = pattern.expand(4, 3, r, r).contiguous()
    masks = (pattern.float() / 255.0).expand(4, 1, r, r).contiguous()
    g = torch.Generator().manual_seed(3)
    x, m = augment(images, masks, crop=9, train=True, generator=g)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    pixels = ((x * std + mean) * 255).round()
    torch.testing.assert_close(pixels[:, 0], (m[:, 0] * 255).round(), rtol=0, atol=0)
    assert x.shape == (4, 3, 9, 9) and m.shape == (4, 1, 9, 9)


def test_augment_flip_and_crop_of_a_box_mask():
    images = torch.zeros(64, 3, 8, 8, dtype=torch.uint8)
    images[:, 0, 2:4, 1:3] = 255  # a box in the red channel...
    masks = torch.zeros(64, 1, 8, 8, dtype=torch.uint8)
    masks[:, 0, 2:4, 1:3] = 1  # ...and the same box as a mask
    x, m = augment(images, masks, crop=6, train=True, generator=torch.Generator().manual_seed(0))
    red = x[:, 0] > 0
    assert torch.equal(red, m[:, 0] > 0.5)
    assert len({tuple(r.nonzero()[0].tolist()) for r in red if r.any()}) > 1  # windows differ


def test_trial_reports_every_term_and_learns_on_real_photos(tiny_train_config):
    history = run_trial(tiny_train_config)
    assert [h["epoch"] for h in history] == [1, 2]
    for h in history:
        for key in ("train_loss", "train_loss_ce", "train_loss_vein", "train_loss_contour", "eval_top1", "test_top1"):
            assert key in h
        assert 0.0 <= h["eval_top1"] <= 1.0
        assert h["train_loss"] == pytest.approx(
            h["train_loss_ce"] + 0.1 * h["train_loss_vein"] + 0.1 * h["train_loss_contour"], rel=1e-5)


def test_zero_weight_removes_term_but_it_is_still_reported(tiny_train_config):
    cfg = TrainConfig(**{**to_dict(tiny_train_config), "delta": 0.0, "lam": 0.0, "epochs": 1})
    (h,) = run_trial(cfg)
    assert h["train_loss"] == pytest.approx(h["train_loss_ce"], rel=1e-6)
    assert h["train_loss_vein"] > 0


def test_resume_from_checkpoint_is_bit_exact_on_cpu(tiny_train_config, tmp_path):
    full = run_trial(tiny_train_config)
    run_trial(tiny_train_config.model_copy(update={"epochs": 1}),
              on_epoch=lambda m, s: save_checkpoint(s, tmp_path / f"e{m['epoch']}.pt"))
    resumed = run_trial(tiny_train_config, resume=load_checkpoint(tmp_path / "e1.pt"))
    assert len(resumed) == 2 and resumed[0]["train_loss"] == full[0]["train_loss"]  # history restored
    assert resumed[1]["train_loss"] == full[1]["train_loss"]
    assert resumed[1]["eval_top1"] == full[1]["eval_top1"]


def test_mask_set_must_match_the_model(tiny_train_config):
    with pytest.raises(ValueError, match="region classes"):
        run_trial(tiny_train_config.model_copy(update={"region_classes": ["vein"], "gamma": 0.0, "lam": 0.0, "beta": 0.7}))
    with pytest.raises(ValueError, match="no mask row"):
        read_masks(tiny_train_config.masks, image_ids=["nope/x"], region_classes=["vein", "contour"])


def test_train_to_dir_writes_config_metrics_checkpoint(tiny_train_config, tmp_path):
    final = train_to_dir(tiny_train_config.model_copy(update={"epochs": 1}), tmp_path)
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "metrics.csv").is_file()
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1
    assert final["epoch"] == 1
