"""Band files benchmark: chipping a scene from its original per-band files (a VRT over the 13
Sentinel-2 JP2 files at 10/20/60 m) against chipping the stacked 10 m GeoTIFF.

Uses ``../shared/data/s2l1c_brandenburg_osm`` (1536 × 768 px, 13 bands). Each variant runs in a
fresh subprocess (its own peak RSS), chips of 256 px, step 128 (overlapping, as the tutorial),
coverage 0 %, and reports the wall time, the time ratio against the stacked GeoTIFF measured
in the same run, and whether the chips equal the stacked file's (nearest) or by how much they
differ (bilinear, mean absolute difference in DN, over all bands and per band).

Usage: python benchmarks/bench_bands.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "s2l1c_brandenburg_osm"

CHILD = textwrap.dedent("""
    import json, resource, sys, time
    image, label, out = sys.argv[1:4]
    from specdeepmap.chipping import chip_scene
    from specdeepmap.params import ChipParams
    start = time.perf_counter()
    params = ChipParams(tile_x=256, tile_y=256, step_x=128, step_y=128, min_coverage=0)
    report = chip_scene(image, label, out, params, workers=2)
    print(json.dumps({"seconds": time.perf_counter() - start, "chips": report.chips,
                      "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
""")


def run(image: str, label: str, out: str) -> dict:
    """Chip a scene in a child process; its seconds, chips and peak memory."""
    done = subprocess.run(
        [sys.executable, "-c", CHILD, image, label, out], check=True, capture_output=True, text=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(folder_a: str, folder_b: str) -> np.ndarray:
    """Mean absolute difference (DN) per band between the image chips of two chip folders."""
    import rasterio

    diffs = []
    names_a = sorted(os.listdir(os.path.join(folder_a, "images")))
    names_b = sorted(os.listdir(os.path.join(folder_b, "images")))
    for a, b in zip(names_a, names_b, strict=True):
        with (
            rasterio.open(os.path.join(folder_a, "images", a)) as x,
            rasterio.open(os.path.join(folder_b, "images", b)) as y,
        ):
            diffs.append(np.abs(x.read().astype(np.int64) - y.read()).mean(axis=(1, 2)))
    return np.mean(diffs, axis=0)


def main() -> None:
    """Run the benchmark and print its table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if not DATA.exists():
        sys.exit(f"{DATA} is missing")
    from specdeepmap.bands import band_files, stack_bands

    label = str(DATA / "osm_landuse_labels_10m.tif")
    rows = []
    with tempfile.TemporaryDirectory() as work:
        images = {"stacked GeoTIFF": str(DATA / "s2l1c_T33UUU_20170216_13b_10m.tif")}
        for resampling in ("nearest", "bilinear"):
            images[f"JP2 VRT ({resampling})"] = stack_bands(
                band_files(str(DATA / "original_jp2")),
                os.path.join(work, f"s2_{resampling}.vrt"),
                resampling,
            )
        results = {}
        for name, image in images.items():
            timings = []
            for i in range(args.repeat):
                out = os.path.join(work, f"{name.split()[0]}-{name[-5:-1]}-{i}")
                timings.append(run(image, label, out))
            results[name] = (min(t["seconds"] for t in timings), timings[0], out)
        bands = [
            os.path.basename(f).split("_")[-1].split(".")[0]
            for f in band_files(str(DATA / "original_jp2"))
        ]
        base = results["stacked GeoTIFF"]
        for name, (seconds, first, out) in results.items():
            rows.append(
                (
                    name,
                    first["chips"],
                    seconds,
                    seconds / base[0],
                    first["rss_mb"],
                    compare(out, base[2]),
                )
            )
    print(
        f"{'input':<22} {'chips':>6} {'best s':>8} {'ratio':>6} {'peak RSS MB':>12} "
        f"{'mean |diff| DN':>15}"
    )
    for name, chips, seconds, ratio, rss, diff in rows:
        print(
            f"{name:<22} {chips:>6} {seconds:>8.2f} {ratio:>6.2f} {rss:>12.0f} {diff.mean():>15.2f}"
        )
    print("\nmean |diff| DN per band against the stacked GeoTIFF")
    print(f"{'input':<22} " + " ".join(f"{b:>5}" for b in bands))
    for name, *_, diff in rows[1:]:
        print(f"{name:<22} " + " ".join(f"{d:>5.1f}" for d in diff))


if __name__ == "__main__":
    main()
