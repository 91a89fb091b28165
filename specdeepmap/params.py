"""The parameters of every step, defined once: the core, the CLI and the flows use these models.

Each step (chip, split, train, evaluate, map, baseline) has one pydantic model whose fields
carry the default, the bounds and the description. The Prefect flows take them as parameters
(the UI renders them as forms), the CLI generates its options from their fields
(:mod:`specdeepmap.cli_options`), and the core functions take them as arguments. Cross-field
rules are model validators, so a flow run with impossible settings is refused when it starts,
before any chip is cut.

Defaults are SpecDeepMap's where users carry files between the two (tile and step sizes,
percentages, seed, class weights) and the recipe's where it was measured (``docs/recipe.md``:
batch size 8, 30 epochs). Built in Python, a model with a bad value raises
:class:`~specdeepmap.errors.InvalidParameterError` naming the field; validated from a form or
JSON (``model_validate``), pydantic's own ``ValidationError``, which Prefect shows per field.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from specdeepmap.errors import InvalidParameterError
from specdeepmap.masks import QualityMask

Architecture = Literal["unet", "unetplusplus", "deeplabv3plus", "segformer", "justo-unet"]
#: SpecDeepMap's names (and spellings users type) for our architecture names
ARCHITECTURE_ALIASES = {
    "u-net": "unet",
    "unet": "unet",
    "u-net++": "unetplusplus",
    "unet++": "unetplusplus",
    "unetplusplus": "unetplusplus",
    "deeplabv3+": "deeplabv3plus",
    "deeplabv3plus": "deeplabv3plus",
    "segformer": "segformer",
    # SpecDeepMap's fifth architecture, 2D-Justo-UNet-Simple
    "justounetsimple": "justo-unet",
    "2d-justo-unet-simple": "justo-unet",
    "justo-unet": "justo-unet",
    "justo": "justo-unet",
}
Device = Literal["cpu", "gpu", "auto"]


def describe_validation_error(name: str, error: ValidationError) -> str:
    """One line per wrong field: ``ChipParams: tile_x: Input should be ≥ 1 (got 0)``."""
    parts = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "settings"
        message = item["msg"].removeprefix("Value error, ")
        got = (
            f" (got {item['input']!r})"
            if item["type"] not in ("value_error", "extra_forbidden", "missing")
            else ""
        )
        parts.append(f"{where}: {message}{got}")
    return f"{name}: " + "; ".join(parts)


class StepParams(BaseModel):
    """Base of the step models: unknown fields are refused; a model is immutable once valid.

    Built in Python (``ChipParams(tile_x=0)``) a bad value raises
    :class:`InvalidParameterError` with one line per wrong field. Immutable, a model can be a
    default argument and a cache key; ``model_copy(update=...)`` makes a changed copy.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as error:
            raise InvalidParameterError(
                describe_validation_error(type(self).__name__, error)
            ) from None


class ChipParams(StepParams):
    """Raster Splitter: chip size, step and the minimum labelled share (SpecDeepMap's names)."""

    tile_x: int = Field(256, ge=1, le=8192, description="Chip width in pixels.")
    tile_y: int = Field(256, ge=1, le=8192, description="Chip height in pixels.")
    step_x: int = Field(
        256,
        ge=1,
        le=8192,
        description="Distance between chip origins "
        "along X in pixels (smaller than the tile: overlapping chips).",
    )
    step_y: int = Field(
        256, ge=1, le=8192, description="Distance between chip origins along Y in pixels."
    )
    min_coverage: float = Field(
        50, ge=0, le=100, description="Minimum labelled share per chip in % (0 keeps every chip)."
    )

    @property
    def tile_size(self) -> tuple[int, int]:
        """(width, height) of a chip in pixels."""
        return (self.tile_x, self.tile_y)

    @property
    def stride(self) -> tuple[int, int]:
        """(x, y) distance between chip origins in pixels."""
        return (self.step_x, self.step_y)


