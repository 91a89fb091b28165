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
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from typing_extensions import override

from specdeepmap import storage
from specdeepmap.errors import InputMismatchError, InvalidParameterError, UnsafeModelFileError
from specdeepmap.model_config import ModelConfig
from specdeepmap.params import ARCHITECTURE_ALIASES

log = logging.getLogger(__name__)

#: our name → smp class name; SpecDeepMap's names map onto the same entries
ARCHITECTURES = {
    "unet": "Unet",
    "unetplusplus": "UnetPlusPlus",
    "deeplabv3plus": "DeepLabV3Plus",
    "segformer": "Segformer",
    "justo-unet": "JustoUNetSimple",  # ours (below), not smp's
}
#: networks without an encoder: no backbone, no pretrained weights, no spectral front-end
PLAIN_ARCHITECTURES = ("justo-unet",)
#: SSL4EO-S12 MoCo weights (Wang et al. 2023) as distributed by torchgeo: timm ResNet state
#: dicts for 13 Sentinel-2 L1C bands (B01…B12 incl. B10), inputs divided by 10 000.
SENTINEL2_WEIGHTS = {
    "resnet18_sentinel2_all_moco": {"backbone": "resnet18", "bands": 13, "scaler": 10000.0},
    "resnet50_sentinel2_all_moco": {"backbone": "resnet50", "bands": 13, "scaler": 10000.0},
}


def canonical_architecture(name: str) -> str:
    """Our name for an architecture; raises with the list of valid names otherwise."""
    key = ARCHITECTURE_ALIASES.get(name.strip().lower().replace(" ", ""))
    if key is None:
        raise InvalidParameterError(
            f"Unknown architecture {name!r}; choose one of {sorted(ARCHITECTURES)} "
            "(SpecDeepMap's 'U-Net', 'U-Net++', 'DeepLabV3+', 'SegFormer' work too)"
        )
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
            "efficientnet-b0, mobilenet_v2, or any timm model as tu-NAME (e.g. tu-convnext_tiny)"
        )


#: width of the spectral front-end built by default (``spectral_channels=-1``)
SPECTRAL_AUTO_CHANNELS = 32


@dataclass(frozen=True)
class ModelSpec:
    """What is needed to rebuild a network (stored in every checkpoint as plain data)."""

    architecture: str
    backbone: str
    in_channels: int
    num_classes: int
    spectral_channels: int = 0  #: > 0: a learned per-pixel front-end of this many channels
    encoder_depth: int = 5  #: encoder stages (U-Net/U-Net++: 3-5; others: 5)
    norm: str = "batch"  #: batch (as built) or group: every BatchNorm2d becomes a GroupNorm

    @classmethod
    def from_config(cls, config: ModelConfig) -> ModelSpec:
        """The spec a model file's config describes."""
        return cls(
            config.architecture,
            config.backbone,
            config.in_channels,
            config.num_classes,
            config.spectral_channels,
            config.encoder_depth,
            config.norm,
        )


#: U-Net decoder widths by resolution (stride 16 … 1); a shallower network keeps the last ones
DECODER_CHANNELS = (256, 128, 64, 32, 16)
#: architectures whose depth can be reduced (their decoders follow the encoder's stages)
DEPTH_ARCHITECTURES = ("unet", "unetplusplus")


def encoder_depth_for(architecture: str, tile: int, requested: int) -> int:
    """Encoder stages: ``requested`` (3-5), or for -1 (auto) the most stages whose deepest
    features are still at least 4 × 4 px on a training chip (32 px → 3, 64 → 4, ≥ 128 → 5).

    A ResNet's last stages hold most of its weights; on 32 px chips they would see a 1 × 1
    feature map, so they add weights to fit but no spatial context. U-Net/U-Net++ only: the
    other architectures keep their full encoder.
    """
    architecture = canonical_architecture(architecture)
    if requested == -1:
        if architecture not in DEPTH_ARCHITECTURES:
            return 5
        return min(5, max(3, int(math.log2(tile / 4)) if tile >= 4 else 3))
    if requested == 5:
        return 5
    if architecture not in DEPTH_ARCHITECTURES or not 3 <= requested <= 5:
        raise InvalidParameterError(
            f"encoder depth {requested}: U-Net and U-Net++ take 3-5 (or -1, auto), "
            f"{architecture} only 5"
        )
    return requested


