"""A trained network's figures on its validation chips, measured once in this process: the
pooled IoU (each chip once, where a multi-device run's shards count some twice) and the
output statistics the mapper's drift verdict compares each scene with.
"""

from __future__ import annotations

import torch
from torch import nn

from specdeepmap.data import ChipDataset


@torch.inference_mode()
def pooled_iou(model: nn.Module, dataset: ChipDataset, batch_size: int, num_classes: int) -> float:
    """Pooled mean IoU of ``model`` on every chip of ``dataset`` once (one process, CPU)."""
    from torch.utils.data import DataLoader

    from specdeepmap.lightning_task import PooledIoU

    metric = PooledIoU(num_classes)
    model = model.eval().cpu()
    for x, y in DataLoader(dataset, batch_size=batch_size):
        metric.update(model(x)[:, 1:].argmax(1) + 1, y)
    return float(metric.compute())


def validation_reference(model: nn.Module, dataset: ChipDataset, batch_size: int) -> dict:
    """The model's outputs on its validation chips, as the mapper computes them on a scene
    (softmax over the real classes): class shares and the share of low-confidence pixels.

    The model file carries them, so that each mapped scene's verdict can say whether its map
    looks like the model's maps of data it knows (:func:`specdeepmap.drift.output_drift`).
    """
    from torch.utils.data import DataLoader

    from specdeepmap.drift import output_reference

    model = model.eval().cpu()

    def batches():
        with torch.no_grad():
            for x, _ in DataLoader(dataset, batch_size=batch_size):
                yield torch.softmax(model(x)[:, 1:].float(), dim=1).numpy()

    return output_reference(batches())
