"""The mask-guided classifier of Pan et al., DICTA 2021 (Eq. 2-8), in plain PyTorch.

* :func:`build_backbone` — torchvision backbone cut before global pooling: images
  (B, 3, H_in, W_in) → feature map F = M_img (B, C, H, W).
* :class:`MaskAttention` — Eq. 2-4: channel max and mean, a 1x1 conv per region class, and one of
  three activations → attention maps (B, K, H, W):

  =================  ==========================  ===============  ============================
  activation         map                         map mean over    β·M⊙F pooled, uniform map
                                                 H×W
  =================  ==========================  ===============  ============================
  ``softmax``        softmax over H·W (paper     1/(H·W)          β/(H·W) · pooled F (≈1% of F
                     Eq. 4 as printed)                            at 14 × 14)
  ``softmax_scaled`` H·W · softmax over H·W      1                β · pooled F (uniform map:
                                                                  F_final = F exactly)
  ``sigmoid``        sigmoid per position        in (0, 1)        β/2 · pooled F at logit 0
                     (released code)
  =================  ==========================  ===============  ============================
* :class:`MGFAClassifier` — Eq. 5-6 feature mix F_final = α·F + β·M_vein⊙F + γ·M_con⊙F, then
  global average pooling and a linear head; ``forward_features`` / ``forward_head`` as in timm.
* :func:`gt_attention` — ground-truth maps M_gt: binary masks average-pooled to the feature grid
  and normalised to match the activation (sum 1 for softmax, mean 1 for softmax_scaled, peak 1
  for sigmoid).
* :func:`mgfa_loss` — Eq. 7-8: L = δ·L_vein + λ·L_con + μ·L_ce, every term reported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Mapping

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from mgfa_ray.weights import WeightsError, load_local_weights

Activation = Literal["softmax", "softmax_scaled", "sigmoid"]
ACTIVATIONS: tuple[str, ...] = ("softmax", "softmax_scaled", "sigmoid")


def check_weights(backbone: str, weights: str | None, *, field: str = "weights") -> None:
    """Check a weights setting before anything runs: a file exists, loads with
    ``torch.load(weights_only=True)``, is a ``state_dict`` and fits ``backbone`` (key names and
    tensor shapes; the classifier keys may be absent). ``None`` and ``"imagenet"`` pass unchecked.

    Costs one backbone build on CPU (about 0.1 s for mobilenet_v2, 1 s for resnet101) and one
    read of the file.

    Raises:
        WeightsError: Naming ``field``, the file, what is wrong and what to do.
    """
    if weights in (None, "imagenet"):
        return
    try:
        build_backbone(backbone, weights)
    except WeightsError as err:
        raise WeightsError(f"{field}: {err}") from None


def dilate_stage(stage: nn.Module, dilation: int) -> None:
    """Remove the stride of a backbone stage and dilate its later 3x3 convolutions instead, in
    place: the stage's output grid doubles per side, its receptive field and weights are kept.

    The first strided convolution (3x3, and the 1x1 of a residual shortcut) gets stride 1 and
    keeps its dilation; every 3x3 convolution after it gets ``dilation`` (padding alike), as
    torchvision's ``replace_stride_with_dilation`` does for Bottleneck ResNets (DeepLab, Chen et
    al. 2017). Works for BasicBlock ResNets and MobileNetV2 blocks, which torchvision's option
    does not support.

    Args:
        stage: The modules from the stage's first strided block to the backbone's end.
        dilation: 2 (one stride removed) or 4 (two).
    """
    strided_seen = False
    for m in stage.modules():
        if not isinstance(m, nn.Conv2d):
            continue
        if m.stride != (1, 1):
            m.stride = (1, 1)
            strided_seen = True
        elif strided_seen and m.kernel_size == (3, 3):
            m.dilation, m.padding = (dilation, dilation), (dilation, dilation)


def build_backbone(name: str, weights: str | None, *, output_stride: int = 32) -> tuple[nn.Module, int]:
    """A torchvision backbone without its pooling and classifier.

    Args:
        name: ``mobilenet_v2``, ``resnet18``, ``resnet34``, ``resnet50`` or ``resnet101``.
        weights: ``None`` (random init), ``"imagenet"`` (torchvision's ``DEFAULT`` weights,
            downloaded; needs internet) or a path to a local ``state_dict`` keyed like the full
            torchvision model (the classifier keys may be absent).
        output_stride: 32 (torchvision's), 16 or 8: the last one or two strides become dilations
            (:func:`dilate_stage`), so a 448 px image gives a 28 x 28 grid at 16 instead of
            14 x 14. Pretrained weights load unchanged.

    Returns:
        ``(module, C)``: module maps (B, 3, H_in, W_in) float images to
        (B, C, H_in/output_stride, W_in/output_stride).

    Raises:
        ValueError: Unknown backbone or output stride; an ImageNet download that fails (the
            message names the local-file option).
        WeightsError: A weights file that is missing, does not load with ``weights_only=True``,
            is not a state_dict, or does not fit (a :class:`~mgfa_ray.errors.ConfigError`).
    """
    if output_stride not in (8, 16, 32):
        raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
    builders = {
        "mobilenet_v2": (torchvision.models.mobilenet_v2, "MobileNet_V2_Weights", "classifier."),
        "resnet18": (torchvision.models.resnet18, "ResNet18_Weights", "fc."),
        "resnet34": (torchvision.models.resnet34, "ResNet34_Weights", "fc."),
        "resnet50": (torchvision.models.resnet50, "ResNet50_Weights", "fc."),
        "resnet101": (torchvision.models.resnet101, "ResNet101_Weights", "fc."),
    }
    if name not in builders:
        raise ValueError(f"unknown backbone {name!r}; supported: {sorted(builders)}")
    build, enum_name, head = builders[name]
    if weights == "imagenet":
        try:
            model = build(weights=getattr(torchvision.models, enum_name).DEFAULT)
        except Exception as err:  # URLError, HTTPError, RuntimeError from the hub download
            raise WeightsError(
                f"could not download ImageNet weights for {name} ({err.__class__.__name__}: {err}); "
                f"offline, set 'weights' to a local state_dict file instead"
            ) from None
    else:
        model = build(weights=None)
        if weights is not None:
            load_local_weights(model, Path(weights), head)
    if name == "mobilenet_v2":
        # Stages start at the strided blocks 7 (stride 16) and 14 (stride 32) of model.features.
        stages, body, channels = [model.features[7:14], model.features[14:]], model.features, model.last_channel
    else:
        stages = [model.layer3, model.layer4]
        body = nn.Sequential(
            model.conv1, model.bn1, model.relu, model.maxpool,
            model.layer1, model.layer2, model.layer3, model.layer4,
        )
        channels = model.fc.in_features
    if output_stride <= 16:
        dilate_stage(stages[1], 2 if output_stride == 16 else 4)
    if output_stride == 8:
        dilate_stage(stages[0], 2)
    return body, channels


class MaskAttention(nn.Module):
    """Eq. 2-4: attention maps from channel statistics of the feature map.

    M_max = max_c F, M_mean = mean_c F (Eq. 2-3), each (B, 1, H, W);
    M_k = act(conv1x1_k([M_max | M_mean])) (Eq. 4) for each region class k.

    Args:
        num_regions: K, the number of region classes (1 or more).
        activation: ``softmax`` over the H*W positions of each map (paper Eq. 4: each map sums
            to 1, mean 1/(H*W)), ``softmax_scaled`` (the same times H*W: mean 1 like the feature
            it weights, so a uniform map gives M⊙F = F) or ``sigmoid`` per position (released
            code: values in (0, 1)).
        shared_conv: One 1x1 conv shared by all K maps (released code) instead of one each.
        bias: The 1x1 conv has a bias (the released code has none).

    Raises:
        ValueError: ``num_regions`` < 1 or an unknown activation.
    """

    def __init__(self, num_regions: int, *, activation: Activation = "softmax", shared_conv: bool = False,
                 bias: bool = True):
        super().__init__()
        if num_regions < 1:
            raise ValueError(f"num_regions must be >= 1, got {num_regions}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.num_regions = num_regions
        self.activation = activation
        self.shared_conv = shared_conv
        self.conv = nn.Conv2d(2, 1 if shared_conv else num_regions, kernel_size=1, bias=bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Map features (B, C, H, W) to attention maps (B, K, H, W), same dtype."""
        m_max = features.amax(dim=1, keepdim=True)  # Eq. 3
        m_mean = features.mean(dim=1, keepdim=True)  # Eq. 2
        logits = self.conv(torch.cat([m_max, m_mean], dim=1))  # Eq. 4, (B, K or 1, H, W)
        if self.shared_conv:
            logits = logits.expand(-1, self.num_regions, -1, -1)
        if self.activation == "sigmoid":
            return torch.sigmoid(logits)
        b, k, h, w = logits.shape
        maps = logits.reshape(b, k, h * w).softmax(dim=-1).reshape(b, k, h, w)
        return maps * (h * w) if self.activation == "softmax_scaled" else maps


def fuse_features(
    features: torch.Tensor, attention: torch.Tensor, *, alpha: float, feature_weights: tuple[float, ...]
) -> torch.Tensor:
    """Eq. 5-6: F_final = α·F + β·M_vein⊙F + γ·M_con⊙F, generalised to K region classes as
    F_final = α·F + Σ_k w_k·(M_k ⊙ F) with (w_0, w_1, ...) = (β, γ, ...).

    A weight of 0 drops its term (no computation); α = 1 with all w_k = 0 returns F unchanged
    (the backbone-only ablation of Table III).

    Args:
        features: F, (B, C, H, W) float.
        attention: M, (B, K, H, W), same dtype; each map broadcasts over the C channels.
        alpha: Weight of the plain features, >= 0.
        feature_weights: (β, γ, ...), one per region class (length K), >= 0; with ``alpha`` they
            sum to 1 (checked by :class:`MGFAClassifier`).

    Returns:
        F_final, (B, C, H, W), same dtype as ``features``.
    """
    assert attention.shape[1] == len(feature_weights), (attention.shape, feature_weights)
    out = features if alpha == 1 else alpha * features
    for k, w in enumerate(feature_weights):
        if w:
            out = out + w * attention[:, k : k + 1] * features
    return out


class MGFAClassifier(nn.Module):
    """Backbone + mask attention + linear head (paper Fig. 2).

    Args:
        backbone: Module mapping (B, 3, H_in, W_in) → (B, C, H, W).
        num_features: C.
        num_classes: Number of categories.
        num_regions: K region classes.
        alpha, feature_weights: Eq. 5-6 weights α and (β, γ, ...), one per region class;
            non-negative, summing to 1.
        activation, shared_conv: See :class:`MaskAttention`.
        attention_bias: The attention's 1x1 conv has a bias (released code: no).
        head_bias: The linear classifier has a bias (released code: no).

    Raises:
        ValueError: A negative weight, weights that do not sum to 1, or a feature-weight count
            different from ``num_regions``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        num_features: int,
        num_classes: int,
        num_regions: int,
        alpha: float,
        feature_weights: tuple[float, ...],
        activation: Activation = "softmax",
        shared_conv: bool = False,
        attention_bias: bool = True,
        head_bias: bool = True,
    ):
        super().__init__()
        weights = (alpha, *feature_weights)
        if len(feature_weights) != num_regions:
            raise ValueError(f"need {num_regions} feature weights (one per region class), got {feature_weights}")
        if min(weights) < 0 or abs(sum(weights) - 1.0) > 1e-6:
            raise ValueError(f"feature weights must be >= 0 and sum to 1 (Eq. 6), got {weights}")
        self.backbone = backbone
        self.attention = MaskAttention(num_regions, activation=activation, shared_conv=shared_conv,
                                       bias=attention_bias)
        self.head = nn.Linear(num_features, num_classes, bias=head_bias)
        self.alpha = alpha
        self.feature_weights = tuple(feature_weights)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H_in, W_in), normalised float → backbone features F (B, C, H, W)."""
        return self.backbone(images)

    def fuse(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features F (B, C, H, W) → (F_final (B, C, H, W) of Eq. 5-6, attention maps (B, K, H, W)
        of Eq. 2-4); what the head pools, and what class activation maps weight."""
        attention = self.attention(features)
        return fuse_features(features, attention, alpha=self.alpha, feature_weights=self.feature_weights), attention

    def forward_head(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features F (B, C, H, W) → (logits (B, num_classes), attention maps (B, K, H, W))."""
        fused, attention = self.fuse(features)
        return self.head(fused.mean(dim=(2, 3))), attention

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, 3, H_in, W_in) → (logits (B, num_classes), attention (B, K, H, W))."""
        return self.forward_head(self.forward_features(images))


def gt_attention(masks: torch.Tensor, *, grid: tuple[int, int], activation: Activation) -> torch.Tensor:
    """Ground-truth attention maps M_gt from (augmented) region masks.

    The masks are average-pooled to the feature grid (the fraction of each cell covered by the
    region), then normalised to the scale the activation produces: each map divided by its sum
    over H*W for ``softmax`` (so it is a distribution like Eq. 4's output), by its mean over H*W
    for ``softmax_scaled`` (sum H*W, like H*W times a softmax), by its maximum for ``sigmoid``
    (peak 1, as the released code). An all-zero map (no region found) stays zero.

    This is the M_gt of Eq. 7 (paper Sec. III-A: masks reduced to the feature grid by average
    pooling and normalised).

    Args:
        masks: (B, K, H_m, W_m) float in [0, 1], at least as fine as the grid (H_m >= H, W_m >= W).
        grid: (H, W) of the feature map.
        activation: The attention activation the maps are compared with.

    Returns:
        (B, K, H, W) float, same dtype as ``masks``.

    Raises:
        ValueError: ``masks`` is not 4-D or is coarser than ``grid``, or an unknown activation.
    """
    if masks.dim() != 4:
        raise ValueError(f"masks must be (B, K, H_m, W_m), got shape {tuple(masks.shape)}")
    if masks.shape[-2] < grid[0] or masks.shape[-1] < grid[1]:
        raise ValueError(
            f"masks of {tuple(masks.shape[-2:])} px are coarser than the feature grid {tuple(grid)}; "
            f"store or resize masks at least as fine as the grid"
        )
    pooled = F.adaptive_avg_pool2d(masks, grid)
    flat = pooled.flatten(2)
    if activation == "sigmoid":
        scale = flat.amax(-1, keepdim=True)
    elif activation == "softmax_scaled":
        scale = flat.mean(-1, keepdim=True)
    elif activation == "softmax":
        scale = flat.sum(-1, keepdim=True)
    else:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return (flat / scale.clamp_min(1e-12)).reshape_as(pooled)


def mgfa_loss(
    *,
    logits: torch.Tensor,
    labels: torch.Tensor,
    attention: torch.Tensor,
    target: torch.Tensor,
    mask_loss_weights: Mapping[str, float],
    mu: float,
    present: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Eq. 7-8: L = Σ_k w_k·L_k + μ·L_ce, with L_k = mean over H*W of (M_gt,k − M_k)² the mask
    loss of region class k, averaged over the batch's images (those holding the region, when
    ``present`` is given).

    Args:
        logits: (B, num_classes) float.
        labels: (B,) int64 class indices.
        attention: Predicted maps (B, K, H, W).
        target: Ground-truth maps (B, K, H, W) from :func:`gt_attention`.
        mask_loss_weights: ``{region class: weight}``, (δ, λ, ...) in the channel order of
            ``attention`` (K entries, e.g. ``{"vein": 0.1, "contour": 0.1}``); a weight of 0
            removes that term from the total.
        mu: Weight of the cross-entropy term, >= 0; 0 removes it.
        present: Optional bool (B, K): which images hold each kind's region
            (:func:`mgfa_ray.train.mask_fit.region_present`). Given, L_k averages over those images only
            (0, with no gradient, when none does): an empty target is no place the attention can
            go, and a softmax map can never reach it. ``None``: every image counts (paper).

    Returns:
        ``{"loss_ce": L_ce, "loss_<region class>": L_k for each region class, "loss": total}``, scalar
        float32 tensors; the per-term values are unweighted and always computed so they can be
        reported. These are the names the trial reports with a ``train_`` / ``eval_`` prefix
        (:func:`mgfa_ray.train.trial.epoch_metrics`).

    Raises:
        ValueError: ``attention`` and ``target`` differ in shape (region classes or grid), the
            number of weights is not K, or a region class is named ``ce`` (its term would be
            the cross-entropy's name).
    """
    if attention.shape != target.shape:
        raise ValueError(
            f"attention maps {tuple(attention.shape)} and ground-truth maps {tuple(target.shape)} differ (B, K, H, W): "
            f"the masks' region classes or grid do not match the model"
        )
    if len(mask_loss_weights) != attention.shape[1]:
        raise ValueError(f"need one loss weight per region class ({attention.shape[1]}), got {dict(mask_loss_weights)}")
    if "ce" in mask_loss_weights:
        raise ValueError("a region class cannot be named 'ce': its loss would be named like the cross-entropy (loss_ce)")
    ce = F.cross_entropy(logits, labels)
    per_image = ((target.float() - attention.float()) ** 2).mean(dim=(2, 3))  # Eq. 7, (B, K)
    if present is None:
        per_region = per_image.mean(0)
    else:
        keep = present.to(per_image.dtype)
        per_region = (per_image * keep).sum(0) / keep.sum(0).clamp_min(1.0)
    out = {"loss_ce": ce}
    total = mu * ce if mu else torch.zeros((), device=logits.device)
    for k, (kind, w) in enumerate(mask_loss_weights.items()):
        out[f"loss_{kind}"] = per_region[k]
        if w:
            total = total + w * per_region[k]
    out["loss"] = total
    return out