def spectral_channels_for(bands: int, requested: int, architecture: str = "unet") -> int:
    """Width of the spectral front-end: ``requested`` if > 0, none if 0, and for -1 (auto)
    :data:`SPECTRAL_AUTO_CHANNELS` whatever the band count: it cut the first layer's weights
    7-fold for 224 EnMAP bands, and its per-pixel head lifted the rare, spectrally distinct
    classes of 13-band Sentinel-2 data too (docs/recipe.md).
    """
    if canonical_architecture(architecture) in PLAIN_ARCHITECTURES:
        return 0 if requested == -1 else requested  # build_model refuses a front-end
    return SPECTRAL_AUTO_CHANNELS if requested == -1 else requested


class SpectralSegmentation(nn.Module):
    """A learned spectral front-end, an smp network on its channels, and a per-pixel head.

    Two per-pixel layers (1×1 convolutions with batch norm) turn the bands into a few learned
    channels before the encoder's first spatial convolution. For the many, strongly correlated
    bands of a hyperspectral image that first convolution then has ``k² · channels`` instead of
    ``k² · bands`` weights per filter (a 224-band ResNet stem alone has 700 000: more than a
    few chips can train). The same per-pixel features also feed a 1×1 head whose logits are
    added to the network's: smp's decoders rebuild full resolution from stride-2 features, so
    without it a pixel's own spectrum reaches the output only blurred with its neighbours',
    and a per-pixel classifier (what a RandomForest is) would see more of it than the network.
    """

    def __init__(self, in_channels: int, channels: int, num_classes: int, net: nn.Module):
        super().__init__()
        hidden = max(channels, min(2 * channels, in_channels))
        self.spectral = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
        )
        self.net = net
        self.pixel_head = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, num_classes, 1))

    @property
    def encoder(self) -> nn.Module:
        """The network's encoder (what pretrained weights and freezing apply to)."""
        return self.net.encoder

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_parts(x)[0]

    def forward_parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits :meth:`forward` returns and the per-pixel head's share of them (for an
        auxiliary loss that trains the per-pixel path on its own).
        """
        features = self.spectral(x)
        pixel = self.pixel_head(features)
        return self.net(features) + pixel, pixel


def init_spectral_front_end(model: nn.Module, axes: np.ndarray) -> int:
    """Start the spectral front-end's first layer on the bands' principal axes.

    Its first filters become the leading principal axes (``axes``, k × bands, e.g. from
    :func:`specdeepmap.data.principal_axes`), at the layer's initial weight scale; filters
    beyond the number of axes keep their random start. Training then begins from the
    directions in which the spectra vary most, found on every pixel of the training chips,
    labelled or not, instead of from random mixtures of many correlated bands. Returns the
    number of filters set (0 without a front-end).
    """
    if not isinstance(model, SpectralSegmentation):
        return 0
    conv = model.spectral[0]
    k = min(conv.out_channels, len(axes))
    with torch.no_grad():
        start = torch.as_tensor(axes[:k], dtype=conv.weight.dtype)
        scale = conv.weight.std() / start.std().clamp_min(1e-12)
        conv.weight[:k, :, 0, 0] = start * scale
    return k


class EnsembleSegmentation(nn.Module):
    """Several networks of one spec, trained from different random starts, as one network.

    Its output is the log of the members' mean probabilities of the real classes (channels
    1…K; channel 0, 'unlabelled', is never trained and gets a probability of ~0): the softmax
    that every caller applies to the real classes' logits then gives that mean, so testing,
    TTA, mapping and int8 quantization treat an ensemble as any other network. Averaging
    independently trained networks removes part of the variance that a small training set
    leaves in any one of them (docs/recipe.md, step 10c); it costs one training and one
    forward pass per member.
    """

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.stack([m(x)[:, 1:].softmax(dim=1) for m in self.members]).mean(dim=0)
        logits = mean.clamp_min(1e-12).log()
        return torch.cat([torch.full_like(logits[:, :1], math.log(1e-12)), logits], dim=1)


def build_network(config: ModelConfig) -> nn.Module:
    """The untrained network a model file's config describes: one network, or an
    :class:`EnsembleSegmentation` of ``config.ensemble`` of them.
    """
    spec = ModelSpec.from_config(config)
    members = config.ensemble
    if members == 1:
        return build_model(spec)
    return EnsembleSegmentation([build_model(spec) for _ in range(members)])


def backbone_encoder(model: nn.Module) -> nn.Module:
    """The encoder that pretrained weights and freezing apply to (never the front-end)."""
    return model.encoder


class JustoUNetSimple(nn.Module):
    """SpecDeepMap's fifth architecture, 2D-Justo-UNet-Simple (after Justo et al.,
    NTNU-SmallSat-Lab ``s_l_c_segm_hyp_img``): a two-level U-Net without skips, made for
    hyperspectral chips, with SpecDeepMap's layer names (its checkpoints load as they are).

    conv 3×3 (bands → 6) + BN + ReLU, max-pool 2, conv 3×3 (6 → 12) + BN + ReLU, max-pool 2,
    nearest ×2, conv 3×3 (12 → 6) + BN + ReLU, nearest ×2, conv 3×3 (6 → classes) + BN. It
    returns logits: SpecDeepMap's version ended in a softmax that its cross-entropy applied
    again (a double softmax, defect 16 of ../shared/SPECDEEPMAP.md); the argmax is the same.
    Chips must be multiples of 4 px.
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.enc_conv1 = nn.Conv2d(in_channels, 6, kernel_size=3, padding=1)
        self.enc_bn1 = nn.BatchNorm2d(6)
        self.enc_conv2 = nn.Conv2d(6, 12, kernel_size=3, padding=1)
        self.enc_bn2 = nn.BatchNorm2d(12)
        self.dec_conv1 = nn.Conv2d(12, 6, kernel_size=3, padding=1)
        self.dec_bn1 = nn.BatchNorm2d(6)
        self.dec_conv2 = nn.Conv2d(6, num_classes, kernel_size=3, padding=1)
        self.dec_bn2 = nn.BatchNorm2d(num_classes)

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.enc_bn1(self.enc_conv1(x))), 2)
        x = nn.functional.max_pool2d(torch.relu(self.enc_bn2(self.enc_conv2(x))), 2)
        x = nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")
        x = torch.relu(self.dec_bn1(self.dec_conv1(x)))
        x = nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.dec_bn2(self.dec_conv2(x))


