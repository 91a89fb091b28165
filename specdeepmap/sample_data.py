"""A realistic Sentinel-2-like demo scene, generated without any download.

The scene is a patchwork of fields (Voronoi cells), each of one land-cover class with its own
13-band top-of-atmosphere spectrum (reflectance × 10 000, band order B01…B12 as in Sentinel-2
L1C), a per-field brightness factor and per-pixel noise. About a third of the fields are left
unlabelled (0), as in real reference data, and a strip along the right edge is image nodata
(0 in every band), as at the edge of a satellite swath; the label raster still holds classes
there so that the chipper's nodata rule has something to do. The label raster carries class
names and colours as GIS tools write them (a colour table, category names in ``.aux.xml``).

The rasters are written strip by strip, so memory stays small for any scene size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.transform import from_origin
from rasterio.windows import Window
from scipy.spatial import cKDTree

from specdeepmap import storage
from specdeepmap.classes import ClassInfo, ClassSchema, pam_xml

SENTINEL2_BANDS = (
    "B01",
    "B02",
    "B03",
    "B04",
    "B05",
    "B06",
    "B07",
    "B08",
    "B8A",
    "B09",
    "B10",
    "B11",
    "B12",
)

#: class value → (name, mean TOA reflectance × 10 000 per Sentinel-2 band)
CLASS_SIGNATURES: dict[int, tuple[str, tuple[int, ...]]] = {
    1: ("water", (1200, 1000, 800, 500, 400, 350, 300, 250, 220, 80, 10, 100, 60)),
    2: ("forest", (1100, 900, 800, 600, 1000, 2200, 2700, 2900, 3000, 900, 15, 1500, 700)),
    3: ("cropland", (1300, 1100, 1250, 1000, 1600, 2800, 3300, 3500, 3600, 1100, 20, 2200, 1200)),
    4: ("grassland", (1250, 1050, 1100, 900, 1400, 2000, 2300, 2400, 2500, 850, 18, 2600, 1700)),
    5: ("built-up", (1600, 1500, 1500, 1600, 1700, 1800, 1900, 2000, 2050, 700, 25, 2500, 2200)),
    6: ("bare soil", (1500, 1400, 1650, 1950, 2150, 2300, 2400, 2500, 2600, 900, 22, 3300, 2900)),
}
CLASS_PROBABILITIES = (0.12, 0.22, 0.26, 0.2, 0.1, 0.1)
CLASS_COLORS = {
    1: (31, 120, 180),
    2: (27, 94, 32),
    3: (240, 200, 60),
    4: (140, 200, 90),
    5: (215, 48, 39),
    6: (166, 118, 70),
}

#: UTM zone 33N, as the Sentinel-2 tile T33UUU near Brandenburg an der Havel
DEFAULT_CRS = "EPSG:32633"
DEFAULT_ORIGIN = (330000.0, 5822040.0)
PIXEL_SIZE = 10.0
IMAGE_NODATA = 0


@dataclass(frozen=True)
class SampleScene:
    """URIs of a generated scene."""

    image_uri: str
    label_uri: str


def _field_map(height: int, width: int, field_size: int, rng: np.random.Generator) -> tuple:
    """Field id of every cell of a coarse grid (4 px cells), plus each field's class and look."""
    cell = 4
    rows, cols = -(-height // cell), -(-width // cell)
    n_fields = max(8, int(height * width / field_size**2))
    seeds = rng.uniform((0, 0), (rows, cols), size=(n_fields, 2))
    grid = np.stack(np.meshgrid(np.arange(rows) + 0.5, np.arange(cols) + 0.5, indexing="ij"), -1)
    _, field_id = cKDTree(seeds).query(grid.reshape(-1, 2), workers=-1)
    field_id = field_id.reshape(rows, cols).astype(np.int32)
    classes = rng.choice(np.array(list(CLASS_SIGNATURES)), size=n_fields, p=CLASS_PROBABILITIES)
    labelled = rng.random(n_fields) < 0.68
    brightness = rng.normal(1.0, 0.07, size=n_fields)
    return field_id, classes.astype(np.uint8), labelled, brightness


def _strip(
    row0: int,
    rows: int,
    width: int,
    fields: tuple[np.ndarray, ...],
    signatures: np.ndarray,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Image rows [row0, row0 + rows) (bands first, with noise and the swath's nodata edge)
    and their labels (0 where the field is unlabelled).
    """
    field_id, field_class, field_labelled, field_brightness = fields
    r = np.arange(row0, row0 + rows)
    ids = field_id[r[:, None] // 4, np.arange(width)[None, :] // 4]
    classes = field_class[ids]
    spectra = signatures[classes - 1] * field_brightness[ids][..., None]
    noise = rng.normal(0.0, 0.03, size=spectra.shape).astype(np.float32)
    pixels = np.clip(spectra * (1.0 + noise), 1, 65535).astype(np.uint16)
    pixels = np.moveaxis(pixels, -1, 0)
    # nodata strip along the right edge, slanted like a swath border
    edge = width - (0.06 * width + 0.04 * r)
    swath_gap = np.arange(width)[None, :] >= edge[:, None]
    pixels[:, swath_gap] = IMAGE_NODATA
    labels = np.where(field_labelled[ids], classes, 0).astype(np.uint8)
    return pixels, labels


def generate_scene(
    out_folder: str,
    width: int = 1024,
    height: int = 1024,
    seed: int = 0,
    field_size: int = 96,
    name: str = "demo_s2",
    compress: str | None = "deflate",
) -> SampleScene:
    """Write a demo image (13 × uint16) and its label raster (uint8) into ``out_folder``.

    Args:
        out_folder: folder URI (local or ``s3://``); created when needed.
        width: scene width in pixels.
        height: scene height in pixels.
        seed: random seed; the same seed gives the same scene.
        field_size: typical field edge length in pixels.
        name: base name: writes ``{name}.tif`` and ``{name}_labels.tif``.
        compress: GeoTIFF compression of both rasters (``None`` for none).

    Returns:
        The URIs of the image and label rasters.
    """
    rng = np.random.default_rng(seed)
    fields = _field_map(height, width, field_size, rng)
    signatures = np.array([CLASS_SIGNATURES[c][1] for c in sorted(CLASS_SIGNATURES)], np.float32)
    n_bands = signatures.shape[1]
    transform = from_origin(*DEFAULT_ORIGIN, PIXEL_SIZE, PIXEL_SIZE)
    common = dict(
        driver="GTiff",
        width=width,
        height=height,
        crs=CRS.from_string(DEFAULT_CRS),
        transform=transform,
        tiled=True,
        blockxsize=256,
        blockysize=256,
    )
    if compress:
        common.update(compress=compress, predictor=2)
    schema = ClassSchema(
        [ClassInfo(v, CLASS_SIGNATURES[v][0], c) for v, c in CLASS_COLORS.items()], "sample data"
    )
    image_uri = storage.join(out_folder, f"{name}.tif")
    label_uri = storage.join(out_folder, f"{name}_labels.tif")
    storage.makedirs(out_folder)
    with (
        storage.gdal_env(),
        storage.atomic_output(image_uri) as image_tmp,
        storage.atomic_output(label_uri) as label_tmp,
    ):
        with (
            rasterio.open(
                image_tmp, "w", count=n_bands, dtype="uint16", nodata=IMAGE_NODATA, **common
            ) as image,
            rasterio.open(label_tmp, "w", count=1, dtype="uint8", **common) as label,
        ):
            for band, description in enumerate(SENTINEL2_BANDS, start=1):
                image.set_band_description(band, description)
            image.update_tags(SOURCE="specdeepmap sample-data", SEED=str(seed))
            strip = 256
            for row0 in range(0, height, strip):
                rows = min(strip, height - row0)
                pixels, labels = _strip(row0, rows, width, fields, signatures, rng)
                window = Window(0, row0, width, rows)
                image.write(pixels, window=window)
                label.write(labels[None], window=window)
            label.write_colormap(1, schema.colormap(list(CLASS_COLORS)))
    # category names as GIS tools store them: GDAL's .aux.xml sidecar
    storage.write_text(label_uri + ".aux.xml", pam_xml(schema, list(CLASS_COLORS)))
    return SampleScene(image_uri=image_uri, label_uri=label_uri)
