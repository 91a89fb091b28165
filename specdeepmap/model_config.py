"""The model file's configuration: what a trained network needs to be rebuilt and used.

Every model file (``model.pt``, a Trainer checkpoint, an imported SpecDeepMap checkpoint)
carries this as plain data beside its weights. :class:`ModelConfig` is its schema: the
Trainer builds one, :func:`specdeepmap.inference.read_model_file` validates the stored one
(a file with a missing or wrong entry is refused naming the file and the entry, before any
chip is read), and the Tester, the Mapper, the model card, ONNX and STAC MLM read its fields.

The schema is versioned by the model file's ``format`` (``specdeepmap-model/1``). Entries
added since the first files have defaults that give those files' behaviour, so every model
file written before keeps loading; entries this version does not know are kept as they are
(a newer file's additions survive a round trip).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from specdeepmap.errors import UnreadableInputError
from specdeepmap.params import describe_validation_error

#: the schema version this code writes and reads (the model file's ``format`` suffix)
SCHEMA_VERSION = 1


class ModelConfig(BaseModel):
    """A trained network's configuration (the model file's ``config``)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    # the network
    architecture: str = Field(description="unet, unetplusplus, deeplabv3plus, segformer, ...")
    backbone: str = Field(description="the encoder: an smp name or tu-<timm model>")
    in_channels: int = Field(gt=0, description="bands the network reads")
    num_classes: int = Field(ge=2, description="output channels: unlabelled (0) + classes")
    spectral_channels: int = Field(0, ge=0, description="learned per-pixel front-end width")
    encoder_depth: int = Field(5, ge=1, description="encoder stages")
    norm: str = Field("batch", description="batch or group normalisation layers")
    ensemble: int = Field(1, ge=1, description="networks averaged (an ensemble's members)")
    # its inputs and outputs
    class_values: list[int] = Field(description="label value of output channel 1, 2, ...")
    ignore_index: int = Field(0, description="the label value that means unlabelled")
    tile_size: list[int] = Field(
        min_length=2, max_length=2, description="[height, width] of the training chips"
    )
    normalization: dict[str, Any] = Field(
        default_factory=dict, description="raw pixels to inputs (Normalization.to_dict)"
    )
    band_names: list[str] = Field(default_factory=list, description="the bands, in order")
    dtype: str | None = Field(None, description="the training chips' data type")
    classes: dict[str, Any] | None = Field(None, description="names and colours by value")
    # how it was made
    weights: str = Field("none", description="the pretrained weights it started from")
    freeze_backbone: bool = False
    dataset: str | None = Field(None, description="the dataset folder it was trained on")
    version: str | None = Field(None, description="the software that trained it")
    run_id: str | None = Field(None, description="its MLflow run")
    reference: dict[str, Any] | None = Field(
        None, description="its validation chips' outputs, for drift checks"
    )
    imported_from: dict[str, Any] | None = Field(
        None, description="where an imported checkpoint came from and what was recovered"
    )

    @field_validator("spectral_channels", "encoder_depth", "ensemble", "norm", mode="before")
    @classmethod
    def _unset_is_default(cls, value: Any, info) -> Any:
        """Older files store None where the entry did not apply: the default's behaviour."""
        if value is None:
            return cls.model_fields[info.field_name].default
        return value

    @field_validator("normalization", mode="before")
    @classmethod
    def _no_normalization(cls, value: Any) -> Any:
        return {} if value is None else value

    @field_validator("band_names", mode="before")
    @classmethod
    def _no_band_names(cls, value: Any) -> Any:
        return [] if value is None else value

    @model_validator(mode="after")
    def _classes_match_outputs(self) -> ModelConfig:
        if self.num_classes != len(self.class_values) + 1:
            raise ValueError(
                f"num_classes is {self.num_classes} for {len(self.class_values)} class values "
                "(it must be one more: channel 0 is unlabelled)"
            )
        return self

    @classmethod
    def read(cls, stored: dict, uri: str) -> ModelConfig:
        """The configuration stored in model file ``uri``; a wrong one is refused with the
        file and the entries named.

        Raises:
            UnreadableInputError: an entry is missing or has the wrong type or value.
        """
        try:
            return cls.model_validate(stored)
        except ValidationError as error:
            raise UnreadableInputError(
                describe_validation_error(f"Model file {uri}: its configuration", error)
            ) from None

    def stored(self) -> dict:
        """Plain data for the model file (``torch.load(weights_only=True)`` reads it back)."""
        return self.model_dump()
