"""Flow parameters as pydantic models: the Prefect UI renders them as forms with defaults,
descriptions and bounds, and rejects bad values before a run starts. Cross-field rules (a
pydantic model validator) are checked again when the flow starts, since the UI only applies
per-field bounds.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator

from specdeepmap.chipping import ChipParams
from specdeepmap.mapping import MapParams
from specdeepmap.splitting import SplitParams


class ScenePair(BaseModel):
    """An image (one raster, a VRT, or one file per band) and its label raster, same grid."""

    image_uri: str | None = Field(None, min_length=1, description="Image raster URI (path or "
                                  "s3://; a GDAL VRT too). Or give band_uris.")
    band_uris: list[str] = Field(default_factory=list, description="Or: one file per band, "
                                 "in band order (e.g. Sentinel-2 JP2 at 10/20/60 m), stacked "
                                 "as a VRT at the finest resolution.")
    resampling: Literal["bilinear", "nearest", "cubic", "average"] = Field(
        "bilinear", description="With band_uris: how coarser bands reach the finest grid.")
    label_uri: str = Field(..., min_length=1,
                           description="Label raster URI: class values 0-255, 0 = unlabelled.")
    classes_uri: str | None = Field(
        None, description="Class names and colours: CSV (value,name,color) or QGIS .qml "
        "(default: those stored with the label raster).")

    @model_validator(mode="after")
    def _one_image(self) -> ScenePair:
        if bool(self.image_uri) == bool(self.band_uris):
            raise ValueError("give either image_uri or band_uris")
        return self


class ChipSettings(BaseModel):
    """Raster Splitter settings."""

    tile_size: int = Field(256, ge=32, le=4096, description="Chip edge in pixels.")
    step: int = Field(256, ge=1, le=4096, description="Distance between chip origins (px).")
    min_coverage: float = Field(50, ge=0, le=100,
                                description="Minimum labelled share of a chip in %.")

    def to_core(self) -> ChipParams:
        """The core library's parameters."""
        return ChipParams((self.tile_size, self.tile_size), (self.step, self.step),
                          self.min_coverage)


class SplitSettings(BaseModel):
    """Dataset Maker settings."""

    train_percent: float = Field(80, ge=1, le=100, description="Share of chips for training.")
    validation_percent: float = Field(10, ge=0, le=99, description="Share for validation.")
    test_percent: float = Field(10, ge=0, le=99, description="Share for testing.")
    seed: int = Field(42, ge=0, description="Random seed of the split.")
    scaler: float | None = Field(None, gt=0, description="Divide pixel values by this "
                                 "(e.g. 10000 for reflectance x 10000).")
    normalize: bool = Field(True, description="Write per-band mean/std for normalisation.")
    strategy: Literal["balanced-groups", "balanced", "spatial-blocks"] = Field(
        "balanced-groups", description="balanced-groups: balance class shares over groups of "
        "touching chips and leave out training chips that touch a validation or test chip "
        "(no spatial leakage); balanced: SpecDeepMap's, over single chips (neighbours may "
        "leak); spatial-blocks: over blocks of chips.")

    @model_validator(mode="after")
    def _percentages(self) -> SplitSettings:
        total = self.train_percent + self.validation_percent + self.test_percent
        if total > 100:
            raise ValueError(f"train + validation + test percentages add up to {total} > 100")
        return self

    def to_core(self) -> SplitParams:
        """The core library's parameters."""
        return SplitParams(self.train_percent, self.validation_percent, self.test_percent,
                           self.seed, self.scaler, self.normalize, self.strategy)


