"""Raster Splitter: cut an image raster and its label raster into georeferenced chip pairs.

Output layout (SpecDeepMap-compatible)::

    OUT/images/{name}_tile_{x}_{y}.tif   all image bands, the image dtype, CRS and nodata
    OUT/labels/{name}_tile_{x}_{y}.tif   one uint8 band of class values (0 = unlabelled)
    OUT/manifest/{name}.csv              one row per chip: offsets, coverage, per-class counts
    OUT/classes.json                     class names and colours, when the labels have them

``x``/``y`` are the pixel column/row offsets of the chip in the scene and ``name`` is the image
file name without its extension. Each scene has its own manifest file, so several scenes can be
chipped into one folder, even at the same time.

Semantics (SpecDeepMap's, with its defects fixed):

* every start position inside the raster is used (``0, stride, 2·stride, … < size``); chips at
  the right and bottom edges are padded to full size, the image with its nodata value (0 when it
  has none) and the label with 0;
* a pixel is image nodata when every band equals the nodata value (GDAL's dataset-mask rule:
  robust to bands that are nodata everywhere, such as EnMAP's water-vapour bands); such pixels
  get label 0;
* coverage is the share of labelled (non-zero) pixels in the padded chip; a chip pair is written
  when ``100 · coverage >= min_coverage`` (so 0 keeps every chip).

Memory stays flat: the scene is read one chip window at a time (the label first, so chips below
the coverage threshold never read the image) and the GDAL block cache is pinned.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import rasterio
import rasterio.errors
from rasterio.windows import Window

from specdeepmap import storage
from specdeepmap.classes import (
    CLASSES_JSON,
    read_classes_file,
    read_dataset_classes,
    read_label_classes,
    write_dataset_classes,
)
from specdeepmap.errors import (
    InputMismatchError,
    InvalidLabelError,
    InvalidParameterError,
    UnreadableInputError,
)
from specdeepmap.params import ChipParams

log = logging.getLogger(__name__)

CHIP_NAME = re.compile(r"^(?P<scene>.+)_tile_(?P<x>\d+)_(?P<y>\d+)\.tif$")
MANIFEST_FOLDER = "manifest"
COUNT_PREFIX = "count_"


@dataclass
class ChipReport:
    """What :func:`chip_scene` did."""

    image_uri: str
    label_uri: str
    out_uri: str
    manifest_uri: str
    windows: int
    written: int = 0
    reused: int = 0
    below_coverage: int = 0
    class_counts: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0
    class_names: dict[int, str] = field(default_factory=dict)

    @property
    def chips(self) -> int:
        """Chip pairs now present for this scene (written now or by an earlier run)."""
        return self.written + self.reused

    def count(self, outcomes: list[str], seconds: float) -> None:
        """Count the windows' outcomes ("written", "reused", "below") and log the total."""
        self.written, self.reused = outcomes.count("written"), outcomes.count("reused")
        self.below_coverage, self.seconds = outcomes.count("below"), seconds
        log.info(
            "Total created image and label tile pairs: %d (%d kept from an earlier run, "
            "%d below coverage) in %.1f s",
            self.written,
            self.reused,
            self.below_coverage,
            self.seconds,
        )


def chip_name(scene: str, x: int, y: int) -> str:
    """SpecDeepMap's chip file name: ``{scene}_tile_{x}_{y}.tif``."""
    return f"{scene}_tile_{x}_{y}.tif"


def tile_offsets(width: int, height: int, params: ChipParams) -> list[tuple[int, int]]:
    """Upper-left pixel offsets (x, y) of all chips, row by row."""
    (sx, sy) = params.stride
    return [(x, y) for y in range(0, height, sy) for x in range(0, width, sx)]


