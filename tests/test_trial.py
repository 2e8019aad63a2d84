"""The trial function without Ray: metrics, checkpoints, bit-exact resume, mask geometry."""

import math

import pandas as pd
import pytest
import torch

from mgfa_ray.config import MasksConfig, TrainConfig, to_dict
from mgfa_ray.data.manifest import manifest_hash
from mgfa_ray.train.mask_fit import FIT_TERMS
from mgfa_ray.masks.sources import LabelBoxes
from mgfa_ray.masks import build_mask_set, read_masks
from mgfa_ray.data.regions import index_labels
from mgfa_ray.train.augment import augment
from mgfa_ray.train.trial import run_trial, train_to_dir
from mgfa_ray.train.checkpoint import load_checkpoint, save_checkpoint

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_augment_moves_masks_exactly_with_the_image():
    # Encode each pixel's position in the image and the same pattern in the mask.
    r = 16
    pattern = (torch.arange(r * r).view(r, r) % 251).to(torch.uint8)
    images = pattern.expand(4, 3, r, r).contiguous()
    masks = (pattern.float() / 255.0).expand(4, 1, r, r).contiguous()
    g = torch.Generator().manual_seed(3)
    x, m = augment(images, masks, size=9, train=True, generator=g)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    pixels = ((x * std + mean) * 255).round()
    torch.testing.assert_close(pixels[:, 0], (m[:, 0] * 255).round(), rtol=0, atol=0)
    assert x.shape == (4, 3, 9, 9) and m.shape == (4, 1, 9, 9)


def test_batched_crop_and_flip_equal_per_image_slicing():
    """The one-shot indexing in augment is exactly slicing each image's window and flipping it."""
    g = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (6, 3, 12, 12), dtype=torch.uint8, generator=g)
    masks = torch.rand(6, 2, 12, 12, generator=g)
    x, m = augment(images, masks, size=7, train=True, generator=torch.Generator().manual_seed(1))
    draw = torch.Generator().manual_seed(1)  # the same draws, in augment's order
    tops, lefts = torch.randint(0, 6, (6,), generator=draw), torch.randint(0, 6, (6,), generator=draw)
    flips = torch.rand(6, generator=draw) < 0.5
    assert 0 < flips.sum() < 6  # both cases are exercised
    ref_x, _ = augment(images, masks, size=12, train=False)  # normalised, uncropped
    for i in range(6):
        win = ref_x[i, :, tops[i] : tops[i] + 7, lefts[i] : lefts[i] + 7]
        mwin = masks[i, :, tops[i] : tops[i] + 7, lefts[i] : lefts[i] + 7]
        if flips[i]:
            win, mwin = win.flip(-1), mwin.flip(-1)
        assert torch.equal(x[i], win) and torch.equal(m[i], mwin)


def test_augment_flip_and_crop_of_a_box_mask():
    images = torch.zeros(64, 3, 8, 8, dtype=torch.uint8)
    images[:, 0, 2:4, 1:3] = 255  # a box in the red channel...
    masks = torch.zeros(64, 1, 8, 8, dtype=torch.uint8)
    masks[:, 0, 2:4, 1:3] = 1  # ...and the same box as a mask
    x, m = augment(images, masks, size=6, train=True, generator=torch.Generator().manual_seed(0))
    red = x[:, 0] > 0
    assert torch.equal(red, m[:, 0] > 0.5)
    assert len({tuple(r.nonzero()[0].tolist()) for r in red if r.any()}) > 1  # windows differ


def test_trial_reports_every_term_and_learns_on_real_photos(tiny_train_config, mobilenet_weights):
    # ImageNet features and lr 0.01 for two epochs, then ÷10: the 12 training photos are fitted.
    cfg = tiny_train_config.model_copy(update={"weights": str(mobilenet_weights), "epochs": 3, "lr_step": 2})
    history = run_trial(cfg)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert [h["lr"] for h in history] == pytest.approx([0.01, 0.01, 0.001])  # step schedule, lr_step 2
    for h in history:
        for key in ("train_loss", "train_loss_ce", "train_loss_vein", "train_loss_contour", "eval_top1", "eval_top5",
                    "eval_loss_vein", "eval_loss_contour", "test_top1", "test_top5"):
            assert key in h
        assert h["train_loss"] == pytest.approx(
            h["train_loss_ce"] + 0.1 * h["train_loss_vein"] + 0.1 * h["train_loss_contour"], rel=1e-5)
    ce = [h["train_loss_ce"] for h in history]
    assert ce[0] > ce[1] > ce[2]  # it learns: the training cross-entropy falls every epoch...
    assert ce[2] < 0.8 * math.log(3)  # ...to well below chance (ln 3: a uniform guess over 3 classes)


