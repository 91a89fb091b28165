"""Offline cloud masks for scenes that ship none (Sentinel-2 L1C has no SCL layer).

``s2cloudless`` (Sentinel Hub's LightGBM pixel classifier, its model inside the PyPI package,
CC BY-SA 4.0; ``pip install 'specdeepmap[cloud]'``) gives each pixel a cloud probability from
ten L1C bands; probabilities are smoothed over a disk, thresholded and dilated. It runs on a
grid of about 120 m: the scene's pixels are averaged k × k (k = 12 for a 10 m scene) strip by
strip, so memory holds one strip of the scene and the coarse grid (a Sentinel-2 tile: 915²
cells). Its cost is measured beside the mapper's in ``benchmarks/bench_mapping.py``.

The result is a 0/1 mask raster on a grid that nests the scene's, which the mapper reads like
any mask an archive ships (:class:`specdeepmap.masks.QualityMask`). Nothing is downloaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import rasterio
from rasterio.transform import Affine
from rasterio.windows import Window

from specdeepmap.bands import SENTINEL2_ORDER, band_name
from specdeepmap.errors import InputMismatchError, InvalidParameterError
from specdeepmap.masks import QualityMask

#: the detectors this module runs
DETECTORS = ("s2cloudless",)
#: the ten bands s2cloudless classifies, in its order
S2CLOUDLESS_BANDS = ("B01", "B02", "B04", "B05", "B08", "B8A", "B09", "B10", "B11", "B12")
#: the grid the detector works on (metres) and its smoothing and dilation there (in cells):
#: the package's example runs at 60 m, smoothing over 240 m and dilating by 120 m; at 120 m the
#: same radii are 2 and 1 cells, and a quarter of the cells makes it four times cheaper (on the
#: shared L1C scene: 22.4 % flagged against 22.1 % at 60 m, the two masks' IoU 0.86)
WORK_RESOLUTION_M = 120.0
AVERAGE_OVER = 2
DILATION_SIZE = 1
#: scene rows read at once, at least (whole cells and whole block rows: 768 for 256-row
#: blocks, about 170 MB of a tile's ten uint16 bands)
STRIP_ROWS = 384


@dataclass(frozen=True)
class CloudMask:
    """What the detector found: the mask raster (1 = cloud) and its flagged share."""

    path: str
    share: float
    detector: str

    def quality_mask(self) -> QualityMask:
        """The mask as the mapper reads it (value 1 flags a pixel)."""
        return QualityMask((self.path,), (1,), f"masked: cloud ({self.detector})", self.detector)


def check_detector(name: str | None) -> None:
    """Refuse an unknown detector, or one whose package is not installed, before any work."""
    if name is None:
        return
    if name not in DETECTORS:
        raise InvalidParameterError(
            f"Unknown cloud detector {name!r}: use one of {', '.join(DETECTORS)}"
        )
    try:
        import s2cloudless  # noqa: F401
    except ImportError as error:
        raise InvalidParameterError(
            f"The cloud detector {name} needs the package s2cloudless, which is not installed "
            "here: pip install 'specdeepmap[cloud]'"
        ) from error


def detect_clouds(src, scene_uri: str, out_path: str, threshold: float = 0.4) -> CloudMask:
    """Run s2cloudless on the open scene ``src`` and write its cloud mask to ``out_path``.

    Band values are taken as L1C reflectance × 10 000 when the scene's blue band reads above 2
    (digital numbers), else as reflectance. Products of processing baseline 04.00 and later
    carry +1000: harmonise them first (the drift verdict flags such a scene anyway).

    Raises:
        InputMismatchError: the scene lacks one of the ten bands (named B01…B12, or a
            13-band stack without names in the L1C order).
    """
    from s2cloudless import S2PixelCloudDetector

    indexes = _band_indexes(src, scene_uri)
    k = _cells(src)
    reflectance, valid = _coarse_reflectance(src, indexes, k)
    detector = S2PixelCloudDetector(
        threshold=threshold,
        all_bands=False,
        average_over=AVERAGE_OVER,
        dilation_size=DILATION_SIZE,
    )
    probability = detector.get_cloud_probability_maps(reflectance[None])[0]
    probability[~valid] = 0.0  # no data: never a cloud
    mask = detector.get_mask_from_prob(probability[None])[0].astype(np.uint8)
    mask[~valid] = 0
    profile = {
        "driver": "GTiff",
        "width": mask.shape[1],
        "height": mask.shape[0],
        "count": 1,
        "dtype": "uint8",
        "crs": src.crs,
        "transform": src.transform @ Affine.scale(k),
        "compress": "deflate",
    }
    with rasterio.open(out_path, "w", **profile) as dst:
        dst.write(mask, 1)
        dst.update_tags(DETECTOR="s2cloudless", THRESHOLD=str(threshold), SCENE=scene_uri)
    share = float(mask[valid].mean()) if valid.any() else 0.0
    return CloudMask(out_path, share, f"s2cloudless, threshold {threshold:g}")


def _band_indexes(src, scene_uri: str) -> list[int]:
    """1-based indexes of the detector's ten bands: by band name, else the L1C stack order."""
    names = [band_name(d) if d else None for d in src.descriptions]
    if all(n in names for n in S2CLOUDLESS_BANDS):
        return [names.index(n) + 1 for n in S2CLOUDLESS_BANDS]
    if not any(names) and src.count == len(SENTINEL2_ORDER):
        return [SENTINEL2_ORDER.index(n) + 1 for n in S2CLOUDLESS_BANDS]
    have = ", ".join(n or "?" for n in names) if any(names) else "no band names"
    raise InputMismatchError(
        f"Scene {scene_uri}: the cloud detector s2cloudless needs the Sentinel-2 L1C bands "
        f"{' '.join(S2CLOUDLESS_BANDS)} (named, or a 13-band stack B01…B12 in order); the "
        f"scene has {src.count} band(s) ({have})"
    )