def check_same_grid(
    image: rasterio.DatasetReader, label: rasterio.DatasetReader, image_uri: str, label_uri: str
) -> None:
    """Raise :class:`InputMismatchError` unless both rasters lie on the same pixel grid."""

    def differ(prop: str, a: object, b: object) -> InputMismatchError:
        return InputMismatchError(
            f"Image {image_uri} and label {label_uri} differ in {prop}: {a} vs {b}. "
            "Resample the label raster onto the image grid first (e.g. gdalwarp -tap -te/-ts)."
        )

    if image.crs != label.crs:
        raise differ("CRS", image.crs, label.crs)
    if not np.allclose(image.res, label.res, rtol=1e-9, atol=0):
        raise differ("pixel size", image.res, label.res)
    (ix, iy) = (image.transform.c, image.transform.f)
    (lx, ly) = (label.transform.c, label.transform.f)
    if not np.allclose((ix, iy), (lx, ly), rtol=0, atol=1e-6 * abs(image.res[0])):
        raise differ("origin", (ix, iy), (lx, ly))
    if (image.width, image.height) != (label.width, label.height):
        raise differ(
            "size (width x height)", (image.width, image.height), (label.width, label.height)
        )
    if label.count != 1:
        raise InputMismatchError(f"Label raster {label_uri} must have 1 band, has {label.count}")


def label_to_classes(values: np.ndarray, nodata: float | None) -> np.ndarray:
    """Label pixels as uint8 class values; label nodata becomes 0 (unlabelled)."""
    if nodata is not None:
        values = np.where(_equals(values, nodata), 0, values)
    return values.astype(np.uint8, copy=False)


def _equals(values: np.ndarray, nodata: float) -> np.ndarray:
    if isinstance(nodata, float) and math.isnan(nodata):
        return np.isnan(values)
    return values == nodata


