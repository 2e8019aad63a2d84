"""The published detector in use: its weights' digest (part of a mask set's id), loading it on a
device, and predicting region boxes on decoded images (stage 4 calls these).
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from pathlib import Path

import numpy as np

from mgfa_ray.compat import ultralytics_private_settings
from mgfa_ray.data.regions import Box
from mgfa_ray.detector.yolo import default_device, import_ultralytics
from mgfa_ray.errors import InputError

log = logging.getLogger(__name__)


def weights_digest(weights: str | Path) -> str:
    """SHA-256 of the network an Ultralytics checkpoint predicts with: the EMA model if saved, else
    the model (as Ultralytics loads it), each state_dict tensor's name, dtype, shape and bytes.

    Unlike the file's hash it ignores what Ultralytics stores beside the weights (date, optimizer,
    training arguments), so two trainings that give the same tensors get the same digest.

    Raises:
        ValueError: ``weights`` is not an Ultralytics checkpoint with a model.
    """
    import torch

    import_ultralytics()  # the checkpoint pickles Ultralytics classes
    ckpt = torch.load(Path(weights), map_location="cpu", weights_only=False)
    model = (ckpt.get("ema") or ckpt.get("model")) if isinstance(ckpt, dict) else None
    if model is None:
        raise InputError(f"{weights} is not an Ultralytics checkpoint (no 'ema' or 'model' entry)")
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def load_detector(weights: Path, *, device: str = "cpu"):
    """Load trained detector weights for :func:`predict_boxes`.

    Args:
        weights: ``weights.pt`` written by :func:`train_detector` (any Ultralytics detection ``.pt``).
        device: ``cpu`` or ``cuda`` (``cuda`` falls back to ``cpu`` with a warning when CUDA is
            not available). Every prediction of the returned model runs there.

    Returns:
        An ``ultralytics.YOLO`` model.

    Raises:
        ValueError: ``weights`` is not an existing file, or ``device`` is not ``cpu``/``cuda``.
    """
    weights = Path(weights)
    if not weights.is_file():
        raise InputError(f"detector weights {weights} do not exist; run the detector stage first")
    if device not in {"cpu", "cuda"}:
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and default_device() != "cuda":
        log.warning("CUDA requested for the detector but not available; using CPU")
        device = "cpu"
    yolo = import_ultralytics()
    with ultralytics_private_settings():
        model = yolo.YOLO(str(weights.resolve()), task="detect")
    model.to(device)
    # Sticky predict arguments: device, and an absolute (never created) save directory so that
    # Ultralytics does not resolve a relative ``runs/`` path.
    model.overrides.update(device=device, project=str(Path(tempfile.gettempdir()) / "mgfa-ray-predict"),
                           save=False, verbose=False)
    return model


def predict_boxes(model, images: list[np.ndarray], *, imgsz: int, conf: float) -> list[list[Box]]:
    """Detect region boxes in a batch of images with one model call.

    Args:
        model: Detector from :func:`load_detector`.
        images: RGB images, each an (H, W, 3) uint8 array; sizes may differ.
        imgsz: Inference input size in pixels (letterboxed; use the training ``imgsz``).
        conf: Confidence threshold in [0, 1].

    Returns:
        Per image, its boxes (``regions.Box``), the same whatever the other images of the batch:
        ``cx``, ``cy``, ``w``, ``h`` normalised to [0, 1]
        by that image's width / height, ``cls`` the predicted class index in [0, nc), ``conf`` the
        score in [0, 1]. Boxes are sorted by descending confidence (Ultralytics' NMS order).

    Raises:
        ValueError: An image is not an (H, W, 3) uint8 array, or ``conf`` is outside [0, 1].
    """
    if not 0.0 <= conf <= 1.0:
        raise ValueError(f"conf must be in [0, 1], got {conf}")
    if not images:
        return []
    bgr = []
    for n, im in enumerate(images):
        im = np.asarray(im)
        if im.ndim != 3 or im.shape[2] != 3 or im.dtype != np.uint8:
            raise ValueError(f"images[{n}]: expected an (H, W, 3) uint8 RGB array, got shape {im.shape} {im.dtype}")
        bgr.append(np.ascontiguousarray(im[:, :, ::-1]))  # Ultralytics treats numpy arrays as BGR
    # rect=False: every image is letterboxed to the full imgsz square, as in training. With
    # Ultralytics' default (rect=True) a batch of same-shaped images is padded only to a multiple of
    # the stride while a mixed batch is padded to the square, so boxes depended on batch company.
    with ultralytics_private_settings():
        results = model.predict(bgr, imgsz=imgsz, conf=conf, rect=False, verbose=False, save=False)
    out = []
    for r in results:
        xywhn = r.boxes.xywhn.cpu().numpy().astype(float)
        cls = r.boxes.cls.cpu().numpy().astype(int)
        score = r.boxes.conf.cpu().numpy().astype(float)
        out.append([
            Box(int(c), float(cx), float(cy), float(w), float(h), conf=float(s))
            for c, (cx, cy, w, h), s in zip(cls, np.clip(xywhn, 0.0, 1.0), score)
        ])
    return out