def test_top5_and_per_class_accuracy_are_consistent(tiny_train_config, tmp_path):
    final = train_to_dir(tiny_train_config.model_copy(update={"epochs": 1}), tmp_path)
    per_class = pd.read_csv(tmp_path / "per_class_accuracy.csv")
    assert list(per_class["label"]) == [0, 1, 2] and per_class["class_name"].str.len().min() > 0
    assert per_class["correct"].sum() / per_class["total"].sum() == pytest.approx(final["eval_top1"])
    assert per_class["top1"].mean() == pytest.approx(final["eval_mean_class_top1"])


def test_evaluate_counts_top1_top5_and_per_class_on_known_logits(tiny_train_config):
    """7 classes, a stand-in model whose logits rank class 0 first and class 6 last for every
    image: top-1 hits the labels 0, top-5 the labels 0-4."""
    from types import SimpleNamespace

    from mgfa_ray.train.step import StepContext, evaluate

    labels = torch.tensor([0, 0, 3, 4, 5, 6])
    logits = torch.arange(7, 0, -1).float().expand(6, 7)

    class Fixed(torch.nn.Module):
        attention = SimpleNamespace(num_regions=0)

        def forward(self, x):
            return logits[: len(x)], torch.zeros(len(x), 0, 1, 1)

    ev = evaluate(Fixed(), torch.zeros(6, 3, 8, 8, dtype=torch.uint8), labels, size=8, num_classes=7,
                  ctx=StepContext(tiny_train_config, torch.device("cpu")), batch_size=4)
    assert ev["top1"] == pytest.approx(2 / 6) and ev["top5"] == pytest.approx(4 / 6)
    assert ev["mean_class_top1"] == pytest.approx(1 / 5)  # class 0 all right, classes 3-6 all wrong
    assert ev["per_class"] == {"correct": [2, 0, 0, 0, 0, 0, 0], "total": [2, 0, 0, 1, 1, 1, 1]}
    assert ev["loss_ce"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-6)


def test_eval_attention_error_is_eq7_on_the_eval_split(tiny_train_config, tmp_path):
    """The reported mask-fit terms, recomputed from the trained model: the Eq. 7 error over the
    eval images that hold the region (empty targets left out), the best constant map's and the
    training split's position prior's errors, and their ratios."""
    from mgfa_ray.analysis.cam import load_trained_model
    from mgfa_ray.data.manifest import read_manifest
    from mgfa_ray.train.model import gt_attention
    from mgfa_ray.train.data import load_images

    final = train_to_dir(tiny_train_config.model_copy(update={"epochs": 1}), tmp_path)
    model, cfg, _ = load_trained_model(tmp_path)
    manifest = read_manifest(cfg.manifest)

    def maps(split):
        df = manifest.query(f"split == '{split}'")
        masks, _ = read_masks(cfg.masks, image_ids=df["image_id"].tolist(), region_classes=cfg.region_classes)
        x, m = augment(load_images(df["path"].tolist(), size=cfg.resize), torch.from_numpy(masks),
                       size=cfg.eval_input_size, train=False)
        with torch.no_grad():
            _, att = model(x)
        return att, gt_attention(m, grid=att.shape[-2:], activation=cfg.activation)

    _, train_target = maps("train")
    att, target = maps("val")
    for k, kind in enumerate(cfg.region_classes):
        train_has = train_target[:, k].flatten(1).sum(1) > 0
        prior = train_target[train_has, k].mean(0)
        has = target[:, k].flatten(1).sum(1) > 0
        assert 0 < has.sum() < len(has)  # some val photos are unlabelled: their empty maps must not count
        t = target[has, k]
        err = ((t - att[has, k]) ** 2).mean().item()
        const = ((t - t.mean()) ** 2).mean().item()
        prior_err = ((t - prior) ** 2).mean().item()
        assert final[f"eval_loss_{kind}"] == pytest.approx(err, rel=1e-5)
        assert final[f"eval_const_loss_{kind}"] == pytest.approx(const, rel=1e-5)
        assert final[f"eval_prior_loss_{kind}"] == pytest.approx(prior_err, rel=1e-5)
        assert final[f"eval_fit_prior_{kind}"] == pytest.approx(err / prior_err, rel=1e-5)
        assert final[f"eval_fit_const_{kind}"] == pytest.approx(err / const, rel=1e-5)
    assert abs(final["eval_loss_vein"] - final["eval_loss_contour"]) > 1e-4 * final["eval_loss_vein"]  # order checked


