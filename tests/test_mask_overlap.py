"""The detector's held-out mask check (mgfa_ray.detector.overlap) on constructed boxes."""

import pytest

from mgfa_ray.detector.overlap import mask_overlap
from mgfa_ray.data.regions import Box

LEAF = Box(1, 0.5, 0.5, 0.5, 0.5)   # contour, the same place in every training photo
VEIN_LEFT = Box(0, 0.25, 0.5, 0.1, 0.8)
VEIN_RIGHT = Box(0, 0.75, 0.5, 0.1, 0.8)


def test_a_perfect_detector_beats_the_prior_and_a_blind_one_scores_zero():
    train = [[LEAF, VEIN_LEFT]] * 3 + [[LEAF]]  # one training photo without a vein: left out of its prior
    drawn = [[LEAF, VEIN_RIGHT], [LEAF, VEIN_LEFT], [LEAF]]
    perfect = mask_overlap(found=drawn, drawn=drawn, train_drawn=train, num_classes=2)
    assert perfect[0] == {"mask_iou": 1.0, "prior_iou": pytest.approx(0.5), "n_mask_images": 2}  # prior: the left vein
    assert perfect[1] == {"mask_iou": 1.0, "prior_iou": 1.0, "n_mask_images": 3}  # the contour never moves
    blind = mask_overlap(found=[[], [], []], drawn=drawn, train_drawn=train, num_classes=2)
    assert blind[0]["mask_iou"] == 0.0 and blind[1]["mask_iou"] == 0.0
    assert blind[0]["prior_iou"] == perfect[0]["prior_iou"]


def test_a_class_no_held_out_photo_holds_is_not_measured_and_lengths_must_match():
    out = mask_overlap(found=[[LEAF]], drawn=[[LEAF]], train_drawn=[[LEAF]], num_classes=2)
    assert out[0] == {"mask_iou": None, "prior_iou": None, "n_mask_images": 0}
    with pytest.raises(ValueError, match="found has 1 photos, drawn 2"):
        mask_overlap(found=[[LEAF]], drawn=[[LEAF], [LEAF]], train_drawn=[], num_classes=2)
