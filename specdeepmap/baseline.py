"""Per-pixel RandomForest baseline: the classic classifier every deep model must beat.

EnMAP-Box users have classified pixels with a RandomForest for a decade. A deep model that maps
worse than such a forest is not worth its training time, so every training run fits one on the
same data and scores it with the same code as the deep model: the labelled pixels of the
training chips (sampled up to a cap, fixed seed) with the same normalised bands as features,
then one pooled confusion matrix over the validation and the test chips
(:func:`specdeepmap.metrics.metrics_from_matrix`). Trees ignore monotonic band scaling, so
the normalisation changes nothing but how nodata is filled; using it keeps the features
identical to what the network sees.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from specdeepmap import storage
from specdeepmap.classes import ClassSchema, read_dataset_classes
from specdeepmap.data import DatasetInfo, chip_properties, read_dataset_folder
from specdeepmap.errors import EmptyDatasetError
from specdeepmap.evaluation import metric_name, write_test_outputs
from specdeepmap.metrics import (
    Metrics,
    accumulate,
    mean_chip_iou,
    metrics_from_matrix,
    per_chip_iou,
)
from specdeepmap.normalization import Normalization
from specdeepmap.params import BaselineParams

log = logging.getLogger(__name__)

#: metric-name prefix in MLflow runs and the figures of reports
PREFIX = "baseline_rf"


@dataclass
class BaselineScore:
    """The forest's figures on one set of chips."""

    metrics: Metrics  #: pooled confusion-matrix metrics
    chip_iou: np.ndarray  #: SpecDeepMap's per-chip mean IoU per class (its IoU CSV)
    chips: int


@dataclass
class BaselineResult:
    """What fitting and scoring the baseline produced."""

    class_values: list[int]
    train_pixels: int
    fit_seconds: float
    trees: int = 100  #: trees of the forest
    max_pixels: int = 100_000  #: the cap on labelled training pixels
    scores: dict[str, BaselineScore] = field(default_factory=dict)  #: "validation", "test"
    forest: Any = field(default=None, repr=False, compare=False)  #: the fitted classifier

    def mean_iou(self, split: str) -> float | None:
        """Pooled mean IoU on ``split`` (None if that split has no chips)."""
        score = self.scores.get(split)
        return None if score is None else score.metrics.mean_iou

    def mlflow_metrics(self, names: dict[int, str] | None = None) -> dict[str, float]:
        """``baseline_rf_val_mean_iou``, ``baseline_rf_test_mean_iou``, per-class IoU
        (``baseline_rf_test_iou_class_3_water`` with the class ``names``).
        """
        out = {}
        for split, short in (("validation", "val"), ("test", "test")):
            score = self.scores.get(split)
            if score is None:
                continue
            out[f"{PREFIX}_{short}_mean_iou"] = score.metrics.mean_iou
            out[f"{PREFIX}_{short}_overall_accuracy"] = score.metrics.overall_accuracy
            for value, iou in zip(self.class_values, score.metrics.iou, strict=True):
                if np.isfinite(iou):
                    key = metric_name(f"{PREFIX}_{short}_iou", value, (names or {}).get(value, ""))
                    out[key] = float(iou)
        return {k: float(v) for k, v in out.items() if np.isfinite(v)}

    def summary(self) -> dict:
        """Plain data for reports, flow results and the model card."""
        return {
            split: {
                "mean_iou": s.metrics.mean_iou,
                "overall_accuracy": s.metrics.overall_accuracy,
                "iou": {
                    str(c): (float(v) if np.isfinite(v) else None)
                    for c, v in zip(self.class_values, s.metrics.iou, strict=True)
                },
                "confusion_matrix": s.metrics.matrix.tolist(),
                "chips": s.chips,
                "chip_confusion_matrices": {
                    name: m.tolist() for name, m in (s.metrics.chip_matrices or {}).items()
                },
            }
            for split, s in self.scores.items()
        } | {
            "class_values": list(self.class_values),
            "train_pixels": self.train_pixels,
            "fit_seconds": self.fit_seconds,
            "trees": self.trees,
            "max_pixels": self.max_pixels,
        }


