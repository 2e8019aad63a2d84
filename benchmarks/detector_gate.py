"""Which held-out mAP@0.5 makes useful masks? The measurement behind ``detector.min_map50``'s default.

The detector gate (:func:`mgfa_ray.pipeline.detector_gate`) stops a job whose detector is too
weak for its masks. This measures what "too weak" means on the real data: detectors of
``jobs/leafsnap20.yaml``'s recipe trained for several epoch budgets (1 epoch finds nothing, 150 is
the job's) on the job's 30 training photos, each scored on the job's 10 held-out labelled photos
twice:

* **held-out mAP@0.5** per region class (Ultralytics ``val``, what the gate reads), and
* **mask IoU** per region class (:mod:`mgfa_ray.detector.overlap`, what the detector stage now
  stores and the gate also reads): the mask the job's mask stage would build from the detector's
  boxes (every box at ``detector.conf`` or above) against the mask of the hand-drawn boxes, over
  the held-out photos that hold that class (no box found: IoU 0), beside the IoU of the
  **position prior**: one fixed mask, the training photos' hand-drawn masks averaged and cut at
  0.5, which sees no image. Masks that do not beat the prior are not useful.

A budget's detector is trained in ``--work/epochs-<E>`` and skipped when already there
(:func:`mgfa_ray.detector.training.train_detector`), so a killed run resumes. Writes ``--out``.

    nice -n 10 python benchmarks/detector_gate.py --epochs 1 3 10 30 60 100 150
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, new_document  # noqa: E402

from mgfa_ray.data.images import decode_rgb
from mgfa_ray.cli import load_job  # noqa: E402
from mgfa_ray.config import resolve_data_root, under  # noqa: E402
from mgfa_ray.detector.inference import load_detector, predict_boxes
from mgfa_ray.detector.training import train_detector
from mgfa_ray.data.manifest import build_manifest  # noqa: E402
from mgfa_ray.detector.overlap import RESOLUTION, mask_overlap  # noqa: E402
from mgfa_ray.data.regions import index_labels, parse_label_file, select_annotated  # noqa: E402
from mgfa_ray.storage import atomic_write_json  # noqa: E402

def score_masks(metrics: dict, weights: Path, *, manifest, labels: dict, classes: list[str], imgsz: int,
                conf: float) -> dict[str, dict]:
    """Per region class: the held-out masks' and the position prior's mean IoU with the
    hand-drawn masks (:func:`mgfa_ray.detector.overlap.mask_overlap`, what the detector stage stores)."""
    paths = manifest.set_index("image_id")["path"]
    drawn = lambda ids: [parse_label_file(labels[i], classes=classes) for i in ids]  # noqa: E731
    found = predict_boxes(load_detector(weights, device="cpu"), [decode_rgb(paths[i]) for i in metrics["holdout_ids"]],
                          imgsz=imgsz, conf=conf)
    overlap = mask_overlap(found=found, drawn=drawn(metrics["holdout_ids"]), train_drawn=drawn(metrics["train_ids"]),
                           num_classes=len(classes))
    return dict(zip(classes, overlap))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", default=str(REPO / "jobs" / "leafsnap20.yaml"))
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 3, 10, 30, 150])
    parser.add_argument("--work", default=str(REPO / "outputs" / "detector_gate"))
    parser.add_argument("--out", default=str(REPO / "results" / "benchmarks" / "detector_gate.json"))
    args = parser.parse_args(argv)

    job = load_job(Path(args.job))
    data_root = resolve_data_root(job.data_root)
    manifest = build_manifest(under(data_root, job.dataset.images), job.dataset)
    labels = select_annotated(index_labels(under(data_root, job.regions.labels)), manifest,
                              max_images=job.regions.max_images, seed=job.regions.seed)
    classes = list(job.regions.classes)
    doc = new_document("detector_gate", settings={
        "job": str(Path(args.job).resolve().relative_to(REPO)), "detector": job.detector.model_dump(mode="json"),
        "mask_resolution": RESOLUTION, "epochs": args.epochs},
        measured={"map50": "held-out box mAP@0.5 per region class (Ultralytics val), what the gate reads",
                  "mask_iou": "mean over held-out photos holding the class of IoU(detector mask, hand-drawn mask)",
                  "prior_iou": "the same for the position prior (training hand-drawn masks averaged, cut at 0.5)"})
    doc["budgets"] = []
    for epochs in args.epochs:
        cfg = job.detector.model_copy(update={"epochs": epochs})
        out_dir = Path(args.work) / f"epochs-{epochs}"
        metrics = train_detector(manifest=manifest, label_files=labels, region_classes=classes, cfg=cfg,
                                 out_dir=out_dir, unknown_class=job.regions.unknown_class)
        masks = score_masks(metrics, out_dir / "weights.pt", manifest=manifest, labels=labels, classes=classes,
                            imgsz=cfg.imgsz, conf=cfg.conf)
        row = {"epochs": epochs, "detector_key": metrics["detector_key"], "train_seconds": metrics.get("train_seconds"),
               "per_class": {c: {"map50": metrics["per_class"][c]["map50"], **masks[c]} for c in classes}}
        doc["budgets"].append(row)
        print(epochs, {c: (round(v["map50"] or 0, 3), round(v["mask_iou"] or 0, 3), round(v["prior_iou"] or 0, 3))
                       for c, v in row["per_class"].items()}, flush=True)
        atomic_write_json(Path(args.out), doc)


if __name__ == "__main__":
    main()
