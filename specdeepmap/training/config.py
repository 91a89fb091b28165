"""A training run's parameters and what it produced: :class:`TrainConfig` (the user's
:class:`~specdeepmap.params.TrainParams` plus where the run reads and writes) and
:class:`TrainResult`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import Field, model_validator

from specdeepmap.baseline import describe_forest
from specdeepmap.model_card import CardScores
from specdeepmap.params import TrainParams

#: with ``distill``: the ensemble the model file's network learned from, beside it
TEACHER_FILE = "ensemble.pt"
#: ensemble member i trains with seed + i × this: runs with neighbouring seeds share no member
MEMBER_SEED_STEP = 1000


class TrainConfig(TrainParams):
    """A training run: the user's :class:`TrainParams` and where the run reads and writes."""

    dataset: str = Field(..., min_length=1, description="Dataset folder URI (what `split` wrote).")
    out: str = Field(
        ..., min_length=1, description="Local folder for checkpoints and TensorBoard logs."
    )
    workers: int = Field(0, ge=0, le=256, description="Data-loader workers.")
    resume: str | None = Field(None, description="A checkpoint to continue from (local or s3://).")
    checkpoint_uri: str | None = Field(
        None,
        description="Where checkpoints are mirrored as training goes (s3:// or a "
        "folder); a training started again with the same URI continues from its last "
        "checkpoint and its MLflow run.",
    )
    keep_top_k: int = Field(1, ge=-1, description="Best checkpoints kept (-1: all).")
    limit_batches: int | None = Field(
        None, ge=1, description="Cap batches per epoch (smoke tests)."
    )
    tracking_uri: str | None = Field(
        None, description="Default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db."
    )
    experiment: str = Field("specdeepmap", min_length=1, description="MLflow experiment.")
    registered_model: str | None = Field(
        "specdeepmap-segmentation",
        description="MLflow registered model name (None: do not register).",
    )
    run_name: str | None = None
    #: MLflow run tags, e.g. ``mlflow.source.name`` (the command or flow that trained) and a
    #: link to the Prefect flow run; default source: ``specdeepmap train``
    run_tags: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _single_network_plumbing(self) -> TrainConfig:
        if self.ensemble > 1 and (self.resume or self.checkpoint_uri):
            raise ValueError(
                "an ensemble (ensemble > 1) trains its members one after the "
                "other: resume and checkpoint_uri are for single networks"
            )
        return self

    @classmethod
    def from_params(cls, params: TrainParams, **run: Any) -> TrainConfig:
        """A run of ``params`` with the given plumbing (``dataset``, ``out``, ...)."""
        return cls(**params.model_dump(), **run)

    @property
    def recipe(self) -> TrainParams:
        """The user's parameters alone, without the run's plumbing."""
        return TrainParams(**self.model_dump(include=set(TrainParams.model_fields)))


#: TrainConfig fields that say how a model was trained (shown on its model card)
RECIPE_FIELDS = (
    "epochs",
    "batch_size",
    "accumulate_grad_batches",
    "lr",
    "augment",
    "augmentation",
    "spectral_jitter",
    "spectral_init",
    "loss",
    "norm",
    "weight_decay",
    "pixel_loss_weight",
    "cutmix",
    "band_dropout",
    "consistency",
    "pseudo_labels",
    "weight_averaging",
    "warmup_epochs",
    "min_chips_per_epoch",
    "min_steps_per_epoch",
    "ensemble",
    "distill",
    "sampling",
    "balanced",
    "normalize",
    "early_stopping",
    "patience",
    "precision",
    "devices",
    "seed",
    "resume",
)


@dataclass
class TrainResult:
    """What a training run produced."""

    best_checkpoint: str  #: the best checkpoint (of the first member, for an ensemble)
    best_val_iou: float  #: the model file's validation IoU (an ensemble's: of the mean)
    model_file: str
    log_dir: str
    run_id: str | None = None
    model_uri: str | None = None  #: models:/NAME/VERSION when registered
    model_version: str | None = None
    epochs_run: int = 0  #: summed over an ensemble's members
    seconds: float = 0.0
    baseline: dict | None = None  #: the RandomForest's figures (BaselineResult.summary())
    #: the recipe's switches as the run used them (:data:`RECIPE_FIELDS`)
    recipe: dict = field(default_factory=dict)
    learning_rate: float | None = None  #: the rate used (``lr``, or the batch-scaled default)
    device: str = ""
    #: a single network's validated epochs, and their median validation IoU: the best of them
    #: chose the checkpoint, so ``best_val_iou`` overstates the model by about the difference
    val_epochs: int = 0
    val_epoch_median: float | None = None
    #: an ensemble's members' best validation IoU each, and, distilled, the ensemble's own
    member_val_ious: list[float] = field(default_factory=list)
    distilled_from_val_iou: float | None = None

    def card_scores(self) -> CardScores:
        """The model card's figures known after training: validation IoU (with how the
        checkpoint was chosen), the forest's on the same chips and which forest it is; the
        test figures and the alias come after (``dataclasses.replace``).
        """
        return CardScores(
            val=self.best_val_iou,
            baseline_val=self.baseline_mean_iou("validation"),
            baseline_forest=describe_forest(self.baseline) if self.baseline else None,
            run_id=self.run_id,
            val_epochs=self.val_epochs if self.val_epoch_median is not None else 0,
            val_median=self.val_epoch_median,
        )

    def baseline_mean_iou(self, split: str) -> float | None:
        """The RandomForest's pooled mean IoU on 'validation' or 'test' (None if not run)."""
        return ((self.baseline or {}).get(split) or {}).get("mean_iou")

    def card_table(self) -> dict:
        """The model card's training table: the recipe and the run's facts, labelled for a
        reader (display only: code reads the fields above).
        """
        table = {**self.recipe}
        if self.recipe.get("lr") is None and self.learning_rate is not None:
            accumulated = (self.recipe.get("accumulate_grad_batches") or 1) > 1
            per_step = "chips per step" if accumulated else "batch size"
            table["lr"] = f"{self.learning_rate:.3g} (0.001 x sqrt({per_step} / 2))"
        table |= {
            "epochs run": self.epochs_run,
            "wall time (s)": round(self.seconds, 1),
            "device": self.device,
            "best validation IoU": round(self.best_val_iou, 4),
        }
        if self.val_epoch_median is not None:
            label = f"median validation IoU of the {self.val_epochs} validated epochs"
            table[label] = round(self.val_epoch_median, 4)
        if self.member_val_ious:  # how far the members alone spread, beside the ensemble's
            table["members' best validation IoU"] = ", ".join(
                f"{v:.4f}" for v in self.member_val_ious
            )
        if self.distilled_from_val_iou is not None:
            table["validation IoU of the ensemble distilled"] = round(
                self.distilled_from_val_iou, 4
            )
        return table
