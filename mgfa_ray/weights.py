"""Weight files: the one reader of a ``state_dict`` file (``torch.load(weights_only=True)``, never
arbitrary pickled code) for the classifier's backbone (:mod:`mgfa_ray.train.model`) and the
detector's (:mod:`mgfa_ray.detector.backbone`), the per-process cache of the last file read, and
loading a file into a module with errors that name the file and what to give instead.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from mgfa_ray.cache import WEIGHT_FILES
from mgfa_ray.errors import ConfigError


class WeightsError(ConfigError):
    """A ``weights`` file that is missing, unreadable, not a ``state_dict`` or does not fit the
    backbone; the message names the file, what is wrong and what to do. Exit status 2."""


WEIGHTS_HINT = ("give a state_dict saved with torch.save(model.state_dict(), PATH) from the torchvision "
                 "model of this backbone, 'imagenet' (download), or null (random initialisation)")


def read_state_dict(path: Path, *, hint: str = WEIGHTS_HINT) -> dict:
    """The state_dict in the weights file ``path``, loaded with ``weights_only=True`` (never
    arbitrary pickled code): the one reader of weight files (the classifier's backbone here, the
    detector's backbone in :mod:`mgfa_ray.detector.backbone`).

    Raises:
        WeightsError: The file does not load that way; the message names it and ends in ``hint``
            (what to give instead).
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError, RuntimeError (not a zip/pickle), EOFError, ...
        text = str(err).strip()
        first = text.splitlines()[0] if text else f"{type(err).__name__}, the file is empty or cut short"
        if "weights_only" in text:  # drop torch's advice to load unsafely: never right for a weights file
            why = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:Check the documentation|$)", text, re.S)
            first = ("the file is not a torch.save file, or it holds Python objects other than tensors"
                     + (f" ({' '.join(why.group(1).split())})" if why else ""))
        raise WeightsError(f"weights file {path}: not a PyTorch state_dict that loads safely "
                           f"(torch.load(weights_only=True) failed: {first}); {hint}") from None


def read_weights(path: Path) -> dict:
    """The state_dict in ``path``, read once per worker while the file is unchanged (path, size and
    modification time). ``load_state_dict`` copies from it, so the kept tensors are never changed."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    return WEIGHT_FILES.get(key, lambda: read_state_dict(path))


def load_local_weights(model: nn.Module, path: Path, head_prefix: str) -> None:
    """Load the state_dict file ``path`` into ``model`` in place; only keys starting with
    ``head_prefix`` (the classifier head) may be absent.

    Raises:
        WeightsError: The file is missing, not a state_dict of tensors, or does not fit ``model``
            (shapes, missing or unexpected keys); the message names the file and what to give instead.
    """
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist (relative paths are relative to the working "
                           f"directory {Path.cwd()}); {WEIGHTS_HINT}")
    state = read_weights(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"weights file {path}: expected a state_dict (names to tensors), got "
                           f"{type(state).__name__}; {WEIGHTS_HINT}")
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatch
        sizes = "; ".join(line.strip() for line in str(err).splitlines()[1:4])
        raise WeightsError(f"weights file {path} does not fit this backbone: {sizes}; {WEIGHTS_HINT}") from None
    missing = [k for k in result.missing_keys if not k.startswith(head_prefix)]
    if missing or result.unexpected_keys:
        raise WeightsError(
            f"weights file {path} does not fit this backbone: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]} (only '{head_prefix}*' may be absent); {WEIGHTS_HINT}"
        )
