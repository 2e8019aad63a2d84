"""Paper Eq. 2-8 on small hand-built tensors, and gradients through the whole classifier."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mgfa_ray.train.model import MaskAttention, MGFAClassifier, build_backbone, fuse_features, gt_attention, mgfa_loss


def test_attention_softmax_maps_sum_to_one_and_use_max_and_mean():
    att = MaskAttention(2, activation="softmax")
    with torch.no_grad():
        att.conv.weight.zero_()
        att.conv.bias.zero_()
        att.conv.weight[0, 0] = 1.0  # map 0 reads the channel max (Eq. 3)
        att.conv.weight[1, 1] = 1.0  # map 1 reads the channel mean (Eq. 2)
    f = torch.zeros(1, 4, 3, 3)
    f[0, 0, 1, 2] = 10.0  # a single hot channel: max is 10 there, mean is 2.5
    m = att(f)
    assert m.shape == (1, 2, 3, 3)
    torch.testing.assert_close(m.sum(dim=(2, 3)), torch.ones(1, 2))
    assert m[0, 0].argmax() == 1 * 3 + 2 and m[0, 1].argmax() == 1 * 3 + 2
    expected0 = torch.softmax(f.amax(1).flatten(), 0).view(3, 3)
    torch.testing.assert_close(m[0, 0], expected0)
    expected1 = torch.softmax(f.mean(1).flatten(), 0).view(3, 3)
    torch.testing.assert_close(m[0, 1], expected1)


def test_attention_sigmoid_and_shared_conv():
    att = MaskAttention(2, activation="sigmoid", shared_conv=True)
    f = torch.randn(2, 5, 4, 4)
    m = att(f)
    assert att.conv.out_channels == 1
    assert ((m > 0) & (m < 1)).all()
    torch.testing.assert_close(m[:, 0], m[:, 1])


def test_fuse_alpha_one_is_identity_and_beta_selects_attended_location():
    f = torch.randn(2, 3, 4, 4)
    att = torch.rand(2, 2, 4, 4)
    torch.testing.assert_close(fuse_features(f, att, alpha=1.0, feature_weights=(0.0, 0.0)), f)
    one_hot = torch.zeros(2, 2, 4, 4)
    one_hot[:, 0, 1, 3] = 1.0
    out = fuse_features(f, one_hot, alpha=0.0, feature_weights=(1.0, 0.0))
    assert torch.equal(out[:, :, 1, 3], f[:, :, 1, 3])
    out[:, :, 1, 3] = 0
    assert torch.count_nonzero(out) == 0


def test_loss_with_zero_mask_loss_weights_is_cross_entropy_and_terms_reported():
    logits, labels = torch.randn(4, 3), torch.tensor([0, 2, 1, 0])
    att, tgt = torch.rand(4, 2, 3, 3), torch.rand(4, 2, 3, 3)
    out = mgfa_loss(logits=logits, labels=labels, attention=att, target=tgt,
                    mask_loss_weights={"vein": 0.0, "contour": 0.0}, mu=1.0)
    assert list(out) == ["loss_ce", "loss_vein", "loss_contour", "loss"]  # the names trials report, prefixed
    torch.testing.assert_close(out["loss"], F.cross_entropy(logits, labels))
    expected = ((tgt - att) ** 2).mean(dim=(0, 2, 3))  # Eq. 7
    torch.testing.assert_close(out["loss_vein"], expected[0])
    torch.testing.assert_close(out["loss_contour"], expected[1])
    weighted = mgfa_loss(logits=logits, labels=labels, attention=att, target=tgt,
                         mask_loss_weights={"vein": 0.1, "contour": 0.2}, mu=0.5)
    torch.testing.assert_close(weighted["loss"], 0.5 * out["loss_ce"] + 0.1 * expected[0] + 0.2 * expected[1])  # Eq. 8
    with pytest.raises(ValueError, match="cannot be named 'ce'"):
        mgfa_loss(logits=logits, labels=labels, attention=att, target=tgt, mask_loss_weights={"ce": 0.1, "x": 0.1},
                  mu=1.0)


def test_gt_attention_normalisation_matches_activation():
    masks = torch.zeros(1, 2, 8, 8)
    masks[0, 0, :4, :4] = 1.0  # top-left quarter
    soft = gt_attention(masks, grid=(2, 2), activation="softmax")
    torch.testing.assert_close(soft[0, 0], torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    torch.testing.assert_close(soft.sum(dim=(2, 3))[0, 0], torch.tensor(1.0))
    assert torch.count_nonzero(soft[0, 1]) == 0  # no region → all-zero target
    masks[0, 0, :2, 4:] = 1.0  # half of the top-right cell
    sig = gt_attention(masks, grid=(2, 2), activation="sigmoid")
    torch.testing.assert_close(sig[0, 0], torch.tensor([[1.0, 0.5], [0.0, 0.0]]))
    soft = gt_attention(masks, grid=(2, 2), activation="softmax")
    torch.testing.assert_close(soft[0, 0], torch.tensor([[2 / 3, 1 / 3], [0.0, 0.0]]))


@pytest.mark.parametrize(
    ("name", "weights", "activation", "shared"),
    [
        ("mobilenet_v2", (0.3, 0.5, 0.2), "softmax", False),  # the paper: two region classes
        ("resnet18", (0.3, 0.5, 0.2), "sigmoid", True),  # the released code's variant
        ("resnet18", (0.3, 0.7), "softmax", False),  # one region class (the Cotton boxes)
        ("mobilenet_v2", (0.1, 0.4, 0.3, 0.2), "softmax", False),  # three region classes
        ("resnet18", (0.3, 0.5, 0.2), "softmax_scaled", False),  # the scale-corrected softmax
        ("mobilenet_v2", (0.65, 0.35), "sigmoid", True),  # the released recipe, without biases
    ],
)
def test_every_parameter_gets_a_gradient(name, weights, activation, shared):
    k = len(weights) - 1
    released = weights == (0.65, 0.35)
    backbone, c = build_backbone(name, None, output_stride=16)
    model = MGFAClassifier(backbone, num_features=c, num_classes=3, num_regions=k, alpha=weights[0],
                           feature_weights=weights[1:], activation=activation, shared_conv=shared,
                           attention_bias=not released, head_bias=not released)
    assert (model.attention.conv.bias is None, model.head.bias is None) == (released, released)
    x = torch.randn(2, 3, 64, 64)
    logits, att = model(x)
    assert logits.shape == (2, 3) and att.shape == (2, k, 4, 4)
    tgt = gt_attention(torch.rand(2, k, 16, 16), grid=(4, 4), activation=activation)
    loss = mgfa_loss(logits=logits, labels=torch.tensor([0, 2]), attention=att, target=tgt,
                     mask_loss_weights={f"kind{i}": 0.1 for i in range(k)}, mu=1.0)
    loss["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_backbone_only_weights_give_the_plain_classifier():
    """Table III 'backbone': alpha = 1 and no mask loss is exactly backbone → pool → linear with CE."""
    backbone, c = build_backbone("resnet18", None)
    model = MGFAClassifier(backbone, num_features=c, num_classes=3, num_regions=2, alpha=1.0,
                           feature_weights=(0.0, 0.0)).eval()
    x = torch.randn(2, 3, 64, 64)
    logits, att = model(x)
    plain = model.head(model.backbone(x).mean(dim=(2, 3)))
    assert torch.equal(logits, plain)
    labels = torch.tensor([1, 2])
    out = mgfa_loss(logits=logits, labels=labels, attention=att, target=torch.zeros_like(att),
                    mask_loss_weights={"vein": 0.0, "contour": 0.0}, mu=1.0)
    assert torch.equal(out["loss"], F.cross_entropy(plain, labels))


def test_mismatched_masks_are_rejected():
    att = torch.rand(2, 2, 4, 4)
    with pytest.raises(ValueError, match="region classes or grid"):
        mgfa_loss(logits=torch.randn(2, 3), labels=torch.tensor([0, 1]), attention=att,
                  target=torch.rand(2, 1, 4, 4), mask_loss_weights={"vein": 0.1, "contour": 0.1}, mu=1.0)
    with pytest.raises(ValueError, match="region classes or grid"):
        mgfa_loss(logits=torch.randn(2, 3), labels=torch.tensor([0, 1]), attention=att,
                  target=torch.rand(2, 2, 7, 7), mask_loss_weights={"vein": 0.1, "contour": 0.1}, mu=1.0)
    with pytest.raises(ValueError, match="coarser than the feature grid"):
        gt_attention(torch.rand(2, 2, 4, 4), grid=(7, 7), activation="softmax")


def test_classifier_rejects_weights_off_the_simplex():
    with pytest.raises(ValueError, match="sum to 1"):
        MGFAClassifier(nn.Identity(), num_features=4, num_classes=2, num_regions=2, alpha=0.5, feature_weights=(0.5, 0.2))
    with pytest.raises(ValueError, match="sum to 1"):
        MGFAClassifier(nn.Identity(), num_features=4, num_classes=2, num_regions=2, alpha=1.2, feature_weights=(-0.2, 0.0))
    with pytest.raises(ValueError, match="need 2 feature weights"):
        MGFAClassifier(nn.Identity(), num_features=4, num_classes=2, num_regions=2, alpha=0.5, feature_weights=(0.5,))


def test_local_weights_file_loads_and_bad_file_is_rejected(tmp_path, mobilenet_weights):
    repo_weights = mobilenet_weights
    backbone, _ = build_backbone("mobilenet_v2", str(repo_weights))
    ref = torch.load(repo_weights, map_location="cpu", weights_only=True)
    torch.testing.assert_close(backbone[0][0].weight, ref["features.0.0.weight"])
    bad = tmp_path / "bad.pth"
    torch.save({"features.0.0.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="does not fit"):
        build_backbone("mobilenet_v2", str(bad))
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("vit_h", None)
    with pytest.raises(ValueError, match="does not fit"):  # right file, wrong architecture
        build_backbone("resnet18", str(repo_weights))


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v2"])
def test_backbones_give_stride_32_feature_maps(name):
    backbone, c = build_backbone(name, None)
    model = MGFAClassifier(backbone, num_features=c, num_classes=2, num_regions=2, alpha=0.3,
                           feature_weights=(0.5, 0.2)).eval()
    with torch.no_grad():
        features = model.forward_features(torch.randn(1, 3, 64, 96))
        logits, att = model.forward_head(features)
    assert features.shape == (1, c, 2, 3) and att.shape == (1, 2, 2, 3) and logits.shape == (1, 2)


def test_imagenet_download_failure_names_the_local_file_option(monkeypatch, tmp_path):
    """The real torchvision download, into an empty cache: offline (CI, these machines) it fails and
    the error must name the local-file option."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    try:
        build_backbone("resnet18", "imagenet")
    except ValueError as err:
        assert "local state_dict file" in str(err) and "resnet18" in str(err)
    else:
        pytest.skip("this machine reached download.pytorch.org: the offline error path cannot run here")