def build_model(spec: ModelSpec, imagenet: bool = False) -> nn.Module:
    """Build a segmentation network from its spec (smp's, or :class:`JustoUNetSimple`).

    Args:
        spec: architecture, backbone, input bands and output classes.
        imagenet: load smp's ImageNet encoder weights (needs the network or a warm torch hub
            cache; offline, a clear error says how to supply a weights file instead).
    """
    import segmentation_models_pytorch as smp

    architecture = canonical_architecture(spec.architecture)
    if architecture in PLAIN_ARCHITECTURES:
        if imagenet or spec.spectral_channels:
            raise InvalidParameterError(
                f"{architecture} has no encoder: no pretrained weights, no spectral front-end"
            )
        model = JustoUNetSimple(spec.in_channels, spec.num_classes)
        if spec.norm == "group":
            to_group_norm(model)
        return model
    check_backbone(spec.backbone)
    cls = getattr(smp, ARCHITECTURES[architecture])
    encoder_bands = spec.spectral_channels or spec.in_channels
    kwargs = dict(
        encoder_name=spec.backbone,
        in_channels=encoder_bands,
        classes=spec.num_classes,
        encoder_weights="imagenet" if imagenet else None,
    )
    if spec.encoder_depth != 5:
        encoder_depth_for(architecture, 0, spec.encoder_depth)  # raises for other networks
        kwargs |= dict(
            encoder_depth=spec.encoder_depth,
            decoder_channels=DECODER_CHANNELS[-spec.encoder_depth :],
        )
    try:
        model = cls(**kwargs)
    except OSError as error:  # urllib's URLError and socket errors are OSErrors
        if imagenet:
            raise InvalidParameterError(
                f"ImageNet weights for {spec.backbone} could not be downloaded ({error}). "
                "Offline, download the encoder's state dict elsewhere and pass it as a weights "
                "file (--weights PATH_OR_URI)."
            ) from error
        raise
    except (RuntimeError, ValueError, KeyError) as error:
        raise InvalidParameterError(
            f"Cannot build {architecture} with backbone {spec.backbone}: {error}"
        ) from error
    if spec.encoder_depth != 5:
        _drop_unused_stages(model.encoder, encoder_bands)
    if spec.spectral_channels:
        model = SpectralSegmentation(
            spec.in_channels, spec.spectral_channels, spec.num_classes, model
        )
    if spec.norm == "group":
        to_group_norm(model)
    elif spec.norm != "batch":
        raise InvalidParameterError(f"norm must be 'batch' or 'group', got {spec.norm!r}")
    return model


