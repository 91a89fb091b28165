"""The training and validation chips as Lightning's data module: how many chips an epoch
draws (at least ``min_chips_per_epoch`` chips in ``min_steps_per_epoch`` optimiser steps, so
that a small dataset still gets its steps at any batch size), in which order (uniform, or
class-balanced), and the loader settings for the device.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler, WeightedRandomSampler
from typing_extensions import override

from specdeepmap.data import ChipDataset
from specdeepmap.training.config import TrainConfig


class ChipDataModule(L.LightningDataModule):
    """Loaders of ``train_set`` and ``val_set`` as ``cfg`` says (batch size, workers,
    sampling, chips per epoch); ``pin_memory`` for a CUDA device.
    """

    def __init__(
        self, cfg: TrainConfig, train_set: ChipDataset, val_set: ChipDataset, pin_memory: bool
    ):
        super().__init__()
        self.train_set, self.val_set = train_set, val_set
        self.sampling = cfg.sampling
        # DDP deals an epoch's chips out to the devices: each takes its steps from its share
        self.samples = max(
            len(train_set),
            cfg.min_chips_per_epoch,
            cfg.min_steps_per_epoch * cfg.chips_per_step * cfg.devices,
        )
        self.batch_size = cfg.batch_size
        self.loader_args = dict(
            batch_size=cfg.batch_size,
            num_workers=cfg.workers,
            pin_memory=pin_memory,
            persistent_workers=cfg.workers > 0,
        )

    @override
    def train_dataloader(self) -> DataLoader:
        if self.sampling == "class-balanced":
            sampler = WeightedRandomSampler(class_balanced_weights(self.train_set), self.samples)
        elif self.samples > len(self.train_set):
            sampler = RandomSampler(self.train_set, num_samples=self.samples)
        else:
            sampler = None
        return DataLoader(
            self.train_set,
            shuffle=sampler is None,
            sampler=sampler,
            drop_last=self.samples > self.batch_size,
            **self.loader_args,
        )

    @override
    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, shuffle=False, **self.loader_args)

    def batches_per_epoch(self, limit_batches: int | None) -> int:
        """Training batches in one epoch (at least 1), as Lightning will run them."""
        # the training loader drops a last short batch whenever there is more than one batch
        steps = self.samples // self.batch_size if self.samples > self.batch_size else 1
        return max(1, steps if limit_batches is None else min(steps, limit_batches))


def class_balanced_weights(dataset: ChipDataset) -> torch.Tensor:
    """Sampling weight of each training chip: half uniform, half by how much of each class's
    pixels the chip holds (every class gets the same total weight), so that chips with rare
    classes are drawn more often (in the spirit of repeat-factor sampling).
    """
    counts = [
        np.bincount(dataset.class_indices(i).ravel(), minlength=len(dataset.lookup))[1:]
        for i in range(len(dataset))
    ]
    counts = np.asarray(counts, np.float64)
    totals = counts.sum(axis=0)
    present = totals > 0
    share = (counts[:, present] / totals[present]).sum(axis=1) / max(1, present.sum())
    weights = 0.5 / len(counts) + 0.5 * share
    return torch.as_tensor(weights / weights.sum(), dtype=torch.double)
