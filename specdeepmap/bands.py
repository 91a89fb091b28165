"""Scenes delivered as one file per band (Sentinel-2 JP2 at 10, 20 and 60 m): stacked on the
fly as a GDAL VRT at the finest resolution, never written out as a stacked copy.

A VRT is a small XML file that GDAL reads like any raster: every command and flow that takes
an image raster takes one. :func:`stack_bands` writes it from an ordered list of band files
(local or ``s3://``); coarser bands are resampled as they are read (``bilinear`` for
reflectance by default; ``nearest`` repeats the coarse pixels, as stacks made by pixel
repetition do). Band names come from the file names (``…_B8A.jp2`` → ``B8A``) and travel into
the dataset and the model, so a scene given in another band order is refused by name.
"""

from __future__ import annotations

import math
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from specdeepmap import storage
from specdeepmap.errors import InputMismatchError, InvalidParameterError, MissingInputError

RESAMPLING = ("bilinear", "nearest", "cubic", "average")
#: Sentinel-2 MSI band order (L1C and L2A), as in the stacked files SpecDeepMap used
SENTINEL2_ORDER = (
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
_BAND_TOKEN = re.compile(r"(?:^|[_\-.])(B\d{1,2}A?)(?=[_\-.]|$)", re.IGNORECASE)


@dataclass(frozen=True)
class BandFile:
    """One band file and what the stack needs to know about it."""

    uri: str
    name: str
    crs: object
    bounds: tuple[float, float, float, float]
    width: int
    height: int
    dtype: str
    nodata: float | None


def band_name(uri: str) -> str:
    """The band's name from its file name (``T33UUU_…_B8A.jp2`` → ``B8A``; B1 → B01), else
    the file's stem.
    """
    found = _BAND_TOKEN.findall(storage.stem(uri))
    if not found:
        return storage.stem(uri)
    token = found[-1].upper()
    number = int(token[1:].rstrip("A"))
    return f"B{number}A" if token.endswith("A") else f"B{number:02d}"


def band_files(folder_or_files: str | list[str], order: list[str] | None = None) -> list[str]:
    """Band file URIs in band order: a list as given, or the raster files of a folder sorted
    by ``order`` (band names; default: Sentinel-2's B01…B12 when the names are Sentinel-2's).
    """
    if isinstance(folder_or_files, list):
        return folder_or_files
    if os.path.splitext(folder_or_files)[1].lower() in (".jp2", ".tif", ".tiff", ".vrt"):
        return [folder_or_files]
    files = [
        u
        for u in storage.list_files(folder_or_files)
        if os.path.splitext(u)[1].lower() in (".jp2", ".tif", ".tiff")
    ]
    if not files:
        raise MissingInputError(f"No band files (.jp2, .tif) in {folder_or_files}")
    by_name = {band_name(u): u for u in files}
    if order is None:
        order = [b for b in SENTINEL2_ORDER if b in by_name]
        if len(order) != len(by_name):
            raise InvalidParameterError(
                f"{folder_or_files} holds bands {sorted(by_name)}: give the band order"
            )
    missing = [b for b in order if b not in by_name]
    if missing:
        raise MissingInputError(
            f"{folder_or_files} has no file for band(s) "
            f"{', '.join(missing)} (found {', '.join(sorted(by_name))})"
        )
    return [by_name[b] for b in order]


def _describe(uri: str) -> BandFile:
    with storage.open_raster(uri) as src:
        if src.count != 1:
            raise InputMismatchError(
                f"Band file {uri} has {src.count} bands: give one file "
                "per band (or a stacked raster directly)"
            )
        return BandFile(
            uri,
            band_name(uri),
            src.crs,
            tuple(src.bounds),
            src.width,
            src.height,
            src.dtypes[0],
            src.nodata,
        )


def _finest_common_grid(bands: list[BandFile]) -> BandFile:
    """The band with the finest pixels, once every band is checked to share its CRS, its
    extent (to half a coarse pixel) and the data type.
    """
    finest = min(bands, key=lambda b: (b.bounds[2] - b.bounds[0]) / b.width)
    for band in bands:
        if band.crs != finest.crs:
            raise InputMismatchError(
                f"Band files {finest.uri} and {band.uri} differ in CRS: {finest.crs} vs {band.crs}"
            )
        coarse = (band.bounds[2] - band.bounds[0]) / band.width
        if any(abs(a - b) > coarse / 2 for a, b in zip(band.bounds, finest.bounds, strict=True)):
            raise InputMismatchError(
                f"Band files {finest.uri} and {band.uri} cover different "
                f"extents: {finest.bounds} vs {band.bounds}"
            )
    dtypes = {b.dtype for b in bands}
    if len(dtypes) > 1:
        raise InputMismatchError(f"Band files differ in data type: {sorted(dtypes)}")
    return finest


def _vrt_band(
    root, index: int, band: BandFile, name: str, gdal_type: str, resampling: str, grid: tuple
) -> None:
    """One band file as a VRT band placed on the finest grid (left, top, res_x, res_y)."""
    left, top, res_x, res_y = grid
    element = ET.SubElement(root, "VRTRasterBand", dataType=gdal_type, band=str(index))
    ET.SubElement(element, "Description").text = name
    if band.nodata is not None and not math.isnan(band.nodata):
        ET.SubElement(element, "NoDataValue").text = repr(float(band.nodata))
    source = ET.SubElement(element, "ComplexSource", resampling=resampling)
    # absolute: the VRT may be written anywhere (a work folder, a temporary file, S3)
    ET.SubElement(source, "SourceFilename", relativeToVRT="0").text = (
        storage.gdal_path(band.uri)
        if storage.is_s3(band.uri)
        else os.path.abspath(storage.local_path(band.uri))
    )
    ET.SubElement(source, "SourceBand").text = "1"
    ET.SubElement(
        source, "SrcRect", xOff="0", yOff="0", xSize=str(band.width), ySize=str(band.height)
    )
    ET.SubElement(
        source,
        "DstRect",
        xOff=repr((band.bounds[0] - left) / res_x),
        yOff=repr((top - band.bounds[3]) / res_y),
        xSize=repr((band.bounds[2] - band.bounds[0]) / res_x),
        ySize=repr((band.bounds[3] - band.bounds[1]) / res_y),
    )
    if band.nodata is not None and not math.isnan(band.nodata):
        ET.SubElement(source, "NODATA").text = repr(float(band.nodata))


def stack_bands(
    band_uris: list[str],
    vrt_path: str,
    resampling: str = "bilinear",
    names: list[str] | None = None,
    overwrite: bool = False,
) -> str:
    """Write a VRT stacking single-band files (same CRS and extent) at the finest resolution.

    Args:
        band_uris: band files in band order (local or ``s3://``).
        vrt_path: local path of the VRT to write (atomically).
        resampling: how coarser bands are brought onto the finest grid.
        names: band names (default: from the file names).
        overwrite: replace an existing file at ``vrt_path`` (a band file is never replaced).

    Raises:
        InputMismatchError: CRS or extents differ, or a file has several bands.
        OutputConflictError: ``vrt_path`` is one of the band files, or exists (without
            ``overwrite``).
        InvalidParameterError: ``vrt_path`` does not end in ``.vrt``.
    """
    from specdeepmap import guards

    if not vrt_path.lower().endswith(".vrt"):
        raise InvalidParameterError(
            f"{vrt_path}: the stack is a GDAL VRT (XML that points at the band files); give "
            "it a .vrt name"
        )
    guards.refuse_overwriting_inputs(
        {"VRT": vrt_path}, {f"band file {i}": u for i, u in enumerate(band_uris, 1)}
    )
    guards.refuse_foreign_output(vrt_path, "VRT", None, overwrite)
    if resampling not in RESAMPLING:
        raise InvalidParameterError(
            f"resampling must be one of {', '.join(RESAMPLING)}, got {resampling!r}"
        )
    if not band_uris:
        raise InvalidParameterError("give at least one band file")
    bands = [_describe(u) for u in band_uris]
    names = names or [b.name for b in bands]
    if len(names) != len(bands) or len(set(names)) != len(names):
        raise InvalidParameterError(f"band names {names} must be unique, one per file")
    finest = _finest_common_grid(bands)
    left, bottom, right, top = finest.bounds
    res_x = (right - left) / finest.width
    res_y = (top - bottom) / finest.height
    # GDAL's plain nearest path decodes a JPEG 2000 source again for every row it upsamples
    # (40 s instead of 0.7 s for the shared 13-band scene); "mode", when upsampling, takes the
    # one source pixel under each destination pixel: the same values, read once
    gdal_resampling = "mode" if resampling == "nearest" else resampling
    root = ET.Element("VRTDataset", rasterXSize=str(finest.width), rasterYSize=str(finest.height))
    ET.SubElement(root, "SRS").text = finest.crs.to_wkt()
    ET.SubElement(root, "GeoTransform").text = ", ".join(
        repr(float(v)) for v in (left, res_x, 0.0, top, 0.0, -res_y)
    )
    gdal_type = {
        "uint8": "Byte",
        "uint16": "UInt16",
        "int16": "Int16",
        "uint32": "UInt32",
        "int32": "Int32",
        "float32": "Float32",
        "float64": "Float64",
    }[bands[0].dtype]
    for index, (band, name) in enumerate(zip(bands, names, strict=True), start=1):
        _vrt_band(root, index, band, name, gdal_type, gdal_resampling, (left, top, res_x, res_y))
    ET.indent(root)
    storage.write_text(vrt_path, ET.tostring(root, encoding="unicode") + "\n")
    return vrt_path


def stack_scene(band_uris: list[str], folder: str, resampling: str = "bilinear") -> str:
    """Stack a scene's band files as ``folder/<scene name>.vrt`` (:func:`scene_name`)."""
    return stack_bands(
        band_uris, storage.join(folder, f"{scene_name(band_uris)}.vrt"), resampling, overwrite=True
    )  # the pipeline's own work folder


def same_band_order(expected: list[str], found: list[str], what: str) -> None:
    """Refuse a scene whose named bands are in another order than the model's (by name, when
    both sides have real names: GDAL's ``band N`` defaults are not names).
    """

    def real(names):
        return names and all(n and not re.fullmatch(r"band \d+", n) for n in names)

    if real(expected) and real(found) and list(expected) != list(found):
        moved = next(i for i, (a, b) in enumerate(zip(expected, found, strict=False)) if a != b)
        raise InputMismatchError(
            f"{what} has its bands in another order than the model: band {moved + 1} is "
            f"{found[moved]}, the model expects {expected[moved]} (model: {', '.join(expected)};"
            f" scene: {', '.join(found)})"
        )


def scene_name(band_uris: list[str]) -> str:
    """A scene's name from its band files: the first file's stem without the band token
    (``T33UUU_20170216T102101_B01`` → ``T33UUU_20170216T102101``).
    """
    stem = storage.stem(band_uris[0])
    return _BAND_TOKEN.sub("", stem).strip("_-.") or stem


__all__ = [
    "BandFile",
    "RESAMPLING",
    "SENTINEL2_ORDER",
    "band_files",
    "band_name",
    "same_band_order",
    "scene_name",
    "stack_bands",
    "stack_scene",
]
