"""The Deep Learning Trainer's run: prepare → the RandomForest baseline → fit the network(s)
→ export the model file → log and register (:mod:`specdeepmap.training.record`).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import numpy as np
from torch import nn

from specdeepmap import storage
from specdeepmap.baseline import BaselineResult, pseudo_labels, run_baseline
from specdeepmap.console import quiet_lightning
from specdeepmap.inference import MODEL_FILE, export_model_file, read_model_file, resolve_device
from specdeepmap.models import EnsembleSegmentation
from specdeepmap.params import BaselineParams
from specdeepmap.tracking import tracking_uri
from specdeepmap.training.config import (
    MEMBER_SEED_STEP,
    RECIPE_FIELDS,
    TEACHER_FILE,
    TrainConfig,
    TrainResult,
)
from specdeepmap.training.continuation import mark_finished, resumable
from specdeepmap.training.data_module import ChipDataModule
from specdeepmap.training.fit import FitContext, MemberFit, distill_student, fit_member
from specdeepmap.training.prepare import Prepared, initial_model, prepare
from specdeepmap.training.record import log_run, open_run, register_version
from specdeepmap.training.validation import pooled_iou, validation_reference

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """The network(s) a training produced, before the model file is written."""

    model: nn.Module  #: what the model file holds (one network, an ensemble or a student)
    best_iou: float
    best_checkpoint: str
    members: list[MemberFit]
    student: MemberFit | None = None
    ensemble_iou: float | None = None  #: distilled: the teacher ensemble's validation IoU


def train(cfg: TrainConfig) -> TrainResult:
    """Train a segmentation model on a dataset folder (Deep Learning Trainer).

    Checks the data, the weights, the device and a resume checkpoint before the first step.
    Logs TensorBoard events under ``out/lightning_logs`` and an MLflow run (parameters,
    per-epoch metrics, the dataset CSVs, the best checkpoint), and registers the best model in
    the MLflow model registry. With ``cfg.ensemble`` > 1 the networks are trained one after
    the other into the same run (:func:`fit_member`), and the model file is their
    :class:`~specdeepmap.models.EnsembleSegmentation`.
    """
    import lightning as L
    import mlflow

    quiet_lightning()
    started = time.perf_counter()
    device = resolve_device(cfg.device)
    # recorded in the model, the run and resume.json: a relative path would name another
    # folder when read from elsewhere
    cfg = cfg.model_copy(update={"dataset": storage.absolute(cfg.dataset)})
    uri = tracking_uri(cfg.tracking_uri)
    cfg, previous_run = resumable(cfg, uri)
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # the network's random start too
    prepared = prepare(cfg)
    baseline = fit_baseline(cfg, prepared)
    os.makedirs(cfg.out, exist_ok=True)
    loggers = open_run(cfg, uri, previous_run, prepared)
    run_id = loggers[1].run_id  # the MLflow run exists from here on
    data = ChipDataModule(cfg, prepared.train_set, prepared.val_set, device.type == "cuda")
    ctx = FitContext(cfg, prepared, data, device, run_id)
    outcome = fit_networks(ctx, loggers, uri)
    if outcome is None:  # another process of a multi-device run
        return TrainResult("", 0.0, "", loggers[0].log_dir)
    # what the mapper's drift verdict compares each scene's map with
    reference = validation_reference(outcome.model, prepared.val_set, cfg.batch_size)
    # lineage: maps made with this model file name the MLflow run that produced it
    config = prepared.config.model_copy(update={"reference": reference, "run_id": run_id})
    model_file = export_model_file(config, outcome.model, os.path.join(cfg.out, MODEL_FILE))
    result = train_result(cfg, outcome, model_file, loggers[0].log_dir, run_id, baseline)
    result.device = str(device)
    with mlflow.start_run(run_id=run_id):
        facts = log_run(cfg, result, outcome, baseline, config)
        result.seconds = time.perf_counter() - started
        if cfg.registered_model:
            register_version(cfg, result, config, facts)
    mark_finished(cfg, run_id)
    log.info("Best val IoU %.4f: %s", result.best_val_iou, model_file)
    return result


def fit_baseline(cfg: TrainConfig, prepared: Prepared) -> BaselineResult | None:
    """The per-pixel RandomForest on the training chips (seconds; first, as pseudo-labels
    need the forest), and the pseudo-labels it gives the network when asked for.
    """
    if not (cfg.baseline or cfg.pseudo_labels):
        return None
    normalization = prepared.train_set.normalization
    baseline = run_baseline(
        prepared.info,
        normalization,
        BaselineParams(max_pixels=cfg.baseline_pixels, seed=cfg.seed),
    )
    if cfg.pseudo_labels:
        prepared.train_set.pseudo_labels = pseudo_labels(
            baseline.forest, prepared.info.train, normalization, cfg.pseudo_labels
        )
    return baseline


def fit_networks(ctx: FitContext, loggers: list, uri: str) -> Outcome | None:
    """Train ``cfg.ensemble`` networks one after the other (each from its own seeded start,
    logging into the same MLflow run), then combine them: the network itself, their
    ensemble, or the student distilled from it. None in the other processes of a
    multi-device run.
    """
    import lightning as L
    from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger

    cfg, model = ctx.cfg, ctx.prepared.model
    members: list[tuple[nn.Module, MemberFit]] = []
    for member in range(cfg.ensemble):
        if member:  # a new random start (and new batches) for each further member
            L.seed_everything(cfg.seed + MEMBER_SEED_STEP * member, workers=True, verbose=False)
            model = initial_model(cfg, ctx.prepared.config, ctx.prepared.train_set)
            loggers = [
                TensorBoardLogger(cfg.out, name="lightning_logs", version=f"member{member}"),
                MLFlowLogger(
                    experiment_name=cfg.experiment,
                    tracking_uri=uri,
                    log_model=False,
                    run_id=ctx.run_id,
                    prefix=f"member{member}",
                ),
            ]
        folder = os.path.join(cfg.out, "checkpoints", *([f"member{member}"] if member else []))
        fit = fit_member(ctx, model, loggers, folder)
        if not fit.global_zero:
            return None
        model.load_state_dict(read_model_file(fit.best_checkpoint)[1])
        members.append((model, fit))
    if cfg.ensemble > 1:
        return combine_members(ctx, members, uri)
    fit = members[0][1]
    outcome = Outcome(model, fit.best_score, fit.best_checkpoint, [fit])
    if cfg.devices > 1:
        import mlflow

        # the processes' validation shards are padded to equal length (a chip or two counted
        # twice): the best model's figure is measured again here, on each chip once
        outcome.best_iou = pooled_iou(
            model, ctx.prepared.val_set, cfg.batch_size, ctx.prepared.config.num_classes
        )
        mlflow.MlflowClient(uri).log_metric(
            ctx.run_id, "best_val_iou_single_pass", outcome.best_iou
        )
    return outcome


def combine_members(
    ctx: FitContext, members: list[tuple[nn.Module, MemberFit]], uri: str
) -> Outcome:
    """The members' ensemble (the mean of their probabilities), or with ``distill`` one
    network trained on its soft labels, the ensemble kept beside the model file.
    """
    import mlflow

    cfg, config = ctx.cfg, ctx.prepared.config
    ensemble = EnsembleSegmentation([m for m, _ in members])
    fits = [fit for _, fit in members]
    client = mlflow.MlflowClient(uri)
    for member, fit in enumerate(fits):
        client.log_metric(ctx.run_id, "member_best_val_iou", fit.best_score, step=member)
    iou = pooled_iou(ensemble, ctx.prepared.val_set, cfg.batch_size, config.num_classes)
    if not cfg.distill:  # the model file holds the ensemble from here on
        ctx.prepared.config = config.model_copy(update={"ensemble": cfg.ensemble})
        return Outcome(ensemble, iou, fits[0].best_checkpoint, fits)
    client.log_metric(ctx.run_id, "ensemble_val_iou", iou)
    # the teacher beside the model, to compare the two on any chips (not registered)
    export_model_file(
        config.model_copy(update={"ensemble": cfg.ensemble, "run_id": ctx.run_id}),
        ensemble,
        os.path.join(cfg.out, TEACHER_FILE),
    )
    student, fit = distill_student(ctx, ensemble, uri)
    return Outcome(student, fit.best_score, fit.best_checkpoint, fits, fit, iou)


def train_result(
    cfg: TrainConfig,
    outcome: Outcome,
    model_file: str,
    log_dir: str,
    run_id: str,
    baseline: BaselineResult | None,
) -> TrainResult:
    """The run's result before it is logged: the model file and the figures of its fits."""
    fits = outcome.members + ([outcome.student] if outcome.student else [])
    result = TrainResult(
        best_checkpoint=outcome.best_checkpoint,
        best_val_iou=outcome.best_iou,
        model_file=model_file,
        log_dir=log_dir,
        run_id=run_id,
        epochs_run=sum(fit.epochs for fit in fits),
        baseline=baseline.summary() if baseline is not None else None,
        # the accumulation and normalisation the run used, defaults resolved (as the rate)
        recipe={k: getattr(cfg, k) for k in RECIPE_FIELDS}
        | {"accumulate_grad_batches": cfg.accumulation, "norm": cfg.norm_layers},
        learning_rate=cfg.learning_rate,
        distilled_from_val_iou=outcome.ensemble_iou,
    )
    if cfg.ensemble > 1:
        result.member_val_ious = [fit.best_score for fit in outcome.members]
    scores = outcome.members[0].val_scores
    if cfg.ensemble == 1 and scores and not cfg.resume:  # a continued run saw some epochs
        result.val_epochs, result.val_epoch_median = len(scores), float(np.median(scores))
    return result
