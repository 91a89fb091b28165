"""Quality masks: pixels of a scene that must not be classified (cloud, shadow, snow...).

A mask is a raster on the scene's extent and CRS, at any resolution (resampled nearest to the
scene's grid, window by window, through a GDAL warped VRT); the listed values flag pixels.
Presets name what archives ship: Sentinel-2 L2A's scene classification layer (SCL) and
EnMAP's quality layers (one raster per kind, 1 = flagged). Several masks combine: a pixel
flagged by any of them is masked. The mapper gives masked pixels one reserved map value
(:func:`masked_value`) with its own colour and name, distinct from nodata 0.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import numpy as np
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from specdeepmap import storage
from specdeepmap.classes import ClassInfo, ClassSchema
from specdeepmap.errors import InputMismatchError, InvalidParameterError

#: preset → (flagged values, the map's name for masked pixels)
PRESETS: dict[str, tuple[tuple[int, ...], str]] = {
    # SCL: 3 cloud shadow, 8 cloud medium probability, 9 cloud high probability,
    # 10 thin cirrus, 11 snow or ice
    "s2-scl": ((3, 8, 9, 10, 11), "masked: cloud / shadow / cirrus / snow"),
    # QL_QUALITY_CLOUD, _CLOUDSHADOW, _HAZE, _SNOW, _CIRRUS: one raster each, 1 = flagged
    "enmap-ql": ((1,), "masked: cloud / shadow / haze / snow / cirrus"),
    # any other 0/1 mask
    "binary": ((1,), "masked"),
}
#: the masked pixels' colour in the map (light grey, apart from every class colour by default)
MASKED_COLOR = (200, 200, 200)


@dataclass(frozen=True)
class QualityMask:
    """Mask rasters and the values that flag a pixel in them."""

    uris: tuple[str, ...]
    values: tuple[int, ...]
    label: str = "masked"
    #: the cloud detector that made the mask (:mod:`specdeepmap.clouds`); None: given as input
    detector: str | None = None

    @classmethod
    def build(
        cls, uris: list[str] | tuple[str, ...], preset: str | None = None, values=None
    ) -> QualityMask | None:
        """A mask from its URIs with a preset's values, or the values given (None: no URIs).

        Raises:
            InvalidParameterError: an unknown preset, or neither a preset nor values.
        """
        if not uris:
            return None
        if preset is not None and preset not in PRESETS:
            raise InvalidParameterError(
                f"Unknown mask preset {preset!r}: use one of {', '.join(PRESETS)}, or give "
                "the flagged values"
            )
        flagged, label = PRESETS[preset] if preset else ((), "masked")
        chosen = tuple(int(v) for v in values) if values else flagged
        if not chosen:
            raise InvalidParameterError(
                f"Mask {uris[0]}: say which values flag a pixel (a preset: "
                f"{', '.join(PRESETS)}; or the values)"
            )
        return cls(tuple(uris), chosen, label)


def masked_value(class_values: list[int]) -> int:
    """The map value for masked pixels: 255, or the largest value below it no class uses."""
    used = set(int(v) for v in class_values)
    for value in range(255, 0, -1):
        if value not in used:
            return value
    raise InputMismatchError("The model uses every value 1-255: none is left for masked pixels")


def with_masked(schema: ClassSchema, value: int, label: str) -> ClassSchema:
    """``schema`` plus the masked pixels' class (their name and colour in every legend)."""
    return ClassSchema([*schema.classes, ClassInfo(value, label, MASKED_COLOR)], schema.source)


def check_masks(mask: QualityMask, scene) -> float:
    """Refuse, before any work, a mask on another CRS, one that does not cover the scene, or
    values its data type cannot hold; warn when no pixel of it is flagged.

    ``scene``: the open scene raster. Returns the share of the scene that the masks flag,
    from a grid of at most 512 × 512 of their pixels (before any mapping).
    """
    for uri in mask.uris:
        with storage.open_raster(uri) as src:
            _check_mask(uri, src, mask.values, scene)
    shape = (min(scene.height, 512), min(scene.width, 512))
    flagged = np.zeros(shape, bool)
    for uri in mask.uris:
        with storage.open_raster(uri) as src, on_scene_grid(src, scene) as vrt:
            flagged |= np.isin(vrt.read(1, out_shape=shape), mask.values)
    if not flagged.any():
        warnings.warn(
            f"Mask {', '.join(mask.uris)}: no pixel holds {', '.join(map(str, mask.values))} "
            f"(in a {shape[0]} x {shape[1]} overview): nothing is masked",
            stacklevel=3,
        )
    return float(flagged.mean())


def on_scene_grid(src, scene) -> WarpedVRT:
    """The mask ``src`` resampled nearest onto the scene's grid (a GDAL warped VRT)."""
    return WarpedVRT(
        src,
        crs=scene.crs or src.crs,
        transform=scene.transform,
        width=scene.width,
        height=scene.height,
        resampling=Resampling.nearest,
    )


