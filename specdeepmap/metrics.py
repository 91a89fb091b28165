"""Segmentation metrics from confusion matrices, in numpy alone: the one place where IoU,
precision, recall, F1 and overall accuracy are defined, for the Tester, the Mapper's scores,
the RandomForest baseline, the paired comparison and the Trainer's validation IoU.

Matrices have rows = truth and columns = prediction. The dataset-level mean IoU is taken over
the classes that occur in truth or prediction (a class absent from both is left out, not
counted as 0 or 1). SpecDeepMap's per-chip IoU (:func:`per_chip_iou`, :func:`mean_chip_iou`)
is its CSV's definition and is kept beside it, named.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd


def confusion_matrix(
    truth: np.ndarray, pred: np.ndarray, num_classes: int, ignore_index: int | None = None
) -> np.ndarray:
    """(num_classes × num_classes) pixel counts of class indices 0..num_classes − 1; pixels
    whose truth is ``ignore_index`` are left out.
    """
    truth = np.asarray(truth).reshape(-1).astype(np.int64)
    pred = np.asarray(pred).reshape(-1).astype(np.int64)
    if ignore_index is not None:
        keep = truth != ignore_index
        truth, pred = truth[keep], pred[keep]
    flat = truth * num_classes + pred
    return np.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)


def mean_iou(matrices: np.ndarray, skip: int | None = None) -> np.ndarray | float:
    """Mean IoU of a (K, K) confusion matrix, or of each of a stack of them (…, K, K), over
    the classes present in truth or prediction (class ``skip`` left out); NaN where none is.
    """
    m = np.asarray(matrices, dtype=np.float64)
    tp = np.diagonal(m, axis1=-2, axis2=-1)
    union = m.sum(axis=-1) + m.sum(axis=-2) - tp
    present = union > 0
    if skip is not None:
        present[..., skip] = False
    iou = np.divide(tp, union, out=np.zeros_like(tp), where=present)
    counts = present.sum(axis=-1)
    out = np.where(counts > 0, iou.sum(axis=-1) / np.maximum(counts, 1), np.nan)
    return float(out) if out.ndim == 0 else out


@dataclass
class Metrics:
    """Dataset-level metrics of one confusion matrix."""

    class_values: list[int]
    matrix: np.ndarray  #: rows = truth, columns = prediction, over class_values
    iou: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    overall_accuracy: float
    mean_iou: float
    #: each chip's confusion matrix by chip file name (they sum to ``matrix``), for the
    #: paired comparison of two models on the same chips (:mod:`comparison`); None if unknown
    chip_matrices: dict[str, np.ndarray] | None = None
    #: each chip's independent unit (its group of touching chips), resampled together
    chip_units: dict[str, int] | None = None

    def table(self) -> pd.DataFrame:
        """One row per class."""
        import pandas as pd  # here: the mapper imports this module and never needs pandas

        return pd.DataFrame(
            {
                "Class": self.class_values,
                "IoU": self.iou,
                "Precision": self.precision,
                "Recall": self.recall,
                "F1": self.f1,
                "Pixels": self.matrix.sum(axis=1),
            }
        )


def metrics_from_matrix(
    matrix: np.ndarray, class_values: list[int], chip_matrices: dict[str, np.ndarray] | None = None
) -> Metrics:
    """IoU, precision, recall, F1 per class, overall accuracy and mean IoU.

    Classes with neither truth nor prediction get NaN and are left out of the mean. A class
    that occurs but is never predicted has precision 0 (none of its predictions is right, as
    none was made), not NaN: a reviewer sees a number, and :func:`never_predicted` names it.
    """
    m = matrix.astype(np.float64)
    tp = np.diag(m)
    truth, pred = m.sum(axis=1), m.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / (truth + pred - tp)
        precision = np.where((pred == 0) & (truth > 0), 0.0, tp / pred)
        recall = tp / truth
        f1 = 2 * precision * recall / (precision + recall)
        f1 = np.where((tp == 0) & (truth + pred > 0), 0.0, f1)
    total = m.sum()
    return Metrics(
        class_values=list(class_values),
        matrix=matrix.astype(np.int64),
        iou=iou,
        precision=precision,
        recall=recall,
        f1=f1,
        overall_accuracy=float(tp.sum() / total) if total else float("nan"),
        mean_iou=mean_iou(matrix),
        chip_matrices=chip_matrices,
    )


def never_predicted(metrics: Metrics) -> list[int]:
    """Class values that occur in the truth but that the model never predicted."""
    truth, pred = metrics.matrix.sum(axis=1), metrics.matrix.sum(axis=0)
    return [v for v, t, p in zip(metrics.class_values, truth, pred, strict=True) if t and not p]


def accumulate(
    matrix: np.ndarray, truth: np.ndarray, pred: np.ndarray, class_values: list[int]
) -> None:
    """Add the pixels whose truth is one of ``class_values`` to ``matrix`` (in place)."""
    lut = np.full(max(256, max(class_values) + 1), -1, dtype=np.int64)
    lut[class_values] = np.arange(len(class_values))
    t = lut[truth.ravel().astype(np.int64)]
    p = lut[np.clip(pred.ravel().astype(np.int64), 0, len(lut) - 1)]
    keep = (t >= 0) & (p >= 0)
    matrix += confusion_matrix(t[keep], p[keep], len(class_values))


def per_chip_iou(truth: np.ndarray, pred: np.ndarray, class_values: list[int]) -> np.ndarray:
    """SpecDeepMap's per-chip IoU of each class (NaN where truth and prediction lack it)."""
    out = np.full(len(class_values), np.nan)
    for i, c in enumerate(class_values):
        union = np.count_nonzero((truth == c) | (pred == c))
        if union:
            out[i] = np.count_nonzero((truth == c) & (pred == c)) / union
    return out


def mean_chip_iou(chip_ious: list[np.ndarray], num_classes: int) -> np.ndarray:
    """SpecDeepMap's per-class IoU: the mean over chips of :func:`per_chip_iou`, ignoring the
    chips where a class is absent from truth and prediction (NaN when it is absent from all).
    """
    if not chip_ious:
        return np.full(num_classes, np.nan)
    with warnings.catch_warnings():  # a class absent from every chip is NaN, said above
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(np.array(chip_ious), axis=0)
