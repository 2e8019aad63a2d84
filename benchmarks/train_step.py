"""Training-step throughput: a backbone-only classifier vs MGFA, synthetic tensors vs a real-data epoch.

One run measures, per backbone and on the same machine:

1. ``backbone_only`` — one SGD step of a plain classifier: the torchvision backbone of
   :func:`mgfa_ray.train.model.build_backbone` + global average pooling + ``nn.Linear``, cross-entropy
   only. The input is a random uint8 batch (B, 3, resize, resize) already on the device; each step
   cuts a random ``crop`` window with a horizontal flip (p = 0.5) and normalises with the ImageNet
   statistics, exactly the image half of :func:`mgfa_ray.train.augment.augment`, built from its parts
   (``augment`` always transforms masks too: the baseline does no mask work at all).
   Precision, memory format and gradient scaler come from :class:`mgfa_ray.train.step.StepContext`,
   the optimizer from :func:`mgfa_ray.train.step.make_optimizer`.
2. ``mgfa`` — :func:`mgfa_ray.train.step.train_step` on :func:`mgfa_ray.train.step.build_model`: random
   uint8 images and random binary uint8 masks (B, K, M, M) already on the device (the dtype the
   trial keeps its masks in).
3. ``real_epoch`` — :func:`mgfa_ray.train.trial.run_trial` on a manifest of real leafsnap20 photos and a
   mask set rasterised from the hand-drawn YOLO labels (empty masks for unlabelled photos). The
   first epoch is a warm-up; the figure is the median ``train_images_per_second`` of the later
   epochs. That metric times only the training loop of the epoch (see ``MEASURED`` below); the
   photos are decoded once beforehand through the trial's on-disk cache.

Synthetic steps are timed after warm-up steps, in repeats of ``steps`` steps each (synchronising
CUDA before the clock is read), the two models alternating repeat by repeat so that a changing
background load hits both alike; the reported figure is the median over repeats. The JSON written
to ``--out`` holds the machine (with its load average before and after), software, git commit,
every setting and every measured number.

Examples::

    python benchmarks/train_step.py --preset cpu --out results/benchmarks/train_step_cpu.json
    python benchmarks/train_step.py --preset h100 --out results/benchmarks/train_step_h100.json
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from common import new_document
from torch import nn

from mgfa_ray.config import DatasetConfig, MasksConfig, TrainConfig, resolve_data_root
from mgfa_ray.storage import atomic_write_json
from mgfa_ray.data.manifest import build_manifest, manifest_hash, write_manifest
from mgfa_ray.masks.sources import LabelBoxes
from mgfa_ray.masks import build_mask_set
from mgfa_ray.train.model import build_backbone
from mgfa_ray.data.regions import index_labels
from mgfa_ray.train.augment import cut_windows, normalise, random_windows
from mgfa_ray.train.step import StepContext, build_model, make_optimizer, train_step
from mgfa_ray.train.data import load_images
from mgfa_ray.train.trial import run_trial

REPO = Path(__file__).resolve().parents[1]
REGION_CLASSES = ["vein", "contour"]

# Every setting; a preset overrides some, explicit flags override both.
DEFAULTS: dict[str, Any] = {
    "backbones": ["resnet50"], "crop": 448, "resize": None, "batch_size": 32, "mask_size": 64,
    "warmup": 3, "steps": 10, "repeats": 5, "real_epochs": 3,
    "device": "auto", "precision": "bf16", "channels_last": True, "threads": None,
    "classes": 20, "per_class": 40, "val_fraction": 0.1, "seed": 0,
}
PRESETS: dict[str, dict[str, Any]] = {
    # 2-core CPU: two backbones at 112 px crop, a few minutes in all.
    "cpu": {"backbones": ["mobilenet_v2", "resnet50"], "crop": 112, "batch_size": 16, "warmup": 2, "steps": 6,
            "repeats": 13, "real_epochs": 8, "device": "cpu", "precision": "fp32", "threads": 2,
            "classes": 10, "per_class": 10},
    # The target set-up: paper resolution, bf16, channels-last, all 800 photos.
    "h100": {"backbones": ["resnet50"], "crop": 448, "batch_size": 64, "warmup": 10, "steps": 20, "repeats": 7,
             "real_epochs": 6, "device": "cuda", "precision": "bf16", "channels_last": True,
             "classes": 20, "per_class": 40},
}
# The targets for the full train step on one H100 (checked when the device is CUDA).
TARGET_IMAGES_PER_SECOND = 1000.0
TARGET_REAL_OVER_SYNTHETIC = 0.9

MEASURED = {
    "backbone_only": (
        "SGD step of backbone + global average pool + Linear, cross-entropy only; input: random uint8 "
        "(B,3,resize,resize) already on the device; random crop+flip and ImageNet normalisation = the image half "
        "of mgfa_ray.train.augment.augment (its random_windows, cut_windows, normalise; no mask work); autocast, memory format and grad scaler of "
        "StepContext; SGD of make_optimizer. images/s = steps*B / wall time of a repeat (synchronised), median "
        "over repeats."
    ),
    "mgfa": (
        "mgfa_ray.train.step.train_step on build_model(cfg): augment (masks resized to resize x resize, shared "
        "crop+flip), forward, gt_attention, Eq. 7-8 loss, backward, SGD; input: random uint8 images and random "
        "binary uint8 masks (B,K,M,M) already on the device. Timed like backbone_only."
    ),
    "real_epoch": (
        "train_images_per_second of mgfa_ray.train.trial.run_trial = images seen / seconds of the epoch's training "
        "loop: per batch a CPU randperm slice, indexing the device-resident uint8 images/masks/labels, train_step, "
        "loss accumulation on the device; plus one scheduler step. Not included: image decode (done once before "
        "the epochs, from the trial's .npy cache filled beforehand), mask-set read, host-to-device copy of the "
        "dataset, model build, evaluation. Epoch 1 is a warm-up; the figure is the median of epochs 2..N. "
        "Train images are trimmed to a multiple of the batch size so every step is a full batch."
    ),
}


def parse_args(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line → resolved settings (defaults, then the preset, then explicit flags)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="a set of defaults (cpu: 2-core smoke-size; h100: target)")
    p.add_argument("--backbone", dest="backbones", nargs="+", help="one or more backbones (default resnet50)")
    p.add_argument("--size", dest="crop", type=int, help="training crop side in pixels (default 448)")
    p.add_argument("--resize", type=int, help="side images are resized to before the crop (default crop*512/448)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--mask-size", type=int, help="side M of the stored masks (default 64)")
    p.add_argument("--warmup", type=int, help="untimed steps before the synthetic timing")
    p.add_argument("--steps", type=int, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, help="timed repeats of the synthetic steps (median reported)")
    p.add_argument("--real-epochs", type=int, help="timed real-data epochs after the warm-up epoch (0 skips)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], help="CUDA autocast dtype (CPU runs fp32)")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_const", const=False,
                   help="keep the contiguous memory format on CUDA")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--classes", type=int, help="leafsnap20 species in the real-data manifest (and synthetic logits)")
    p.add_argument("--per-class", type=int, help="photos per species in the real-data manifest")
    p.add_argument("--val-fraction", type=float, help="fraction of each species' photo groups held out for val")
    p.add_argument("--seed", type=int)
    p.add_argument("--data-root", help="directory holding leafsnap20/ (default $MGFA_DATA_ROOT or ../shared/data)")
    p.add_argument("--work-dir", type=Path, default=REPO / "outputs" / "bench" / "train_step",
                   help="manifest, mask set and image cache (default outputs/bench/train_step, git-ignored)")
    p.add_argument("--out", type=Path, help="JSON result file (default <work-dir>/train_step.json)")
    args = vars(p.parse_args(argv))
    preset, data_root, work_dir, out = (args.pop(k) for k in ("preset", "data_root", "work_dir", "out"))
    settings = {**DEFAULTS, **PRESETS.get(preset, {}), **{k: v for k, v in args.items() if v is not None}}
    if settings["resize"] is None:
        settings["resize"] = round(settings["crop"] * 512 / 448)
    settings.update(preset=preset, data_root=str(resolve_data_root(data_root)), work_dir=str(work_dir.resolve()),
                    out=str((out or work_dir / "train_step.json").resolve()))
    return settings


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work so the host clock covers it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Release the previous measurement's tensors before the next one."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class BackboneClassifier(nn.Module):
    """The backbone-only baseline: backbone → global average pool → linear head."""

    def __init__(self, backbone: nn.Module, num_features: int, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(num_features, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, H, W) → logits (B, num_classes)."""
        return self.head(self.backbone(images).mean(dim=(2, 3)))


