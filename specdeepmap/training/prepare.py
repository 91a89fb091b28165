"""Everything a training checks and builds before its first step: the dataset's chips and
their normalisation, the model file's configuration, the class weights, the datasets and the
network's start. Bad input fails here, before any step is taken.
"""

from __future__ import annotations

import logging
import os
import subprocess
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from specdeepmap import __version__
from specdeepmap.classes import read_dataset_classes
from specdeepmap.data import (
    CHIP_MEMORY_BYTES,
    ChipDataset,
    DatasetInfo,
    band_names,
    chip_properties,
    principal_axes,
    read_dataset_folder,
)
from specdeepmap.errors import InputMismatchError
from specdeepmap.inference import read_model_file
from specdeepmap.lightning_task import IGNORE_INDEX
from specdeepmap.model_config import ModelConfig
from specdeepmap.models import (
    SENTINEL2_WEIGHTS,
    ModelSpec,
    build_model,
    canonical_architecture,
    encoder_depth_for,
    freeze_encoder,
    init_spectral_front_end,
    load_encoder_weights,
    spectral_channels_for,
    weights_kind,
)
from specdeepmap.normalization import Normalization
from specdeepmap.splitting import NORMALIZE_CSV
from specdeepmap.training.config import TrainConfig

log = logging.getLogger(__name__)

#: what a resumed checkpoint must share with the dataset (a file written before an entry
#: existed has :class:`ModelConfig`'s default for it, the behaviour it was trained with)
RESUME_MUST_MATCH = (
    "class_values",
    "in_channels",
    "architecture",
    "backbone",
    "spectral_channels",
    "encoder_depth",
    "norm",
)


@dataclass
class Prepared:
    """What a training needs, checked and built before its first step."""

    info: DatasetInfo
    model: nn.Module  #: the first network, at its start
    #: the model file's configuration: the network (:class:`~specdeepmap.models.ModelSpec`)
    #: and the input contract (bands, tile size, normalisation, classes)
    config: ModelConfig
    class_weights: torch.Tensor | None  #: the loss's (channel 0, unlabelled, weighs 0)
    train_set: ChipDataset
    val_set: ChipDataset


def prepare(cfg: TrainConfig) -> Prepared:
    """Read and check the dataset, then build the model configuration, datasets and network."""
    info = read_dataset_folder(cfg.dataset, normalize=cfg.normalize)
    bands, height, width, nodata, dtype = chip_properties(info.train + info.validation)
    normalization, backbone = input_normalization(cfg, info, bands, nodata)
    check_chip_size(cfg, height, width)
    config = model_config(cfg, info, normalization, backbone, (bands, height, width, dtype))
    if cfg.resume:
        check_resume_matches(cfg, config)
    lookup = np.zeros(256, dtype=np.int64)
    for index, value in enumerate(info.class_values, start=1):
        lookup[value] = index
    cache = os.path.join(cfg.out, "chip-cache")
    # every loader worker keeps its own decoded chips: the budget is shared out among them
    memory = CHIP_MEMORY_BYTES // max(1, cfg.workers)
    train_set = ChipDataset(
        info.train,
        normalization,
        lookup,
        augment=cfg.augment,
        cache_dir=cache,
        augmentation=cfg.augmentation,
        spectral_jitter=cfg.spectral_jitter,
        memory_bytes=memory,
    )
    val_set = ChipDataset(
        info.validation, normalization, lookup, cache_dir=cache, memory_bytes=memory
    )
    model = initial_model(cfg, config, train_set)
    return Prepared(info, model, config, loss_weights(cfg, info), train_set, val_set)


def input_normalization(
    cfg: TrainConfig, info: DatasetInfo, bands: int, nodata: float | None
) -> tuple[Normalization, str]:
    """How the chips are scaled for the network, and the backbone that reads them:
    the dataset's scaler and band statistics, or Sentinel-2 weights' own normalisation (and
    backbone) when ``cfg.weights`` are such weights.
    """
    scaler, mean, std = info.scaler, info.band_mean, info.band_std
    backbone = cfg.backbone
    kind = weights_kind(cfg.weights)
    if kind in SENTINEL2_WEIGHTS:
        s2 = SENTINEL2_WEIGHTS[kind]
        if bands != s2["bands"] and not cfg.adapt_first_conv:
            raise InputMismatchError(
                f"{cfg.weights} are Sentinel-2 weights for {s2['bands']} bands (B01…B12), the "
                f"chips of {cfg.dataset} have {bands}. Use 13-band Sentinel-2 L1C chips or set "
                "adapt_first_conv."
            )
        backbone = s2["backbone"]
        scaler, mean, std = s2["scaler"], None, None  # the weights' own normalisation
    if mean is not None and len(mean) != bands:
        raise InputMismatchError(
            f"{NORMALIZE_CSV} of {cfg.dataset} has {len(mean)} bands, the chips have {bands}"
        )
    return Normalization(scaler=scaler, mean=mean, std=std, nodata=nodata), backbone