#: channels per group of :func:`to_group_norm` (at most 32 groups, as in Wu & He 2018)
GROUP_NORM_GROUPS = 32


def group_count(channels: int) -> int:
    """The most groups (≤ 32) that divide ``channels`` evenly."""
    return next(g for g in range(min(GROUP_NORM_GROUPS, channels), 0, -1) if channels % g == 0)


def to_group_norm(model: nn.Module) -> None:
    """Replace every ``BatchNorm2d`` of ``model`` by a ``GroupNorm`` over the same channels.

    Batch norm estimates its statistics from the batch: with the Trainer's default batch of 2
    small chips the deepest features give it a few dozen values per channel, and the running
    averages used at inference differ from what training saw. Group norm normalises each
    sample on its own, the same way in training and inference.
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.BatchNorm2d):
            replace_submodule(
                model,
                name,
                nn.GroupNorm(
                    group_count(module.num_features),
                    module.num_features,
                    eps=module.eps,
                    affine=module.affine,
                    device=module.weight.device if module.affine else None,
                ),
            )


def replace_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` where the submodule ``name`` (a dotted path) was."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def _drop_unused_stages(encoder: nn.Module, in_channels: int) -> None:
    """Replace the encoder's stages that a shallower encoder never calls by nothing.

    smp builds the whole backbone and runs only the first stages, so the unused ones would
    still sit in every checkpoint and count as (never trained) parameters, which also makes
    DDP wait for gradients that never come.
    """
    called: set[nn.Module] = set()
    hooks = [
        child.register_forward_hook(lambda module, *_: called.add(module))
        for child in encoder.children()
    ]
    with torch.no_grad():
        was_training = encoder.training
        encoder.eval()
        encoder(torch.zeros(1, in_channels, 64, 64))
        encoder.train(was_training)
    for hook in hooks:
        hook.remove()
    for name, child in list(encoder.named_children()):
        if child not in called and any(True for _ in child.parameters()):
            setattr(encoder, name, nn.Identity())


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
            ".safetensors."
        ) from error
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
    encoder = backbone_encoder(model)
    target = encoder.state_dict()
    prefix = "model." if next(iter(target)).startswith("model.") else ""
    stages = encoder.model if prefix else encoder
    dropped = {name for name, child in stages.named_children() if isinstance(child, nn.Identity)}
    mapped = {}
    for key, value in source.items():
        key = key.removeprefix("module.").removeprefix("backbone.").removeprefix("encoder.")
        key = key.removeprefix("model.")
        if (
            key.startswith("fc.") or key.startswith("head.") or key.split(".")[0] in dropped
        ):  # stages a shallower encoder left out
            continue
        mapped[prefix + key] = value
    missing = sorted(set(target) - set(mapped))
    unexpected = sorted(set(mapped) - set(target))
    if missing or unexpected:
        raise InputMismatchError(
            f"Weights {uri} do not fit the encoder: {len(missing)} missing keys (e.g. "
            f"{missing[:3]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:3]}). Is the "
            "backbone right (resnet18 vs resnet50)?"
        )
    for key, value in mapped.items():
        if value.shape == target[key].shape:
            continue
        first_conv = (
            value.ndim == 4
            and value.shape[0] == target[key].shape[0]
            and value.shape[2:] == target[key].shape[2:]
        )
        if first_conv and not adapt_first_conv:
            raise InputMismatchError(
                f"Weights {uri} expect {value.shape[1]} input bands, the data have "
                f"{target[key].shape[1]}. Give data with {value.shape[1]} bands, or set "
                "adapt_first_conv (--adapt-first-conv) to repeat the pretrained kernels over "
                "the bands."
            )
        if first_conv:
            bands = target[key].shape[1]
            repeats = -(-bands // value.shape[1])
            mapped[key] = value.repeat(1, repeats, 1, 1)[:, :bands] * (value.shape[1] / bands)
        else:
            raise InputMismatchError(
                f"Weights {uri}: {key} has shape {tuple(value.shape)}, "
                f"the encoder needs {tuple(target[key].shape)}"
            )
    encoder.load_state_dict(mapped)
    log.info("Loaded encoder weights from %s (%d tensors)", uri, len(mapped))


def freeze_encoder(model: nn.Module) -> None:
    """Stop gradients into the encoder (its BatchNorm statistics still adapt); a spectral
    front-end stays trainable.
    """
    for parameter in backbone_encoder(model).parameters():
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
