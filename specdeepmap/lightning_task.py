"""The Lightning side of training: the task (loss, optimiser, schedule) and the pooled IoU.

A module of its own, with module-level classes, so that multi-process training can start its
processes by spawning (the task is pickled to them): a Prefect worker must not have its
command line re-run, as Lightning's default launcher would. Metrics are torchmetrics objects
logged to Lightning, which reduces them across processes at the same point in every process;
a collective of our own in an epoch-end hook could meet another process inside Lightning's
metric sync and deadlock (it did: the progress bar's sync on rank 0 against our all_gather
on rank 1).
"""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torchmetrics import Metric
from typing_extensions import override

from specdeepmap.augmentation import D4, band_dropout, cutmix, d4_apply, d4_invert
from specdeepmap.losses import Loss, build_loss, warmup_cosine
from specdeepmap.metrics import confusion_matrix, mean_iou
from specdeepmap.model_config import ModelConfig

IGNORE_INDEX = 0


class PooledIoU(Metric):
    """Mean IoU of one confusion matrix pooled over every pixel of the epoch (and of every
    process: the matrices are summed across processes before the IoU is taken).
    """

    full_state_update = False

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.add_state(
            "matrix",
            default=torch.zeros(num_classes, num_classes, dtype=torch.long),
            dist_reduce_fx="sum",
        )

    @override
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        counts = confusion_matrix(
            target.cpu().numpy(), pred.cpu().numpy(), self.num_classes, IGNORE_INDEX
        )
        self.matrix += torch.from_numpy(counts).to(self.matrix.device)

    @override
    def compute(self) -> torch.Tensor:
        # the unlabelled channel left out; 0 (not NaN) before any class was seen, so that
        # checkpointing and early stopping always compare numbers
        iou = mean_iou(self.matrix.cpu().numpy(), skip=IGNORE_INDEX)
        return torch.tensor(0.0 if iou != iou else iou)


