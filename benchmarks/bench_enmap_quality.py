"""Model quality on the real EnMAP Potsdam chips (224 bands): U-Net vs per-pixel RandomForest.

Splits the 18 shipped chips (../shared/data/enmap_potsdam) 60/20/20 with the Dataset Maker,
trains a small U-Net on CPU with the Trainer, and trains a scikit-learn RandomForest on the
labelled pixels of the same training chips. Both are scored on the same test chips with the
same pooled confusion matrix (mean IoU over classes 1–6).

Usage: python benchmarks/bench_enmap_quality.py [--epochs 60] [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio


def read_pairs(pairs):
    """(pixels × bands features, labels) of all labelled pixels of the chips."""
    features, labels = [], []
    for image, mask in pairs:
        with rasterio.open(image) as src, rasterio.open(mask) as lab:
            x = src.read().reshape(src.count, -1).T
            y = lab.read(1).ravel().astype(np.int64)
        keep = y > 0
        features.append(x[keep])
        labels.append(y[keep])
    return np.concatenate(features), np.concatenate(labels)


def main() -> None:
    """Split, train both models, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared"
                                              / "data"))
    args = parser.parse_args()
    from sklearn.ensemble import RandomForestClassifier

    from specdeepmap.data import read_dataset_folder
    from specdeepmap.evaluation import accumulate, evaluate_model, metrics_from_matrix
    from specdeepmap.splitting import SplitParams, make_dataset
    from specdeepmap.training import TrainConfig, train

    chips = os.path.join(args.data, "enmap_potsdam")
    work = tempfile.mkdtemp(prefix="bench-enmap-")
    make_dataset(chips, SplitParams(60, 20, 20), out_folder=os.path.join(work, "ds"))
    info = read_dataset_folder(os.path.join(work, "ds"))
    classes = info.class_values

    start = time.perf_counter()
    result = train(TrainConfig(
        dataset=os.path.join(work, "ds"), out=os.path.join(work, "run"), epochs=args.epochs,
        batch_size=4, lr=1e-3, device="cpu", early_stopping=False,
        tracking_uri=f"sqlite:///{work}/mlflow.db", registered_model=None))
    unet_seconds = time.perf_counter() - start
    report = evaluate_model(os.path.join(work, "ds", "test_files.csv"), result.model_file,
                            os.path.join(work, "test"), device="cpu")

    start = time.perf_counter()
    x_train, y_train = read_pairs(info.train)
    forest = RandomForestClassifier(n_estimators=200, n_jobs=-1, random_state=0)
    forest.fit(np.nan_to_num(x_train), y_train)
    matrix = np.zeros((len(classes), len(classes)), np.int64)
    x_test, y_test = read_pairs(info.test)
    accumulate(matrix, y_test, forest.predict(np.nan_to_num(x_test)), classes)
    forest_metrics = metrics_from_matrix(matrix, classes)
    forest_seconds = time.perf_counter() - start

    print(f"\nEnMAP Potsdam, 224 bands, 18 chips of 32² split 60/20/20 "
          f"({len(info.train)}/{len(info.validation)}/{len(info.test)}), CPU, "
          f"{len(y_train)} labelled training pixels, {len(y_test)} test pixels")
    print("model | train s | test mean IoU (pooled) | overall accuracy | per-class IoU")
    print("--- | --- | --- | --- | ---")
    for name, seconds, m in (
            (f"U-Net/ResNet-18, {args.epochs} epochs", unet_seconds, report.metrics),
            ("RandomForest, 200 trees, per pixel", forest_seconds, forest_metrics)):
        per_class = " ".join(f"{c}:{v:.2f}" for c, v in zip(classes, np.nan_to_num(m.iou)))
        print(f"{name} | {seconds:.0f} | {m.mean_iou:.3f} | {m.overall_accuracy:.3f} | "
              f"{per_class}")


if __name__ == "__main__":
    main()