def _uniform_attention(k: int, activation: str) -> MaskAttention:
    """An attention module whose conv outputs 0 everywhere: a uniform map."""
    att = MaskAttention(k, activation=activation)
    with torch.no_grad():
        att.conv.weight.zero_()
        att.conv.bias.zero_()
    return att


def test_scaled_softmax_with_uniform_attention_gives_the_features_exactly():
    """softmax_scaled: a uniform map is 1 everywhere, so F_final = α·F + β·F + γ·F = F (Eq. 5-6)."""
    f = torch.randn(2, 6, 4, 5)
    m = _uniform_attention(2, "softmax_scaled")(f)
    assert torch.equal(m, torch.ones_like(m))
    out = fuse_features(f, m, alpha=0.3, feature_weights=(0.5, 0.2))
    torch.testing.assert_close(out, f)
    # A non-uniform scaled map still averages 1 over H*W (the feature's scale).
    att = MaskAttention(2, activation="softmax_scaled")
    torch.testing.assert_close(att(f).mean(dim=(2, 3)), torch.ones(2, 2))


@pytest.mark.parametrize(("activation", "scale"), [("softmax", 1 / 20), ("softmax_scaled", 1.0), ("sigmoid", 0.5)])
def test_attention_branch_scale_relative_to_the_features(activation, scale):
    """The module docstring's table: with a uniform map, the pooled attention branch β·M⊙F is
    β·scale times the pooled features — 1/(H*W) for the printed softmax (here 4 x 5)."""
    f = torch.randn(3, 6, 4, 5)
    m = _uniform_attention(1, activation)(f)
    branch = fuse_features(f, m, alpha=0.0, feature_weights=(1.0,)).mean(dim=(2, 3))
    torch.testing.assert_close(branch, scale * f.mean(dim=(2, 3)))