def crop_flip(images: torch.Tensor, *, crop: int, generator: torch.Generator) -> torch.Tensor:
    """The image half of :func:`mgfa_ray.train.augment.augment` (train mode), from its own parts: uint8
    (B, 3, R, R) → a random ``crop`` window, flipped with p = 0.5, as normalised float32
    (B, 3, crop, crop); the same RNG draws and the same single gather over the batch."""
    rows, cols = random_windows(len(images), side=images.shape[-1], crop=crop, generator=generator)
    return normalise(cut_windows(images.float().div_(255.0), rows, cols))


def time_interleaved(steps_of: dict[str, Callable[[], Any]], *, device: torch.device, batch_size: int, warmup: int,
                     steps: int, repeats: int) -> dict[str, dict[str, Any]]:
    """Time several step functions in alternation: ``warmup`` untimed steps of each, then ``repeats``
    rounds in which each runs ``steps`` timed steps. Alternating keeps a changing background load
    from favouring one of them.

    Returns:
        Per name: median ``images_per_second``, the per-repeat figures and the step time (plus the
        peak CUDA memory on a GPU).
    """
    for step in steps_of.values():
        for _ in range(warmup):
            step()
    sync(device)
    rates: dict[str, list[float]] = {name: [] for name in steps_of}
    peak: dict[str, int] = dict.fromkeys(steps_of, 0)
    for _ in range(repeats):
        for name, step in steps_of.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            sync(device)
            rates[name].append(steps * batch_size / (time.perf_counter() - t0))
            if device.type == "cuda":
                peak[name] = max(peak[name], torch.cuda.max_memory_allocated(device))
    out = {}
    for name, rs in rates.items():
        median = statistics.median(rs)
        out[name] = {"images_per_second": median, "repeats_images_per_second": rs,
                     "milliseconds_per_step": 1000 * batch_size / median}
        if device.type == "cuda":
            out[name]["max_memory_allocated_gib"] = peak[name] / 2**30
    return out