class SplitParams(StepParams):
    """Dataset Maker: set shares, seed, scaler, balancing strategy (SpecDeepMap's defaults)."""

    train_percent: float = Field(
        80,
        ge=0,
        le=100,
        description="Share of chips for training.",
        json_schema_extra={"cli": ["--train"]},
    )
    validation_percent: float = Field(
        10,
        ge=0,
        le=100,
        description="Share for validation.",
        json_schema_extra={"cli": ["--validation"]},
    )
    test_percent: float = Field(
        10, ge=0, le=100, description="Share for testing.", json_schema_extra={"cli": ["--test"]}
    )
    seed: int = Field(42, ge=0, description="Random seed of the split.")
    scaler: float | None = Field(
        None,
        gt=0,
        description="Divide pixel values by this before "
        "statistics and training (e.g. 10000 for reflectance x 10000).",
    )
    normalize: bool = Field(True, description="Write per-band mean/std (Normalize_Bands.csv).")
    strategy: Literal["balanced-groups", "balanced", "spatial-blocks"] = Field(
        "balanced-groups",
        description="balanced-groups: balance class shares over groups of "
        "touching chips and leave out training chips that touch a validation or test chip "
        "(no spatial leakage); balanced: SpecDeepMap's, over single chips (neighbours may "
        "leak); spatial-blocks: over blocks of block_size x block_size chips.",
    )
    class_weighting: Literal["one-minus-share", "inverse-frequency"] = Field(
        "one-minus-share",
        description="Class weights of the loss: one-minus-share "
        "(SpecDeepMap's) or inverse-frequency.",
    )
    block_size: int = Field(4, ge=1, le=1024, description="spatial-blocks: chips per block edge.")
    min_class_share: float = Field(
        0.01,
        ge=0,
        le=1,
        description="Each set holds at least "
        "this share of every class's pixels (SpecDeepMap: 0.01).",
    )
    max_search_seconds: float = Field(
        2.0, gt=0, le=3600, description="Time the balancing search may take."
    )

    @model_validator(mode="after")
    def _percentages(self) -> SplitParams:
        total = self.train_percent + self.validation_percent + self.test_percent
        if total > 100 + 1e-9:
            raise ValueError(f"train + validation + test percentages add up to {total:g} > 100")
        if self.train_percent <= 0:
            raise ValueError("the training percentage must be > 0")
        return self

    @property
    def fractions(self) -> tuple[float, float, float]:
        """(train, validation, test) shares of the chips, 0-1."""
        return (self.train_percent / 100, self.validation_percent / 100, self.test_percent / 100)


#: SpecDeepMap's learning rate at SpecDeepMap's batch size: the anchor of the square-root rule
BASE_LR = 1e-3
BASE_BATCH_SIZE = 2
#: chips one optimiser step sees at least by default: a smaller batch accumulates batches up
#: to it (batch 2 trained below batch 8 on both real sets, level with it accumulated four
#: times: docs/recipe.md, experiment 16)
MIN_CHIPS_PER_STEP = 8
#: batches under this many chips train by batch renormalisation by default, larger ones by
#: batch norm: renormalisation scored higher at batch 2 and 8 on both real sets, lower at
#: 16 on Sentinel-2, where 16 chips give batch norm steady statistics and the running
#: averages it corrects towards lag behind half as many steps (docs/recipe.md, experiments
#: 18 and 19)
RENORM_BELOW_BATCH = 16


