"""Class activation maps (Zhou et al. 2016; paper Fig. 4): the CAM identity, hand-built maps, the CLI."""

import pytest
import torch
from PIL import Image
from torch import nn

from mgfa_ray.analysis.cam import class_activation_maps, load_trained_model, raw_class_activation_maps
from mgfa_ray.cli import main
from mgfa_ray.storage import safe_stem
from mgfa_ray.data.manifest import read_manifest
from mgfa_ray.train.model import MGFAClassifier
from mgfa_ray.train.augment import eval_images
from mgfa_ray.train.trial import train_to_dir
from mgfa_ray.train.data import load_images


@pytest.fixture()
def trained_run(tiny_train_config, tmp_path):
    """A 1-epoch run of the tiny config: (checkpoint path, config, manifest)."""
    cfg = tiny_train_config.model_copy(update={"epochs": 1})
    train_to_dir(cfg, tmp_path)
    return tmp_path / "checkpoint.pt", cfg, read_manifest(cfg.manifest)


def _hand_model(alpha: float, feature_weights: tuple[float, ...]) -> MGFAClassifier:
    # Identity backbone: the "images" are the feature map F itself (B, C=2, H, W).
    model = MGFAClassifier(nn.Identity(), num_features=2, num_classes=2, num_regions=len(feature_weights),
                           alpha=alpha, feature_weights=feature_weights)
    with torch.no_grad():
        model.head.weight.copy_(torch.tensor([[1.0, -2.0], [0.5, 3.0]]))
        model.head.bias.copy_(torch.tensor([10.0, -7.0]))
    model.attention.conv.weight.data.zero_()
    model.attention.conv.bias.data.zero_()
    return model


def test_cam_is_the_head_weighted_sum_of_channels_without_bias():
    # alpha = 1, no region terms: F_final = F, so CAM_c = w_c0 * F0 + w_c1 * F1 by hand.
    model = _hand_model(1.0, (0.0, 0.0))
    f = torch.tensor([[[[1.0, 0.0], [0.0, 2.0]], [[0.0, 1.0], [0.5, 0.0]]]])  # (1, 2, 2, 2)
    cams, logits, attention = raw_class_activation_maps(model, f)
    expected = torch.tensor([[[[1.0, -2.0], [-1.0, 2.0]], [[0.5, 3.0], [1.5, 1.0]]]])
    torch.testing.assert_close(cams, expected)
    torch.testing.assert_close(logits, torch.tensor([[10.0, -7.0]]) + expected.mean(dim=(2, 3)))
    assert attention.shape == (1, 2, 2, 2)


def test_cam_uses_the_fused_features_of_eq_5_6():
    # Zero conv → uniform softmax attention 1/(H*W) = 1/4: F_final = (0.3 + 0.7/4) F.
    model = _hand_model(0.3, (0.5, 0.2))
    f = torch.randn(2, 2, 2, 2)
    cams, _, _ = raw_class_activation_maps(model, f)
    fused = (0.3 + 0.7 / 4) * f
    torch.testing.assert_close(cams, torch.einsum("nc,bchw->bnhw", model.head.weight.detach(), fused))


def test_cam_spatial_mean_equals_logit_minus_bias_on_a_trained_model(trained_run):
    ckpt, cfg, manifest = trained_run
    model, _, names = load_trained_model(ckpt)
    assert len(names) == 3 and names[0] == manifest.sort_values("label")["class_name"].iloc[0]
    images = load_images(manifest["path"].head(6).tolist(), size=cfg.resize)
    x = eval_images(images, size=cfg.eval_input_size)
    cams, logits, attention = raw_class_activation_maps(model, x)
    with torch.no_grad():
        model_logits, model_attention = model(x)
    torch.testing.assert_close(logits, model_logits)  # the same forward pass as the model's
    torch.testing.assert_close(attention, model_attention)
    assert cams.shape == (6, 3, 2, 2)  # 64 px / 32
    torch.testing.assert_close(cams.mean(dim=(2, 3)), model_logits - model.head.bias.detach(), atol=1e-5, rtol=1e-5)

    result = class_activation_maps(model, images, size=cfg.eval_input_size)
    assert result.cams.shape == (6, cfg.eval_input_size, cfg.eval_input_size) and result.cams.dtype == torch.float32
    assert result.cams.min() >= 0 and torch.allclose(result.cams.flatten(1).amax(1), torch.ones(6))
    assert torch.equal(result.predicted, model_logits.argmax(1)) and torch.equal(result.classes, result.predicted)
    torch.testing.assert_close(result.confidence, model_logits.softmax(1).amax(1))
    assert result.attention.shape == (6, 2, cfg.eval_input_size, cfg.eval_input_size)
    labels = torch.tensor([2, 1, 0, 2, 1, 0])
    chosen = class_activation_maps(model, images, size=cfg.eval_input_size, labels=labels)
    assert torch.equal(chosen.classes, labels) and torch.equal(chosen.predicted, result.predicted)
    with pytest.raises(ValueError, match="label 3"):
        class_activation_maps(model, images, size=cfg.eval_input_size, labels=torch.tensor([3, 0, 0, 0, 0, 0]))


def test_cli_writes_one_png_per_requested_image(trained_run, tmp_path, capsys):
    ckpt, _, manifest = trained_run
    ids = manifest["image_id"].iloc[[5, 0]].tolist()
    out = tmp_path / "figs"
    assert main(["cam", "--checkpoint", str(ckpt), "--images", *ids, "--output-dir", str(out)]) == 0
    pngs = sorted(out.glob("*.png"))
    assert sorted(p.name for p in pngs) == sorted(f"{safe_stem(i)}.png" for i in ids)
    for p in pngs:
        with Image.open(p) as im:
            assert im.format == "PNG" and im.mode in ("RGB", "RGBA") and im.width > 0 and im.height > 0
    assert not list(out.glob(".*"))  # no temporary files left behind

    # Default: the first --count images of the split, next to the checkpoint.
    assert main(["cam", "--checkpoint", str(ckpt), "--split", "val", "--count", "2"]) == 0
    first = manifest[manifest["split"] == "val"].sort_values("image_id")["image_id"].head(2)
    assert sorted(p.name for p in (ckpt.parent / "cam").glob("*.png")) == sorted(f"{safe_stem(i)}.png" for i in first)


def test_cli_unknown_image_id_and_empty_split_exit_2(trained_run, capsys):
    ckpt, _, manifest = trained_run
    known = manifest["image_id"].iloc[0]
    assert main(["cam", "--checkpoint", str(ckpt), "--images", known, "no_such/leaf-1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "'no_such/leaf-1'" in err
    assert not (ckpt.parent / "cam").exists()  # nothing written for a bad request
    assert main(["cam", "--checkpoint", str(ckpt), "--split", "holdout"]) == 2
    assert "'holdout'" in capsys.readouterr().err


def test_cli_missing_checkpoint_exits_2(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "checkpoint.pt"
    assert main(["cam", "--checkpoint", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and str(missing) in err
    assert not (tmp_path / "nowhere").exists()
