"""Ultralytics, imported offline (:func:`mgfa_ray.runtime.configure` first), and the device it runs on.

The in-memory settings and font patches it needs while it trains or predicts are in
:func:`mgfa_ray.compat.ultralytics_private_settings` and :func:`mgfa_ray.compat.ultralytics_offline_fonts`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from mgfa_ray.runtime import configure

log = logging.getLogger(__name__)


def import_ultralytics():
    """Import Ultralytics after :func:`mgfa_ray.runtime.configure` (offline); returns the module."""
    configure()
    import ultralytics
    from ultralytics.utils import USER_CONFIG_DIR

    if Path(USER_CONFIG_DIR).parent != Path(os.environ["YOLO_CONFIG_DIR"]).expanduser():
        log.warning(
            "ultralytics was imported before mgfa_ray.runtime.configure(); its settings live in %s "
            "(call configure() first to keep them in $YOLO_CONFIG_DIR)", USER_CONFIG_DIR
        )
    return ultralytics


def default_device() -> str:
    """``"cuda"`` when torch sees a CUDA device, else ``"cpu"``: where the detector trains and predicts."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
