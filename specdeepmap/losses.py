"""Training losses and the learning-rate schedule of the Trainer.

Cross-entropy alone is dominated by the frequent classes of a small dataset even with class
weights; the soft Dice term scores each class's overlap on its own scale, which lifts rare
classes and matches what the reports measure (IoU per class, averaged over classes).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn
from typing_extensions import override

#: 'ce': (weighted) cross-entropy; 'dice-ce': cross-entropy plus soft Dice over the classes;
#: 'lovasz-ce': cross-entropy plus the Lovász-softmax loss (a convex surrogate of 1 − IoU)
Loss = Literal["ce", "dice-ce", "lovasz-ce"]
LOSSES: tuple[str, ...] = ("ce", "dice-ce", "lovasz-ce")


class DiceCELoss(nn.Module):
    """Weighted cross-entropy + soft multi-class Dice, both ignoring ``ignore_index`` pixels.

    The Dice term is computed over the real classes (channels other than ``ignore_index``)
    from the batch's pooled pixels, and averaged over the classes present in the batch's
    labels, so a class absent from a batch neither helps nor hurts.
    """

    def __init__(
        self, weight: torch.Tensor | None = None, ignore_index: int = 0, smooth: float = 1.0
    ):
        super().__init__()
        self.ce = nn.CrossEntropyLoss(weight=weight, ignore_index=ignore_index)
        self.ignore_index = ignore_index
        self.smooth = smooth

    def dice(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """1 − mean soft Dice over the classes present in ``target``."""
        classes = logits.shape[1]
        keep = [c for c in range(classes) if c != self.ignore_index]
        valid = (target != self.ignore_index).unsqueeze(1).to(logits.dtype)
        probs = torch.softmax(logits.float(), dim=1)[:, keep] * valid
        onehot = nn.functional.one_hot(target.clamp(0, classes - 1), classes)
        onehot = onehot.permute(0, 3, 1, 2)[:, keep].to(probs.dtype) * valid
        dims = (0, 2, 3)
        intersection = (probs * onehot).sum(dims)
        truth = onehot.sum(dims)
        score = (2 * intersection + self.smooth) / (probs.sum(dims) + truth + self.smooth)
        present = truth > 0
        if not present.any():
            return logits.sum() * 0.0
        return 1 - score[present].mean()

    @override
    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ce = self.ce(logits, target)
        if torch.isnan(ce):  # no labelled pixel in the batch
            ce = logits.sum() * 0.0
        return ce + self.dice(logits, target)


class LovaszCELoss(nn.Module):
    """Weighted cross-entropy + Lovász-softmax (Berman et al., CVPR 2018), both ignoring
    ``ignore_index`` pixels.

    The Lovász extension of the Jaccard loss is a tight convex surrogate of 1 − IoU per class;
    averaged over the classes present in the batch's labels (smp's implementation) it
    optimises the mean IoU that the reports measure, where the soft Dice term optimises a
    related but different overlap.
    """

    def __init__(self, weight: torch.Tensor | None = None, ignore_index: int = 0):
        super().__init__()
        from segmentation_models_pytorch.losses import LovaszLoss

        self.ce = nn.CrossEntropyLoss(weight=weight, ignore_index=ignore_index)
        self.lovasz = LovaszLoss("multiclass", ignore_index=ignore_index)

    @override
    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ce = self.ce(logits, target)
        if torch.isnan(ce):  # no labelled pixel in the batch
            return logits.sum() * 0.0
        return ce + self.lovasz(logits.float(), target)


def build_loss(kind: Loss, weight: torch.Tensor | None, ignore_index: int) -> nn.Module:
    """The Trainer's loss by name."""
    if kind == "dice-ce":
        return DiceCELoss(weight, ignore_index)
    if kind == "lovasz-ce":
        return LovaszCELoss(weight, ignore_index)
    if kind == "ce":
        return nn.CrossEntropyLoss(weight=weight, ignore_index=ignore_index)
    raise ValueError(f"unknown loss {kind!r}; expected one of {', '.join(LOSSES)}")


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, floor: float) -> float:
    """Learning-rate factor: linear warm-up over ``warmup_steps``, then a cosine decay to
    ``floor`` (a fraction of the base rate) at ``total_steps``.
    """
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
