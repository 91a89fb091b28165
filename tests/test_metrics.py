"""The one metrics module: its confusion matrix and mean IoU against counts made by hand."""

from __future__ import annotations

import numpy as np
import pytest

from specdeepmap.metrics import confusion_matrix, mean_iou


def test_the_confusion_matrix_counts_every_pixel_once_and_leaves_out_the_ignored():
    rng = np.random.default_rng(0)
    truth, pred = rng.integers(0, 4, (2, 5, 7)), rng.integers(0, 4, (2, 5, 7))
    by_hand = np.zeros((4, 4), np.int64)
    for t, p in zip(truth.ravel(), pred.ravel(), strict=True):
        if t != 0:
            by_hand[t, p] += 1
    assert np.array_equal(confusion_matrix(truth, pred, 4, ignore_index=0), by_hand)
    assert confusion_matrix(truth, pred, 4).sum() == truth.size


def test_mean_iou_averages_the_classes_present_and_skips_the_one_asked():
    # class 0: tp 2, union 3 → 2/3; class 1: tp 1, union 2 → 1/2; class 2 in neither
    m = np.array([[2, 1, 0], [0, 1, 0], [0, 0, 0]])
    assert mean_iou(m) == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert mean_iou(m, skip=0) == pytest.approx(1 / 2)
    # a class in the truth that is never predicted counts, as 0
    assert mean_iou(np.array([[2, 0], [1, 0]])) == pytest.approx((2 / 3 + 0) / 2)
    out = mean_iou(np.stack([m, np.zeros((3, 3))]))
    assert out[0] == pytest.approx((2 / 3 + 1 / 2) / 2) and np.isnan(out[1])
