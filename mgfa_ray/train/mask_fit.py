"""The mask-fit check: does the attention follow the ground-truth masks better than a map that
ignores the image?

An accuracy comparison between a masked row and the backbone says something about the method only
where the attention maps (Eq. 4) actually follow the masks. Their Eq. 7 error alone cannot say
that: its size depends on the masks. So it is compared with the errors of two maps that see no
image, on the same images and targets:

* the **best constant map** — one value everywhere, the mean of the targets over the split's
  images and positions (no constant does better in squared error);
* the **position prior** — the mean ground-truth map of the *training* images, position by
  position (:func:`position_prior`): where the region usually is. A fixed map that knows the layout
  of the data set, and the yardstick that matters, since a crop that centres the object makes a
  constant-looking target easy to "fit".

``fit_prior = error / prior_error`` and ``fit_const = error / const_error``: 0 is a perfect map, 1
is no better than the yardstick, above 1 worse. The masks are *learned* on a split where
``fit_prior < 1`` for every region class the model uses (:func:`masks_learned`). Kinds are always
reported separately, never pooled.

Images whose target for a kind is empty (the detector found no such region, or a crop cut it out)
have no place for the attention to go; they are left out of a kind's metric, always, and of its
training loss unless ``empty_masks: include`` keeps the paper's behaviour
(:func:`mgfa_ray.train.model.mgfa_loss`). A softmax map sums to 1, so it can never reach an empty target.

All tensors here are on one device; nothing depends on Ray. Used by :mod:`mgfa_ray.train.trial`
(every epoch, on the train, eval and test splits) and :mod:`mgfa_ray.analysis.ablation` (the table's
``masks learned`` column).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch

FIT_TERMS = ("loss", "const_loss", "prior_loss", "fit_const", "fit_prior")
"""What :func:`mask_fit` reports per region class, in this order (names without the region-class suffix)."""


def region_present(target: torch.Tensor) -> torch.Tensor:
    """Which ground-truth maps hold a region: (B, K, H, W) float → (B, K) bool, True where the map
    has any mass (a region covers part of the image after its crop)."""
    if target.dim() != 4:
        raise ValueError(f"target must be (B, K, H, W), got shape {tuple(target.shape)}")
    return target.flatten(2).sum(-1) > 0


def position_prior(targets: torch.Tensor) -> torch.Tensor:
    """The position prior: the mean ground-truth map over the images that hold the region, per kind.

    Args:
        targets: (N, K, H, W) ground-truth maps of the training images at the evaluation geometry
            (:func:`mgfa_ray.train.model.gt_attention`).

    Returns:
        float32 (K, H, W); a kind no image holds gets zeros.
    """
    present = region_present(targets).to(targets.dtype)  # (N, K)
    total = (targets * present[..., None, None]).sum(0)
    return (total / present.sum(0).clamp_min(1)[:, None, None]).float()


def mask_fit(*, attention: torch.Tensor, target: torch.Tensor, prior: torch.Tensor) -> list[dict[str, float]]:
    """Eq. 7 errors of the attention, the best constant map and the position prior, per region class.

    Args:
        attention: Predicted maps (N, K, H, W), the model's activation.
        target: Ground-truth maps (N, K, H, W) normalised for that activation.
        prior: (K, H, W) from :func:`position_prior` on the training split.

    Returns:
        One dict per kind (channel order) with ``n`` (images holding the region), ``loss`` (the
        attention's mean squared error over those images and the H*W positions), ``const_loss``,
        ``prior_loss``, ``fit_const`` = loss / const_loss and ``fit_prior`` = loss / prior_loss. A
        value is NaN where no image holds the kind, a ratio NaN where its yardstick's error is 0.

    Raises:
        ValueError: The shapes of ``attention``, ``target`` and ``prior`` differ.
    """
    if attention.shape != target.shape or tuple(prior.shape) != tuple(target.shape[1:]):
        raise ValueError(f"attention {tuple(attention.shape)}, target {tuple(target.shape)} and prior "
                         f"{tuple(prior.shape)} must be (N, K, H, W), (N, K, H, W) and (K, H, W)")
    present = region_present(target)
    t, a, p = target.double(), attention.double(), prior.double()
    out = []
    for k in range(target.shape[1]):
        rows = present[:, k]
        n = int(rows.sum())
        if n == 0:
            out.append({"n": 0, **{name: math.nan for name in FIT_TERMS}})
            continue
        tk = t[rows, k]
        loss = float(((tk - a[rows, k]) ** 2).mean())
        const = float(((tk - tk.mean()) ** 2).mean())
        prior_loss = float(((tk - p[k]) ** 2).mean())
        out.append({"n": n, "loss": loss, "const_loss": const, "prior_loss": prior_loss,
                    "fit_const": loss / const if const > 0 else math.nan,
                    "fit_prior": loss / prior_loss if prior_loss > 0 else math.nan})
    return out


def masked_classes(region_classes: Sequence[str], feature_weights: Sequence[float],
                 mask_loss_weights: Sequence[float]) -> list[str]:
    """The region classes a model uses: a non-zero Eq. 5 feature weight or Eq. 8 loss weight."""
    return [kind for kind, f, m in zip(region_classes, feature_weights, mask_loss_weights) if f or m]


def masks_learned(metrics: Mapping[str, Any], kinds: Sequence[str], *, split: str = "train") -> bool | None:
    """Whether the attention beats the position prior on ``split`` for every kind in ``kinds``.

    Args:
        metrics: One epoch's metrics (:func:`mgfa_ray.train.trial.epoch_metrics`): reads
            ``<split>_fit_prior_<kind>``.
        kinds: The kinds the model uses (:func:`masked_classes`).
        split: ``train`` (the check: an accuracy comparison says nothing about the method where
            the masks were not learned on the images they trained on), ``eval`` or ``test``.

    Returns:
        ``None`` without kinds (the backbone row), else True when every kind's ratio is below 1;
        False when one is not, or is missing or NaN.
    """
    if not kinds:
        return None
    values = [metrics.get(f"{split}_fit_prior_{kind}") for kind in kinds]
    return all(v is not None and not math.isnan(float(v)) and float(v) < 1.0 for v in values)
