"""The mask-fit check on constructed maps: a map equal to the prior scores 1, a perfect map 0,
empty targets count nowhere, and ``masks_learned`` reads the training split's ratios."""

import math

import pytest
import torch

from mgfa_ray.train.mask_fit import mask_fit, masked_classes, masks_learned, position_prior, region_present
from mgfa_ray.train.model import gt_attention, mgfa_loss


def _targets(n: int = 6, grid: int = 8, seed: int = 0) -> torch.Tensor:
    """(n, 2, grid, grid) max-normalised box targets at random places, the last image empty for kind 0."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(n, 2, 32, 32)
    for i in range(n):
        for k in range(2):
            y, x = torch.randint(0, 20, (2,), generator=g).tolist()
            masks[i, k, y : y + 10, x : x + 12] = 1.0
    masks[-1, 0] = 0.0
    return gt_attention(masks, grid=(grid, grid), activation="sigmoid")


def test_a_map_equal_to_the_prior_scores_one_and_a_perfect_map_zero():
    target = _targets()
    prior = position_prior(target)
    perfect = mask_fit(attention=target.clone(), target=target, prior=prior)
    as_prior = mask_fit(attention=prior.expand_as(target).clone(), target=target, prior=prior)
    for k in range(2):
        assert perfect[k]["loss"] == 0 and perfect[k]["fit_prior"] == 0 and perfect[k]["fit_const"] == 0
        assert as_prior[k]["fit_prior"] == pytest.approx(1.0)
        assert as_prior[k]["fit_const"] < 1  # the prior knows the layout: better than any constant
    constant = mask_fit(attention=torch.full_like(target, float(target[:-1, 0].mean())), target=target, prior=prior)
    assert constant[0]["fit_const"] == pytest.approx(1.0)  # the mean of the targets is the best constant


def test_prior_is_the_mean_target_over_images_holding_the_region():
    target = _targets()
    prior = position_prior(target)
    torch.testing.assert_close(prior[0], target[:-1, 0].mean(0))  # the empty image is left out
    torch.testing.assert_close(prior[1], target[:, 1].mean(0))
    assert position_prior(torch.zeros(3, 1, 4, 4)).abs().sum() == 0  # a kind no image holds


def test_empty_targets_count_in_neither_metric_nor_loss():
    target = _targets()
    attention = torch.rand(target.shape, generator=torch.Generator().manual_seed(1))
    prior = position_prior(target)
    fits = mask_fit(attention=attention, target=target, prior=prior)
    assert fits[0]["n"] == 5 and fits[1]["n"] == 6
    expected = ((target[:-1, 0] - attention[:-1, 0]) ** 2).mean().item()
    assert fits[0]["loss"] == pytest.approx(expected)
    # changing the attention on the empty image changes nothing
    other = attention.clone()
    other[-1, 0] = 5.0
    assert mask_fit(attention=other, target=target, prior=prior)[0]["loss"] == pytest.approx(expected)

    logits, labels = torch.zeros(6, 3), torch.zeros(6, dtype=torch.int64)
    weights = {"vein": 1.0, "contour": 1.0}
    kept = mgfa_loss(logits=logits, labels=labels, attention=attention, target=target, mask_loss_weights=weights,
                     mu=1.0, present=region_present(target))
    paper = mgfa_loss(logits=logits, labels=labels, attention=attention, target=target, mask_loss_weights=weights,
                      mu=1.0)
    assert kept["loss_vein"].item() == pytest.approx(expected)
    assert paper["loss_vein"].item() == pytest.approx(((target[:, 0] - attention[:, 0]) ** 2).mean().item())
    assert kept["loss_contour"].item() == pytest.approx(paper["loss_contour"].item())  # no empty contour target
    # a batch without any region of a kind: that term is 0 and gives no gradient
    att = attention[-1:, :1].clone().requires_grad_(True)
    none = mgfa_loss(logits=logits[-1:], labels=labels[-1:], attention=att, target=target[-1:, :1],
                     mask_loss_weights={"vein": 1.0}, mu=0.0, present=region_present(target[-1:, :1]))
    none["loss"].backward()
    assert none["loss_vein"].item() == 0 and att.grad.abs().sum() == 0


def test_no_image_with_a_region_gives_nan_not_zero():
    target = torch.zeros(4, 1, 4, 4)
    fit = mask_fit(attention=torch.rand(4, 1, 4, 4), target=target, prior=position_prior(target))[0]
    assert fit["n"] == 0 and math.isnan(fit["loss"]) and math.isnan(fit["fit_prior"])


def test_masks_learned_reads_every_used_kind_on_the_training_split():
    assert masked_classes(["vein", "contour"], (0.5, 0.0), (0.1, 0.0)) == ["vein"]
    assert masked_classes(["vein", "contour"], (0.0, 0.0), (0.0, 0.0)) == []
    metrics = {"train_fit_prior_vein": 0.4, "train_fit_prior_contour": 1.2, "eval_fit_prior_contour": 0.9}
    assert masks_learned(metrics, ["vein"]) is True
    assert masks_learned(metrics, ["vein", "contour"]) is False
    assert masks_learned(metrics, ["contour"], split="eval") is True
    assert masks_learned({"train_fit_prior_vein": math.nan}, ["vein"]) is False
    assert masks_learned(metrics, []) is None


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="must be"):
        mask_fit(attention=torch.zeros(2, 1, 4, 4), target=torch.zeros(2, 1, 4, 4), prior=torch.zeros(2, 4, 4))