def backbone_only_step(cfg: TrainConfig, s: dict[str, Any], device: torch.device) -> Callable[[], None]:
    """A synthetic step of the backbone-only classifier (see the module docstring, item 1)."""
    torch.manual_seed(s["seed"])
    backbone, channels = build_backbone(cfg.backbone, cfg.weights)
    ctx = StepContext(cfg, device)
    model = BackboneClassifier(backbone, channels, s["classes"]).to(device).to(memory_format=ctx.memory_format)
    model.train()
    optimizer, _ = make_optimizer(cfg, model)
    generator = torch.Generator().manual_seed(s["seed"])
    b, r = cfg.batch_size, cfg.resize
    images = torch.randint(0, 256, (b, 3, r, r), dtype=torch.uint8, device=device)
    labels = torch.randint(0, s["classes"], (b,), device=device)

    def step() -> None:
        x = crop_flip(images, crop=cfg.train_crop, generator=generator)
        with ctx.autocast():
            logits = model(ctx.inputs(x))
        loss = F.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        ctx.scaler.scale(loss).backward()
        ctx.scaler.step(optimizer)
        ctx.scaler.update()

    return step


def mgfa_step(cfg: TrainConfig, s: dict[str, Any], device: torch.device) -> Callable[[], None]:
    """A synthetic :func:`~mgfa_ray.train.step.train_step` of the MGFA classifier (module docstring, item 2)."""
    torch.manual_seed(s["seed"])
    ctx = StepContext(cfg, device)
    model = build_model(cfg, s["classes"]).to(device).to(memory_format=ctx.memory_format)
    model.train()
    optimizer, _ = make_optimizer(cfg, model)
    generator = torch.Generator().manual_seed(s["seed"])
    b, r, m, k = cfg.batch_size, cfg.resize, s["mask_size"], len(cfg.region_classes)
    images = torch.randint(0, 256, (b, 3, r, r), dtype=torch.uint8, device=device)
    masks = (torch.rand(b, k, m, m, device=device) < 0.3).to(torch.uint8)
    labels = torch.randint(0, s["classes"], (b,), device=device)

    def step() -> None:
        train_step(model, optimizer, ctx, images=images, masks=masks, labels=labels, generator=generator)

    return step


