"""How much a pixel's neighbours tell about its class, on the real data sets.

A per-pixel classifier sees one spectrum; a segmentation network also sees the pixels around
it. Where neighbours share a class, that context is what a network can add over the
RandomForest; where classes change from pixel to pixel, it has nothing to add but a better
reading of the spectrum. This benchmark measures which case a data set is, without training a
network: the forest's class probabilities are averaged over a moving window (w × w pixels,
w = 1 is the forest as it is) before the argmax, and scored by the same cross-validation as
``bench_quality.py --folds`` (every development chip a test chip once, confusion matrices
pooled over the folds; the held-out part is left out, as everywhere but ``--final``). The
ratio column is the smoothed forest's test mean IoU over the per-pixel forest's.

Usage: python benchmarks/bench_spatial_context.py [--sets enmap s2] [--folds 6]
       [--windows 1 3 5 7]
Takes about a minute per set on 2 cores (six forests each).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from bench_quality import DATA, SETS, fold_datasets
from scipy.ndimage import uniform_filter

from specdeepmap.baseline import dataset_normalization, fit_forest, read_pixels
from specdeepmap.data import read_dataset_folder
from specdeepmap.metrics import accumulate, metrics_from_matrix
from specdeepmap.params import BaselineParams


def smoothed_forest_matrices(
    datasets: list[str], windows: list[int], seed: int
) -> tuple[dict[int, dict[str, np.ndarray]], list[int]]:
    """Per window, each test chip's confusion matrix of the window-averaged forest."""
    matrices: dict[int, dict[str, np.ndarray]] = {w: {} for w in windows}
    for dataset in datasets:
        info = read_dataset_folder(dataset)
        normalization = dataset_normalization(info)
        classes = info.class_values
        forest, _ = fit_forest(info.train, normalization, classes, BaselineParams(seed=seed))
        for image, mask in info.test:
            features, truth = read_pixels(image, mask, normalization)
            proba = forest.predict_proba(features).T.reshape(-1, *truth.shape)
            for w in windows:
                smooth = (
                    proba
                    if w == 1
                    else np.stack([uniform_filter(p, w, mode="nearest") for p in proba])
                )
                matrix = np.zeros((len(classes), len(classes)), np.int64)
                accumulate(matrix, truth, forest.classes_[smooth.argmax(axis=0)], classes)
                matrices[w][image] = matrix
    return matrices, classes


def main() -> None:
    """Cross-validate the smoothed forests per set; print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=["enmap", "s2"], choices=["enmap", "s2"])
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--folds", type=int, default=6)
    parser.add_argument("--windows", type=int, nargs="+", default=[1, 3, 5, 7])
    parser.add_argument("--seed", type=int, default=0, help="The forest's seed.")
    args = parser.parse_args()
    windows = sorted(set(args.windows) | {1})
    work = tempfile.mkdtemp(prefix="bench-context-")
    print("set | window | test mean IoU | test OA | chips | ratio to the per-pixel forest")
    print("--- | --- | --- | --- | --- | ---")
    for name in args.sets:
        prepare, split = SETS[name]
        chips = prepare(Path(args.data), work)
        datasets = fold_datasets(name, chips, split(), args.folds, work)
        matrices, classes = smoothed_forest_matrices(datasets, windows, args.seed)
        scores = {w: metrics_from_matrix(sum(m.values()), classes, m) for w, m in matrices.items()}
        for w in windows:
            print(
                f"{name} | {w} × {w} | {scores[w].mean_iou:.3f} | "
                f"{scores[w].overall_accuracy:.3f} | {len(matrices[w])} | "
                f"{scores[w].mean_iou / scores[1].mean_iou:.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
