"""A pretrained backbone for the region detector (stage 3, :mod:`mgfa_ray.detector.training`).

Ultralytics builds a YOLO from a model YAML without weights; offline there is no COCO checkpoint,
and from scratch 30-40 annotated photos teach the thin vein box poorly (results/detector/table.md).
A model YAML may instead put a torchvision classifier's feature extractor under YOLO's neck and
head (Ultralytics' ``TorchVision`` module, split into pyramid levels with ``Index``, as in
``mgfa_ray/detector/models/yolo11n-mobilenetv2.yaml``); ``detector.backbone_weights`` then names a
local torchvision ``state_dict`` — e.g. the ImageNet MobileNetV2 features of ``../shared/weights``
— that is loaded into that backbone before training.

How the weights get into training (public Ultralytics API only): :func:`build_pretrained` builds
``ultralytics.nn.tasks.DetectionModel`` from the YAML and copies the torchvision weights into its
``TorchVision`` layer; :func:`write_initial_checkpoint` saves that model as an Ultralytics checkpoint
(``{"model": ...}``); ``YOLO(checkpoint).train(...)`` then starts from it (Ultralytics transfers
every tensor of a checkpoint into the model it builds from the same YAML).

Model names: ``detector.model`` may name a file, a YAML shipped in :data:`MODELS_DIR` (by file
name) or one of Ultralytics' own (``yolo11n.yaml``); :func:`model_source` resolves it.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mgfa_ray.runtime import configure
from mgfa_ray.storage import atomic_write_bytes
from mgfa_ray.weights import WeightsError, read_state_dict

#: Model YAMLs shipped with mgfa-ray; ``detector.model`` names them by file name.
MODELS_DIR = Path(__file__).resolve().parent / "models"

_HINT = ("give a state_dict saved with torch.save(model.state_dict(), PATH) from the torchvision model that the "
         "model YAML's TorchVision layer names, or null (train from scratch)")


def model_source(model: str) -> str:
    """Where Ultralytics should read ``detector.model`` from.

    Args:
        model: A path to a ``.yaml``/``.pt`` file (relative to the working directory), the file
            name of a YAML in :data:`MODELS_DIR`, or an Ultralytics model name (``yolo11n.yaml``).

    Returns:
        The file's path when ``model`` is an existing file or a shipped YAML, else ``model`` as given.
    """
    path = Path(model).expanduser()
    if path.is_file():
        return str(path)
    shipped = MODELS_DIR / model
    if shipped.is_file() and Path(model).name == model:
        return str(shipped)
    return model


def _torchvision_layer(model: Any) -> tuple[Any, list[Any]]:
    """The one ``TorchVision`` layer of an Ultralytics model and its YAML args.

    ``model`` is an ``ultralytics.nn.tasks.DetectionModel`` and the layer an Ultralytics
    ``TorchVision`` module: both are typed ``Any`` because the attributes used here (``yaml``,
    ``model``, the layer's ``m``) are set at run time and reach a type checker only through
    ``nn.Module.__getattr__`` (typed ``Tensor | Module``)."""
    configure()  # Ultralytics offline, before its first import
    from ultralytics.nn.modules import TorchVision

    rows = model.yaml["backbone"] + model.yaml["head"]
    found = [(layer, rows[i][3]) for i, layer in enumerate(model.model) if isinstance(layer, TorchVision)]
    if len(found) != 1:
        raise WeightsError(f"detector.backbone_weights needs a model YAML with exactly one TorchVision layer "
                           f"(e.g. yolo11n-mobilenetv2.yaml); this one has {len(found)}; set "
                           f"detector.backbone_weights to null or use such a YAML")
    return found[0]


def _unwrapped_layers(net: nn.Module, truncate: int) -> list[nn.Module]:
    """The layers Ultralytics' ``TorchVision(unwrap=True, truncate=truncate)`` keeps, in order."""
    layers = list(net.children())
    if isinstance(layers[0], nn.Sequential):  # as Ultralytics does: MobileNet, EfficientNet, ConvNeXt
        layers = [*layers[0].children(), *layers[1:]]
    return layers[:-truncate] if truncate else layers


def read_backbone_state(path: Path) -> dict[str, torch.Tensor]:
    """The ``state_dict`` in ``path``, read with ``torch.load(weights_only=True)``.

    Raises:
        WeightsError: The file is missing, does not load safely or is not names → tensors.
    """
    if not path.is_file():
        raise WeightsError(f"detector.backbone_weights: file {path} does not exist (relative paths are relative "
                           f"to the working directory {Path.cwd()}); {_HINT}")
    try:
        state = read_state_dict(path, hint=_HINT)
    except WeightsError as err:
        raise WeightsError(f"detector.backbone_weights: {err}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"detector.backbone_weights: file {path} holds {type(state).__name__}, not a "
                           f"state_dict (names to tensors); {_HINT}")
    return state


def load_backbone_weights(model: nn.Module, weights: str | Path, *,
                          state: dict[str, torch.Tensor] | None = None) -> int:
    """Copy a torchvision ``state_dict`` into ``model``'s ``TorchVision`` backbone layer, in place.

    The file is read with ``torch.load(weights_only=True)`` and loaded into a fresh torchvision
    model of the name the YAML gives; every tensor of the layers the YAML keeps (``unwrap`` True,
    ``truncate`` dropping the tail) must come from the file — the dropped tail (classifier) may be
    absent — and nothing in the file may be foreign to that model.

    Args:
        model: An ``ultralytics.nn.tasks.DetectionModel`` built from a YAML with one
            ``TorchVision`` layer (args: channels, torchvision model name, weights, unwrap,
            truncate, split).
        weights: Path of the state_dict (keys as torchvision's model of that name, e.g.
            ``features.0.0.weight`` for ``mobilenet_v2``).
        state: The file's state_dict when the caller has read it already
            (:func:`read_backbone_state`); else it is read here.

    Returns:
        The number of tensors copied.

    Raises:
        WeightsError: No or several TorchVision layers; ``unwrap`` false; the file is missing, does
            not load safely, is not a state_dict, or does not fit (names, shapes); the message
            names ``detector.backbone_weights``, the file and what to do.
    """
    import torchvision

    layer, args = _torchvision_layer(model)
    name, unwrap, truncate = args[1], (args[3] if len(args) > 3 else True), (args[4] if len(args) > 4 else 2)
    if not unwrap:
        raise WeightsError(f"detector.backbone_weights: the model YAML's TorchVision layer ({name}) has unwrap "
                           f"false; only unwrapped backbones are supported")
    path = Path(weights).expanduser()
    state = read_backbone_state(path) if state is None else state
    net = torchvision.models.get_model(name, weights=None)
    try:
        result = net.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatch
        sizes = "; ".join(line.strip() for line in str(err).splitlines()[1:4])
        raise WeightsError(f"detector.backbone_weights: file {path} does not fit torchvision's {name}: {sizes}; "
                           f"{_HINT}") from None
    kept = _unwrapped_layers(net, truncate)
    kept_ids = {id(t) for part in kept for t in part.state_dict(keep_vars=True).values()}
    named = net.state_dict(keep_vars=True)
    missing = [k for k in result.missing_keys if id(named[k]) in kept_ids]
    if missing or result.unexpected_keys:
        raise WeightsError(f"detector.backbone_weights: file {path} does not fit torchvision's {name}: missing "
                           f"{missing[:5]}, unexpected {result.unexpected_keys[:5]}; {_HINT}")
    assert len(kept) == len(layer.m), (len(kept), len(layer.m))
    for dst, src in zip(layer.m, kept):
        dst.load_state_dict(src.state_dict(), strict=True)
    return sum(len(part.state_dict()) for part in kept)


def build_pretrained(model: str, weights: str | Path, *, nc: int) -> nn.Module:
    """An Ultralytics ``DetectionModel`` from a model YAML with its backbone's weights loaded.

    Args:
        model: ``detector.model`` (resolved by :func:`model_source`); a YAML with one ``TorchVision``
            layer.
        weights: ``detector.backbone_weights``.
        nc: Region classes (the detection head's outputs).

    Raises:
        WeightsError: As :func:`load_backbone_weights`; also when ``model`` is not a YAML file.
    """
    configure()  # Ultralytics offline, before its first import
    from ultralytics.nn.tasks import DetectionModel

    src = model_source(model)
    if not (src.endswith((".yaml", ".yml")) and Path(src).is_file()):
        raise WeightsError(f"detector.backbone_weights needs detector.model to be a model YAML file with a "
                           f"TorchVision backbone (e.g. yolo11n-mobilenetv2.yaml), got {model!r}")
    state = read_backbone_state(Path(weights).expanduser())  # a bad file fails before the (slower) build
    net = DetectionModel(src, nc=nc, verbose=False)
    load_backbone_weights(net, weights, state=state)
    return net


def write_initial_checkpoint(model: str, weights: str | Path, *, nc: int, path: Path) -> Path:
    """Save :func:`build_pretrained`'s model as an Ultralytics checkpoint for ``YOLO(path).train``.

    Written atomically (:func:`mgfa_ray.storage.atomic_write_bytes`). Returns ``path``.

    Raises:
        WeightsError: As :func:`build_pretrained`.
    """
    configure()  # Ultralytics offline, before its first import
    import ultralytics

    net = build_pretrained(model, weights, nc=nc)
    buf = io.BytesIO()
    torch.save({"model": net, "train_args": {}, "version": ultralytics.__version__}, buf)
    return atomic_write_bytes(path, buf.getvalue())
