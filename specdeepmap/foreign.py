"""SpecDeepMap checkpoints in: read a Lightning checkpoint written by EnMAP-Box's Trainer
without running its pickled code, and describe it as one of our model files.

SpecDeepMap's checkpoints pickle more than tensors: its hyper-parameters hold a torchvision
augmentation pipeline, the training and validation tables (pandas, with numpy inside) and,
when it normalised, a torchvision ``Normalize``. Unpickling them the usual way would run
whatever the file names. We read them with PyTorch's ``weights_only`` unpickler, which builds
only tensors and plain containers, and let it build exactly those foreign classes as *inert
records* (:class:`Inert`): the name, the arguments and the state, never the class itself, so
that nothing of theirs is imported or called. Any other global in the file is refused as
before (a crafted checkpoint runs nothing).

From the hyper-parameters (``../shared/SPECDEEPMAP.md`` §3.7) we rebuild what inference
needs: architecture, backbone, bands, classes and their values, chip size, scaler and the
``Normalize`` mean/std, in our config format (:mod:`specdeepmap.inference`).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from specdeepmap import storage
from specdeepmap.classes import ClassSchema
from specdeepmap.errors import InputMismatchError
from specdeepmap.model_config import ModelConfig
from specdeepmap.params import ARCHITECTURE_ALIASES

log = logging.getLogger(__name__)

#: the foreign classes SpecDeepMap's checkpoints pickle, built as inert records
INERT_GLOBALS = (
    "torchvision.transforms.v2._container.Compose",
    "torchvision.transforms.v2._geometry.RandomRotation",
    "torchvision.transforms.v2._geometry.RandomHorizontalFlip",
    "torchvision.transforms.v2._geometry.RandomVerticalFlip",
    "torchvision.transforms.v2._misc.Normalize",
    "torchvision.transforms.transforms.Compose",
    "torchvision.transforms.transforms.Normalize",
    "torchvision.transforms.functional.InterpolationMode",
    "pandas.core.frame.DataFrame",
    "pandas.core.internals.managers.BlockManager",
    "pandas._libs.internals._unpickle_block",
    "pandas.core.indexes.base._new_Index",
    "pandas.core.indexes.base.Index",
    "pandas.core.indexes.range.RangeIndex",
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
    "numpy.ndarray",
    "numpy.dtype",
)
#: hyper-parameters every SpecDeepMap checkpoint has (what its Tester and Mapper read)
REQUIRED = ("in_channels", "architecture", "classes", "img_x", "img_y", "class_values")


class Inert:
    """A pickled object of a foreign class, kept as data: its arguments and its state."""

    qualified_name = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def attribute(self, name: str) -> Any:
        """``name`` from the pickled state (a dict, or the dict of a (dict, slots) pair)."""
        state = self.state
        if isinstance(state, tuple) and state and isinstance(state[0], dict):
            state = state[0]
        return state.get(name) if isinstance(state, dict) else None

    def __repr__(self) -> str:
        return f"<inert {self.qualified_name}>"


def _inert_classes() -> list[tuple[type, str]]:
    return [
        (type(name.rsplit(".", 1)[1], (Inert,), {"qualified_name": name}), name)
        for name in INERT_GLOBALS
    ]


def load_checkpoint(path: str) -> dict:
    """The checkpoint's contents, its foreign objects as :class:`Inert` records.

    Raises:
        the ``weights_only`` unpickler's error for any other global (callers turn it into
        :class:`~specdeepmap.errors.UnsafeModelFileError`).
    """
    with torch.serialization.safe_globals([*_inert_classes(), set, slice]):
        return torch.load(path, map_location="cpu", weights_only=True)


def is_specdeepmap_checkpoint(obj: object) -> bool:
    """Whether ``obj`` (a loaded checkpoint) has SpecDeepMap's hyper-parameters."""
    hyper = obj.get("hyper_parameters") if isinstance(obj, dict) else None
    return isinstance(hyper, dict) and all(key in hyper for key in REQUIRED)