class TrainSettings(BaseModel):
    """Deep Learning Trainer settings."""

    architecture: Literal["unet", "unetplusplus", "deeplabv3plus", "segformer"] = Field(
        "unet", description="Segmentation network (U-Net, U-Net++, DeepLabV3+, SegFormer).")
    backbone: str = Field("resnet18", description="Encoder: an smp encoder name (resnet18, "
                          "resnet50, efficientnet-b0 ...) or 'tu-' followed by a timm model name.")
    weights: str | None = Field(None, description="None, 'imagenet', or a weights file URI.")
    epochs: int = Field(10, ge=1, le=1000, description="Training epochs (passes over the "
                        "training chips, at least min_chips_per_epoch chips each).")
    batch_size: int = Field(8, ge=1, le=1024, description="Chips per training step.")
    lr: float = Field(1e-3, gt=0, le=1, description="Learning rate.")
    augment: bool = Field(True, description="Augmentation on or off (what it does: the next "
                          "three fields).")
    augmentation: Literal["d4", "d4-rotate", "none"] = Field(
        "d4", description="d4: random flips and quarter turns; d4-rotate: also a rotation up "
        "to 45 degrees.")
    spectral_jitter: bool = Field(True, description="Random spectral gain per chip.")
    spectral_channels: int = Field(
        -1, ge=-1, le=512, description="Learned per-pixel front-end and head width: -1 auto "
        "(32; off with pretrained weights), 0 off.")
    spectral_init: Literal["pca", "random"] = Field(
        "pca", description="pca: the front-end's first filters start on the training chips' "
        "principal axes (every pixel, labelled or not); random: the usual random start.")
    encoder_depth: Literal[-1, 3, 4, 5] = Field(
        -1, description="Encoder stages for U-Net/U-Net++; -1 auto: as many as keep the deepest "
        "features at least 4 px wide on a chip (32 px chips: 3, 64: 4, larger: 5).")
    loss: Literal["dice-ce", "lovasz-ce", "ce"] = Field(
        "dice-ce", description="Dice + cross-entropy, Lovász-softmax + cross-entropy, or "
        "cross-entropy alone (class weights apply to the cross-entropy).")
    cutmix: float = Field(0.5, ge=0, le=1, description="Share of training chips given a "
                          "random box of another chip, image and labels (0: off).")
    band_dropout: float = Field(0.0, ge=0, le=0.9, description="Share of the bands zeroed "
                                "at random in each training chip (dropout over bands; 0: off).")
    consistency: float = Field(0.0, ge=0, le=10, description="Weight of a FixMatch "
                               "consistency loss on unlabelled pixels (0: off).")
    pseudo_labels: float = Field(
        0.0, ge=0, le=1, description="Label the training chips' unlabelled pixels with the "
        "RandomForest's class where its vote share reaches this (0: off).")
    pixel_loss_weight: float = Field(0.0, ge=0, le=10, description="Also train the per-pixel "
                                     "head alone, with this loss weight (0: off).")
    norm: Literal["batch", "group"] = Field("batch", description="Batch or group "
                                            "normalisation in networks trained from scratch.")
    weight_decay: float = Field(0.0, ge=0, le=1, description="AdamW weight decay (0: Adam).")
    weight_averaging: Literal["ema", "none"] = Field(
        "none", description="ema: validate and keep an exponential moving average of the "
        "weights (did not help on the shared real data sets, see docs/recipe.md).")
    warmup_epochs: float = Field(1.0, ge=0, le=100, description="Learning-rate warm-up epochs.")
    min_chips_per_epoch: int = Field(
        128, ge=0, description="Draw a small training set repeatedly until an epoch holds this "
        "many chips (0: one pass per epoch).")
    sampling: Literal["uniform", "class-balanced"] = Field(
        "uniform", description="uniform: every chip as often; class-balanced: chips rich in "
        "rare classes are drawn more often.")
    ensemble: int = Field(
        1, ge=1, le=16, description="Networks trained from different random starts whose mean "
        "class probabilities the model gives (N times the training and the mapping time; for "
        "small training sets).")
    distill: bool = Field(
        False, description="With ensemble > 1: one more network learns the members' mean "
        "class probabilities on every pixel, and the model is that one network (the "
        "ensemble's training time plus about two networks', one network's mapping time).")
    baseline: bool = Field(True, description="Fit and score a per-pixel RandomForest baseline; "
                           "a model below it is never made champion automatically.")
    early_stopping: bool = Field(True, description="Stop when the validation IoU has not "
                                 "improved for `patience` epochs (the best model is kept).")
    patience: int = Field(20, ge=1, description="Epochs without improvement before stopping.")
    device: Literal["cpu", "gpu", "auto"] = Field("auto", description="auto: a GPU if the "
                                                  "worker has one, else the CPU.")
    devices: int = Field(1, ge=1, le=64, description="GPUs (DDP when > 1).")
    precision: Literal["32", "bf16-mixed", "16-mixed"] = Field(
        "32", description="Training arithmetic: 32-bit, or mixed precision on GPUs.")