def _check_mask(uri: str, src, values: tuple[int, ...], scene) -> None:
    """One mask raster: one band, the scene's CRS, its extent covered, values it can hold."""
    if src.count != 1:
        raise InputMismatchError(f"Mask {uri} has {src.count} bands: give one band")
    if scene.crs and src.crs != scene.crs:
        raise InputMismatchError(
            f"Mask {uri} is in {src.crs}, the scene in {scene.crs}: give the mask on the "
            "scene's CRS"
        )
    tolerance = abs(scene.transform.a) / 2
    left, bottom, right, top = scene.bounds
    if (
        left < src.bounds.left - tolerance
        or bottom < src.bounds.bottom - tolerance
        or right > src.bounds.right + tolerance
        or top > src.bounds.top + tolerance
    ):
        raise InputMismatchError(
            f"Mask {uri} covers {tuple(round(v, 2) for v in src.bounds)}, which does not hold "
            f"the scene's extent {tuple(round(v, 2) for v in scene.bounds)}"
        )
    dtype = np.dtype(src.dtypes[0])
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        impossible = [v for v in values if not info.min <= v <= info.max]
        if impossible:
            raise InvalidParameterError(
                f"Mask {uri} is {dtype}: it never holds the value(s) "
                f"{', '.join(map(str, impossible))}"
            )


class MaskReader:
    """Reads the combined mask of scene windows (True: masked), resampled to the scene grid.

    A mask on the scene's grid or on a coarser grid that nests it (e.g. Sentinel-2's 20 m SCL
    over a 10 m scene: each mask pixel covers 2 × 2 scene pixels) is read at its own
    resolution and repeated, which is nearest resampling without GDAL's warper; any other
    grid goes through a warped VRT. Use as a context manager, in the thread that reads the
    scene.
    """

    def __init__(self, mask: QualityMask, scene) -> None:
        self.mask = mask
        self.scene = scene
        self._stack = contextlib.ExitStack()
        self._sources: list[tuple] = []  # ("nested", src, k, dx, dy) or ("warped", vrt)
        self._table: np.ndarray | None = None

    def __enter__(self) -> MaskReader:
        for uri in self.mask.uris:
            src = self._stack.enter_context(storage.open_raster(uri))
            nested = _nesting(src.transform, self.scene.transform)
            if nested is not None:
                self._sources.append(("nested", src, *nested))
                continue
            vrt = self._stack.enter_context(on_scene_grid(src, self.scene))
            self._sources.append(("warped", vrt))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def read(self, y: int, x0: int, x1: int, rows: int) -> np.ndarray:
        """Rows [y, y + rows) × columns [x0, x1) of the scene: True where masked (False
        beyond the scene, like the padding of the input).
        """
        out = np.zeros((rows, x1 - x0), bool)
        h = min(rows, self.scene.height - y)
        w = min(x1, self.scene.width) - x0
        if h <= 0 or w <= 0:
            return out
        for source in self._sources:
            if source[0] == "warped":
                data = source[1].read(1, window=Window(x0, y, w, h))
            else:
                data = _read_nested(*source[1:], x0, y, w, h)
            out[:h, :w] |= self._flags(data)
        return out

    def _flags(self, data: np.ndarray) -> np.ndarray:
        """Flagged pixels: a table lookup for 8- and 16-bit integer masks (SCL, QL layers),
        several times faster than ``np.isin``, which the other types use.
        """
        if data.dtype in (np.uint8, np.uint16):
            if self._table is None or len(self._table) <= np.iinfo(data.dtype).max:
                self._table = np.zeros(np.iinfo(data.dtype).max + 1, bool)
                self._table[[v for v in self.mask.values if 0 <= v < len(self._table)]] = True
            return self._table[data]
        return np.isin(data, self.mask.values)


def _nesting(mask_transform, scene_transform) -> tuple[int, int, int] | None:
    """(k, dx, dy) when each mask pixel covers k × k scene pixels on one aligned grid (the
    scene's pixel (col, row) is the mask's ((col + dx) // k, (row + dy) // k)), else None.
    """
    m, t = mask_transform, scene_transform
    if m.b or m.d or t.b or t.d or not t.a or not t.e:
        return None
    k = m.a / t.a
    dx, dy = (t.c - m.c) / t.a, (t.f - m.f) / t.e
    if not all(abs(v - round(v)) < 1e-6 for v in (k, m.e / t.e, dx, dy)):
        return None
    if round(k) < 1 or round(k) != round(m.e / t.e) or dx < -1e-6 or dy < -1e-6:
        return None
    return int(round(k)), int(round(dx)), int(round(dy))


def _read_nested(src, k: int, dx: int, dy: int, x0: int, y: int, w: int, h: int) -> np.ndarray:
    """Scene window (x0, y, w, h) of a nested mask: its pixels read once, repeated k × k."""
    c0, r0 = (x0 + dx) // k, (y + dy) // k
    c1, r1 = (x0 + dx + w - 1) // k + 1, (y + dy + h - 1) // k + 1
    data = src.read(1, window=Window(c0, r0, c1 - c0, r1 - r0), boundless=True, fill_value=0)
    if k > 1:
        data = np.repeat(np.repeat(data, k, axis=0), k, axis=1)
    top, left = (y + dy) - r0 * k, (x0 + dx) - c0 * k
    return data[top : top + h, left : left + w]