def prepare_real_data(s: dict[str, Any]) -> dict[str, Any]:
    """Manifest, label-based mask set and filled image cache under the work directory.

    Returns:
        Paths (``manifest``, ``masks``, ``cache``) and a description of the data (counts, decode
        time of this run's cache fill).
    """
    root, work = Path(s["data_root"]), Path(s["work_dir"])
    ds = DatasetConfig(layout="class_folders", images="leafsnap20", max_classes=s["classes"],
                       max_per_class=s["per_class"], val_fraction=s["val_fraction"], test_fraction=0.0, seed=s["seed"])
    df = build_manifest(root / ds.images, ds)
    train = df[df["split"] == "train"]
    keep = len(train) // s["batch_size"] * s["batch_size"]
    if keep == 0:
        raise SystemExit(f"{len(train)} train photos: fewer than one batch of {s['batch_size']}; raise --per-class")
    df = df.drop(index=train.index[keep:]).reset_index(drop=True)
    key = manifest_hash(df)[:12]
    manifest = write_manifest(df, work / f"manifest-{key}.parquet")

    labels = index_labels(root / "leafsnap20-regions" / "labels")
    source = LabelBoxes.create(labels, classes=REGION_CLASSES, unlabelled="empty")
    masks = build_mask_set(manifest=df, manifest_hash=manifest_hash(df), source=source, region_classes=REGION_CLASSES,
                           cfg=MasksConfig(resolution=s["mask_size"]), location=work / "masks", executor="local")

    # The order run_trial decodes in (train, then val; no test split here), so its cache key matches.
    cache = work / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    paths = [*df.loc[df["split"] == "train", "path"], *df.loc[df["split"] == "val", "path"]]
    before = set(cache.iterdir())
    t0 = time.perf_counter()
    load_images(paths, size=s["resize"], cache_dir=cache)
    decode_seconds = time.perf_counter() - t0
    cold = set(cache.iterdir()) != before
    return {
        "manifest": str(manifest), "masks": str(masks), "cache": str(cache),
        "info": {
            "species": int(df["label"].nunique()), "train_images": keep,
            "val_images": int((df["split"] == "val").sum()),
            "train_images_dropped_to_fill_batches": len(train) - keep,
            "labelled_images": int(df["image_id"].isin(set(labels)).sum()), "mask_resolution": s["mask_size"],
            "cache_filled_this_run": cold,
            "decode_seconds": decode_seconds if cold else None,
            "decode_images_per_second": len(paths) / decode_seconds if cold else None,
        },
    }