class MapSettings(BaseModel):
    """Deep Learning Mapper settings."""

    overlap: float = Field(10, ge=0, lt=50, description="Minimum tile overlap in %.")
    window: int | None = Field(None, ge=32, le=8192,
                               description="Window edge in px (default: chosen per scene).")
    batch_size: int | None = Field(None, ge=1, le=256, description="Windows per forward "
                                   "pass (default: about four 256 x 256 tiles of pixels).")
    tta: bool = Field(False, description="Average each window over its 8 flips and quarter "
                      "turns: smoother maps at 8 times the mapping time.")
    precision: Literal["fp32", "bf16", "int8"] = Field(
        "fp32", description="bf16: autocast (GPUs, AMX CPUs); int8: quantized network on the "
        "CPU (several times faster on VNNI CPUs, a few pixels change class).")
    device: Literal["cpu", "gpu", "auto"] = Field(
        "auto", description="auto: a GPU if the worker has one, else the CPU.")

    def to_core(self) -> MapParams:
        """The core library's parameters."""
        return MapParams(overlap=self.overlap, window=self.window, batch_size=self.batch_size,
                         tta=self.tta,
                         precision=self.precision, device=self.device)


class TrainingPipelineParams(BaseModel):
    """chip → split → train → evaluate → register."""

    scenes: list[ScenePair] = Field(..., min_length=1, description="Training scenes.")
    work_uri: str = Field(..., min_length=1,
                          description="Folder or s3:// prefix for chips, CSVs and test outputs.")
    model_name: str = Field("specdeepmap-segmentation", min_length=1,
                            description="MLflow registered model name.")
    min_improvement: float = Field(
        0.01, ge=0, le=1, description="Pooled test mean IoU by which a new version must beat "
        "the champion, both scored on this run's test chips, to become champion.")
    review_timeout_hours: float = Field(
        24, gt=0, le=24 * 30, description="With approval: how long the run waits for a "
        "reviewer's answer; without one the version stays challenger.")
    chip: ChipSettings = Field(ChipSettings(), description="Raster Splitter: chip size, step "
                               "and minimum labelled share.")
    split: SplitSettings = Field(SplitSettings(), description="Dataset Maker: set shares, "
                                 "seed, scaler, balancing strategy.")
    train: TrainSettings = Field(TrainSettings(), description="Deep Learning Trainer: "
                                 "network, recipe, epochs, device.")


class MapFlowParams(BaseModel):
    """Map scenes given as a list or a prefix."""

    model_uri: str = Field(..., description="Model file URI or models:/NAME@ALIAS.")
    output_uri: str = Field(..., description="Output folder or s3:// prefix.")
    scenes: list[str] = Field(default_factory=list, description="Scene URIs: rasters, VRTs, "
                              "STAC items or catalogs.")
    input_prefix: str | None = Field(
        None, description="Or: map every scene (GeoTIFF, VRT, STAC item) under this prefix, "
        "or every item of a STAC catalog/collection JSON.")
    map: MapSettings = Field(MapSettings(), description="Deep Learning Mapper settings.")
    task_runner: Literal["threads", "dask"] = Field(
        "threads", description="Threads on this worker, or a Dask cluster.")
    dask_address: str | None = Field(None, description="Dask scheduler (default: local).")
    max_workers: int = Field(2, ge=1, le=256, description="Scenes mapped at once.")

    @model_validator(mode="after")
    def _inputs(self) -> MapFlowParams:
        if not self.scenes and not self.input_prefix:
            raise ValueError("give scenes or an input_prefix")
        return self


class ScheduledMappingParams(BaseModel):
    """Map every new scene under a prefix with the champion model."""

    input_prefix: str = Field(..., description="Folder or s3:// prefix of incoming scenes "
                              "(GeoTIFF, VRT, STAC item), or a STAC catalog/collection JSON.")
    output_prefix: str = Field(..., description="Folder or s3:// prefix of the maps.")
    model_name: str = Field("specdeepmap-segmentation", description="Registered model name.")
    alias: str = Field("champion", description="Model alias to map with.")
    redo_with_new_model: bool = Field(
        False, description="Map again the scenes mapped by another model version (done = "
        "scene + model version); off: a scene is mapped once.")
    map: MapSettings = Field(MapSettings(), description="Deep Learning Mapper settings.")