def describe_forest(summary: dict | None) -> str | None:
    """Which forest a model was compared with, in words (model card, reports), from a
    :meth:`BaselineResult.summary`; None without one.
    """
    if not summary or "train_pixels" not in summary:
        return None

    def number(n: int) -> str:
        return f"{n:,}".replace(",", " ")

    trees = f" of {summary['trees']} trees" if summary.get("trees") else ""
    cap = f" (at most {number(summary['max_pixels'])})" if summary.get("max_pixels") else ""
    return (
        f"a per-pixel RandomForest{trees} (EnMAP-Box's classifier) on the network's normalised "
        f"bands, fitted on {number(summary['train_pixels'])} labelled pixels{cap} of the same "
        "training chips"
    )


def summary_metrics(summary: dict | None, split: str) -> Metrics | None:
    """The :class:`Metrics` of ``split`` from a :meth:`BaselineResult.summary` (or None)."""
    if not summary or split not in summary:
        return None
    chips = summary[split].get("chip_confusion_matrices")  # (not in older summaries)
    return metrics_from_matrix(
        np.asarray(summary[split]["confusion_matrix"]),
        summary["class_values"],
        {name: np.asarray(m) for name, m in chips.items()} if chips else None,
    )


def read_pixels(
    image_uri: str, mask_uri: str, normalization: Normalization
) -> tuple[np.ndarray, np.ndarray]:
    """(normalised features of every pixel (pixels × bands), the (H, W) label chip)."""
    with storage.open_raster(image_uri) as src:
        image = src.read()
    with storage.open_raster(mask_uri) as src:
        truth = src.read(1).astype(np.int64)
    return normalization.apply(image).reshape(image.shape[0], -1).T, truth


