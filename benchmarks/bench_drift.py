"""Drift verdict calibration on the shared Sentinel-2 scene: its parts, and shifted copies.

The verdict's thresholds (``specdeepmap.drift.THRESHOLDS``) must let ordinary scenes pass and
catch changed numbers. This script measures, on the real 13-band L1C scene of
``../shared/data/s2l1c_brandenburg_osm``:

* every part against every other part (west/east halves, four quadrants): the input scores a
  model trained on one part would give a scene of another (training statistics = the part's
  per-band mean and standard deviation after the scaler 10 000, as a model carries them), and
  the Jensen–Shannon divergence of the two parts' label class shares (how much the class
  composition of ordinary scenes differs);
* the east half against the west half's statistics after: +1000 on every band (Sentinel-2's
  processing baseline 04.00), ×2 (another gain), ÷10 000 (0–1 reflectance where the model
  expects × 10 000), and milder changes (+200, ×1.2) that stay within the thresholds.

Usage: python benchmarks/bench_drift.py [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np
import rasterio

from specdeepmap.drift import THRESHOLDS, OutputStatistics, SceneStatistics, js_divergence, judge

FOLDER = "s2l1c_brandenburg_osm"
SCALER = 10000.0


def parts(array: np.ndarray) -> dict[str, np.ndarray]:
    """West/east halves and the four quadrants of a (..., rows, cols) array."""
    rows, cols = array.shape[-2:]
    out = {"west": array[..., :, : cols // 2], "east": array[..., :, cols // 2 :]}
    for i, j in itertools.product(range(2), range(2)):
        out[f"q{i}{j}"] = array[
            ..., i * rows // 2 : (i + 1) * rows // 2, j * cols // 2 : (j + 1) * cols // 2
        ]
    return out


def trained_on(pixels: np.ndarray) -> dict:
    """A model's normalisation from training pixels (bands, rows, cols)."""
    flat = pixels.reshape(pixels.shape[0], -1) / SCALER
    return {"mean": flat.mean(1).tolist(), "std": flat.std(1).tolist()}


def verdict(normalization: dict, scene: np.ndarray):
    """The input verdict of a scene against a model's statistics."""
    stats = SceneStatistics(scene.shape[0], SCALER)
    stats.add(scene.reshape(scene.shape[0], -1))
    return judge(stats, OutputStatistics(1), normalization, None)


def shares(labels: np.ndarray) -> np.ndarray:
    """Class shares of the labelled pixels (values 1..8)."""
    counts = np.bincount(labels[labels > 0].ravel(), minlength=9)[1:].astype(float)
    return counts / counts.sum()


def main() -> None:
    """Print the calibration tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).parents[1] / ".." / "shared" / "data"))
    args = parser.parse_args()
    folder = Path(args.data) / FOLDER
    with rasterio.open(folder / "s2l1c_T33UUU_20170216_13b_10m.tif") as src:
        image = src.read().astype(np.float64)
    with rasterio.open(folder / "osm_landuse_labels_10m.tif") as src:
        labels = src.read(1)
    images, label_parts = parts(image), parts(labels)
    print(f"Thresholds: {THRESHOLDS}\n")
    print(
        "training part | scene part | median band shift | gain | offset | label shares JS | verdict"
    )
    print("--- | --- | --- | --- | --- | --- | ---")
    for a, b in itertools.permutations(images, 2):
        if {a, b} in ({"west", "east"},) or (a.startswith("q") and b.startswith("q")):
            found = verdict(trained_on(images[a]), images[b])
            js = js_divergence(shares(label_parts[a]), shares(label_parts[b]))
            s = found.scores
            print(
                f"{a} | {b} | {s['median_band_shift']:.2f} | {s['gain']:.3f} | "
                f"{s['offset']:+.3f} | {js:.3f} | {found.status}"
            )
    print("\nEast half against the west half's statistics, changed")
    print("change | median band shift | gain | offset | verdict | reason")
    print("--- | --- | --- | --- | --- | ---")
    normalization, east = trained_on(images["west"]), images["east"]
    changes = {
        "none": east,
        "+200": east + 200,
        "x1.2": east * 1.2,
        "+1000 (baseline 04.00)": east + 1000,
        "x2": east * 2,
        "0-1 reflectance": east / SCALER,
    }
    for name, scene in changes.items():
        found = verdict(normalization, scene)
        s = found.scores
        print(
            f"{name} | {s['median_band_shift']:.2f} | {s['gain']:.4g} | {s['offset']:+.3f} | "
            f"{found.status} | {'; '.join(found.reasons) or '–'}"
        )


if __name__ == "__main__":
    main()
