"""Network factory and pretrained-weight loading.

Architectures come from segmentation-models-pytorch (smp) and accept both our names and
SpecDeepMap's ('U-Net', 'U-Net++', 'DeepLabV3+', 'SegFormer'); backbones are any smp encoder
or any timm encoder as ``tu-NAME``. Nothing is ever downloaded: ``encoder_weights=None`` is
passed to smp unless ImageNet weights are asked for, and pretrained weights otherwise come from
a file or URI the user gives (a state dict as .pth/.pt/.safetensors, or the SSL4EO-S12
Sentinel-2 MoCo ResNet weights as distributed by torchgeo).
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass

import torch
from torch import nn

from specdeepmap import storage
from specdeepmap.errors import InputMismatchError, InvalidParameterError, UnsafeModelFileError

log = logging.getLogger(__name__)

#: our name → smp class name; SpecDeepMap's names map onto the same entries
ARCHITECTURES = {"unet": "Unet", "unetplusplus": "UnetPlusPlus", "deeplabv3plus": "DeepLabV3Plus",
                 "segformer": "Segformer"}
_ALIASES = {"u-net": "unet", "unet": "unet", "u-net++": "unetplusplus", "unet++": "unetplusplus",
            "unetplusplus": "unetplusplus", "deeplabv3+": "deeplabv3plus",
            "deeplabv3plus": "deeplabv3plus", "segformer": "segformer"}

#: SSL4EO-S12 MoCo weights (Wang et al. 2023) as distributed by torchgeo: timm ResNet state
#: dicts for 13 Sentinel-2 L1C bands (B01…B12 incl. B10), inputs divided by 10 000.
SENTINEL2_WEIGHTS = {
    "resnet18_sentinel2_all_moco": {"backbone": "resnet18", "bands": 13, "scaler": 10000.0},
    "resnet50_sentinel2_all_moco": {"backbone": "resnet50", "bands": 13, "scaler": 10000.0},
}


def canonical_architecture(name: str) -> str:
    """Our name for an architecture; raises with the list of valid names otherwise."""
    key = _ALIASES.get(name.strip().lower().replace(" ", ""))
    if key is None:
        raise InvalidParameterError(
            f"Unknown architecture {name!r}; choose one of {sorted(ARCHITECTURES)} "
            "(SpecDeepMap's 'U-Net', 'U-Net++', 'DeepLabV3+', 'SegFormer' work too)")
    return key


def check_backbone(backbone: str) -> None:
    """Raise with a hint when ``backbone`` is neither an smp encoder nor ``tu-<timm model>``."""
    import segmentation_models_pytorch as smp
    import timm

    if backbone.startswith("tu-"):
        if not timm.list_models(backbone[3:]) and backbone[3:] not in timm.list_models():
            raise InvalidParameterError(f"Unknown timm encoder {backbone[3:]!r} (timm.list_models)")
    elif backbone not in smp.encoders.get_encoder_names():
        raise InvalidParameterError(
            f"Unknown backbone {backbone!r}: use an smp encoder such as resnet18, resnet50, "
            "efficientnet-b0, mobilenet_v2, or any timm model as tu-NAME (e.g. tu-convnext_tiny)")


@dataclass(frozen=True)
class ModelSpec:
    """What is needed to rebuild a network (stored in every checkpoint as plain data)."""

    architecture: str
    backbone: str
    in_channels: int
    num_classes: int


def build_model(spec: ModelSpec, imagenet: bool = False) -> nn.Module:
    """Build an smp segmentation network from its spec.

    Args:
        spec: architecture, backbone, input bands and output classes.
        imagenet: load smp's ImageNet encoder weights (needs the network or a warm torch hub
            cache; offline, a clear error says how to supply a weights file instead).
    """
    import segmentation_models_pytorch as smp

    architecture = canonical_architecture(spec.architecture)
    check_backbone(spec.backbone)
    cls = getattr(smp, ARCHITECTURES[architecture])
    kwargs = dict(encoder_name=spec.backbone, in_channels=spec.in_channels,
                  classes=spec.num_classes, encoder_weights="imagenet" if imagenet else None)
    try:
        return cls(**kwargs)
    except OSError as error:  # urllib's URLError and socket errors are OSErrors
        if imagenet:
            raise InvalidParameterError(
                f"ImageNet weights for {spec.backbone} could not be downloaded ({error}). "
                "Offline, download the encoder's state dict elsewhere and pass it as a weights "
                "file (--weights PATH_OR_URI).") from error
        raise
    except (RuntimeError, ValueError, KeyError) as error:
        raise InvalidParameterError(
            f"Cannot build {architecture} with backbone {spec.backbone}: {error}") from error


def read_state_dict(uri: str) -> dict[str, torch.Tensor]:
    """Read tensors from a .safetensors file or a ``torch.save`` file, never running code.

    ``.pth``/``.pt`` files are loaded with ``weights_only=True``; a file that would need
    arbitrary unpickling is refused with :class:`UnsafeModelFileError`. A Lightning checkpoint
    or a ``{"state_dict": …}``/``{"model": …}`` wrapper is unwrapped.
    """
    data = storage.read_bytes(uri)
    if uri.endswith(".safetensors"):
        from safetensors.torch import load

        return load(data)
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError or RuntimeError subclasses
        raise UnsafeModelFileError(
            f"{uri} is not a plain state dict: loading it would unpickle arbitrary objects "
            f"({type(error).__name__}). Save it with torch.save(model.state_dict()) or as "
            ".safetensors.") from error
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise UnsafeModelFileError(f"{uri} holds a {type(obj).__name__}, not a state dict")
    return obj


def load_encoder_weights(model: nn.Module, uri: str, adapt_first_conv: bool = False) -> None:
    """Load a timm/torchvision-style backbone state dict into ``model.encoder``.

    Classifier keys (``fc.*``) are dropped, a ``model.`` prefix (timm universal encoders) is
    added or removed as the encoder needs, and every remaining key must match. A first
    convolution for another band count is refused unless ``adapt_first_conv`` is set, which
    repeats the pretrained kernels cyclically over the input bands and rescales them (smp's
    rule for non-RGB inputs).
    """
    source = read_state_dict(uri)
    target = model.encoder.state_dict()
    prefix = "model." if next(iter(target)).startswith("model.") else ""
    mapped = {}
    for key, value in source.items():
        key = key.removeprefix("module.").removeprefix("backbone.").removeprefix("encoder.")
        key = key.removeprefix("model.")
        if key.startswith("fc.") or key.startswith("head."):
            continue
        mapped[prefix + key] = value
    missing = sorted(set(target) - set(mapped))
    unexpected = sorted(set(mapped) - set(target))
    if missing or unexpected:
        raise InputMismatchError(
            f"Weights {uri} do not fit the encoder: {len(missing)} missing keys (e.g. "
            f"{missing[:3]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:3]}). Is the "
            "backbone right (resnet18 vs resnet50)?")
    for key, value in mapped.items():
        if value.shape == target[key].shape:
            continue
        first_conv = value.ndim == 4 and value.shape[0] == target[key].shape[0] and \
            value.shape[2:] == target[key].shape[2:]
        if first_conv and not adapt_first_conv:
            raise InputMismatchError(
                f"Weights {uri} expect {value.shape[1]} input bands, the data have "
                f"{target[key].shape[1]}. Give data with {value.shape[1]} bands, or set "
                "adapt_first_conv (--adapt-first-conv) to repeat the pretrained kernels over "
                "the bands.")
        if first_conv:
            bands = target[key].shape[1]
            repeats = -(-bands // value.shape[1])
            mapped[key] = value.repeat(1, repeats, 1, 1)[:, :bands] * (value.shape[1] / bands)
        else:
            raise InputMismatchError(f"Weights {uri}: {key} has shape {tuple(value.shape)}, "
                                     f"the encoder needs {tuple(target[key].shape)}")
    model.encoder.load_state_dict(mapped)
    log.info("Loaded encoder weights from %s (%d tensors)", uri, len(mapped))


def freeze_encoder(model: nn.Module) -> None:
    """Stop gradients into the encoder (its BatchNorm statistics still adapt)."""
    for parameter in model.encoder.parameters():
        parameter.requires_grad = False


def weights_kind(weights: str | None) -> str:
    """'none', 'imagenet', a Sentinel-2 weights name, or 'file'."""
    if not weights or weights.lower() == "none":
        return "none"
    if weights.lower() == "imagenet":
        return "imagenet"
    name = os.path.basename(str(weights)).split(".")[0].lower()
    for key in SENTINEL2_WEIGHTS:
        if key in name:
            return key
    return "file"