def test_cosine_schedule_anneals_to_zero(tiny_train_config):
    cfg = tiny_train_config.model_copy(update={"lr_schedule": "cosine", "epochs": 3, "lr": 0.02})
    history = run_trial(cfg)
    assert [h["lr"] for h in history] == pytest.approx([0.02, 0.015, 0.005])


def test_one_region_kind_trains_end_to_end(tiny_manifest, data_root, tmp_path, tiny_train_config):
    """The Cotton case: a single region class, its own mask set, beta/delta only."""
    df, _ = tiny_manifest
    labels = index_labels(data_root / "leafsnap20-regions" / "labels")
    # Vein boxes only: the contour lines (class 1) are outside ["vein"] and skipped.
    source = LabelBoxes.create(labels, classes=["vein"], unknown_class="skip", unlabelled="empty")
    with pytest.warns(UserWarning, match="unknown region class 1"):
        mask_dir = build_mask_set(manifest=df, manifest_hash=manifest_hash(df), source=source, region_classes=["vein"],
                                  cfg=MasksConfig(resolution=32), location=tmp_path, executor="local")
    cfg = tiny_train_config.model_copy(update={
        "masks": str(mask_dir), "region_classes": ["vein"], "alpha": 0.3, "beta": 0.7, "gamma": 0.0, "lam": 0.0,
        "epochs": 1})
    (h,) = run_trial(TrainConfig(**to_dict(cfg)))
    assert "train_loss_vein" in h and "train_loss_contour" not in h
    assert h["train_loss"] == pytest.approx(h["train_loss_ce"] + 0.1 * h["train_loss_vein"], rel=1e-5)


def test_zero_weight_removes_term_but_it_is_still_reported(tiny_train_config):
    cfg = TrainConfig(**{**to_dict(tiny_train_config), "delta": 0.0, "lam": 0.0, "epochs": 1})
    (h,) = run_trial(cfg)
    assert h["train_loss"] == pytest.approx(h["train_loss_ce"], rel=1e-6)
    assert h["train_loss_vein"] > 0


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("schedule", ["step", "cosine"])
def test_resume_from_checkpoint_is_bit_exact_on_cpu(tiny_train_config, tmp_path, schedule):
    cfg = tiny_train_config.model_copy(update={"lr_schedule": schedule})
    full = run_trial(cfg)

    def save_then_die(metrics, state):  # the run is killed right after its first checkpoint
        save_checkpoint(state, tmp_path / "e1.pt")
        raise _Interrupt

    with pytest.raises(_Interrupt):
        run_trial(cfg, on_epoch=save_then_die)
    state = load_checkpoint(tmp_path / "e1.pt")
    assert {"model", "optimizer", "scheduler", "scaler", "generator", "torch_rng", "epoch", "config"} <= set(state)
    resumed = run_trial(cfg, resume=state)
    assert len(resumed) == 2 and resumed[0]["train_loss"] == full[0]["train_loss"]  # history restored
    assert resumed[1]["train_loss"] == full[1]["train_loss"]
    assert resumed[1]["eval_top1"] == full[1]["eval_top1"] and resumed[1]["lr"] == full[1]["lr"]


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


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_trial_with_autocast_channels_last_and_resume(tiny_train_config, tmp_path, precision):
    cfg = tiny_train_config.model_copy(update={"device": "cuda", "precision": precision, "channels_last": True})
    full = run_trial(cfg)
    assert all(h["train_loss"] == h["train_loss"] for h in full)  # finite, not NaN
    def save_then_die(metrics, state):
        save_checkpoint(state, tmp_path / "e1.pt")
        raise _Interrupt

    with pytest.raises(_Interrupt):
        run_trial(cfg, on_epoch=save_then_die)
    state = load_checkpoint(tmp_path / "e1.pt")
    if precision == "fp16":
        assert state["scaler"]["scale"] > 0  # the gradient scaler's state is checkpointed
    resumed = run_trial(cfg, resume=state)
    assert resumed[1]["train_loss"] == pytest.approx(full[1]["train_loss"], rel=1e-3)  # cuDNN is not bit-exact