def test_gt_attention_scaled_softmax_averages_one():
    masks = torch.zeros(1, 1, 8, 8)
    masks[0, 0, :4, :4] = 1.0
    masks[0, 0, :2, 4:] = 1.0  # half of the top-right cell
    gt = gt_attention(masks, grid=(2, 2), activation="softmax_scaled")
    torch.testing.assert_close(gt[0, 0], torch.tensor([[8 / 3, 4 / 3], [0.0, 0.0]]))  # 4 x the softmax target
    torch.testing.assert_close(gt.mean(dim=(2, 3)), torch.ones(1, 1))
    with pytest.raises(ValueError, match="activation must be one of"):
        gt_attention(masks, grid=(2, 2), activation="relu")
    with pytest.raises(ValueError, match="activation must be one of"):
        MaskAttention(1, activation="relu")


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v2"])
@pytest.mark.parametrize(("stride", "side"), [(16, 4), (8, 8)])
def test_output_stride_dilates_without_changing_the_weights(name, stride, side):
    torch.manual_seed(0)
    ref, c = build_backbone(name, None)
    torch.manual_seed(0)
    dilated, c2 = build_backbone(name, None, output_stride=stride)
    assert c == c2
    ref_state, new_state = ref.state_dict(), dilated.state_dict()
    assert ref_state.keys() == new_state.keys()
    assert all(torch.equal(ref_state[k], new_state[k]) for k in ref_state)
    with torch.no_grad():
        assert dilated.eval()(torch.randn(1, 3, 64, 64)).shape == (1, c, side, side)
    with pytest.raises(ValueError, match="output_stride"):
        build_backbone(name, None, output_stride=4)
