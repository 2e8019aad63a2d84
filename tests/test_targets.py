"""The proxy's target shapes (mgfa_ray/train/targets.py): a moved crop window and line targets, and the
manifest that keeps the detector's labelled photos out of val and test."""

import numpy as np
import pytest
import torch

from mgfa_ray.config import DatasetConfig, TrainConfig
from mgfa_ray.data.manifest import build_manifest
from mgfa_ray.data.regions import index_labels
from mgfa_ray.train.targets import jitter_offsets, line_direction, line_mask, line_masks
from mgfa_ray.train.data import region_boxes


def test_jitter_offsets_are_a_fixed_uniform_draw_per_image():
    ids = [f"species/leaf-{i:03d}-1" for i in range(400)]
    off = jitter_offsets(ids)
    assert off.shape == (400, 2) and off.min() >= -1 and off.max() <= 1
    np.testing.assert_array_equal(jitter_offsets(ids[::-1])[::-1], off)  # the same id, the same move
    np.testing.assert_array_equal(jitter_offsets(ids[7:8]), off[7:8])
    assert abs(off.mean()) < 0.1 and off.std() > 0.5  # spread over [-1, 1], not a constant
    assert np.abs(off[:, 0] - off[:, 1]).mean() > 0.3  # x and y moves differ


def test_jittered_crop_moves_the_window_and_keeps_the_box_inside():
    contour = [1.0, 0.5, 0.5, 0.4, 0.2, 0.9]  # box x 0.3-0.7, y 0.4-0.6
    plain = region_boxes([[contour]], region=1, margin=0.5)[0]
    np.testing.assert_allclose(plain, [0.1, 0.3, 0.9, 0.7])
    moved = region_boxes([[contour]], region=1, margin=0.5, jitter=1.0, offsets=np.array([[1.0, -0.5]]))[0]
    # x moves by 1 x 1.0 x 0.5 x 0.4 = 0.2, y by -0.5 x 0.5 x 0.2 = -0.05; the window clips at 1.
    np.testing.assert_allclose(moved, [0.3, 0.25, 1.0, 0.65])
    assert moved[0] <= 0.3 and moved[2] >= 0.7 and moved[1] <= 0.4 and moved[3] >= 0.6  # the box stays inside
    half = region_boxes([[contour]], region=1, margin=0.5, jitter=0.5, offsets=np.array([[1.0, -0.5]]))[0]
    np.testing.assert_allclose(half, [0.2, 0.275, 1.0, 0.675])
    with pytest.raises(ValueError, match="offsets"):
        region_boxes([[contour]], region=1, margin=0.5, jitter=1.0)


def _band_image(direction: int, side: int = 32) -> np.ndarray:
    """A light image with a dark band along one diagonal (a leaf's midrib on a light table)."""
    y, x = np.mgrid[0:side, 0:side]
    on = np.abs(x - y) <= 3 if direction == 1 else np.abs(x + y - (side - 1)) <= 3
    return np.where(on, 40, 220).astype(np.uint8)


@pytest.mark.parametrize("direction", [1, -1])
def test_line_direction_follows_the_dark_pixels(direction):
    assert line_direction(_band_image(direction)) == direction
    assert line_direction(np.full((8, 8), 128)) == 1  # no contrast: a fixed answer, no error


def test_line_mask_covers_the_diagonal_and_not_the_other_corners():
    m = line_mask(np.array([0.0, 0.0, 1.0, 1.0]), direction=1, width=0.125, resolution=16)
    assert m.shape == (16, 16) and m.dtype == np.float32
    assert np.diag(m).min() == 1.0 and m[0, 15] == 0 and m[15, 0] == 0
    assert m.mean() == pytest.approx(0.125 * np.sqrt(2), rel=0.1)  # a band of width w along a length of sqrt(2)
    mirrored = line_mask(np.array([0.0, 0.0, 1.0, 1.0]), direction=-1, width=0.125, resolution=16)
    np.testing.assert_array_equal(mirrored, m[:, ::-1])
    wide = line_mask(np.array([0.0, 0.0, 1.0, 1.0]), direction=1, width=0.25, resolution=16)
    assert wide.sum() > 1.7 * m.sum()
    with pytest.raises(ValueError, match="direction"):
        line_mask(np.zeros(4), direction=0, width=0.1, resolution=8)


