"""Checkpoints of one network's training: the best ones by validation IoU (and, with a
checkpoint prefix, the latest state every epoch), mirrored to object storage as Lightning
writes them.

Mirroring goes through Lightning's public :class:`~lightning.fabric.plugins.CheckpointIO`
plugin: every file the trainer saves or removes passes through it, in the process that
writes (rank 0), so the mirror holds exactly what the local folder holds.
"""

from __future__ import annotations

import os

from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from typing_extensions import override

from specdeepmap import storage
from specdeepmap.resume import LAST_CHECKPOINT, RESUME_STATE, ResumeState

CHECKPOINT_PATTERN = "{epoch:05d}-val_iou_{val_iou:.4f}"


class MirroringCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint files, each also copied to ``mirror_uri`` (object storage or
    another folder) as soon as it is written: one PUT on S3, a rename locally, so a copy is
    never half-written; a checkpoint no longer kept is removed there too. Once ``last.ckpt``
    is copied, ``resume.json`` beside it names the MLflow run, the dataset and the epoch, so
    that a restarted training continues that run (see :mod:`specdeepmap.resume`).
    """

    def __init__(self, mirror_uri: str, mlflow_run_id: str, dataset: str | None = None):
        super().__init__()
        self.mirror_uri = mirror_uri
        self.mlflow_run_id = mlflow_run_id
        self.dataset = dataset

    @override
    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        super().save_checkpoint(checkpoint, path, storage_options)
        name = os.path.basename(path)
        if name.startswith("."):  # a tool's temporary file (the learning-rate finder's)
            return
        storage.upload(str(path), storage.join(self.mirror_uri, name))
        if name == LAST_CHECKPOINT:
            state = ResumeState(
                self.mlflow_run_id,
                checkpoint["epoch"],
                checkpoint["global_step"],
                LAST_CHECKPOINT,
                self.dataset,
            )
            storage.write_text(storage.join(self.mirror_uri, RESUME_STATE), state.to_json())

    @override
    def remove_checkpoint(self, path) -> None:
        super().remove_checkpoint(path)
        name = os.path.basename(path)
        if not name.startswith("."):
            storage.remove(storage.join(self.mirror_uri, name))


def checkpoint_callbacks(directory: str, keep_top_k: int, latest: bool) -> list[ModelCheckpoint]:
    """The best ``keep_top_k`` checkpoints by validation IoU in ``directory`` and, with
    ``latest``, ``last.ckpt`` every epoch (Lightning's ``save_last`` only saves when a best
    checkpoint is saved too). The best checkpointing is first.
    """
    callbacks = [
        ModelCheckpoint(
            dirpath=directory,
            filename=CHECKPOINT_PATTERN,
            monitor="val_iou",
            mode="max",
            save_top_k=keep_top_k,
            auto_insert_metric_name=False,
        )
    ]
    if latest:
        callbacks.append(
            ModelCheckpoint(
                dirpath=directory,
                filename=LAST_CHECKPOINT.removesuffix(".ckpt"),
                save_top_k=1,
                enable_version_counter=False,
            )
        )
    return callbacks