def bench_real_epoch(cfg: TrainConfig, s: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """``run_trial`` for 1 + ``real_epochs`` epochs on the real data (module docstring, item 3)."""
    cache = Path(data["cache"])
    before = set(cache.iterdir())
    t0 = time.perf_counter()
    history = run_trial(cfg, cache_dir=cache)
    wall = time.perf_counter() - t0
    rates = [h["train_images_per_second"] for h in history]
    return {
        "images_per_second": statistics.median(rates[1:]),
        "epochs_images_per_second": rates,
        "epoch_seconds": [h["epoch_seconds"] for h in history],
        "train_steps_per_epoch": data["info"]["train_images"] // cfg.batch_size,
        "run_trial_wall_seconds": wall,
        "run_trial_decoded_again": set(cache.iterdir()) != before,
    }


def run(s: dict[str, Any]) -> dict[str, Any]:
    """Every measurement of the settings ``s``; the JSON document."""
    started = time.perf_counter()
    if s["threads"]:
        torch.set_num_threads(s["threads"])
    if s["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine")
    device = torch.device("cuda" if s["device"] == "cuda" or (s["device"] == "auto" and torch.cuda.is_available())
                          else "cpu")
    torch.backends.cudnn.benchmark = device.type == "cuda"  # as run_trial sets it, for every measurement
    doc = new_document("train_step", settings=s, measured=MEASURED)
    log(f"preparing real data under {s['work_dir']}")
    data = prepare_real_data(s)
    doc["real_data"] = data["info"]
    results = []
    for backbone in s["backbones"]:
        cfg = TrainConfig(
            manifest=data["manifest"], masks=data["masks"], region_classes=REGION_CLASSES, backbone=backbone,
            weights=None, resize=s["resize"], train_crop=s["crop"], batch_size=s["batch_size"],
            epochs=1 + max(0, s["real_epochs"]), precision=s["precision"], channels_last=s["channels_last"],
            device=device.type, threads=s["threads"], seed=s["seed"],
        )
        ctx = StepContext(cfg, device)
        res: dict[str, Any] = {
            "backbone": backbone, "device": str(device), "autocast_dtype": str(ctx.amp_dtype or torch.float32),
            "memory_format": str(ctx.memory_format), "threads": torch.get_num_threads(),
        }
        log(f"{backbone}: synthetic steps, backbone-only and MGFA alternating")
        steps_of = {"backbone_only": backbone_only_step(cfg, s, device), "mgfa": mgfa_step(cfg, s, device)}
        res.update(time_interleaved(steps_of, device=device, batch_size=cfg.batch_size, warmup=s["warmup"],
                                    steps=s["steps"], repeats=s["repeats"]))
        del steps_of
        free_memory(device)
        per_repeat = [m / b for m, b in zip(res["mgfa"]["repeats_images_per_second"],
                                            res["backbone_only"]["repeats_images_per_second"], strict=True)]
        ratios = {"mgfa_over_backbone_only": res["mgfa"]["images_per_second"]
                  / res["backbone_only"]["images_per_second"],
                  "mgfa_over_backbone_only_per_repeat": per_repeat,
                  "mgfa_over_backbone_only_median_of_repeats": statistics.median(per_repeat)}
        if s["real_epochs"] > 0:
            log(f"{backbone}: real-data epochs (run_trial)")
            res["real_epoch"] = bench_real_epoch(cfg, s, data)
            free_memory(device)
            ratios["real_epoch_over_synthetic_mgfa"] = (res["real_epoch"]["images_per_second"]
                                                        / res["mgfa"]["images_per_second"])
        res["ratios"] = ratios
        if device.type == "cuda":
            res["targets"] = {
                "mgfa_images_per_second_min": TARGET_IMAGES_PER_SECOND,
                "mgfa_met": res["mgfa"]["images_per_second"] >= TARGET_IMAGES_PER_SECOND,
                "real_over_synthetic_min": TARGET_REAL_OVER_SYNTHETIC,
                "real_met": ratios.get("real_epoch_over_synthetic_mgfa", 0.0) >= TARGET_REAL_OVER_SYNTHETIC,
            }
        log(f"{backbone}: " + ", ".join(f"{k} {res[k]['images_per_second']:.1f} img/s"
                                        for k in ("backbone_only", "mgfa", "real_epoch") if k in res)
            + "; " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items() if isinstance(v, float)))
        results.append(res)
    doc["results"] = results
    doc["machine"]["loadavg_end"] = os.getloadavg()
    doc["total_seconds"] = time.perf_counter() - started
    return doc


def log(msg: str) -> None:
    """Progress line on stderr."""
    print(f"[train_step] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, measure, write the JSON atomically."""
    settings = parse_args(argv)
    doc = run(settings)
    atomic_write_json(settings["out"], doc)
    log(f"wrote {settings['out']} ({doc['total_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
