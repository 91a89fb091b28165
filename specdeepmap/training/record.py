"""What a training records: its TensorBoard and MLflow loggers and parameters, then the
MLflow run's files, figures and dataset lineage, and the registered version with its card.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from specdeepmap import storage
from specdeepmap.baseline import BaselineResult
from specdeepmap.classes import ClassSchema
from specdeepmap.model_card import dataset_facts, dataset_frame, publish_model_card
from specdeepmap.model_config import ModelConfig
from specdeepmap.splitting import NORMALIZE_CSV, SUMMARY_CSV
from specdeepmap.tracking import ensure_experiment, log_baseline, register_model
from specdeepmap.training.config import TrainConfig, TrainResult
from specdeepmap.training.prepare import Prepared

if TYPE_CHECKING:
    from specdeepmap.training.run import Outcome

#: the Dataset Maker's files logged with every run (those the dataset has)
DATASET_FILES = (
    SUMMARY_CSV,
    NORMALIZE_CSV,
    "train_files.csv",
    "validation_files.csv",
    "test_files.csv",
    "split.json",
)


def open_run(cfg: TrainConfig, uri: str, previous_run: str | None, prepared: Prepared) -> list:
    """TensorBoard's and MLflow's loggers, the MLflow run created (or ``previous_run``
    continued) and, for a new run, its parameters logged.
    """
    from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger

    ensure_experiment(uri, cfg.experiment)
    mlflow_logger = MLFlowLogger(
        experiment_name=cfg.experiment,
        tracking_uri=uri,
        log_model=False,
        run_name=cfg.run_name or f"train {storage.basename(cfg.dataset.rstrip('/'))}",
        tags={
            "mlflow.source.name": "specdeepmap train",
            "mlflow.source.type": "JOB",
            **cfg.run_tags,
        },
        run_id=previous_run,
    )
    if previous_run is None:  # a continued run keeps its parameters (MLflow's are immutable)
        mlflow_logger.log_hyperparams(
            {
                k: v
                for k, v in cfg.model_dump().items()
                if k not in ("tracking_uri", "run_tags", "resume")
            }
            | {
                "learning_rate": cfg.learning_rate,  # lr, or the default scaled by batch size
                "accumulation": cfg.accumulation,  # accumulate_grad_batches, or the default's
                "norm_layers": cfg.norm_layers,  # norm, or the default's for the batch size
                "class_values": prepared.info.class_values,
                "in_channels": prepared.config.in_channels,
                "tile_size": prepared.config.tile_size,
            }
        )
    return [TensorBoardLogger(cfg.out, name="lightning_logs"), mlflow_logger]


def log_run(
    cfg: TrainConfig,
    result: TrainResult,
    outcome: Outcome,
    baseline: BaselineResult | None,
    config: ModelConfig,
) -> dict:
    """The MLflow run's files and figures: the forest's child run, the dataset's files and
    its chipping and split parameters, the best checkpoints, the best and median validation
    IoU, lineage tags and the dataset as the run's input, in the active MLflow run.
    Returns the dataset's facts.
    """
    import mlflow

    facts = dataset_facts(cfg.dataset)
    if baseline is not None:
        log_baseline(
            baseline,
            os.path.join(cfg.out, "baseline"),
            ClassSchema.from_dict(config.classes),
        )
    for name in DATASET_FILES:
        uri_csv = storage.join(cfg.dataset, name)
        if storage.exists(uri_csv):
            local = storage.cached_local_copy(uri_csv, os.path.join(cfg.out, "dataset"))
            mlflow.log_artifact(local, artifact_path="dataset")
    # the Raster Splitter's and Dataset Maker's parameters, as run parameters
    mlflow.log_params(
        {f"chip_{k}": v for k, v in facts["chip_params"].items()}
        | {f"split_{k}": v for k, v in facts["split_params"].items()}
    )
    for member, fit in enumerate(outcome.members):
        folder = "checkpoints" + (f"/member{member}" if member else "")
        mlflow.log_artifact(fit.best_checkpoint, artifact_path=folder)
    if outcome.student:
        mlflow.log_artifact(outcome.student.best_checkpoint, "checkpoints/student")
    mlflow.log_metric("best_val_iou", result.best_val_iou)
    if result.val_epoch_median is not None:
        mlflow.log_metric("val_iou_epoch_median", result.val_epoch_median)
    mlflow.set_tags(
        {
            "dataset": cfg.dataset,
            "dataset_digest": facts["digest"],
            "specdeepmap_version": config.version,
        }
    )
    mlflow.log_input(
        mlflow.data.from_pandas(
            dataset_frame(cfg.dataset),
            source=cfg.dataset,
            name=storage.basename(cfg.dataset) or "chips",
            digest=facts["digest"],  # one digest: the tag's, the card's and MLflow's
        ),
        context="training",
    )
    return facts


def register_version(
    cfg: TrainConfig, result: TrainResult, config: ModelConfig, facts: dict
) -> None:
    """Register the model file as a new version of ``cfg.registered_model`` from the active
    MLflow run and publish its model card; the version lands in ``result``.
    """
    result.model_uri, result.model_version = register_model(
        result.model_file,
        config,
        cfg.registered_model,
        result.best_val_iou,
        cfg.dataset,
        result.baseline_mean_iou("validation"),
        facts["digest"],
    )
    publish_model_card(
        cfg.registered_model,
        result.model_version,
        result.run_id,
        result.model_file,
        cfg.dataset,
        result.card_scores(),
        result.card_table(),
        facts=facts,
    )
