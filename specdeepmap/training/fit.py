"""Training one network with Lightning: the task, its callbacks (checkpoints, early stopping,
weight averaging), the trainer for the device, and the distilled student of an ensemble.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import lightning as L
import torch
from torch import nn

from specdeepmap.console import is_verbose
from specdeepmap.inference import read_model_file
from specdeepmap.lightning_task import SegmentationTask, ValidationHistory
from specdeepmap.training.checkpoints import MirroringCheckpointIO, checkpoint_callbacks
from specdeepmap.training.config import MEMBER_SEED_STEP, TrainConfig
from specdeepmap.training.data_module import ChipDataModule
from specdeepmap.training.prepare import Prepared, initial_model

log = logging.getLogger(__name__)


@dataclass
class MemberFit:
    """One network's training: its best checkpoint and validation IoU, epochs run."""

    best_checkpoint: str
    best_score: float
    epochs: int
    global_zero: bool = True  #: False in the other processes of a multi-device run
    #: validation IoU of each epoch validated in this process, in order
    val_scores: list[float] = field(default_factory=list)


@dataclass
class FitContext:
    """What every network of one training shares: the run's parameters, its prepared data
    and loaders, the device, and the MLflow run its metrics and mirrored checkpoints name.
    """

    cfg: TrainConfig
    prepared: Prepared
    data: ChipDataModule
    device: torch.device
    run_id: str


def fit_member(
    ctx: FitContext,
    model: nn.Module,
    loggers: list,
    checkpoint_dir: str,
    teacher: nn.Module | None = None,
) -> MemberFit:
    """Train one network with Lightning (checkpointing on validation IoU, early stopping,
    weight averaging and the learning-rate finder as ``ctx.cfg`` says), logging to
    ``loggers``; checkpoints mirrored to ``cfg.checkpoint_uri`` name the MLflow run to
    continue. A ``teacher`` adds its distillation loss.
    """
    cfg = ctx.cfg
    task = SegmentationTask(
        model,
        ctx.prepared.config,
        ctx.prepared.class_weights,
        cfg.learning_rate,
        cfg.epochs,
        cfg.loss,
        cfg.warmup_epochs,
        cfg.weight_decay,
        cfg.pixel_loss_weight,
        cfg.cutmix,
        cfg.consistency,
        cfg.band_dropout,
        teacher=teacher,
    )
    checkpoints = checkpoint_callbacks(
        checkpoint_dir, cfg.keep_top_k, latest=bool(cfg.checkpoint_uri)
    )
    history = ValidationHistory()
    trainer = L.Trainer(
        max_epochs=cfg.epochs,
        accelerator="gpu" if ctx.device.type == "cuda" else "cpu",
        devices=cfg.devices,
        precision=cfg.precision,
        accumulate_grad_batches=cfg.accumulation,
        callbacks=[*checkpoints, history, *training_callbacks(cfg, ctx.data)],
        plugins=[MirroringCheckpointIO(cfg.checkpoint_uri, ctx.run_id, cfg.dataset)]
        if cfg.checkpoint_uri
        else None,
        logger=loggers,
        log_every_n_steps=1,
        enable_progress_bar=True,
        limit_train_batches=cfg.limit_batches,
        limit_val_batches=cfg.limit_batches,
        num_sanity_val_steps=0,
        deterministic=False,
        enable_model_summary=is_verbose(),
        strategy=ddp_strategy(cfg.devices),
    )
    if cfg.lr_finder:
        from lightning.pytorch.tuner import Tuner

        finder = Tuner(trainer).lr_find(task, datamodule=ctx.data, update_attr=True, attr_name="lr")
        log.info(
            "Learning-rate finder suggests %s (used for training)",
            finder.suggestion() if finder else None,
        )
    # the checked local copy, loaded once more by Lightning as plain data (weights_only)
    trainer.fit(task, datamodule=ctx.data, ckpt_path=cfg.resume, weights_only=True)
    best = checkpoints[0]
    return MemberFit(
        best.best_model_path,
        float(best.best_model_score or 0.0),
        trainer.current_epoch,
        trainer.is_global_zero,
        history.scores,
    )


def training_callbacks(cfg: TrainConfig, data: ChipDataModule) -> list:
    """Early stopping, EMA weight averaging and batch renormalisation, as ``cfg`` asks."""
    callbacks = []
    if cfg.norm_layers == "renorm":
        from specdeepmap.batch_renorm import BatchRenormalization

        callbacks.append(BatchRenormalization(start=min(0.5, cfg.warmup_epochs / cfg.epochs)))
    if cfg.early_stopping:
        from lightning.pytorch.callbacks import EarlyStopping

        callbacks.append(EarlyStopping(monitor="val_iou", mode="max", patience=cfg.patience))
    if cfg.weight_averaging == "ema":
        steps = -(-data.batches_per_epoch(cfg.limit_batches) // cfg.accumulation)
        callbacks.append(ema_callback(steps * cfg.epochs))
    return callbacks


def distill_student(ctx: FitContext, teacher: nn.Module, uri: str) -> tuple[nn.Module, MemberFit]:
    """Train one network from a new random start on the labels plus the ensemble
    ``teacher``'s class probabilities on every pixel (``lightning_task.distillation_loss``);
    return it, with its best weights loaded, and its fit.
    """
    from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger

    cfg = ctx.cfg
    L.seed_everything(cfg.seed + MEMBER_SEED_STEP * cfg.ensemble, workers=True, verbose=False)
    student = initial_model(cfg, ctx.prepared.config, ctx.prepared.train_set)
    loggers = [
        TensorBoardLogger(cfg.out, name="lightning_logs", version="student"),
        MLFlowLogger(
            experiment_name=cfg.experiment,
            tracking_uri=uri,
            log_model=False,
            run_id=ctx.run_id,
            prefix="student",
        ),
    ]
    fit = fit_member(
        ctx, student, loggers, os.path.join(cfg.out, "checkpoints", "student"), teacher=teacher
    )
    _, state = read_model_file(fit.best_checkpoint)
    student.load_state_dict(state)
    return student, fit


def ddp_strategy(devices: int):
    """Lightning's spawn-based DDP for several devices ("auto" for one).

    Spawned processes run only the training loop; Lightning's default launcher would instead
    re-run the process's command line in each extra process, which inside a Prefect worker is
    the flow run itself. Rank 0's results (best checkpoint, metrics) come back to this process.
    """
    if devices <= 1:
        return "auto"
    from lightning.pytorch.strategies import DDPStrategy

    return DDPStrategy(start_method="spawn")


def ema_callback(total_steps: int):
    """Lightning's EMA weight averaging with a horizon of about a twentieth of the training
    steps (10-1000): long enough to smooth the last epochs' noise, short enough to follow the
    model on the few hundred steps of a small dataset (a fixed decay of 0.999 would still be
    averaging the first epochs).
    """
    from lightning.pytorch.callbacks import EMAWeightAveraging

    horizon = min(1000.0, max(10.0, total_steps / 20))
    return EMAWeightAveraging(decay=1 - 1 / horizon)
