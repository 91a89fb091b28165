"""Writing a map as the Mapper finalises it: the class map and its optional probability
rasters as tiled GeoTIFFs in a private staging folder, written window by window; then the
tags, the legend and, once complete, Cloud Optimized GeoTIFFs moved or uploaded into place.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.windows import Window

from specdeepmap import storage
from specdeepmap.classes import ClassSchema

#: bands of each optional output: the top-class probability, every class's probability
EXTRA_BANDS = {"confidence": 1, "probabilities": None}


class MapWriter:
    """The class map (``dtype``, nodata 0) and the ``extras`` named (``confidence``,
    ``probabilities``; uint8, probability × 255) of a scene on ``src``'s grid, open in
    ``staging`` while used as a context manager.
    """

    def __init__(self, src, staging: str, dtype: str, classes: int, extras: list[str]):
        self.staging, self.classes, self.extras = staging, classes, extras
        self.profile = dict(
            driver="GTiff",
            width=src.width,
            height=src.height,
            count=1,
            dtype=dtype,
            crs=src.crs,
            transform=src.transform,
            nodata=0,
            tiled=True,
            blockxsize=256,
            blockysize=256,
        )
        self._stack = contextlib.ExitStack()
        self.out = None
        self.extra_out: dict = {}

    def path(self, name: str) -> str:
        """The staged file of an output (``classes`` or an extra)."""
        return os.path.join(self.staging, f"{name}.tif")

    def __enter__(self) -> MapWriter:
        self.out = self._stack.enter_context(
            rasterio.open(self.path("classes"), "w", **self.profile)
        )
        for name in self.extras:
            count = EXTRA_BANDS[name] or self.classes
            profile = {**self.profile, "dtype": "uint8", "count": count}
            self.extra_out[name] = self._stack.enter_context(
                rasterio.open(self.path(name), "w", **profile)
            )
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def write(
        self, window: Window, classes: np.ndarray, sums: np.ndarray, masked: np.ndarray | None
    ) -> None:
        """One finished window: its classes (0: no data) and, for the extras, the blended
        weighted ``sums`` (classes + 1 channels, the weight sum last); pixels without a class
        or ``masked`` get probability 0.
        """
        self.out.write(classes[None], window=window)
        if not self.extra_out:
            return
        final = sums[: self.classes] / sums[self.classes]
        scaled = {"confidence": final.max(axis=0, keepdims=True), "probabilities": final}
        empty = (classes == 0) if masked is None else (classes == 0) | masked
        for name, dst in self.extra_out.items():
            data = np.round(scaled[name] * 255).astype(np.uint8)
            data[:, empty] = 0
            dst.write(data, window=window)

    def label(
        self, tags: dict, schema: ClassSchema, legend_values: list[int], class_values: list[int]
    ) -> None:
        """Lineage tags on every output, the class map's colour table, the probability
        bands named by class.
        """
        self.out.update_tags(**tags)
        self.out.write_colormap(1, schema.colormap(legend_values))
        for dst in self.extra_out.values():
            dst.update_tags(**tags)
        if "probabilities" in self.extra_out:
            for band, value in enumerate(class_values, start=1):
                self.extra_out["probabilities"].set_band_description(band, schema.name(value))


def finish_cog(tmp: str, uri: str, staging: str, resampling: str) -> None:
    """Copy a finished GeoTIFF to a COG (DEFLATE, overviews) and move/upload it into place."""
    cog = os.path.join(staging, f"cog-{os.path.basename(tmp)}")
    with storage.gdal_env():
        rasterio.shutil.copy(
            tmp,
            cog,
            driver="COG",
            compress="DEFLATE",
            overview_resampling=resampling,
            blocksize=256,
            num_threads="ALL_CPUS",
        )
    storage.upload(cog, uri)
