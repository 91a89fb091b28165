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
    with MaskReader(mask, scene) as reader:
        for vrt in reader._vrts:
            flagged |= np.isin(vrt.read(1, out_shape=shape), mask.values)
    if not flagged.any():
        warnings.warn(
            f"Mask {', '.join(mask.uris)}: no pixel holds {', '.join(map(str, mask.values))} "
            f"(in a {shape[0]} x {shape[1]} overview): nothing is masked",
            stacklevel=3,
        )
    return float(flagged.mean())


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

    Use as a context manager, in the thread that reads the scene.
    """

    def __init__(self, mask: QualityMask, scene) -> None:
        self.mask = mask
        self.scene = scene
        self._stack = contextlib.ExitStack()
        self._vrts: list = []

    def __enter__(self) -> MaskReader:
        for uri in self.mask.uris:
            src = self._stack.enter_context(storage.open_raster(uri))
            self._vrts.append(
                self._stack.enter_context(
                    WarpedVRT(
                        src,
                        crs=self.scene.crs or src.crs,
                        transform=self.scene.transform,
                        width=self.scene.width,
                        height=self.scene.height,
                        resampling=Resampling.nearest,
                    )
                )
            )
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
        for vrt in self._vrts:
            data = vrt.read(1, window=Window(x0, y, w, h))
            out[:h, :w] |= np.isin(data, self.mask.values)
        return out
