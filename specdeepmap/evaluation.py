"""Deep Learning Tester: per-class IoU and confusion-matrix metrics on a test CSV.

Two IoU definitions are reported and named:

* ``IoU`` in SpecDeepMap's CSV (``Class,IoU`` rows, then ``Mean IoU``) is SpecDeepMap's
  definition: per chip and class, |pred ∩ truth| / |pred ∪ truth| (NaN when both are empty),
  averaged over chips ignoring NaN, then over classes. It over-weights small chips and rare
  local occurrences.
* the dataset-level metrics come from one confusion matrix accumulated over every labelled
  pixel of every chip: per-class IoU, precision, recall, F1, overall accuracy and mean IoU.

Pixels labelled 0 (unlabelled) are left out of both when 'mask unlabelled' is on (default).
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import rasterio

from specdeepmap import storage
from specdeepmap.classes import ClassSchema
from specdeepmap.comparison import Difference, paired_bootstrap
from specdeepmap.errors import EmptyDatasetError, InputMismatchError
from specdeepmap.inference import Predictor, load_model
from specdeepmap.leakage import Leakage, chip_units, read_split_leakage, split_block_size
from specdeepmap.metrics import (
    Metrics,
    accumulate,
    mean_chip_iou,
    metrics_from_matrix,
    per_chip_iou,
)
from specdeepmap.params import EvaluateParams

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


def metric_name(kind: str, value: int, name: str) -> str:
    """An MLflow metric name for one class: ``test_iou_class_3_water`` (the value alone
    when the class has no name).
    """
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    return f"{kind}_class_{value}" + (f"_{slug}" if slug and slug != str(value) else "")


def write_iou_csv(
    uri: str, class_values: list[int], iou: np.ndarray, names: list[str] | None = None
) -> None:
    """SpecDeepMap's IoU CSV: ``Class,IoU`` rows per class, then ``Mean IoU``. With class
    ``names`` a third column ``Name`` follows (SpecDeepMap's two columns stay as they are).
    """
    mean = float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")
    if names is None:
        lines = ["Class,IoU"] + [f"{c},{v}" for c, v in zip(class_values, iou, strict=True)]
        lines.append(f"Mean IoU,{mean}")
    else:
        lines = ["Class,IoU,Name"] + [
            f"{c},{v},{_csv_field(n)}" for c, v, n in zip(class_values, iou, names, strict=True)
        ]
        lines.append(f"Mean IoU,{mean},")
    storage.write_text(uri, "\n".join(lines) + "\n")


def _csv_field(text: str) -> str:
    return f'"{text.replace(chr(34), chr(34) * 2)}"' if any(c in text for c in ',"\n') else text


def plot_metrics(
    metrics: Metrics, folder: str, baseline: Metrics | None = None, names: list[str] | None = None
) -> tuple[str, str]:
    """Confusion-matrix PNG (row-normalised) and per-class IoU bar chart (with the baseline's
    bars beside the model's when given); axes labelled with the class ``names``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(metrics.class_values)
    labels = names or [str(c) for c in metrics.class_values]
    fig, ax = plt.subplots(figsize=(2.2 + 0.6 * k, 2 + 0.6 * k))
    rows = metrics.matrix.sum(axis=1, keepdims=True)
    norm = np.divide(metrics.matrix, rows, out=np.zeros(metrics.matrix.shape), where=rows > 0)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), labels, rotation=45 if names else 0, ha="right" if names else "center")
    ax.set_yticks(range(k), labels)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    for i in range(k):
        for j in range(k):
            ax.text(
                j,
                i,
                f"{norm[i, j]:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if norm[i, j] > 0.5 else "black",
            )
    ax.set_title("Confusion matrix (row-normalised)")
    fig.tight_layout()
    matrix_uri = storage.join(folder, "confusion_matrix.png")
    with storage.atomic_output(matrix_uri) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(1.5 + 0.5 * k, 3.5 if names else 3))
    x = np.arange(k)
    title = f"mean IoU {metrics.mean_iou:.3f}"
    if baseline is None:
        ax.bar(x, np.nan_to_num(metrics.iou))
    else:
        ax.bar(x - 0.2, np.nan_to_num(metrics.iou), width=0.4, label="model")
        ax.bar(x + 0.2, np.nan_to_num(baseline.iou), width=0.4, label="RandomForest")
        ax.legend(fontsize=7)
        title += f" (RandomForest {baseline.mean_iou:.3f})"
    ax.set_xticks(x, labels, rotation=45 if names else 0, ha="right" if names else "center")
    ax.set_ylim(0, 1)
    ax.set_xlabel("class")
    ax.set_ylabel("IoU (pooled pixels)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    bars_uri = storage.join(folder, "class_iou.png")
    with storage.atomic_output(bars_uri) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return matrix_uri, bars_uri


def write_test_outputs(
    out_folder: str,
    metrics: Metrics,
    chip_iou: np.ndarray,
    about: dict,
    baseline: Metrics | None = None,
    classes: ClassSchema | None = None,
    versus_baseline: Difference | None = None,
) -> tuple[str, str, tuple[str, str], dict]:
    """Write the Tester's files: ``test_iou.csv`` (SpecDeepMap's format), ``test_metrics.csv``
    and ``.json`` and the two PNGs; ``baseline`` metrics go beside the model's, and class
    names (from ``classes``, when it names them) beside the class values, and
    ``versus_baseline`` (:func:`compare_with_baseline`) as the JSON's
    ``baseline_rf_difference``.

    Returns (IoU CSV URI, metrics CSV URI, plot URIs, the JSON summary).
    """
    storage.makedirs(out_folder)
    iou_csv = storage.join(out_folder, "test_iou.csv")
    names = (
        [classes.name(v) for v in metrics.class_values]
        if classes is not None and classes.named
        else None
    )
    write_iou_csv(iou_csv, metrics.class_values, chip_iou, names)
    table = metrics.table()
    if names:
        table.insert(1, "Name", names)
    summary = {
        "mean_iou_pooled": metrics.mean_iou,
        "overall_accuracy": metrics.overall_accuracy,
        "mean_iou_per_chip_specdeepmap": float(np.nanmean(chip_iou))
        if np.isfinite(chip_iou).any()
        else float("nan"),
        "class_values": metrics.class_values,
        "class_names": names,
        **about,
        "confusion_matrix": metrics.matrix.tolist(),
    }
    if metrics.chip_matrices is not None:  # for paired comparisons with other models later
        summary["chip_confusion_matrices"] = {
            name: m.tolist() for name, m in metrics.chip_matrices.items()
        }
    if metrics.chip_units is not None:  # resampled together: touching chips, a split's blocks
        summary["chip_units"] = metrics.chip_units
    if baseline is not None:
        table["Baseline RF IoU"] = baseline.iou
        summary |= {
            "baseline_rf_mean_iou": baseline.mean_iou,
            "baseline_rf_overall_accuracy": baseline.overall_accuracy,
            "baseline_rf_iou": [None if not np.isfinite(v) else float(v) for v in baseline.iou],
        }
        if versus_baseline is not None:
            summary["baseline_rf_difference"] = versus_baseline.to_dict()
    summary["per_class"] = json.loads(table.to_json(orient="records"))  # NaN → null
    metrics_csv = storage.join(out_folder, "test_metrics.csv")
    storage.write_text(metrics_csv, table.to_csv(index=False))
    storage.write_text(storage.join(out_folder, "test_metrics.json"), json.dumps(summary, indent=2))
    plots = plot_metrics(metrics, out_folder, baseline, names)
    return iou_csv, metrics_csv, plots, summary


def compare_with_baseline(metrics: Metrics, baseline: Metrics) -> Difference | None:
    """The model's mean IoU minus the baseline's on the same chips, with its interval; None
    (with a warning) when either lacks per-chip matrices or they were scored on other chips.
    """
    if metrics.chip_matrices is None or baseline.chip_matrices is None:
        return None
    try:
        return paired_bootstrap(
            metrics.chip_matrices, baseline.chip_matrices, units=metrics.chip_units
        )
    except InputMismatchError as error:
        log.warning("No interval for the difference with the baseline: %s", error)
        return None


@dataclass
class EvaluationReport:
    """What the Tester produced."""

    iou_csv: str
    metrics_csv: str
    metrics: Metrics
    per_chip_mean_iou: float
    plots: tuple[str, str]
    predictions: list[str]
    #: mean IoU minus the baseline's on these chips, with its interval (given a baseline)
    versus_baseline: Difference | None = None
    #: how far the test chips touch training chips (from the dataset's ``split.json``)
    split_leakage: Leakage | None = None
    #: the model's class names by value
    class_names: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TestFigures:
    """The Tester's figures that the steps after it use: promotion, the model card, a flow's
    summary (the report without its files and per-chip matrices).
    """

    __test__ = False  # a result, not a pytest class

    mean_iou: float  #: pooled over the test chips' pixels
    mean_iou_per_chip: float  #: SpecDeepMap's per-chip mean
    overall_accuracy: float
    iou_csv: str
    forest_mean_iou: float | None = None  #: the RandomForest's on the same chips
    versus_forest: Difference | None = None  #: mean IoU − the forest's, with its interval
    split_leakage: Leakage | None = None

    @classmethod
    def of(cls, report: EvaluationReport, forest: Metrics | None = None) -> TestFigures:
        """The figures of a Tester's report (``forest``: the RandomForest's on its chips)."""
        return cls(
            mean_iou=report.metrics.mean_iou,
            mean_iou_per_chip=report.per_chip_mean_iou,
            overall_accuracy=report.metrics.overall_accuracy,
            iou_csv=report.iou_csv,
            forest_mean_iou=forest.mean_iou if forest is not None else None,
            versus_forest=report.versus_baseline,
            split_leakage=report.split_leakage,
        )

    def to_dict(self) -> dict:
        """Plain data under the names a flow's summary gives them."""
        return {
            "test_mean_iou": self.mean_iou,
            "test_mean_iou_per_chip": self.mean_iou_per_chip,
            "overall_accuracy": self.overall_accuracy,
            "iou_csv": self.iou_csv,
            "baseline_rf_test_mean_iou": self.forest_mean_iou,
            "baseline_rf_difference": self.versus_forest.to_dict()
            if self.versus_forest is not None
            else None,
            "split_leakage": self.split_leakage.to_dict()
            if self.split_leakage is not None
            else None,
        }


def evaluate_model(
    test_csv: str,
    model_uri: str,
    out_folder: str,
    params: EvaluateParams = EvaluateParams(),
    predictions_folder: str | None = None,
    mlflow_run_id: str | None = None,
    baseline: Metrics | None = None,
    log_to_mlflow: bool = True,
) -> EvaluationReport:
    """Predict every chip of a test CSV and measure the model (Deep Learning Tester).

    Args:
        test_csv: ``test_files.csv`` (rows relative to its folder, or absolute URIs).
        model_uri: checkpoint / model file path or URI, or ``models:/NAME/VERSION|@ALIAS``.
        out_folder: where ``test_iou.csv`` (SpecDeepMap format), ``test_metrics.csv``,
            ``test_metrics.json`` and the two PNGs go.
        params: device, batch size, masking of exported predictions and test-time
            augmentation (:class:`~specdeepmap.params.EvaluateParams`; TTA did not raise
            validation IoU on the shared real data sets, see docs/recipe.md).
        predictions_folder: optional folder for ``{chip}_prediction.tif`` (georeferenced
            like the chip; created when missing).
        mlflow_run_id: log the outputs to this MLflow run (default: the registered model's run).
        baseline: the RandomForest baseline's metrics on the same chips, shown beside the
            model's in ``test_metrics.csv/json`` and the IoU plot.
        log_to_mlflow: log metrics and files to the model's MLflow run (off when another
            model's test chips are scored, e.g. the champion's in a promotion).
    """
    # here: the mapper imports this module, and this brings the tables' pandas along
    from specdeepmap.data import read_chip_list

    pairs = read_chip_list(test_csv)
    if not pairs:
        raise EmptyDatasetError(f"{test_csv} lists no chips")
    predictor = load_model(model_uri, params.device)
    class_values = predictor.class_values
    scores, exported = _score_chips(
        pairs, predictor, params, predictions_folder, test_csv, model_uri
    )
    scores.warn_foreign(test_csv, model_uri)
    metrics = scores.metrics(split_block_size(storage.parent(test_csv)))
    versus = compare_with_baseline(metrics, baseline) if baseline is not None else None
    leakage = read_split_leakage(storage.parent(test_csv))
    iou_csv, metrics_csv, plots, summary = write_test_outputs(
        out_folder,
        metrics,
        mean_chip_iou(scores.ious, len(class_values)),
        {
            "model": model_uri,
            "test_csv": test_csv,
            "tta": params.tta,
            "split_leakage": leakage.to_dict() if leakage else None,
        },
        baseline=baseline,
        classes=predictor.classes,
        versus_baseline=versus,
    )
    report = EvaluationReport(
        iou_csv=iou_csv,
        metrics_csv=metrics_csv,
        metrics=metrics,
        per_chip_mean_iou=summary["mean_iou_per_chip_specdeepmap"],
        plots=plots,
        predictions=exported,
        versus_baseline=versus,
        split_leakage=leakage,
        class_names={v: predictor.classes.name(v) for v in class_values},
    )
    if log_to_mlflow:
        _log_to_mlflow(report, model_uri, mlflow_run_id, out_folder)
    _log_report(report, test_csv)
    return report


def _log_report(report: EvaluationReport, test_csv: str) -> None:
    """The figures a user reads first: the comparison with the forest, a leak, the IoU."""
    if report.versus_baseline is not None:
        log.info(report.versus_baseline.sentence("The model", "the RandomForest baseline"))
    leakage = report.split_leakage
    if leakage is not None and leakage.test.touching_chips:
        log.warning("%s: %s", test_csv, leakage.sentence())
    log.info(
        "Test mean IoU: %.4f pooled over pixels, %.4f per-chip mean (SpecDeepMap)",
        report.metrics.mean_iou,
        report.per_chip_mean_iou,
    )


def _exported_classes(
    pred: np.ndarray, truth: np.ndarray, image: np.ndarray, nodata, mask_unlabelled: bool
) -> np.ndarray:
    """A chip's prediction as exported: 0 where the chip is unlabelled (when asked) and
    where the image has no data.
    """
    out = pred.copy()
    if mask_unlabelled:
        out[truth == 0] = 0
    if nodata is not None:
        out[np.all(image == nodata, axis=0)] = 0
    return out


def _score_chips(
    pairs: list[tuple[str, str]],
    predictor: Predictor,
    params: EvaluateParams,
    predictions_folder: str | None,
    test_csv: str,
    model_uri: str,
) -> tuple[ChipScores, list[str]]:
    """Predict the chips a batch at a time and score each; with ``predictions_folder``
    each chip's prediction is written there too (returned: their URIs).
    """
    class_values = predictor.class_values
    scores = ChipScores(class_values)
    exported = []
    if predictions_folder:
        storage.makedirs(predictions_folder)
    for start in range(0, len(pairs), params.batch_size):
        batch_pairs = pairs[start : start + params.batch_size]
        images, labels, profiles = _read_chips(batch_pairs, predictor.in_channels, model_uri)
        if len({i.shape for i in images}) > 1:
            raise InputMismatchError(f"Chips of {test_csv} differ in size")
        preds = predictor.predict_classes(np.stack(images), tta=params.tta)
        for (image_uri, _), image, truth, pred, profile in zip(
            batch_pairs, images, labels, preds, profiles, strict=True
        ):
            scores.add(storage.basename(image_uri), truth, pred)
            if predictions_folder:
                uri = storage.join(predictions_folder, f"{storage.stem(image_uri)}_prediction.tif")
                out = _exported_classes(pred, truth, image, profile[2], params.mask_unlabelled)
                exported.append(_write_prediction(uri, out, profile, max(class_values)))
    return scores, exported


class ChipScores:
    """Each test chip's figures as the Tester collects them: its confusion matrix and
    SpecDeepMap's per-chip IoU by chip name, its size, and the labelled values the model
    does not know (left out of every figure, and warned about).
    """

    def __init__(self, class_values: list[int]):
        self.class_values = class_values
        self.k = len(class_values)
        self.ious: list[np.ndarray] = []
        self.matrices: dict[str, np.ndarray] = {}
        self.sizes: dict[str, tuple[int, int]] = {}
        self.foreign: set[int] = set()
        self.foreign_pixels = 0

    def add(self, name: str, truth: np.ndarray, pred: np.ndarray) -> None:
        """One chip's truth and prediction (class values; 0: unlabelled)."""
        # per chip name (they sum to the pooled matrix; for paired comparisons, chips of
        # one name in several folders count as one chip, for both models alike)
        matrix = self.matrices.setdefault(name, np.zeros((self.k, self.k), dtype=np.int64))
        accumulate(matrix, truth, pred, self.class_values)
        self.sizes[name] = truth.shape
        self.ious.append(per_chip_iou(truth, np.where(truth == 0, 0, pred), self.class_values))
        unknown = (truth != 0) & ~np.isin(truth, self.class_values)
        if unknown.any():
            self.foreign.update(np.unique(truth[unknown]).tolist())
            self.foreign_pixels += int(unknown.sum())

    def metrics(self, block_size: int | None) -> Metrics:
        """The pooled metrics, each chip's matrix and its independent unit (chips that touch,
        and the split's spatial blocks of ``block_size`` chips, resampled together).
        """
        matrix = sum(self.matrices.values(), np.zeros((self.k, self.k), dtype=np.int64))
        metrics = metrics_from_matrix(matrix, self.class_values, self.matrices)
        metrics.chip_units = chip_units(self.sizes, block_size)
        return metrics

    def warn_foreign(self, test_csv: str, model_uri: str) -> None:
        """Say which labelled values no figure counts because the model does not know them."""
        if not self.foreign:
            return
        warnings.warn(
            f"{test_csv}: {self.foreign_pixels} labelled pixel(s) hold class value(s) "
            f"{', '.join(map(str, sorted(self.foreign)))} that the model {model_uri} does "
            f"not predict (it knows {', '.join(map(str, self.class_values))}): they are left "
            "out of every figure; were these chips made for another model?",
            stacklevel=3,
        )


def _read_chips(
    pairs: list[tuple[str, str]], bands: int, model_uri: str
) -> tuple[list[np.ndarray], list[np.ndarray], list[tuple]]:
    """The image chips (refused unless they have the model's ``bands``), their labels and
    each chip's (transform, CRS, nodata).
    """
    images, labels, profiles = [], [], []
    for image_uri, mask_uri in pairs:
        with storage.open_raster(image_uri) as src:
            if src.count != bands:
                raise InputMismatchError(
                    f"{image_uri} has {src.count} bands, the model {model_uri} expects {bands}"
                )
            images.append(src.read())
            profiles.append((src.transform, src.crs, src.nodata))
        with storage.open_raster(mask_uri) as src:
            labels.append(src.read(1).astype(np.int64))
    return images, labels, profiles


def _write_prediction(uri: str, classes: np.ndarray, profile: tuple, largest: int) -> str:
    """A chip's predicted classes as a GeoTIFF on the chip's grid (nodata 0), written
    atomically; uint16 when a class value passes 255.
    """
    transform, crs, _ = profile
    dtype = "uint8" if largest < 256 else "uint16"
    with (
        storage.atomic_output(uri) as tmp,
        rasterio.open(
            tmp,
            "w",
            driver="GTiff",
            width=classes.shape[1],
            height=classes.shape[0],
            count=1,
            dtype=dtype,
            crs=crs,
            transform=transform,
            nodata=0,
        ) as dst,
    ):
        dst.write(classes.astype(dtype)[None])
    return uri


def _log_to_mlflow(
    report: EvaluationReport, model_uri: str, run_id: str | None, out_folder: str
) -> None:
    """Log test metrics and files to the model's MLflow run, when there is one."""
    if run_id is None and model_uri.startswith("models:/"):
        import mlflow

        client = mlflow.MlflowClient()
        reference = model_uri[len("models:/") :]
        if "@" in reference:
            version = client.get_model_version_by_alias(*reference.split("@", 1))
        else:
            version = client.get_model_version(*reference.split("/", 1))
        run_id = version.run_id
    if run_id is None:
        return
    import mlflow

    client = mlflow.MlflowClient()
    client.log_metric(run_id, "test_mean_iou", report.metrics.mean_iou)
    client.log_metric(run_id, "test_mean_iou_per_chip", report.per_chip_mean_iou)
    client.log_metric(run_id, "test_overall_accuracy", report.metrics.overall_accuracy)
    if report.versus_baseline is not None:
        versus = report.versus_baseline
        for suffix, value in (
            ("", versus.difference),
            ("_low", versus.low),
            ("_high", versus.high),
        ):
            client.log_metric(run_id, f"test_mean_iou_minus_baseline_rf{suffix}", value)
    m = report.metrics
    for name, values in (("iou", m.iou), ("precision", m.precision), ("recall", m.recall)):
        for c, v in zip(m.class_values, values, strict=True):
            if np.isfinite(v):
                key = metric_name(f"test_{name}", c, report.class_names.get(c, ""))
                client.log_metric(run_id, key, float(v))
    with tempfile.TemporaryDirectory() as tmp:  # S3 outputs are logged from a local copy
        for uri in (
            report.iou_csv,
            report.metrics_csv,
            *report.plots,
            storage.join(out_folder, "test_metrics.json"),
        ):
            local = (
                uri
                if not storage.is_s3(uri)
                else storage.download(uri, os.path.join(tmp, storage.basename(uri)))
            )
            client.log_artifact(run_id, storage.local_path(local), artifact_path="test")
