"""Flow parameters as pydantic models: the Prefect UI renders them as forms with defaults,
descriptions and bounds, and rejects bad values before a run starts. Each step's settings are
the core's own models (:mod:`specdeepmap.params`, the same the CLI's options come from);
this module adds only what a flow needs beside them (scenes, folders, model names). Cross-field
rules (pydantic model validators) are checked again when a flow starts, since the UI only
applies per-field bounds.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator

from specdeepmap.params import ChipParams, MapParams, SplitParams, TrainParams


class ScenePair(BaseModel):
    """An image (one raster, a VRT, or one file per band) and its label raster, same grid."""

    image_uri: str | None = Field(
        None,
        min_length=1,
        description="Image raster URI (path or s3://; a GDAL VRT too). Or give band_uris.",
    )
    band_uris: list[str] = Field(
        default_factory=list,
        description="Or: one file per band, "
        "in band order (e.g. Sentinel-2 JP2 at 10/20/60 m), stacked "
        "as a VRT at the finest resolution.",
    )
    resampling: Literal["bilinear", "nearest", "cubic", "average"] = Field(
        "bilinear", description="With band_uris: how coarser bands reach the finest grid."
    )
    label_uri: str = Field(
        ..., min_length=1, description="Label raster URI: class values 0-255, 0 = unlabelled."
    )
    classes_uri: str | None = Field(
        None,
        description="Class names and colours: CSV (value,name,color) or QGIS .qml "
        "(default: those stored with the label raster).",
    )

    @model_validator(mode="after")
    def _one_image(self) -> ScenePair:
        if bool(self.image_uri) == bool(self.band_uris):
            raise ValueError("give either image_uri or band_uris")
        return self


class TrainingPipelineParams(BaseModel):
    """chip → split → train → evaluate → register."""

    scenes: list[ScenePair] = Field(..., min_length=1, description="Training scenes.")
    work_uri: str = Field(
        ..., min_length=1, description="Folder or s3:// prefix for chips, CSVs and test outputs."
    )
    model_name: str = Field(
        "specdeepmap-segmentation", min_length=1, description="MLflow registered model name."
    )
    min_improvement: float = Field(
        0.01,
        ge=0,
        le=1,
        description="Pooled test mean IoU by which a new version must beat "
        "the champion, both scored on this run's test chips, to become champion.",
    )
    review_timeout_hours: float = Field(
        24,
        gt=0,
        le=24 * 30,
        description="With approval: how long the run waits for a "
        "reviewer's answer; without one the version stays challenger.",
    )
    chip: ChipParams = Field(
        ChipParams(), description="Raster Splitter: chip size, step and minimum labelled share."
    )
    split: SplitParams = Field(
        SplitParams(), description="Dataset Maker: set shares, seed, scaler, balancing strategy."
    )
    train: TrainParams = Field(
        TrainParams(), description="Deep Learning Trainer: network, recipe, epochs, device."
    )


class MapFlowParams(BaseModel):
    """Map scenes given as a list or a prefix."""

    model_uri: str = Field(..., description="Model file URI or models:/NAME@ALIAS.")
    output_uri: str = Field(..., description="Output folder or s3:// prefix.")
    scenes: list[str] = Field(
        default_factory=list, description="Scene URIs: rasters, VRTs, STAC items or catalogs."
    )
    input_prefix: str | None = Field(
        None,
        description="Or: map every scene (GeoTIFF, VRT, STAC item) under this prefix, "
        "or every item of a STAC catalog/collection JSON.",
    )
    map: MapParams = Field(MapParams(), description="Deep Learning Mapper settings.")
    masks: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Quality mask rasters per scene URI (their flagged values: map.mask_preset "
        "or map.mask_values); a STAC item's own mask asset is used without naming it.",
    )
    quarantine: bool = Field(
        True,
        description="Keep a suspect map (its scene does not look like the model's training "
        "data) under quarantine/, out of the published catalog, and emit the event "
        "specdeepmap.map.suspect.",
    )
    force: bool = Field(
        False,
        description="Map a scene again even if this model version mapped it already (off: "
        "an arrival announced twice maps once).",
    )
    task_runner: Literal["threads", "dask"] = Field(
        "threads", description="Threads on this worker, or a Dask cluster."
    )
    dask_address: str | None = Field(None, description="Dask scheduler (default: local).")
    max_workers: int = Field(2, ge=1, le=256, description="Scenes mapped at once.")

    @model_validator(mode="after")
    def _inputs(self) -> MapFlowParams:
        if not self.scenes and not self.input_prefix:
            raise ValueError("give scenes or an input_prefix")
        return self


class ScheduledMappingParams(BaseModel):
    """Map every new scene under a prefix with the champion model."""

    input_prefix: str = Field(
        ...,
        description="Folder or s3:// prefix of incoming scenes "
        "(GeoTIFF, VRT, STAC item), or a STAC catalog/collection JSON.",
    )
    output_prefix: str = Field(..., description="Folder or s3:// prefix of the maps.")
    model_name: str = Field("specdeepmap-segmentation", description="Registered model name.")
    alias: str = Field("champion", description="Model alias to map with.")
    redo_with_new_model: bool = Field(
        False,
        description="Map again the scenes mapped by another model version (done = "
        "scene + model version); off: a scene is mapped once.",
    )
    map: MapParams = Field(MapParams(), description="Deep Learning Mapper settings.")
    mask_suffix: str | None = Field(
        None,
        description="A scene's quality mask lies beside it as SCENE + this suffix (e.g. "
        "_SCL.tif: scene.tif and scene_SCL.tif); its flagged values: map.mask_preset or "
        "map.mask_values. STAC items bring their own mask assets.",
    )
