"""Raster Splitter benchmark: our chipper vs one full read vs a SpecDeepMap-style baseline.

Generates 13-band uint16 tiled (DEFLATE) scenes of 2048² and 4096² px, then times, each in a
fresh subprocess so that peak RSS is its own:

* ``full read``: one sequential read of the whole image raster (the I/O floor);
* ``chip``: ``specdeepmap.chipping.chip_scene`` (tile 256, step 256, coverage 50 %);
* ``baseline``: SpecDeepMap's approach: the whole label raster in memory, then per window one
  windowed image read and one default (striped, uncompressed) GeoTIFF write per chip, one thread.

Both run with the chipper's pinned GDAL block cache (256 MB), each ``--repeats`` times,
alternating; the table gives medians, spreads and the range of the per-pair speed-up.

Usage: python benchmarks/bench_chipping.py [--sizes 2048 4096] [--workdir DIR] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap

CHILD = textwrap.dedent("""
    import json, sys, time
    mode, image, label, out = sys.argv[1:5]
    import numpy as np, rasterio  # imports are not timed
    from rasterio.windows import Window
    from specdeepmap.chipping import chip_scene
    from specdeepmap.params import ChipParams
    start = time.perf_counter()
    result = {}
    if mode == "read":
        with rasterio.open(image) as src:
            data = src.read()
        result["bytes"] = data.nbytes
    elif mode == "chip":
        params = ChipParams(tile_x=256, tile_y=256, step_x=256, step_y=256, min_coverage=50)
        report = chip_scene(image, label, out, params, workers=2)
        result["chips"] = report.chips
    else:
        import os
        os.makedirs(out + "/images"); os.makedirs(out + "/labels")
        with rasterio.open(image) as img, rasterio.open(label) as lab:
            labels = lab.read(1)  # whole label raster in memory, as SpecDeepMap does
            if img.nodata is not None:  # SpecDeepMap masks labels where band 1 is nodata
                labels[img.read(1) == img.nodata] = 0
            labels = np.pad(labels, ((0, 256), (0, 256)))
            chips = 0
            for x in range(0, img.width, 256):          # column-major, like SpecDeepMap
                for y in range(0, img.height, 256):
                    tile = labels[y:y + 256, x:x + 256]
                    if np.count_nonzero(tile) / tile.size < 0.5:
                        continue
                    data = img.read(window=Window(x, y, 256, 256), boundless=True,
                                    fill_value=img.nodata or 0)
                    profile = dict(driver="GTiff", width=256, height=256, count=img.count,
                                   dtype=img.dtypes[0], crs=img.crs, nodata=img.nodata,
                                   transform=img.window_transform(Window(x, y, 256, 256)))
                    name = f"s_tile_{x}_{y}.tif"
                    with rasterio.open(f"{out}/images/{name}", "w", **profile) as dst:
                        dst.write(data)
                    with rasterio.open(f"{out}/labels/{name}", "w", **{**profile, "count": 1,
                                       "dtype": labels.dtype}) as dst:
                        dst.write(tile[None])
                    chips += 1
        result["chips"] = chips
    result["seconds"] = time.perf_counter() - start
    # VmHWM is this program's own peak (ru_maxrss would include the parent's, kept over exec)
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
    result["peak_rss_mb"] = int(hwm.split()[1]) / 1024
    print(json.dumps(result))
""")


#: GDAL block cache of every measurement: the chipper's own default
#: (storage.DEFAULT_GDAL_CACHEMAX_MB), given to the baseline too, so that neither's memory or
#: speed is a matter of cache policy (GDAL's default is 5 % of RAM)
GDAL_CACHEMAX_MB = 256


def run(mode: str, image: str, label: str, out: str) -> dict:
    """Run one measurement in a fresh interpreter and return its JSON result."""
    import shutil

    if out:
        shutil.rmtree(out, ignore_errors=True)  # a repeat writes anew
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, mode, image, label, out],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "GDAL_CACHEMAX": str(GDAL_CACHEMAX_MB)},
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def median(runs: list[dict]) -> dict:
    """The run of median seconds."""
    return sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]


def spread(runs: list[dict]) -> str:
    """Fastest–slowest seconds."""
    seconds = [r["seconds"] for r in runs]
    return f"{min(seconds):.2f}–{max(seconds):.2f}"


def main() -> None:
    """Generate the scenes, run the measurements per size, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--workdir", default=None)
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="runs of the chipper and of the baseline each, alternating (medians and spreads)",
    )
    args = parser.parse_args()
    from specdeepmap.sample_data import generate_scene

    workdir = args.workdir or tempfile.mkdtemp(prefix="bench-chipping-")
    rows = []
    for size in args.sizes:
        scene = generate_scene(os.path.join(workdir, f"s{size}"), size, size, seed=1)
        read = run("read", scene.image_uri, scene.label_uri, "")
        ours, base = [], []
        for _ in range(args.repeats):
            ours.append(
                run("chip", scene.image_uri, scene.label_uri, os.path.join(workdir, f"c{size}"))
            )
            base.append(
                run("baseline", scene.image_uri, scene.label_uri, os.path.join(workdir, f"b{size}"))
            )
        rows.append((size, read, ours, base))

    print(
        f"\nRaster Splitter, 13-band uint16 DEFLATE tiled scene, tile 256, step 256, "
        f"coverage 50 %, {os.cpu_count()} cores, GDAL_CACHEMAX {GDAL_CACHEMAX_MB} MB for both, "
        f"median (fastest–slowest) of {args.repeats} alternating run(s) each"
    )
    header = (
        "scene",
        "chips",
        "chip s",
        "chips/s",
        "MB/s",
        "full read s",
        "chip/read",
        "baseline s",
        "speed-up (range)",
        "RSS chip MB",
        "RSS base MB",
        "RSS read MB",
    )
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for size, read, ours_runs, base_runs in rows:
        ours, base = median(ours_runs), median(base_runs)
        assert ours["chips"] == base["chips"], (ours, base)
        chip_mb = ours["chips"] * 256 * 256 * 13 * 2 / 1e6
        ratios = [b["seconds"] / o["seconds"] for o, b in zip(ours_runs, base_runs, strict=True)]
        print(
            " | ".join(
                [
                    f"{size}²",
                    str(ours["chips"]),
                    f"{ours['seconds']:.2f} ({spread(ours_runs)})",
                    f"{ours['chips'] / ours['seconds']:.0f}",
                    f"{chip_mb / ours['seconds']:.0f}",
                    f"{read['seconds']:.2f}",
                    f"{ours['seconds'] / read['seconds']:.2f}",
                    f"{base['seconds']:.2f} ({spread(base_runs)})",
                    f"{base['seconds'] / ours['seconds']:.1f}x "
                    f"({min(ratios):.1f}–{max(ratios):.1f})",
                    f"{max(r['peak_rss_mb'] for r in ours_runs):.0f}",
                    f"{max(r['peak_rss_mb'] for r in base_runs):.0f}",
                    f"{read['peak_rss_mb']:.0f}",
                ]
            )
        )


if __name__ == "__main__":
    main()