class SegmentationTask(L.LightningModule):
    """Loss (ignore index 0), Adam, warm-up then cosine per step, pooled IoU per epoch."""

    def __init__(
        self,
        model: nn.Module,
        config: ModelConfig,
        class_weights: torch.Tensor | None,
        lr: float,
        epochs: int,
        loss: Loss = "ce",
        warmup_epochs: float = 0.0,
        weight_decay: float = 0.0,
        pixel_loss_weight: float = 0.0,
        cutmix: float = 0.0,
        consistency: float = 0.0,
        band_dropout: float = 0.0,
        teacher: nn.Module | None = None,
        distillation: float = 1.0,
    ):
        super().__init__()
        self.model = model
        # a plain attribute, not a submodule: the teacher is neither trained nor checkpointed
        self.__dict__["teacher"] = teacher.eval().requires_grad_(False) if teacher else None
        self.distillation = distillation
        self.lr = lr
        self.weight_decay = weight_decay
        self.pixel_loss_weight = pixel_loss_weight
        self.cutmix = cutmix
        self.consistency = consistency
        self.band_dropout = band_dropout
        self.epochs = epochs
        self.warmup_epochs = warmup_epochs
        self.save_hyperparameters({"config": config.stored()})  # plain data in the checkpoint
        self.loss = build_loss(loss, class_weights, IGNORE_INDEX)
        self.num_classes = config.num_classes
        self.train_iou = PooledIoU(self.num_classes)
        self.val_iou = PooledIoU(self.num_classes)

    @override
    def setup(self, stage: str) -> None:
        from specdeepmap.console import quiet_lightning

        quiet_lightning()  # also in processes spawned for multi-device training

    @override
    def on_fit_start(self) -> None:
        # channels-last: oneDNN's and cuDNN's fastest convolution layout (about 1.2x per
        # step on the CPU, docs/benchmarks.md); the same arithmetic, the weights' values
        # and the checkpoint's keys unchanged. A network with 5-D weights (3-D
        # convolutions) has no such layout and keeps its own.
        if all(p.dim() != 5 for p in self.model.parameters()):
            self.model.to(memory_format=torch.channels_last)
        if self.teacher is not None:  # once, on the student's device (not a submodule)
            self.teacher.to(self.device)

    @override
    def forward(self, x):
        return self.model(x)

    def _step(self, batch, stage: str):
        x, y = batch
        if stage == "train" and self.cutmix:
            x, y = cutmix(x, y, self.cutmix)
        if stage == "train" and self.band_dropout:
            x = band_dropout(x, self.band_dropout)
        x = x.contiguous(memory_format=torch.channels_last)
        if stage == "train" and self.pixel_loss_weight and hasattr(self.model, "forward_parts"):
            logits, pixel = self.model.forward_parts(x)
            loss = self.loss(logits, y) + self.pixel_loss_weight * self.loss(pixel, y)
        else:
            logits = self(x)
            loss = self.loss(logits, y)
        if torch.isnan(loss):  # a batch without labelled pixels
            loss = logits.sum() * 0.0
        if stage == "train" and self.consistency:
            loss = loss + self.consistency * consistency_loss(self.model, x, logits, y)
        if stage == "train" and self.teacher is not None:
            loss = loss + self.distillation * distillation_loss(self.teacher, x, logits)
        pred = logits[:, 1:].argmax(1) + 1
        metric = self.train_iou if stage == "train" else self.val_iou
        metric.update(pred, y)
        self.log(
            f"{stage}_loss",
            loss,
            on_step=False,
            on_epoch=True,
            prog_bar=True,
            batch_size=len(x),
            sync_dist=True,
        )
        self.log(f"{stage}_iou", metric, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    @override
    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    @override
    def validation_step(self, batch, batch_idx):
        return self._step(batch, "val")

    @override
    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = (
            torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
            if self.weight_decay
            else torch.optim.Adam(params, lr=self.lr)
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = min(total // 2, round(self.warmup_epochs * total / max(1, self.epochs)))
        floor = min(1.0, 1e-6 / self.lr)  # SpecDeepMap's eta_min
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _Schedule(warmup, total, floor))
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


#: FixMatch's confidence threshold for a prediction to become a target
CONSISTENCY_THRESHOLD = 0.9


def consistency_loss(
    model: nn.Module, x: torch.Tensor, logits: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """FixMatch-style consistency on the unlabelled pixels of a batch (Sohn et al. 2020).

    Where the network's prediction for an unlabelled pixel is confident (class probability at
    least :data:`CONSISTENCY_THRESHOLD`), that class becomes the target for the same pixel
    seen in another orientation (a random non-identity D4 element, mapped back): the network
    learns from the two thirds of a sparsely labelled chip that the labelled loss never sees.
    Averaged over the batch's unlabelled pixels, so the weight does not depend on how many
    are confident.
    """
    unlabelled = y == IGNORE_INDEX
    if not unlabelled.any():
        return logits.sum() * 0.0
    with torch.no_grad():
        confidence, target = torch.softmax(logits.detach()[:, 1:].float(), 1).max(1)
        keep = unlabelled & (confidence >= CONSISTENCY_THRESHOLD)
        target = torch.where(keep, target + 1, IGNORE_INDEX)
    if not keep.any():
        return logits.sum() * 0.0
    k, flip = D4[int(torch.randint(1, len(D4), ()))]
    student = d4_invert(model(d4_apply(x, k, flip)), k, flip)
    return (
        nn.functional.cross_entropy(
            student.float(), target, ignore_index=IGNORE_INDEX, reduction="sum"
        )
        / unlabelled.sum()
    )


def distillation_loss(teacher: nn.Module, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Knowledge distillation (Hinton et al. 2015) on every pixel of a batch, labelled or not.

    The student's class distribution (real classes 1…K) is pulled towards the teacher's
    (typically an ensemble's mean probabilities) by the KL divergence, averaged over pixels:
    the unlabelled two thirds of a sparsely labelled chip get the teacher's soft targets, and
    the labelled pixels its view of which wrong classes are near. An ensemble's gain then
    comes at one network's mapping cost.
    """
    with torch.no_grad():
        target = teacher(x)[:, 1:].float().log_softmax(dim=1)
    student = logits[:, 1:].float().log_softmax(dim=1)
    return (
        nn.functional.kl_div(student, target, log_target=True, reduction="none").sum(dim=1).mean()
    )


class _Schedule:
    """Warm-up + cosine as a picklable callable (LambdaLR keeps it in its state)."""

    def __init__(self, warmup: int, total: int, floor: float):
        self.warmup, self.total, self.floor = warmup, total, floor

    def __call__(self, step: int) -> float:
        return warmup_cosine(step, self.warmup, self.total, self.floor)


class ValidationHistory(L.Callback):
    """The validation IoU of every validated epoch, in order (``scores``).

    The best of them chose the checkpoint, so it overstates the model on these chips; their
    median tells a reviewer by how much (see :func:`specdeepmap.model_card.summary`).
    """

    def __init__(self) -> None:
        self.scores: list[float] = []

    @override
    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking and "val_iou" in trainer.callback_metrics:
            self.scores.append(float(trainer.callback_metrics["val_iou"]))
