"""Class polygons of a class map, written as a GeoPackage (SpecDeepMap's vector output).

Polygons are 4-connected regions of equal class value (GDAL's polygonize); class 0
(unlabelled / nodata) is dropped. Each feature has the integer field ``Class``.
Up to ``max_pixels`` the raster is polygonised at once; larger rasters go strip by strip
(bounded memory), and polygons crossing a strip border are then split there.
"""

from __future__ import annotations

import logging

import numpy as np
from rasterio.features import shapes
from rasterio.windows import Window

from specdeepmap import storage

log = logging.getLogger(__name__)


def polygonize(class_uri: str, gpkg_uri: str, max_pixels: int = 100_000_000) -> int:
    """Write the class polygons of ``class_uri`` to ``gpkg_uri``; return the feature count."""
    import pyogrio.raw
    import shapely
    from shapely.geometry import shape

    geometries, classes = [], []
    with storage.open_raster(class_uri) as src:
        crs = src.crs.to_wkt() if src.crs else None
        rows = (
            src.height if src.width * src.height <= max_pixels else max(1, max_pixels // src.width)
        )
        if rows < src.height:
            log.warning(
                "%s is large: polygonising in strips of %d rows; polygons crossing "
                "strip borders are split there",
                class_uri,
                rows,
            )
        for y in range(0, src.height, rows):
            window = Window(0, y, src.width, min(rows, src.height - y))
            data = src.read(1, window=window)
            for geometry, value in shapes(
                data, mask=data != 0, connectivity=4, transform=src.window_transform(window)
            ):
                geometries.append(shape(geometry))
                classes.append(int(value))
    wkb = shapely.to_wkb(np.array(geometries, dtype=object)) if geometries else np.array([])
    with storage.atomic_output(gpkg_uri, suffix=".gpkg") as tmp:
        pyogrio.raw.write(
            tmp,
            wkb,
            field_data=[np.array(classes, dtype=np.int32)],
            fields=["Class"],
            crs=crs,
            driver="GPKG",
            geometry_type="Polygon",
            layer="classes",
            encoding="UTF-8",
        )
    return len(classes)