def validate_label_values(label: rasterio.DatasetReader, label_uri: str) -> None:
    """Raise :class:`InvalidLabelError` unless every label is a whole number 0–255.

    Float rasters that hold whole numbers are accepted. Reads the raster in strips.
    """
    nodata = label.nodata
    rows_per_strip = max(1, (1 << 22) // max(1, label.width))
    for row0 in range(0, label.height, rows_per_strip):
        window = Window(0, row0, label.width, min(rows_per_strip, label.height - row0))
        values = label.read(1, window=window)
        if nodata is not None:
            values = np.where(_equals(values, nodata), 0, values)
        bad = ~np.isfinite(values) if values.dtype.kind == "f" else np.zeros(values.shape, bool)
        bad |= (values < 0) | (values > 255)
        if values.dtype.kind == "f":
            bad |= np.isfinite(values) & (values != np.round(values))
        if bad.any():
            r, c = np.argwhere(bad)[0]
            raise InvalidLabelError(
                f"Label raster {label_uri} holds {values[r, c]!r} at row {row0 + r}, column {c}: "
                "labels must be whole class values 0-255 (0 = unlabelled)."
            )


def check_readable(dataset: rasterio.DatasetReader, uri: str) -> None:
    """Read the raster's last pixel in every band, so that a truncated file (cut off at its
    end, as an interrupted copy leaves it) is refused before any work, naming the file.
    """
    try:
        dataset.read(window=Window(dataset.width - 1, dataset.height - 1, 1, 1))
    except rasterio.errors.RasterioIOError as error:
        raise UnreadableInputError(
            f"{uri} cannot be read to its end: truncated or corrupt ({error}). Copy the file again."
        ) from error


def _padded_read(
    dataset: rasterio.DatasetReader,
    x: int,
    y: int,
    tx: int,
    ty: int,
    fill: float,
    indexes: int | list[int] | None = None,
) -> np.ndarray:
    """Read the chip window at (x, y); the part outside the raster is filled with ``fill``."""
    w, h = min(tx, dataset.width - x), min(ty, dataset.height - y)
    try:
        data = dataset.read(indexes, window=Window(x, y, w, h))
    except rasterio.errors.RasterioIOError as error:
        if storage.is_transient(error):
            raise
        raise UnreadableInputError(
            f"{dataset.name}: window at column {x}, row {y} cannot be "
            f"read ({error}): the file is corrupt"
        ) from error
    if (w, h) == (tx, ty):
        return data
    pad = [(0, 0)] * (data.ndim - 2) + [(0, ty - h), (0, tx - w)]
    return np.pad(data, pad, constant_values=fill)


def _write_geotiff(
    uri: str,
    array: np.ndarray,
    profile: dict,
    descriptions: Sequence[str | None] | None = None,
    band_tags: Sequence[dict] | None = None,
) -> None:
    with storage.atomic_output(uri) as tmp, rasterio.open(tmp, "w", **profile) as dst:
        dst.write(array)
        if descriptions and any(descriptions):
            dst.descriptions = tuple(descriptions)
        for band, tags in enumerate(band_tags or (), start=1):
            if tags:
                dst.update_tags(band, **tags)


def _manifest_row(
    name: str,
    x: int,
    y: int,
    labels: np.ndarray,
    image_uri: str,
    label_uri: str,
    params: ChipParams,
) -> dict:
    values, counts = np.unique(labels, return_counts=True)
    tx, ty = params.tile_size
    row = {
        "chip": name,
        "image": f"images/{name}",
        "mask": f"labels/{name}",
        "scene": image_uri,
        "label_scene": label_uri,
        "x": x,
        "y": y,
        "tile_x": tx,
        "tile_y": ty,
        "stride_x": params.stride[0],
        "stride_y": params.stride[1],
        "min_coverage": params.min_coverage,
        "coverage": float(1.0 - (labels == 0).mean()),
    }
    row.update({f"{COUNT_PREFIX}{int(v)}": int(n) for v, n in zip(values, counts, strict=True)})
    return row


def chip_scene(
    image_uri: str,
    label_uri: str,
    out_uri: str,
    params: ChipParams = ChipParams(),
    workers: int = 2,
    progress: Callable[[int, int], None] | None = None,
    classes_uri: str | None = None,
) -> ChipReport:
    """Cut one image/label pair into chips under ``out_uri`` (Raster Splitter).

    Everything is validated before the first chip is written: parameters, the two rasters'
    grids, the label values and the output location. Chips written by an earlier run with the
    same parameters are kept and not written again; each chip is written under a temporary
    name and moved into place, so an interrupted run leaves no half-written chip.

    Args:
        image_uri: image raster (any GDAL raster; local or ``s3://``).
        label_uri: single-band label raster on the image's grid, class values 0–255.
        out_uri: output folder (local or ``s3://``).
        params: tile size, stride and minimum label coverage (%).
        workers: threads reading and writing chips (GDAL releases the GIL).
        progress: optional callback ``progress(done, total)``.
        classes_uri: class names and colours (``classes.csv`` or a QGIS ``.qml``); default:
            those stored with the label raster, if any. Kept in ``out_uri/classes.json``.

    Returns:
        A :class:`ChipReport` with counts and the manifest's URI.

    Raises:
        InputMismatchError: image and labels differ in grid, CRS or size, or the classes
            file disagrees with classes already in ``out_uri``.
        InvalidLabelError: the labels hold values that are not classes 0-255.
        MissingInputError: an input does not exist.
        UnreadableInputError: an input is not a raster (or a classes file is unreadable).
    """
    started = time.perf_counter()
    source = read_source(image_uri, label_uri, params)
    manifest_uri = storage.join(out_uri, MANIFEST_FOLDER, f"{source.scene}.csv")
    # which scene the chips come from: a different file under the same name must not reuse
    # (and silently keep) the chips of the earlier one
    scene_id = f"{storage.fingerprint(image_uri)}-{storage.fingerprint(label_uri)}"
    cutter = ChipCutter(
        source,
        out_uri,
        params,
        existing=_existing_pairs(out_uri),
        previous=_previous_rows(manifest_uri, params, scene_id, image_uri),
    )
    schema = read_classes_file(classes_uri) if classes_uri else read_label_classes(label_uri)
    read_dataset_classes(out_uri).merge(schema, storage.join(out_uri, CLASSES_JSON))  # early
    for sub in ("images", "labels", MANIFEST_FOLDER):
        storage.makedirs(storage.join(out_uri, sub))
    offsets = tile_offsets(source.width, source.height, params)
    log.info(
        "Chipping %s (%d x %d px) into %d windows of %d x %d, stride %s, coverage >= %s %%",
        image_uri,
        source.width,
        source.height,
        len(offsets),
        *params.tile_size,
        params.stride,
        params.min_coverage,
    )
    results = cutter.cut(offsets, workers, progress)
    rows = [row | {"scene_id": scene_id} for _, row in results if row is not None]
    class_counts = _write_manifest(manifest_uri, rows)
    if schema.classes:
        write_dataset_classes(out_uri, schema)
    report = ChipReport(
        image_uri=image_uri,
        label_uri=label_uri,
        out_uri=out_uri,
        manifest_uri=manifest_uri,
        windows=len(offsets),
        class_counts=class_counts,
        class_names={c.value: c.name for c in schema.classes},
    )
    report.count([kind for kind, _ in results], time.perf_counter() - started)
    return report


@dataclass
class ChipSource:
    """An image and its label raster, checked, with what every chip of them shares."""

    image_uri: str
    label_uri: str
    scene: str  #: the chips' name prefix
    width: int
    height: int
    image_profile: dict  #: a chip's GeoTIFF profile, without its transform
    label_profile: dict
    transform: rasterio.Affine
    descriptions: tuple
    band_tags: list[dict]
    image_nodata: float | None
    label_nodata: float | None


def read_source(image_uri: str, label_uri: str, params: ChipParams) -> ChipSource:
    """Open both rasters, check that they share a grid, that the labels are classes 0–255
    and that the image can be read; warn when a tile is larger than the scene.
    """
    tx, ty = params.tile_size
    with storage.open_raster(image_uri) as image, storage.open_raster(label_uri) as label:
        check_same_grid(image, label, image_uri, label_uri)
        validate_label_values(label, label_uri)
        check_readable(image, image_uri)
        source = ChipSource(
            image_uri=image_uri,
            label_uri=label_uri,
            scene=storage.stem(image_uri),
            width=image.width,
            height=image.height,
            image_profile=dict(
                driver="GTiff",
                width=tx,
                height=ty,
                count=image.count,
                dtype=image.dtypes[0],
                crs=image.crs,
                nodata=image.nodata,
            ),
            label_profile=dict(
                driver="GTiff", width=tx, height=ty, count=1, dtype="uint8", crs=image.crs
            ),
            transform=image.transform,
            descriptions=image.descriptions,
            band_tags=[image.tags(b) for b in range(1, image.count + 1)],
            image_nodata=image.nodata,
            label_nodata=label.nodata,
        )
    if tx > source.width or ty > source.height:
        log.warning(
            "The tile (%d x %d px) is larger than the scene %s (%d x %d px): each chip "
            "is mostly padding (unlabelled); use a tile of at most the scene's size",
            tx,
            ty,
            image_uri,
            source.width,
            source.height,
        )
    return source


class ChipCutter:
    """Cuts the chips of one :class:`ChipSource` into ``out_uri`` (``images/``,
    ``labels/``): a chip below the coverage threshold is skipped, one already written
    (``existing``; its manifest row in ``previous`` when an earlier run recorded it) is kept.
    """

    def __init__(
        self,
        source: ChipSource,
        out_uri: str,
        params: ChipParams,
        existing: set[str],
        previous: dict[str, dict],
    ):
        self.source, self.out_uri, self.params = source, out_uri, params
        self.existing, self.previous = existing, previous

    def cut(
        self,
        offsets: list[tuple[int, int]],
        workers: int,
        progress: Callable[[int, int], None] | None,
    ) -> list[tuple[str, dict | None]]:
        """Every window's outcome ("written", "reused", "below") and manifest row."""
        done = [0]
        src = self.source

        def work(chunk: list[tuple[int, int]]) -> list[tuple[str, dict | None]]:
            results = []
            with (
                storage.open_raster(src.image_uri) as img,
                storage.open_raster(src.label_uri) as lab,
            ):
                for x, y in chunk:
                    results.append(self.chip(img, lab, x, y))
                    done[0] += 1
                    if progress is not None:
                        progress(done[0], len(offsets))
            return results

        workers = max(1, min(workers, len(offsets)))
        # interleave rows of chips between threads so each reads neighbouring blocks
        chunks = [offsets[i::workers] for i in range(workers)]
        with storage.gdal_env(), ThreadPoolExecutor(workers) as pool:
            return [r for chunk in pool.map(work, chunks) for r in chunk]

    def chip(self, img, lab, x: int, y: int) -> tuple[str, dict | None]:
        """The chip at (x, y) of the open image and label rasters."""
        src, params, out_uri = self.source, self.params, self.out_uri
        tx, ty = params.tile_size
        name = chip_name(src.scene, x, y)
        if name in self.existing:
            row = self.previous.get(name)
            if row is None:  # written by a run that stopped before its manifest
                labels = _read_label_chip(storage.join(out_uri, "labels", name))
                row = _manifest_row(name, x, y, labels, src.image_uri, src.label_uri, params)
            return "reused", row
        labels = label_to_classes(_padded_read(lab, x, y, tx, ty, 0, 1), src.label_nodata)
        threshold = params.min_coverage / 100.0
        # the label alone bounds the coverage from above: skip the image read when it fails
        if threshold > 0 and np.count_nonzero(labels) < threshold * tx * ty:
            return "below", None
        nodata = src.image_nodata
        pixels = _padded_read(img, x, y, tx, ty, nodata if nodata is not None else 0)
        if nodata is not None:
            labels[np.all(_equals(pixels, nodata), axis=0)] = 0
            if threshold > 0 and np.count_nonzero(labels) < threshold * tx * ty:
                return "below", None
        chip_transform = src.transform @ rasterio.Affine.translation(x, y)
        _write_geotiff(
            storage.join(out_uri, "images", name),
            pixels,
            {**src.image_profile, "transform": chip_transform},
            src.descriptions,
            src.band_tags,
        )
        _write_geotiff(
            storage.join(out_uri, "labels", name),
            labels[None],
            {**src.label_profile, "transform": chip_transform},
        )
        return "written", _manifest_row(name, x, y, labels, src.image_uri, src.label_uri, params)


def _write_manifest(manifest_uri: str, rows: list[dict]) -> dict[int, int]:
    """The scene's manifest (a row per chip, class-count columns last, in class order);
    returns the labelled pixels per class over its chips.
    """
    manifest = (
        pd.DataFrame(rows).sort_values(["y", "x"])
        if rows
        else pd.DataFrame(columns=["chip", "image", "mask", "scene", "x", "y"])
    )
    count_columns = sorted(
        (c for c in manifest.columns if c.startswith(COUNT_PREFIX)),
        key=lambda c: int(c[len(COUNT_PREFIX) :]),
    )
    manifest[count_columns] = manifest[count_columns].fillna(0).astype("int64")
    manifest = manifest[[c for c in manifest.columns if c not in count_columns] + count_columns]
    storage.write_text(manifest_uri, manifest.to_csv(index=False))
    return {int(c[len(COUNT_PREFIX) :]): int(manifest[c].sum()) for c in count_columns}


def label_windows(label_uri: str, params: ChipParams = ChipParams()) -> pd.DataFrame:
    """Class counts of the chip windows that would pass the coverage threshold, from the label
    raster alone (one strip of windows at a time): what the split will work with, known before
    any chip is cut. The image's nodata is not applied (it can only lower the counts).
    """
    tx, ty = params.tile_size
    rows = []
    with storage.open_raster(label_uri) as label:
        validate_label_values(label, label_uri)
        offsets = tile_offsets(label.width, label.height, params)
        for y in sorted({y for _, y in offsets}):
            strip = label_to_classes(_padded_read(label, 0, y, label.width, ty, 0, 1), label.nodata)
            strip = np.pad(strip, ((0, 0), (0, tx)))  # the last windows' right padding
            for x in (x for x, y0 in offsets if y0 == y):
                counts = np.bincount(strip[:, x : x + tx].ravel(), minlength=256)
                if counts[1:].sum() >= params.min_coverage / 100.0 * tx * ty and counts[1:].any():
                    rows.append(
                        {
                            "scene": label_uri,
                            "x": x,
                            "y": y,
                            "tile_x": tx,
                            "tile_y": ty,
                            "stride_x": params.stride[0],
                            "stride_y": params.stride[1],
                        }
                        | {f"{COUNT_PREFIX}{v}": int(n) for v, n in enumerate(counts) if n}
                    )
    frame = pd.DataFrame(rows)
    columns = [c for c in frame.columns if c.startswith(COUNT_PREFIX)]
    frame[columns] = frame[columns].fillna(0).astype("int64")
    return frame


def _read_label_chip(uri: str) -> np.ndarray:
    with storage.open_raster(uri) as src:
        return label_to_classes(src.read(1), src.nodata)


def _existing_pairs(out_uri: str) -> set[str]:
    """Names of chips whose image and label both exist (each was moved into place whole)."""
    images, labels = (
        {storage.basename(u) for u in storage.list_files(storage.join(out_uri, folder), ".tif")}
        for folder in ("images", "labels")
    )
    return images & labels


def _previous_rows(
    manifest_uri: str, params: ChipParams, scene_id: str, image_uri: str
) -> dict[str, dict]:
    """Rows of an earlier run's manifest; refuses to mix chips cut with other parameters or
    from another scene file of the same name.
    """
    if not storage.exists(manifest_uri):
        return {}
    frame = read_manifest(manifest_uri)
    if len(frame):
        first = frame.iloc[0]
        if "scene_id" in frame.columns and str(first["scene_id"]) != scene_id:
            raise InputMismatchError(
                f"{manifest_uri} records chips of another file named like {image_uri} "
                f"({first['scene']}, or the same path since replaced): its chips would be kept "
                "as they are. Write into a new folder, or delete that manifest and the scene's "
                "chips first."
            )
        earlier = (
            int(first["tile_x"]),
            int(first["tile_y"]),
            int(first["stride_x"]),
            int(first["stride_y"]),
        )
        now = (*params.tile_size, *params.stride)
        if earlier != now:
            raise InvalidParameterError(
                f"{manifest_uri} records chips cut with tile size {earlier[:2]} and step "
                f"{earlier[2:]}, not {now[:2]} and {now[2:]}: write into a new folder."
            )
    return {row["chip"]: row for row in frame.to_dict("records")}


def read_manifest(uri: str) -> pd.DataFrame:
    """Read one manifest CSV (count columns as integers)."""
    import io

    frame = pd.read_csv(io.StringIO(storage.read_text(uri)))
    for column in frame.columns:
        if column.startswith(COUNT_PREFIX):
            frame[column] = frame[column].fillna(0).astype("int64")
    return frame


def read_manifests(folder: str) -> pd.DataFrame | None:
    """All manifests of a chip folder concatenated, or None when the folder has none."""
    uris = storage.list_files(storage.join(folder, MANIFEST_FOLDER), ".csv")
    if not uris:
        return None
    frame = pd.concat([read_manifest(u) for u in uris], ignore_index=True)
    counts = [c for c in frame.columns if c.startswith(COUNT_PREFIX)]
    frame[counts] = frame[counts].fillna(0).astype("int64")
    return frame