class TrainParams(StepParams):
    """Deep Learning Trainer: the network and the recipe a user chooses (no run plumbing)."""

    architecture: Architecture = Field(
        "unet",
        description="Segmentation network: unet, unetplusplus, deeplabv3plus, segformer, "
        "justo-unet (SpecDeepMap's 'U-Net', 'U-Net++', 'DeepLabV3+', 'SegFormer', "
        "'JustoUNetSimple' too; justo-unet: a small U-Net for hyperspectral chips, no backbone).",
    )
    backbone: str = Field(
        "resnet18",
        min_length=1,
        description="Encoder: an smp encoder "
        "name (resnet18, resnet50, efficientnet-b0 ...) or 'tu-' followed "
        "by a timm model name.",
    )
    weights: str | None = Field(
        None, description="None, 'imagenet', or a weights file/URI (state dict, SSL4EO-S12 MoCo)."
    )
    adapt_first_conv: bool = Field(
        False, description="Repeat pretrained first-conv kernels over another band count."
    )
    freeze_backbone: bool | None = Field(
        None, description="Freeze the encoder (default: frozen with pretrained weights)."
    )
    epochs: int = Field(
        30,
        ge=1,
        le=10_000,
        description="Training epochs (passes over the training chips; a small set is "
        "drawn again up to min_chips_per_epoch chips and min_steps_per_epoch steps).",
    )
    batch_size: int = Field(
        8,
        ge=1,
        le=1024,
        description="Chips per forward pass (SpecDeepMap's default is 2: over three seeds "
        "batch 8 trained better on both real sets, and faster; docs/recipe.md).",
    )
    accumulate_grad_batches: int | None = Field(
        None,
        ge=1,
        le=64,
        description="Batches whose gradients one optimiser step sums (Lightning's "
        "accumulate_grad_batches): a step sees batch_size x this many chips, in the memory "
        "of one batch. Unset: enough batches for 8 chips a step (4 at batch 2, 1 from batch "
        "8 up; batch 2 alone trained worse: docs/recipe.md, experiment 16).",
    )
    lr: float | None = Field(
        None,
        ge=1e-7,
        le=1,
        description="Learning rate of Adam. Unset: 0.001 at 2 chips per step, scaled by the "
        "square root of chips per step / 2: 0.002 at 8, so at the default batch 8 and at a "
        "batch 2 accumulated to 8 (Adam's square-root rule: about the same training at any "
        "batch size; docs/recipe.md). A rate given is used as it is.",
    )
    lr_finder: bool = Field(False, description="Find a learning rate before training and use it.")
    augment: bool = Field(
        True,
        description="Augmentation on or off (SpecDeepMap's data_aug; "
        "what it does: augmentation and spectral_jitter).",
    )
    augmentation: Literal["d4", "d4-rotate", "none"] = Field(
        "d4",
        description="d4: random flips and quarter turns; d4-rotate: also a rotation up "
        "to 45 degrees.",
    )
    spectral_jitter: bool = Field(
        True, description="Random spectral gain per chip (brightness and per band)."
    )
    spectral_channels: int = Field(
        -1,
        ge=-1,
        le=512,
        description="Learned per-pixel front-end and head width: -1 auto "
        "(32; off with pretrained weights), 0 off.",
    )
    spectral_init: Literal["pca", "random"] = Field(
        "pca",
        description="pca: the front-end's first filters start on the training chips' "
        "principal axes (every pixel, labelled or not); random: the usual random start.",
    )
    encoder_depth: Literal[-1, 3, 4, 5] = Field(
        -1,
        description="Encoder stages for U-Net/U-Net++; -1 auto: as many as keep the "
        "deepest features at least 4 px wide on a chip (32 px chips: 3, 64: 4, larger: 5).",
    )
    loss: Literal["dice-ce", "lovasz-ce", "ce"] = Field(
        "dice-ce",
        description="Dice + cross-entropy, Lovász-softmax + cross-entropy, or "
        "cross-entropy alone (class weights apply to the cross-entropy).",
    )
    norm: Literal["batch", "group", "renorm"] | None = Field(
        None,
        description="Normalisation in training: batch norm, group norm (networks trained "
        "from scratch), or batch renormalisation (Ioffe 2017: batch norm corrected towards "
        "its running statistics; batch norm in the model file). Unset: renorm for a batch "
        "under 16 chips (higher than batch norm at batch 2 and 8 on both real sets), batch "
        "norm from 16 up (higher at 16 on Sentinel-2): docs/recipe.md, experiments 18-19.",
    )
    weight_decay: float = Field(0.0, ge=0, le=1, description="AdamW weight decay (0: Adam).")
    pixel_loss_weight: float = Field(
        0.0,
        ge=0,
        le=10,
        description="Also train the per-pixel head alone, with this loss weight (0: off).",
    )
    cutmix: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Share of training chips given a "
        "random box of another chip, image and labels (0: off).",
    )
    band_dropout: float = Field(
        0.0,
        ge=0,
        le=0.9,
        description="Share of the bands zeroed "
        "at random in each training chip (dropout over bands; 0: off).",
    )
    consistency: float = Field(
        0.0,
        ge=0,
        le=10,
        description="Weight of a FixMatch consistency loss on unlabelled pixels (0: off).",
    )
    pseudo_labels: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Label the training chips' unlabelled pixels with the "
        "RandomForest's class where its vote share reaches this (0: off).",
    )
    weight_averaging: Literal["ema", "none"] = Field(
        "none",
        description="ema: validate and keep an exponential moving average of the "
        "weights (did not help on the shared real data sets, see docs/recipe.md).",
    )
    warmup_epochs: float = Field(
        1.0,
        ge=0,
        le=100,
        description="Linear learning-rate warm-up epochs before the cosine decay.",
    )
    min_chips_per_epoch: int = Field(
        256,
        ge=0,
        le=1_000_000,
        description="Draw a small training set repeatedly until an epoch holds this many "
        "chips (0: one pass per epoch; 128 until experiment 15 of docs/recipe.md).",
    )
    min_steps_per_epoch: int = Field(
        16,
        ge=0,
        le=100_000,
        description="Draw a small training set repeatedly until an epoch also holds this "
        "many optimiser steps (up to batch 16 the chips' floor already gives them; at a larger "
        "batch a small set would get too few steps: docs/recipe.md, experiment 13; 0: off).",
    )
    sampling: Literal["uniform", "class-balanced"] = Field(
        "uniform",
        description="uniform: every chip as often; class-balanced: chips rich in "
        "rare classes are drawn more often.",
    )
    ensemble: int = Field(
        1,
        ge=1,
        le=16,
        description="Networks trained from different random starts whose mean "
        "class probabilities the model gives (N times the training and the mapping time; for "
        "small training sets).",
    )
    distill: bool = Field(
        False,
        description="With ensemble > 1: one more network learns the members' mean "
        "class probabilities on every pixel, and the model is that one network (one "
        "network's mapping time).",
    )
    balanced: bool = Field(True, description="Class weights (Summary_train_val.csv) in the loss.")
    normalize: bool = Field(
        True, description="Z-score the bands with Normalize_Bands.csv (after the scaler)."
    )
    baseline: bool = Field(
        True,
        description="Fit and score a per-pixel RandomForest "
        "baseline; a model below it is never made champion automatically.",
    )
    baseline_pixels: int = Field(
        100_000,
        ge=1,
        le=100_000_000,
        description="Labelled training pixels for the baseline at most.",
    )
    early_stopping: bool = Field(
        True,
        description="Stop when the validation IoU has not "
        "improved for `patience` epochs (the best model is kept).",
    )
    patience: int = Field(
        20, ge=1, le=10_000, description="Epochs without improvement before stopping."
    )
    seed: int = Field(
        42, ge=0, description="Random seed of the training (ensemble member i: seed + 1000 i)."
    )
    device: Device = Field("auto", description="auto: a GPU if there is one, else the CPU.")
    devices: int = Field(1, ge=1, le=64, description="GPUs (DDP when > 1).")
    precision: Literal["32", "bf16-mixed", "16-mixed"] = Field(
        "32", description="Training arithmetic: 32-bit, or mixed precision on GPUs."
    )

    @field_validator("precision", mode="before")
    @classmethod
    def _precision_as_text(cls, value: Any) -> Any:
        """``precision: 32`` in YAML, JSON or a Prefect form is a number, as in Lightning."""
        return "32" if value == 32 and not isinstance(value, bool) else value

    @field_validator("architecture", mode="before")
    @classmethod
    def _architecture_alias(cls, value: Any) -> Any:
        if isinstance(value, str):
            return ARCHITECTURE_ALIASES.get(value.strip().lower().replace(" ", ""), value)
        return value

    @model_validator(mode="after")
    def _recipe(self) -> TrainParams:
        if self.architecture == "justo-unet" and self.weights not in (None, "none"):
            raise ValueError("justo-unet has no encoder to take pretrained weights: drop weights")
        if self.distill and self.ensemble < 2:
            raise ValueError(
                "distill learns from an ensemble's mean: set ensemble >= 2 (e.g. 3) with it"
            )
        if self.ensemble > 1 and self.devices > 1:
            raise ValueError(
                "an ensemble (ensemble > 1) trains its members one after the "
                "other on one device: set devices to 1"
            )
        return self

    @property
    def learning_rate(self) -> float:
        """The rate training uses: ``lr``, or by default :data:`BASE_LR` at
        :data:`BASE_BATCH_SIZE` chips per step scaled by the square root of the ratio of
        :attr:`chips_per_step` to it (Malladi et al. 2022: Adam's updates keep their noise at
        a larger batch when the rate grows with its square root, where SGD's linear rule
        would overshoot).
        A run's length is counted in chips seen (epochs x chips per epoch), so a larger batch
        takes fewer, larger steps over the same chips.
        """
        if self.lr is not None:
            return self.lr
        return BASE_LR * math.sqrt(self.chips_per_step / BASE_BATCH_SIZE)

    @property
    def accumulation(self) -> int:
        """Batches one optimiser step sums: ``accumulate_grad_batches``, or by default enough
        for :data:`MIN_CHIPS_PER_STEP` chips (a batch that fits no more than two chips in
        memory still takes steps of eight).
        """
        if self.accumulate_grad_batches is not None:
            return self.accumulate_grad_batches
        return -(-MIN_CHIPS_PER_STEP // self.batch_size)

    @property
    def norm_layers(self) -> str:
        """The normalisation training uses: ``norm``, or by default batch renormalisation
        for a batch under :data:`RENORM_BELOW_BATCH` chips (batch norm's statistics over a
        few chips are noise that inference never sees) and batch norm from there.
        """
        if self.norm is not None:
            return self.norm
        return "renorm" if self.batch_size < RENORM_BELOW_BATCH else "batch"

    @property
    def chips_per_step(self) -> int:
        """Chips whose gradients one optimiser step uses (on one device)."""
        return self.batch_size * self.accumulation


class EvaluateParams(StepParams):
    """Deep Learning Tester: how the test chips are predicted."""

    device: Device = Field("auto", description="auto: a GPU if there is one, else the CPU.")
    batch_size: int = Field(8, ge=1, le=1024, description="Chips per forward pass.")
    mask_unlabelled: bool = Field(
        True,
        description="Set exported predictions to 0 where the "
        "label is 0 (SpecDeepMap's no_data_label_mask).",
    )
    tta: bool = Field(
        False,
        description="Average predictions over the 8 flips and quarter "
        "turns of each chip (8 times the time).",
    )


class MapParams(StepParams):
    """Deep Learning Mapper: windows, blending, arithmetic and device."""

    overlap: float = Field(
        10,
        ge=0,
        lt=50,
        description="Minimum overlap of neighbouring "
        "windows in % of the model's tile size (SpecDeepMap's 10).",
    )
    window: int | None = Field(
        None,
        ge=32,
        description="Window edge in px (default: 1, 2 "
        "or 4 x the training tile, fewest pixels processed; a window "
        "larger than the scene is cut to it).",
    )
    batch_size: int | None = Field(
        None,
        ge=1,
        description="Windows per forward pass "
        "(default: about four 256 x 256 tiles of pixels; refused "
        "before mapping when it would not fit in memory).",
    )
    blend: Literal["cosine", "linear", "gaussian", "none", "crop"] = Field(
        "cosine",
        description="How overlapping windows are combined: cosine, linear or "
        "gaussian weights, none (plain mean), or crop (SpecDeepMap's: each pixel from the "
        "window whose kept centre covers it).",
    )
    precision: Literal["fp32", "bf16", "int8"] = Field(
        "fp32",
        description="bf16: autocast (GPUs, AMX CPUs); int8: quantized network on the "
        "CPU (several times faster on VNNI CPUs, a few pixels change class).",
    )
    engine: Literal["auto", "torch", "onnxruntime", "openvino"] = Field(
        "auto",
        description="What runs the network: torch, ONNX Runtime or OpenVINO (CPU) on the "
        "model's ONNX file (a registered version's own, else exported once and cached; "
        "int8: calibrated once on the model's training chips). auto: OpenVINO for int8 on "
        "the CPU (the fastest measured, calibrated once per model), torch where the model "
        "has no int8 network or training chips, and for fp32 and bf16. An .onnx MODEL runs "
        "on OpenVINO with openvino, else on ONNX Runtime.",
    )
    channels_last: bool = Field(
        True, description="Run the network channels-last (faster convolutions on CPUs and GPUs)."
    )
    device: Device = Field("auto", description="auto: a GPU if there is one, else the CPU.")
    tta: bool = Field(
        False,
        description="Average each window over its 8 flips and quarter "
        "turns: smoother maps at 8 times the mapping time.",
    )
    mask_preset: Literal["s2-scl", "enmap-ql", "binary"] | None = Field(
        None,
        description="Which values of a quality mask flag a pixel: s2-scl (Sentinel-2 L2A "
        "SCL: cloud shadow 3, cloud 8 and 9, cirrus 10, snow 11), enmap-ql (EnMAP "
        "QL_QUALITY_* layers: 1), binary (1); or give mask_values.",
    )
    mask_values: list[int] = Field(
        default_factory=list,
        description="Mask values that flag a pixel (instead of a preset's).",
    )
    cloud_mask: Literal["s2cloudless"] | None = Field(
        None,
        description="Offline cloud detector for scenes without a mask of their own "
        "(Sentinel-2 L1C: s2cloudless, needs pip install 'specdeepmap[cloud]'); a scene's "
        "own mask wins.",
    )
    cloud_threshold: float = Field(
        0.4,
        gt=0,
        lt=1,
        description="Cloud probability above which the detector flags a pixel "
        "(s2cloudless's 0.4; lower masks more).",
    )
    max_masked_share: float = Field(
        0.95,
        ge=0,
        le=1,
        description="A scene whose mask flags more than this share is not mapped (reported "
        "as skipped).",
    )

    def quality_mask(self, uris: list[str] | tuple[str, ...]) -> QualityMask | None:
        """The quality mask of a scene from its mask rasters and these settings."""
        return QualityMask.build(uris, self.mask_preset, self.mask_values)


class BaselineParams(StepParams):
    """Per-pixel RandomForest baseline: EnMAP-Box's defaults (100 trees), a pixel cap, a seed."""

    trees: int = Field(100, ge=1, le=10_000, description="Trees of the forest.")
    max_pixels: int = Field(
        100_000,
        ge=1,
        le=100_000_000,
        description="Labelled training pixels sampled at most (spread over the chips).",
    )
    seed: int = Field(0, ge=0, description="Random seed of the pixel sample and the forest.")
    n_jobs: int = Field(
        -1, ge=-1, le=1024, description="Threads fitting the forest (-1: all cores)."
    )

    @field_validator("n_jobs")
    @classmethod
    def _jobs(cls, value: int) -> int:
        if value == 0:
            raise ValueError("n_jobs must be -1 (all cores) or >= 1")
        return value