def _normalize(hyper: dict) -> tuple[list[float] | None, list[float] | None]:
    """Mean and std of the checkpoint's ``preprocess`` (a torchvision Normalize), or None."""
    preprocess = hyper.get("preprocess")
    if not isinstance(preprocess, Inert):
        return None, None
    mean, std = preprocess.attribute("mean"), preprocess.attribute("std")
    if mean is None or std is None:
        raise InputMismatchError(
            f"The checkpoint's preprocessing is a {preprocess.qualified_name} without mean and "
            "std: only torchvision's Normalize can be carried over"
        )
    return [float(v) for v in mean], [float(v) for v in std]


def to_model_file(obj: dict, uri: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, state dict) in our model-file format for a SpecDeepMap checkpoint.

    Raises:
        InputMismatchError: something the checkpoint says cannot be carried over (a
            checkpoint trained without the background channel, an unknown architecture).
    """
    hyper = obj["hyper_parameters"]
    architecture = ARCHITECTURE_ALIASES.get(str(hyper["architecture"]).strip().lower())
    if architecture is None:
        raise InputMismatchError(
            f"{uri}: SpecDeepMap architecture {hyper['architecture']!r} is not one we can build"
        )
    if str(hyper.get("remove_background_class", "Yes")).lower() != "yes":
        raise InputMismatchError(
            f"{uri} was trained without the background channel (remove_background_class "
            "'No'): its channel 0 is a class, which our models reserve for 'unlabelled'; "
            "train it again with background, or with specdeepmap"
        )
    values = [int(v) for v in hyper["class_values"]]
    reverse = {int(k): int(v) for k, v in (hyper.get("reverse_mapping") or {}).items()}
    if reverse and [reverse.get(i) for i in range(1, len(values) + 1)] != values:
        raise InputMismatchError(
            f"{uri}: its reverse mapping {reverse} does not give its class values {values} "
            "in channel order"
        )
    if int(hyper["classes"]) != len(values) + 1:
        raise InputMismatchError(
            f"{uri}: {hyper['classes']} output channels for {len(values)} classes and background"
        )
    mean, std = _normalize(hyper)
    scaler = hyper.get("scaler")
    state = {
        k.removeprefix("model."): v for k, v in obj["state_dict"].items() if k.startswith("model.")
    }
    config = {
        "architecture": architecture,
        "backbone": str(hyper.get("backbone") or "none"),
        "in_channels": int(hyper["in_channels"]),
        "num_classes": int(hyper["classes"]),
        "class_values": values,
        "ignore_index": 0,
        "tile_size": [int(hyper["img_y"]), int(hyper["img_x"])],
        "normalization": {
            "scaler": float(scaler) if scaler else None,
            "mean": mean,
            "std": std,
            "nodata": None,  # SpecDeepMap never masked nodata in its inputs
        },
        "weights": str(hyper.get("weights")),
        "freeze_backbone": bool(hyper.get("freeze_backbone")),
        "spectral_channels": 0,
        "encoder_depth": 5,
        "norm": "batch",
        "classes": ClassSchema().restrict(values).to_dict(),
        "band_names": [],
        "version": f"SpecDeepMap (Lightning {obj.get('pytorch-lightning_version', '?')})",
        "imported_from": {
            "format": "specdeepmap-checkpoint",
            "file": uri,
            "epoch": obj.get("epoch"),
            "epochs": hyper.get("epochs"),
            "lr": hyper.get("lr"),
            "batch_size": hyper.get("batch_size"),
            # what does not come over: SpecDeepMap's argmax also took the background channel
            # (a pixel could come out 0); ours chooses among the classes only
            "not_carried": ["augmentation", "training tables", "background predictions"],
        },
    }
    return config, state


def convert(checkpoint_uri: str, out_uri: str) -> ModelConfig:
    """Write a SpecDeepMap checkpoint as our model file (``model.pt`` format); its config.

    The weights load into the network the config describes (strictly: every tensor must fit),
    so a file that converts is a file our Tester and Mapper run.
    """
    from specdeepmap.inference import export_model_file, read_model_file
    from specdeepmap.models import build_network

    config, state = read_model_file(checkpoint_uri)
    if config.imported_from is None:
        raise InputMismatchError(
            f"{checkpoint_uri} is a specdeepmap model already: use it as it is"
        )
    model = build_network(config)
    model.load_state_dict(state, strict=True)
    export_model_file(config, model, out_uri)
    return config


#: our architectures by the names SpecDeepMap's Trainer builds (its ``_prepare_model``)
SPECDEEPMAP_ARCHITECTURES = {
    "unet": "Unet",
    "unetplusplus": "Unet++",
    "deeplabv3plus": "DeepLabV3+",
    "justo-unet": "JustoUNetSimple",
}
#: the bias of the background channel in an exported network: SpecDeepMap's argmax runs
#: over every channel, background included; ours chooses among the classes, so the exported
#: background channel is made never to win (its logit lowered by this much)
BACKGROUND_BIAS = -1.0e4
#: the last layer's bias per architecture family (smp's segmentation head, Justo's last norm)
_LAST_BIAS = ("segmentation_head.0.bias", "dec_bn2.bias")


def export_checkpoint(model_uri: str, out_uri: str) -> dict:
    """Write one of our models as a checkpoint SpecDeepMap's Tester and Mapper load.

    Their loader (``MyModel.load_from_checkpoint`` in EnMAP-Box) builds a plain network from
    the hyper-parameters (architecture, backbone, bands, classes incl. background) and loads
    ``state_dict`` under ``model.``; its ``predict`` divides by ``scaler``, applies the pickled
    torchvision ``Normalize`` of ``preprocess`` and takes the argmax over all channels. So the
    model must be a plain one (no spectral front-end, five encoder stages, batch norms, one
    network), its normalisation becomes a ``Normalize`` (a band without statistics: mean 0,
    std infinite, i.e. 0 as ours makes it), and the background channel never wins.

    Returns the hyper-parameters written.

    Raises:
        InputMismatchError: the model has parts SpecDeepMap's Trainer does not build (named).
    """
    import lightning

    from specdeepmap.inference import load_model
    from specdeepmap.models import ModelSpec, canonical_architecture

    predictor = load_model(model_uri, "cpu")
    if predictor.model is None:
        raise InputMismatchError(f"{model_uri} is an ONNX file: export its torch model instead")
    spec = ModelSpec.from_config(predictor.config)
    name = SPECDEEPMAP_ARCHITECTURES.get(canonical_architecture(spec.architecture))
    state = predictor.model.state_dict()
    problems = _unexportable(spec, name, state)
    if problems:
        raise InputMismatchError(
            f"{model_uri} cannot be loaded by SpecDeepMap: it has " + "; ".join(problems)
        )
    state = {f"model.{k}": v.detach().clone() for k, v in state.items()}
    for key in _LAST_BIAS:
        if f"model.{key}" in state:
            state[f"model.{key}"][0] += BACKGROUND_BIAS
    norm = predictor.normalization
    preprocess = _preprocess(norm, spec.in_channels)
    values = predictor.class_values
    height, width = predictor.tile_size
    imported = predictor.config.imported_from or {}
    hyper = {
        "in_channels": spec.in_channels,
        "architecture": name,
        "classes": spec.num_classes,
        "backbone": None if name == "JustoUNetSimple" else spec.backbone,
        "weights": None,
        # an imported checkpoint's own (ours are not written into the model file)
        "epochs": imported.get("epochs"),
        "lr": imported.get("lr"),
        "batch_size": imported.get("batch_size"),
        "num_workers": 0,
        "acc": "cpu",
        "transform": None,
        "freeze_backbone": False,
        "class_weights": None,
        "checkpoint_path": None,
        "img_x": int(width),
        "img_y": int(height),
        "preprocess": preprocess,
        "remove_background_class": "Yes",
        "scaler": float(norm.scaler) if norm.scaler else None,
        "class_values": [int(v) for v in values],
        "forward_mapping": {int(v): i + 1 for i, v in enumerate(values)},
        "reverse_mapping": {i + 1: int(v) for i, v in enumerate(values)},
    }
    checkpoint = {
        "epoch": 0,
        "global_step": 0,
        "pytorch-lightning_version": lightning.__version__,
        "state_dict": state,
        # as SpecDeepMap's own: the flat keys, and MyModel's init arguments
        "hyper_parameters": hyper
        | {"train_data": None, "val_data": None, "feedback": None, "hparams": dict(hyper)},
        "specdeepmap_platform": {"source": storage.redact(model_uri)},
    }
    with storage.atomic_output(out_uri) as tmp:
        torch.save(checkpoint, tmp)
    return hyper


def _preprocess(norm, bands: int):
    """Our normalisation as SpecDeepMap's ``preprocess``: a torchvision ``Normalize`` (a band
    without statistics: mean 0, std infinite, i.e. 0 as ours makes it); None without one.
    """
    from torchvision import transforms

    if norm.mean is None or norm.std is None:
        return None
    mean, std, missing = norm.band_terms(bands)
    return transforms.Compose(
        [transforms.Normalize(mean=mean.tolist(), std=np.where(missing, np.inf, std).tolist())]
    )


def _unexportable(spec, name: str | None, state: dict) -> list[str]:
    """What a model has that SpecDeepMap's Trainer does not build (empty: exportable)."""
    from specdeepmap.models import ModelSpec, build_model

    problems = [
        what
        for what, present in (
            (
                f"architecture {spec.architecture} (SpecDeepMap builds "
                + ", ".join(SPECDEEPMAP_ARCHITECTURES.values())
                + ")",
                name is None,
            ),
            (
                f"a spectral front-end of {spec.spectral_channels} channels "
                "(train with --spectral-channels 0)",
                spec.spectral_channels > 0,
            ),
            (
                f"{spec.encoder_depth} encoder stages (SpecDeepMap's have 5: --encoder-depth 5)",
                spec.encoder_depth != 5,
            ),
            ("group norms (--norm batch)", spec.norm != "batch"),
        )
        if present
    ]
    if not problems:
        plain = build_model(
            ModelSpec(spec.architecture, spec.backbone, spec.in_channels, spec.num_classes)
        ).state_dict()
        if {k: v.shape for k, v in state.items()} != {k: v.shape for k, v in plain.items()}:
            problems.append("layers a plain network does not have (an ensemble, a pixel head)")
    return problems


def import_card(config: ModelConfig) -> str:
    """A short model card for an imported checkpoint: where it came from, what came over."""
    source = config.imported_from
    values = ", ".join(str(v) for v in config.class_values)
    norm = config.normalization
    return "\n".join(
        [
            f"# Imported SpecDeepMap model: {config.architecture}",
            "",
            f"From `{source['file']}` ({config.version}; epoch {source.get('epoch')} of "
            f"{source.get('epochs')}, learning rate {source.get('lr')}, batch size "
            f"{source.get('batch_size')}).",
            "",
            "Recovered from its hyper-parameters: architecture "
            f"`{config.architecture}` (backbone `{config.backbone}`), "
            f"{config.in_channels} input bands, class values {values} (channel 0: "
            f"background), {config.tile_size[1]} x {config.tile_size[0]} px chips, "
            f"scaler {norm['scaler']}, normalisation "
            + ("mean/std per band" if norm["mean"] else "none")
            + ".",
            "",
            "Not carried over: " + ", ".join(source["not_carried"]) + ". The checkpoint names "
            "no bands, so maps cannot check the band order; no class names either.",
        ]
    )