def check_chip_size(cfg: TrainConfig, height: int, width: int) -> None:
    """The Justo U-Net needs chips divisible by 4 (refused otherwise); encoders prefer 32."""
    if canonical_architecture(cfg.architecture) == "justo-unet":
        if height % 4 or width % 4:
            raise InputMismatchError(
                f"Chips of {cfg.dataset} are {width} x {height} px: justo-unet needs multiples "
                "of 4 (two max-pools)"
            )
    elif height % 32 or width % 32:
        log.warning("Chips of %d x %d px: most encoders need sizes divisible by 32", height, width)


def model_config(
    cfg: TrainConfig,
    info: DatasetInfo,
    normalization: Normalization,
    backbone: str,
    chips: tuple[int, int, int, str],
) -> ModelConfig:
    """The model file's configuration for chips of (bands, height, width, dtype)."""
    bands, height, width, dtype = chips
    kind = weights_kind(cfg.weights)
    architecture = canonical_architecture(cfg.architecture)
    return ModelConfig(
        architecture=architecture,
        backbone=backbone,
        in_channels=bands,
        num_classes=len(info.class_values) + 1,
        class_values=info.class_values,
        ignore_index=IGNORE_INDEX,
        tile_size=[height, width],
        normalization=normalization.to_dict(),
        weights=str(cfg.weights),
        freeze_backbone=cfg.freeze_backbone if cfg.freeze_backbone is not None else kind != "none",
        dataset=cfg.dataset,
        version=software_version(),
        # pretrained weights expect the raw bands: no front-end unless one is asked for
        spectral_channels=spectral_channels_for(
            bands,
            cfg.spectral_channels if kind == "none" else max(cfg.spectral_channels, 0),
            architecture,
        ),
        # pretrained encoders keep all their stages unless fewer are asked for
        encoder_depth=encoder_depth_for(
            architecture,
            min(height, width),
            cfg.encoder_depth if kind == "none" or cfg.encoder_depth != -1 else 5,
        ),
        # renormalisation is a way of training batch norm: the network holds batch norms
        norm="group" if cfg.norm_layers == "group" and kind == "none" else "batch",
        classes=read_dataset_classes(cfg.dataset).restrict(info.class_values).to_dict(),
        band_names=band_names(info.train[0][0]),
        dtype=dtype,
    )


def check_resume_matches(cfg: TrainConfig, config: ModelConfig) -> None:
    """A checkpoint to resume must describe the network this dataset gives."""
    resume_config, _ = read_model_file(cfg.resume)
    for key in RESUME_MUST_MATCH:
        found = getattr(resume_config, key)
        if found != getattr(config, key):
            raise InputMismatchError(
                f"Checkpoint {cfg.resume} was trained with {key} = {found}, "
                f"the dataset {cfg.dataset} gives {getattr(config, key)}: resume needs the same"
            )


def loss_weights(cfg: TrainConfig, info: DatasetInfo) -> torch.Tensor | None:
    """The Dataset Maker's class weights for the loss (``cfg.balanced``), unlabelled at 0."""
    if not cfg.balanced:
        return None
    weights = torch.tensor([0.0, *info.class_weights], dtype=torch.float32)
    return None if weights[1:].sum() == 0 else weights


def initial_model(cfg: TrainConfig, config: ModelConfig, train_set: ChipDataset) -> nn.Module:
    """A new network as ``config`` describes it, started as ``cfg`` asks: pretrained encoder
    weights (frozen or not), or the spectral front-end on the training chips' principal axes;
    torch's random generator draws the rest (each ensemble member its own start).
    """
    kind = weights_kind(cfg.weights)
    model = build_model(ModelSpec.from_config(config), imagenet=(kind == "imagenet"))
    if kind not in ("none", "imagenet"):
        load_encoder_weights(model, cfg.weights, adapt_first_conv=cfg.adapt_first_conv)
    if config.freeze_backbone:
        freeze_encoder(model)
    if config.spectral_channels and cfg.spectral_init == "pca" and not cfg.resume:
        init_spectral_front_end(model, principal_axes(train_set, config.in_channels, seed=cfg.seed))
    return model


def software_version() -> str:
    """This package's version, with the git commit when run from a checkout."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=os.path.dirname(__file__),
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{__version__}+{commit}" if commit else __version__