def _cells(src) -> int:
    """Scene pixels per coarse cell edge: the integer closest to 120 m (1 for coarser scenes)."""
    size = abs(src.transform.a)
    if src.crs is not None and src.crs.is_geographic:
        size *= 111_320.0  # metres per degree at the equator: an upper bound is enough here
    return max(1, round(WORK_RESOLUTION_M / size)) if size else 1


def _coarse_reflectance(src, indexes: list[int], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The bands averaged over k × k cells (rows, cols, bands) and where a cell had data.

    Read in strips of whole block rows (all bands of a block decoded once: GDAL's own
    averaging reads band by band, which decodes a pixel-interleaved scene once per band when
    its block cache is small) and summed cell by cell; nodata pixels are left out of the
    means. The last, partial row and column of cells average the pixels they hold.
    """
    height, width = math.ceil(src.height / k), math.ceil(src.width / k)
    sums = np.zeros((len(indexes), height, width), np.float64)
    counts = np.zeros((height, width), np.float64)
    nodata = src.nodata if src.nodata is not None else 0
    block_rows = src.block_shapes[0][0]
    strip = k * block_rows // math.gcd(k, block_rows)  # whole cells and whole block rows
    strip *= max(1, STRIP_ROWS // strip)
    for y0 in range(0, src.height, strip):
        data = src.read(indexes, window=Window(0, y0, src.width, min(strip, src.height - y0)))
        valid = np.any(data != nodata, axis=0)
        if not valid.all():
            data[:, ~valid] = 0
        rows = slice(y0 // k, y0 // k + math.ceil(data.shape[1] / k))
        sums[:, rows] = _cell_sums(data, k)
        counts[rows] = _cell_sums(valid[None], k)[0]
    valid = counts > 0
    means = np.zeros((height, width, len(indexes)), np.float32)
    means[valid] = (sums[:, valid] / counts[valid]).T
    if valid.any():  # digital numbers (L1C × 10 000) or reflectance: by the blue band
        means *= 1e-4 if np.median(means[valid][:, 1]) > 2 else 1.0
    return means, valid


def _cell_sums(data: np.ndarray, k: int) -> np.ndarray:
    """Sums over k × k cells of (bands, rows, cols); a partial last row or column of cells
    sums the pixels it holds.
    """
    bands, rows, cols = data.shape
    if rows % k:
        data = np.concatenate([data, np.zeros((bands, k - rows % k, cols), data.dtype)], 1)
    kind = np.float64 if data.dtype.kind == "f" else np.int64
    whole = cols // k * k
    cells = data[:, :, :whole].reshape(bands, -1, k, cols // k, k).sum(axis=(2, 4), dtype=kind)
    if whole == cols:
        return cells
    rest = data[:, :, whole:].reshape(bands, -1, k, cols - whole).sum(axis=(2, 3), dtype=kind)
    return np.concatenate([cells, rest[:, :, None]], axis=2)
