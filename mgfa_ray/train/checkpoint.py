"""Trial checkpoints: a state dict written atomically with ``torch.save`` and read back with
``weights_only=True``; a damaged file is an error that names it.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from mgfa_ray.errors import InputError
from mgfa_ray.storage import atomic_write_bytes


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write a checkpoint state (from the epoch callback) atomically with ``torch.save``."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    The state holds ``epoch``, ``model``, ``optimizer``, ``scheduler``, ``scaler`` (gradient
    scaler), ``generator`` and ``torch_rng`` (plus ``cuda_rng`` on CUDA), ``history`` (metrics of
    every epoch so far), ``eval_per_class`` and ``config`` (the resolved TrainConfig).

    Raises:
        ValueError: The file is missing or is not a trial checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or "epoch" not in state or "model" not in state:
        raise InputError(f"{path} is not an mgfa-ray trial checkpoint")
    return state