def _read_chip(
    image_uri: str, mask_uri: str, normalization: Normalization, class_values: list[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features of labelled pixels (n × bands), their labels, the full label chip)."""
    features, truth = read_pixels(image_uri, mask_uri, normalization)
    keep = np.isin(truth, class_values)
    return features[keep.ravel()], truth[keep], truth


def fit_forest(
    pairs: list[tuple[str, str]],
    normalization: Normalization,
    class_values: list[int],
    params: BaselineParams = BaselineParams(),
):
    """Fit a RandomForest on the labelled pixels of ``pairs`` (at most ``max_pixels``).

    The cap is spread evenly over the chips (a random sample within each chip), so memory
    stays bounded and no single chip dominates. Returns (forest, number of training pixels).
    """
    from sklearn.ensemble import RandomForestClassifier

    rng = np.random.default_rng(params.seed)
    per_chip = max(1, params.max_pixels // max(1, len(pairs)))
    xs, ys = [], []
    for image_uri, mask_uri in pairs:
        x, y, _ = _read_chip(image_uri, mask_uri, normalization, class_values)
        if len(y) > per_chip:
            pick = rng.choice(len(y), per_chip, replace=False)
            x, y = x[pick], y[pick]
        xs.append(x)
        ys.append(y)
    y = np.concatenate(ys) if ys else np.zeros(0, np.int64)
    if len(y) == 0:
        raise EmptyDatasetError(
            "The training chips hold no labelled pixels for the RandomForest baseline"
        )
    forest = RandomForestClassifier(
        n_estimators=params.trees, n_jobs=params.n_jobs, random_state=params.seed
    )
    forest.fit(np.concatenate(xs), y)
    return forest, len(y)


def score_forest(
    forest, pairs: list[tuple[str, str]], normalization: Normalization, class_values: list[int]
) -> BaselineScore:
    """Pooled metrics and SpecDeepMap's per-chip IoU of the forest on ``pairs``."""
    k = len(class_values)
    chip_matrices, chip_ious = {}, []
    for image_uri, mask_uri in pairs:
        x, y, truth = _read_chip(image_uri, mask_uri, normalization, class_values)
        pred = np.zeros_like(truth)
        if len(y):
            pred[np.isin(truth, class_values)] = forest.predict(x)
        # (chips of one name in several folders count as one chip, as in the Tester)
        matrix = chip_matrices.setdefault(
            storage.basename(image_uri), np.zeros((k, k), dtype=np.int64)
        )
        accumulate(matrix, truth, pred, class_values)
        chip_ious.append(per_chip_iou(truth, pred, class_values))
    total = sum(chip_matrices.values(), np.zeros((k, k), dtype=np.int64))
    return BaselineScore(
        metrics_from_matrix(total, class_values, chip_matrices),
        mean_chip_iou(chip_ious, k),
        len(pairs),
    )


def pseudo_labels(
    forest, pairs: list[tuple[str, str]], normalization: Normalization, min_share: float
) -> list[np.ndarray]:
    """The forest's classes for the unlabelled pixels of each chip (semi-supervised training).

    Per chip an (H, W) array of class values: the forest's class where the chip's label is 0
    (unlabelled) and at least ``min_share`` of the trees' averaged probability agrees, 0
    elsewhere (labelled pixels keep their own label). Digitised training data usually labels
    a part of each chip (a third of the pixels in the shared EnMAP and Sentinel-2 sets); the
    pseudo-labels give the network the forest's per-pixel knowledge of the rest, around which
    it can learn spatial context, instead of leaving two thirds of every chip unused.
    """
    out = []
    for image_uri, mask_uri in pairs:
        features, truth = read_pixels(image_uri, mask_uri, normalization)
        pseudo = np.zeros(truth.shape, np.int64)
        unlabelled = truth == 0
        if unlabelled.any():
            share = forest.predict_proba(features[unlabelled.ravel()])
            best = share.argmax(axis=1)
            confident = share[np.arange(len(best)), best] >= min_share
            pseudo[unlabelled] = np.where(confident, forest.classes_[best], 0)
        out.append(pseudo)
    return out


def run_baseline(
    info: DatasetInfo, normalization: Normalization, params: BaselineParams = BaselineParams()
) -> BaselineResult:
    """Fit on the training chips, score on the validation and (if any) the test chips."""
    started = time.perf_counter()
    forest, pixels = fit_forest(info.train, normalization, info.class_values, params)
    result = BaselineResult(
        class_values=list(info.class_values),
        train_pixels=pixels,
        fit_seconds=time.perf_counter() - started,
        trees=params.trees,
        max_pixels=params.max_pixels,
        forest=forest,
    )
    for split, pairs in (("validation", info.validation), ("test", info.test)):
        if pairs:
            result.scores[split] = score_forest(forest, pairs, normalization, info.class_values)
    log.info(
        "RandomForest baseline (%d pixels, %.1f s): %s",
        pixels,
        time.perf_counter() - started,
        ", ".join(f"{s} mean IoU {v.metrics.mean_iou:.4f}" for s, v in result.scores.items()),
    )
    return result


def dataset_normalization(info: DatasetInfo) -> Normalization:
    """The dataset's own normalisation (scaler, band statistics, the chips' nodata)."""
    _, _, _, nodata, _ = chip_properties(info.train[:1])
    return Normalization(scaler=info.scaler, mean=info.band_mean, std=info.band_std, nodata=nodata)


def baseline_dataset(
    dataset: str, out_folder: str, params: BaselineParams = BaselineParams()
) -> BaselineResult:
    """``specdeepmap baseline``: fit, score and write the Tester's files for the forest.

    Writes ``test_iou.csv`` (SpecDeepMap's format), ``test_metrics.csv/json`` and the plots for
    the test chips, or for the validation chips when the dataset has no test set, plus
    ``baseline.json`` with both sets' figures.
    """
    from specdeepmap.splitting import NORMALIZE_CSV

    info = read_dataset_folder(
        dataset, normalize=storage.exists(storage.join(dataset, NORMALIZE_CSV))
    )
    result = run_baseline(info, dataset_normalization(info), params)
    write_baseline(result, out_folder, {"dataset": dataset}, read_dataset_classes(dataset))
    return result


def write_baseline(
    result: BaselineResult,
    out_folder: str,
    about: dict | None = None,
    classes: ClassSchema | None = None,
) -> None:
    """The Tester's files for the forest (on the test chips, or the validation chips when
    there is no test set, with the dataset's class names) and ``baseline.json`` with every
    set's figures.
    """
    split = "test" if "test" in result.scores else "validation"
    score = result.scores[split]
    write_test_outputs(
        out_folder,
        score.metrics,
        score.chip_iou,
        {"model": "RandomForest baseline (per pixel)", "scored_on": split, **(about or {})},
        classes=classes,
    )
    storage.write_text(
        storage.join(out_folder, "baseline.json"), json.dumps(result.summary(), indent=2)
    )