def test_line_masks_pick_each_images_diagonal_and_leave_boxless_images_empty():
    images = np.stack([np.repeat(_band_image(d)[None], 3, axis=0) for d in (1, -1, 1)])
    boxes = np.array([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0], [np.nan] * 4])
    out = line_masks(images, boxes, width=0.125, resolution=16)
    assert out.shape == (3, 16, 16)
    assert out[0, 0, 0] == 1.0 and out[0, 0, 15] == 0  # top-left to bottom-right
    assert out[1, 0, 15] == 1.0 and out[1, 0, 0] == 0  # top-right to bottom-left
    assert out[2].max() == 0  # no box: no target (left out of the loss with empty_masks: exclude)


def test_trial_data_with_jitter_and_line_targets(tiny_train_config):
    """Through load_trial_data: the jittered crop moves the contour within its frame from photo to
    photo, and the vein channel becomes a thin band that differs from the box mask."""
    from mgfa_ray.train.data import load_trial_data

    base = {"crop_to_region": "contour", "crop_margin": 0.5, "resize": 64, "train_crop": 64}
    box_cfg = tiny_train_config.model_copy(update=base)
    cfg = tiny_train_config.model_copy(update={**base, "crop_jitter": 1.0, "line_regions": ["vein"],
                                               "line_width": 0.1})
    centred, _ = load_trial_data(box_cfg, device=torch.device("cpu"))
    moved, _ = load_trial_data(cfg, device=torch.device("cpu"))
    _, c_masks, _ = centred["train"]
    images, masks, _ = moved["train"]
    vein_box = c_masks[:, 0].flatten(1).amax(1) > 0
    assert vein_box.sum() >= 2
    assert masks[vein_box, 0].mean() < 0.6 * c_masks[vein_box, 0].mean()  # a band is thinner than its box
    assert masks[~vein_box, 0].max() == 0
    labelled = c_masks[:, 1].flatten(1).amax(1) > 0

    def centre(m):  # the contour mask's centre of mass, (N, 2) in pixels
        grid = torch.arange(m.shape[-1], dtype=torch.float32)
        w = m / m.sum(dim=(1, 2), keepdim=True)
        return torch.stack([(w.sum(1) * grid).sum(1), (w.sum(2) * grid).sum(1)], dim=1)

    spread_centred = centre(c_masks[labelled, 1]).std(0).sum()
    spread_moved = centre(masks[labelled, 1]).std(0).sum()
    assert spread_moved > spread_centred + 2  # the region is no longer in one place of every crop


def test_line_regions_and_jitter_are_validated(tiny_train_config):
    base = tiny_train_config.model_dump()
    with pytest.raises(ValueError, match="line_regions"):
        TrainConfig.model_validate({**base, "line_regions": ["stem"]})
    with pytest.raises(ValueError, match="crop_jitter"):
        TrainConfig.model_validate({**base, "crop_jitter": 0.5})
    TrainConfig.model_validate({**base, "crop_jitter": 0.5, "crop_to_region": "contour", "line_regions": ["vein"]})


def test_labelled_photos_groups_train(data_root):
    """labelled_in_train: every group holding a hand-labelled photo is in train; the test and val
    counts are as without it; too many labelled groups is one clear error."""
    labels = index_labels(data_root / "leafsnap20-regions" / "labels")
    cfg = DatasetConfig(layout="class_folders", images="leafsnap20", max_classes=4, max_per_class=10,
                        val_fraction=0.2, test_fraction=0.5, labelled_in_train=True)
    df = build_manifest(data_root / "leafsnap20", cfg, labelled=labels)
    labelled = df["image_id"].isin(set(labels))
    assert labelled.sum() == 8  # 2 per species
    assert (df.loc[labelled, "split"] == "train").all()
    free = build_manifest(data_root / "leafsnap20", cfg.model_copy(update={"labelled_in_train": False}), labelled=labels)
    assert (free.loc[free["image_id"].isin(set(labels)), "split"] != "train").any()  # the case it fixes
    assert df["split"].value_counts().to_dict() == free["split"].value_counts().to_dict()
    tight = cfg.model_copy(update={"val_fraction": 0.3, "test_fraction": 0.6})
    with pytest.raises(ValueError, match="labelled_in_train"):
        build_manifest(data_root / "leafsnap20", tight, labelled=labels)
