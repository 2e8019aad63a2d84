"""``mgfa-ray masks show``: Fig. 3 figures and the summary of a mask set."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from mgfa_ray.cli import main
from mgfa_ray.analysis.mask_view import mask_summary, render_mask_png
from mgfa_ray.masks import read_metadata, read_rows


def tinted_pixels(png: bytes) -> int:
    """Pixels clearly blue (tab10 colour 0 over a black photo)."""
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    return int(((rgb[..., 2] - rgb[..., 0] > 40) & (rgb[..., 2] > 60)).sum())


def test_render_draws_masks_and_checks_input():
    photo = np.zeros((40, 60, 3), np.uint8)
    empty = np.zeros((2, 8, 8), np.uint8)
    vein = empty.copy()
    vein[0, 2:6, 2:6] = 1
    no_box = np.zeros((0, 6))
    assert tinted_pixels(render_mask_png(photo, no_box, empty, region_names=["vein", "contour"], title="t")) == 0
    assert tinted_pixels(render_mask_png(photo, no_box, vein, region_names=["vein", "contour"], title="t")) > 100
    box = np.array([[0, 0.5, 0.5, 0.5, 0.5, 0.9]])
    assert tinted_pixels(render_mask_png(photo, box, empty, region_names=["vein", "contour"], title="t")) > 20
    with pytest.raises(ValueError, match="need 2 region names"):
        render_mask_png(photo, no_box, empty, region_names=["vein"], title="t")
    with pytest.raises(ValueError, match=r"box classes \[2\] outside \[0, 2\)"):
        render_mask_png(photo, np.array([[2, 0.5, 0.5, 0.1, 0.1, 1.0]]), empty, region_names=["v", "c"], title="t")


def test_masks_command_writes_figures_and_summary(label_mask_set, tiny_manifest, tmp_path, capsys):
    df, manifest_path = tiny_manifest
    out = tmp_path / "figs"
    assert main(["masks", "show", label_mask_set, "--manifest", str(manifest_path), "--count", "3", "--output-dir",
                 str(out)]) == 0
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 3 and all(Image.open(p).size[0] > 200 for p in pngs)
    summary = json.loads((out / "summary.json").read_text())
    assert summary == mask_summary(label_mask_set)
    assert "summary.json" in capsys.readouterr().out

    # The summary agrees with the rows, counted here independently.
    rows = read_rows(label_mask_set)
    counts = [len(b) for b in rows["boxes"]]
    assert summary["rows"] == len(df) == 24
    meta = read_metadata(label_mask_set)  # boxes from label files: the box source is labels-<hash>, not a detector
    assert summary["source"] == "labels" and summary["box_source"] == meta["detector_key"]
    assert summary["box_source"].startswith("labels-")
    assert summary["boxes_per_image"] == {"min": min(counts), "median": float(np.median(counts)), "max": max(counts)}
    assert summary["images_without_box"] == sum(c == 0 for c in counts) > 0
    veins = sum(sum(1 for b in bs if b[0] == 0) for bs in rows["boxes"])
    assert summary["per_class"]["vein"]["mean_boxes_per_image"] == pytest.approx(veins / 24)
    masks = np.stack([np.frombuffer(m, np.uint8).reshape(2, 32, 32) for m in rows["masks"]])
    assert summary["per_class"]["contour"]["mean_coverage"] == pytest.approx(masks[:, 1].mean())
    assert summary["per_class"]["contour"]["images_with_region"] == pytest.approx((masks[:, 1].sum((1, 2)) > 0).mean())

    # Chosen ids are drawn in the order given; a seeded sample is reproducible.
    ids = df["image_id"].tolist()
    assert main(["masks", "show", label_mask_set, "--manifest", str(manifest_path), "--images", ids[5], ids[1],
                 "--output-dir", str(tmp_path / "two")]) == 0
    assert len(list((tmp_path / "two").glob("*.png"))) == 2
    for name in ("a", "b"):
        main(["masks", "show", label_mask_set, "--manifest", str(manifest_path), "--count", "4", "--seed", "3",
              "--split", "train", "--output-dir", str(tmp_path / name)])
    assert sorted(p.name for p in (tmp_path / "a").glob("*.png")) == sorted(p.name for p in (tmp_path / "b").glob("*.png"))


def test_masks_command_bad_input_exits_2(label_mask_set, tiny_manifest, tmp_path, capsys):
    _, manifest_path = tiny_manifest
    assert read_metadata(label_mask_set)["manifest"] is None  # built without one: the command needs --manifest
    assert main(["masks", "show", label_mask_set, "--output-dir", str(tmp_path)]) == 2
    assert "records no manifest" in capsys.readouterr().err
    assert main(["masks", "show", label_mask_set, "--manifest", str(manifest_path), "--images", "no/such-image"]) == 2
    assert "'no/such-image' is not in manifest" in capsys.readouterr().err
    assert main(["masks", "show", str(tmp_path), "--manifest", str(manifest_path)]) == 2
    assert "not a complete mask set" in capsys.readouterr().err