def test_region_boxes_and_crop_masks_cut_image_and_masks_alike():
    """crop_to_region: the region's most confident box (plus margin) is the crop; the masks are
    resampled over exactly that box, so a region that filled the box fills the new frame."""
    import numpy as np

    from mgfa_ray.data.regions import rasterize
    from mgfa_ray.data.regions import Box
    from mgfa_ray.train.data import crop_masks, region_boxes

    contour = [1.0, 6 / 16, 8 / 16, 8 / 16, 8 / 16, 0.9]  # cols 2-9, rows 4-11 of a 16 x 16 mask
    chart = [1.0, 0.9, 0.9, 0.2, 0.2, 0.3]  # a weaker false detection elsewhere
    vein = [0.0, 6 / 16, 7 / 16, 2 / 16, 2 / 16, 0.8]  # cols 5-6, rows 6-7, inside the leaf
    boxes = region_boxes([[vein, chart, contour], [vein]], region=1, margin=0.0)
    np.testing.assert_allclose(boxes[0], [2 / 16, 4 / 16, 10 / 16, 12 / 16])
    np.testing.assert_allclose(boxes[1], [0.0, 0.0, 1.0, 1.0])  # no contour: the whole image
    np.testing.assert_allclose(region_boxes([[contour]], region=1, margin=0.25)[0], [0.0, 2 / 16, 12 / 16, 14 / 16])
    masks = np.stack([rasterize([Box(int(b[0]), *b[1:5], conf=b[5]) for b in bs], num_classes=2, resolution=16)
                      for bs in ([vein, contour], [vein])])
    cropped = crop_masks(masks, boxes)
    assert cropped.shape == (2, 2, 16, 16) and cropped.dtype == np.float32
    assert cropped[0, 1].min() == 1.0  # the contour fills its own box
    # The vein (cols 5-6, rows 6-7 of the 8 x 8 box at (2, 4)) lands at 2x scale: cols 6-9, rows 4-7.
    np.testing.assert_allclose(cropped[0, 0, 4:8, 6:10], 1.0)
    assert cropped[0, 0].sum() == pytest.approx(16.0, abs=1e-4)
    np.testing.assert_array_equal(cropped[1], masks[1])  # whole-image box: unchanged


def test_crop_to_region_trial_sees_only_the_leaf(tiny_train_config, tmp_path):
    """The cached images are the contour boxes of the photos: the mean of the cropped images differs
    from the full photos', and every contour mask fills most of its frame."""
    from mgfa_ray.train.data import load_trial_data

    cfg = tiny_train_config.model_copy(update={"crop_to_region": "contour", "crop_margin": 0.0})
    data, names = load_trial_data(cfg, device=torch.device("cpu"), cache_dir=tmp_path)
    full, _ = load_trial_data(tiny_train_config, device=torch.device("cpu"))
    images, masks, _ = data["train"]
    labelled = masks[:, 1].flatten(1).amax(1) > 0  # photos with a hand-drawn contour box
    assert labelled.any() and len(names) == 3
    assert masks[labelled, 1].mean() > 0.9  # the leaf's box fills the frame
    assert not torch.equal(images[labelled], full["train"][0][labelled])
    assert torch.equal(images[~labelled], full["train"][0][~labelled])  # no box: the whole photo
    assert len(list(tmp_path.glob("images-*.npy"))) == 1  # the crop is part of the cache key


def test_lr_decay_and_center_eval_crop(tiny_train_config):
    from mgfa_ray.train.step import build_model, make_optimizer
    from mgfa_ray.train.augment import eval_images

    cfg = tiny_train_config.model_copy(update={"lr": 0.0008, "lr_step": 2, "lr_decay": 0.13})
    optimizer, scheduler = make_optimizer(cfg, build_model(cfg, 3))
    lrs = []
    for _ in range(5):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.0008, 0.0008, 0.0008 * 0.13, 0.0008 * 0.13, 0.0008 * 0.13 ** 2])
    images = torch.randint(0, 256, (2, 3, 72, 72), dtype=torch.uint8)
    centre = eval_images(images, size=64, eval_crop="center")
    whole = eval_images(images, size=72)
    assert torch.equal(centre, whole[..., 4:68, 4:68])
    x, m = augment(images, torch.ones(2, 1, 8, 8), size=64, train=False, eval_crop="center")
    assert torch.equal(x, centre) and m.shape == (2, 1, 64, 64)


def test_training_crop_and_evaluation_size_are_separate_inputs(tiny_train_config):
    """train_crop sizes the training windows, eval_size the test-time input (both the old
    ``crop`` before); the metrics name the mask loss of each region class like mgfa_loss does."""
    from mgfa_ray.train.trial import evaluate_split, prepare, train_one_epoch

    cfg = tiny_train_config.model_copy(update={"train_crop": 48, "eval_size": 64})
    trial = prepare(cfg)
    sides: list[tuple[int, ...]] = []
    trial.model.register_forward_pre_hook(lambda module, args: sides.append(tuple(args[0].shape[-2:])))
    train, _ = train_one_epoch(trial)
    assert set(sides) == {(48, 48)}
    assert set(train) == {"loss", "loss_ce", "loss_vein", "loss_contour"}
    sides.clear()
    ev = evaluate_split(trial, "eval")
    assert set(sides) == {(64, 64)}
    assert {f"{term}_{kind}" for term in FIT_TERMS for kind in ("vein", "contour")} <= set(ev)
