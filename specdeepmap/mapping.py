"""Deep Learning Mapper: whole-scene prediction, streamed, batched and seamlessly blended.

The scene is covered by overlapping windows (the last window of each row and column aligned to
the scene edge; a scene smaller than a window is padded). Class probabilities of overlapping
windows are blended with a smooth weight window (cosine ramps by default) instead of cropping
margins, so no seams remain. Windows are processed row by row, a batch at a time: pixels are
finalised as soon as no later window touches them, only the rows a row of windows shares with
the next are carried over, and a background thread reads the next batch while the model runs.
On the CPU the network can run quantized to int8 (``precision="int8"``, see
:mod:`specdeepmap.quantization`).

Output: a GeoTIFF with the input's CRS and transform, class values mapped back to the original
label values (uint8, or uint16 for values above 255), input nodata → 0 (the output nodata),
finished as a Cloud Optimized GeoTIFF (DEFLATE, overviews) and moved/uploaded atomically, with
lineage tags (model, run, input, software version).

An input without a CRS is mapped with a warning (the output has no CRS either): pixel
prediction does not need one, and refusing would block ungeoreferenced imagery.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import rasterio
import rasterio.enums
import rasterio.errors
import rasterio.shutil
import torch
from rasterio.windows import Window

from specdeepmap import __version__, storage
from specdeepmap.bands import same_band_order
from specdeepmap.classes import ClassSchema, pam_xml, qml
from specdeepmap.clouds import check_detector, detect_clouds
from specdeepmap.drift import Verdict
from specdeepmap.errors import InputMismatchError, InvalidParameterError
from specdeepmap.evaluation import accumulate, metrics_from_matrix, write_iou_csv
from specdeepmap.inference import Predictor, fold_batch_norms, load_model
from specdeepmap.masks import MaskReader, QualityMask, check_masks, masked_value, with_masked
from specdeepmap.params import MapParams
from specdeepmap.scene_quality import QUALITY_SUFFIX, SceneQuality, write_quality

log = logging.getLogger(__name__)


@dataclass
class MapReport:
    """What :func:`map_scene` wrote and measured."""

    output_uri: str
    windows: int
    pixels_processed: int
    seconds: float
    confidence_uri: str | None = None
    iou_csv: str | None = None
    mean_iou: float | None = None
    window: int = 0
    batch_size: int = 0
    #: preparing the network: int8 quantization and calibration, or batch-norm folding
    #: (part of ``seconds``)
    setup_seconds: float = 0.0
    verdict: Verdict | None = None  #: does the scene look like the model's training data?
    quality_uri: str | None = None  #: the quality JSON beside the map
    masked_share: float = 0.0  #: share of the pixels with data that the mask flagged
    #: why the scene was not mapped (almost all of it masked); nothing was written
    skipped: str | None = None
    #: seconds the quality mask and the verdict took on the mapping's main thread (part of
    #: ``seconds``), and reading the mask in the reader thread (beside the network's work)
    guard_seconds: float = 0.0
    mask_read_seconds: float = 0.0


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start offsets covering [0, size) with the fewest windows no more than ``stride`` apart,
    spread evenly: the first at 0, the last aligned to the end, every overlap about equal
    (an edge-aligned last window spaced like the others, not piled onto its neighbour).
    """
    if size <= window:
        return [0]
    gaps = math.ceil((size - window) / stride)
    return [round(i * (size - window) / gaps) for i in range(gaps + 1)]


def _processed_pixels(height: int, width: int, window: int, stride: int) -> int:
    rows, cols = _padded_shape(height, width, window)
    return (
        len(window_starts(height, window, stride))
        * len(window_starts(width, window, stride))
        * rows
        * cols
    )


#: pixels per forward pass (a batch of windows, or one window): what bounds the network's
#: activations, the mapper's largest memory (a U-Net/ResNet-18 at 512² holds ~120 MB at its
#: peak, at 1024² four times that), and enough to batch
BATCH_PIXELS = 512 * 512


def choose_window(height: int, width: int, tile: int, overlap_px: int) -> int:
    """The window (1, 2 or 4 × the training tile, no more than :data:`BATCH_PIXELS`) that
    processes the fewest pixels.

    A fully convolutional model accepts windows larger than its training chips; larger
    windows repeat less of the overlap (at 10 % overlap a 2 × tile window processes about
    1.23 × the scene's pixels where a 1 × tile window processes 1.56 ×), but near the scene
    size the edge-aligned last window repeats more. Capped so that memory stays bounded
    whatever the scene (one forward pass of a bigger window costs more memory than its saved
    overlap is worth).
    """
    candidates = [tile * f for f in (1, 2, 4) if f == 1 or (tile * f) ** 2 <= BATCH_PIXELS]
    return min(
        candidates, key=lambda w: (_processed_pixels(height, width, w, max(1, w - overlap_px)), -w)
    )


def weight_window(size: int, ramp: int, kind: str) -> np.ndarray:
    """1-D blending weights: rising over ``ramp`` px at both ends, 1 in the middle, never 0."""
    w = np.ones(size, dtype=np.float32)
    if kind == "none" or ramp <= 0:
        return w
    if kind == "crop":  # margins of half the overlap count (almost) nothing
        margin = ramp // 2
        w[:margin] = w[size - margin :] = 1e-6
        return w
    i = np.arange(ramp, dtype=np.float32) + 0.5
    if kind == "linear":
        edge = i / ramp
    elif kind == "gaussian":
        edge = np.exp(-0.5 * ((ramp - i) / (ramp / 2.5)) ** 2)
    else:
        edge = 0.5 - 0.5 * np.cos(np.pi * i / ramp)
    w[:ramp] = np.minimum(w[:ramp], edge)
    w[-ramp:] = np.minimum(w[-ramp:], edge[::-1])
    return np.maximum(w, 1e-3)  # a pixel only one window covers keeps that window's vote


def _check_input(
    src: rasterio.DatasetReader, predictor: Predictor, uri: str, model_uri: str
) -> None:
    """Band count must match; warn when values look wrong for the stored normalisation."""
    if src.count != predictor.in_channels:
        raise InputMismatchError(
            f"{uri} has {src.count} bands, the model {model_uri} was "
            f"trained on {predictor.in_channels}"
        )
    same_band_order(predictor.config.get("band_names") or [], list(src.descriptions), uri)
    if src.crs is None:
        warnings.warn(f"{uri} has no CRS: mapping anyway, the output will have none", stacklevel=3)
    norm = predictor.normalization
    h, w = min(src.height, 256), min(src.width, 256)
    sample = src.read(window=Window((src.width - w) // 2, (src.height - h) // 2, w, h))
    valid = (
        sample[:, ~np.all(sample == norm.nodata, axis=0)]
        if norm.nodata is not None
        else sample.reshape(sample.shape[0], -1)
    )
    if valid.size and np.issubdtype(valid.dtype, np.floating) and not np.isfinite(valid).all():
        share = float(np.mean(~np.isfinite(valid).all(axis=0)))
        warnings.warn(
            f"{uri}: {share:.1%} of the sampled pixels hold NaN or infinite values: "
            "they are left unclassified (0), like nodata",
            stacklevel=3,
        )
        valid = np.where(np.isfinite(valid), valid, 0)
    if valid.size and norm.scaler and norm.scaler >= 100 and float(np.nanmax(valid)) <= 2.0:
        warnings.warn(
            f"{uri} holds values up to {float(np.nanmax(valid)):.3g}, but the model "
            f"divides inputs by {norm.scaler}: is the input already scaled?",
            stacklevel=3,
        )
    if valid.size and norm.mean is not None:
        x = norm.apply(valid[:, None, :].astype(np.float32))
        if np.nanmedian(np.abs(x)) > 20:
            warnings.warn(
                f"{uri}: after the model's normalisation the input is far from the "
                "training data (median |z| > 20); check the bands and the scaler",
                stacklevel=3,
            )


def check_writable(uri: str) -> None:
    """Fail early when the output location cannot be written."""
    storage.check_writable_folder(
        uri if storage.is_s3(uri) else storage.parent(uri), f"Output {uri}"
    )


#: bytes per window pixel beyond the input and the blending buffers: the network's
#: activations (a ResNet-18 U-Net at fp32 peaks near 2 KB per pixel)
ACTIVATION_BYTES_PER_PIXEL = 2048


def check_memory(src, window: int, batch_size: int, classes: int, uri: str) -> None:
    """Refuse a window and batch size whose buffers would not fit in the available memory.

    Checked before any allocation: ``--window 100000`` would otherwise ask for tens of GiB.
    """
    import psutil

    pad_h, pad_w = _padded_shape(src.height, src.width, window)
    batch_pixels = batch_size * pad_h * pad_w
    # input (raw, float32, the prefetched batch), activations, blending buffers
    need = batch_pixels * (src.count * 4 * 3 + ACTIVATION_BYTES_PER_PIXEL) + (
        classes + 1
    ) * 4 * pad_h * (src.width + batch_size * pad_w)
    available = psutil.virtual_memory().available
    if need > available:
        raise InvalidParameterError(
            f"mapping {uri} with {pad_w} x {pad_h} px windows, {batch_size} per batch, needs "
            f"about {need / 2**30:.1f} GiB, more than the {available / 2**30:.1f} GiB "
            "available: give a smaller --window or --batch-size (or leave both to their "
            "defaults)"
        )


def _is_our_raster(uri: str) -> bool:
    """True for a raster this mapper wrote (it carries the ``SPECDEEPMAP_MODEL`` tag)."""
    try:
        with storage.open_raster(uri) as src:
            return "SPECDEEPMAP_MODEL" in src.tags()
    except (OSError, rasterio.errors.RasterioError):
        return False


def _is_our_iou_csv(uri: str) -> bool:
    """True for an IoU CSV in SpecDeepMap's format (``Class,IoU`` header)."""
    try:
        return storage.read_bytes(uri)[:9] == b"Class,IoU"
    except OSError:
        return False


def check_outputs(
    input_uri: str,
    model_uri: str,
    gt_uri: str | None,
    outputs: dict[str, str | None],
    overwrite: bool = False,
) -> None:
    """Before any work.

    No output replaces the scene, the model or the ground truth (nor their sidecars), no two outputs
    are one file, and an existing output that is not a map of ours is replaced only with
    ``overwrite``.
    """
    from specdeepmap import guards

    class_map = outputs.get("class map")
    if class_map:  # the sidecars written beside the map are outputs too
        outputs = {
            **outputs,
            "category names (.aux.xml)": class_map + ".aux.xml",
            "QGIS style (.qml)": map_base(class_map) + ".qml",
        }
    iou_csv = outputs.get("IoU CSV")
    if iou_csv:
        base = iou_csv[:-4] if iou_csv.endswith(".csv") else iou_csv
        outputs = {**outputs, "metrics CSV": base + "_metrics.csv"}
    inputs = {
        "input scene": input_uri,
        "ground truth": gt_uri,
        "model file": None if model_uri.startswith("models:/") else model_uri,
    }
    guards.refuse_overwriting_inputs(outputs, inputs)
    for role in ("class map", "confidence raster", "probability raster"):
        if outputs.get(role):
            guards.refuse_foreign_output(outputs[role], role, _is_our_raster, overwrite)
    if iou_csv:
        guards.refuse_foreign_output(iou_csv, "IoU CSV", _is_our_iou_csv, overwrite)


def map_scene(
    input_uri: str,
    model_uri: str,
    output_uri: str,
    params: MapParams = MapParams(),
    gt_uri: str | None = None,
    iou_csv_uri: str | None = None,
    confidence_uri: str | None = None,
    probabilities_uri: str | None = None,
    vector_uri: str | None = None,
    predictor: Predictor | None = None,
    overwrite: bool = False,
    mask: QualityMask | None = None,
) -> MapReport:
    """Predict a whole scene (a raster, a VRT or a STAC item) into a class-map COG (Deep
    Learning Mapper).

    The map carries the model's classes: a colour table, category names in ``MAP.tif.aux.xml``
    (GDAL's sidecar, read by QGIS and ArcGIS) and a QGIS style ``MAP.qml``.

    Args:
        input_uri: input raster (local or ``s3://``).
        model_uri: model file path/URI or ``models:/NAME/VERSION`` / ``models:/NAME@ALIAS``.
        output_uri: output GeoTIFF URI (local or ``s3://``).
        params: overlap, window, batch size, blending, precision, device.
        gt_uri: optional ground-truth label raster on the same grid; with ``iou_csv_uri``
            writes SpecDeepMap's IoU CSV and a ``*_metrics.csv`` beside it.
        iou_csv_uri: where the IoU CSV goes.
        confidence_uri: optional GeoTIFF of the top-class probability (uint8, 0–255).
        probabilities_uri: optional GeoTIFF of every class's probability (uint8, one band
            per class in the order of the class values).
        vector_uri: optional GeoPackage of class polygons (class 0 dropped).
        predictor: an already loaded model (saves reloading across scenes).
        overwrite: replace existing outputs that are not maps of ours (an input is never
            replaced).
        mask: pixels to leave unclassified (cloud, shadow, snow...): they get one reserved
            value (:func:`~specdeepmap.masks.masked_value`). A STAC item's own mask asset is
            used when none is given, else ``params.cloud_mask``'s detector when one is set
            (:mod:`specdeepmap.clouds`). A scene whose mask flags more than
            ``params.max_masked_share`` is not mapped (the report says why).

    Returns:
        The report, with the scene's drift verdict (:mod:`specdeepmap.drift`), also written
        to ``MAP_quality.json`` beside the map.

    Raises:
        OutputConflictError: an output is an input, two outputs are one file, or an output
            exists and is not ours (without ``overwrite``); checked before any work.
    """
    from specdeepmap.stac import is_item, item_scene

    started = time.perf_counter()
    check_detector(params.cloud_mask)
    check_outputs(
        input_uri,
        model_uri,
        gt_uri,
        {
            "class map": output_uri,
            "confidence raster": confidence_uri,
            "probability raster": probabilities_uri,
            "polygon file": vector_uri,
            "IoU CSV": iou_csv_uri,
            "quality JSON": map_base(output_uri) + QUALITY_SUFFIX,
        },
        overwrite,
    )
    predictor = predictor or load_for_engine(model_uri, params)
    if is_item(input_uri):  # the item's assets for the model's bands, stacked by name
        from specdeepmap.stac import item_mask

        mask = mask or item_mask(input_uri)
        with tempfile.TemporaryDirectory(prefix="specdeepmap-scene-") as folder:
            scene = item_scene(
                input_uri,
                predictor.config.get("band_names") or [],
                os.path.join(folder, "scene.vrt"),
            )
            return map_scene(
                scene,
                model_uri,
                output_uri,
                params,
                gt_uri,
                iou_csv_uri,
                confidence_uri,
                probabilities_uri,
                vector_uri,
                predictor,
                overwrite=True,
                mask=mask,
            )  # checked above
    check_writable(output_uri)
    tile = max(predictor.tile_size)
    overlap_px = math.ceil(2 * params.overlap / 100 * tile)
    values = predictor.value_lut()[1:]
    dtype = "uint8" if values.max() < 256 else "uint16"
    with contextlib.ExitStack() as stack:
        # the windows' blocks decoded on as many threads as the network uses
        src = stack.enter_context(storage.open_raster(input_uri, threads=torch.get_num_threads()))
        _check_input(src, predictor, input_uri, model_uri)
        detecting = time.perf_counter()
        if mask is None and params.cloud_mask:  # a scene's own mask wins over the detector
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="specdeepmap-clouds-"))
            clouds = detect_clouds(
                src, input_uri, os.path.join(folder, "clouds.tif"), params.cloud_threshold
            )
            log.info("%s: %s flags %.1f%% as cloud", input_uri, clouds.detector, 100 * clouds.share)
            mask = clouds.quality_mask()
        quality = SceneQuality(src.count, len(values), predictor.normalization.scaler, mask)
        quality.seconds += time.perf_counter() - detecting
        if mask is not None:
            checking = time.perf_counter()
            share = check_masks(mask, src)
            quality.seconds += time.perf_counter() - checking
            if share > params.max_masked_share:
                reason = (
                    f"{share:.0%} of the scene is masked (more than "
                    f"{params.max_masked_share:.0%}): not mapped"
                )
                log.warning("%s: %s", input_uri, reason)
                return MapReport(output_uri, 0, 0, time.perf_counter() - started, skipped=reason)
            quality.masked_value = masked_value(list(values))
            quality.reader = stack.enter_context(MaskReader(mask, src))
        window = params.window or choose_window(src.height, src.width, tile, overlap_px)
        # a window larger than the scene maps it in one padded window either way
        window = min(window, max(_to_stride(src.height), _to_stride(src.width)))
        stride = max(1, window - overlap_px)
        batch_size = params.batch_size or max(1, BATCH_PIXELS // (window * window))
        check_memory(src, window, batch_size, len(values), input_uri)
        blend_1d = weight_window(window, overlap_px, params.blend)
        blend = np.outer(blend_1d, blend_1d)
        setup_started = time.perf_counter()
        predictor = prepare_predictor(predictor, params, lambda: _calibration_windows(src, 128))
        setup_seconds = time.perf_counter() - setup_started
        if params.precision == "int8":  # quantized networks take plain NCHW input
            params = params.model_copy(update={"channels_last": False})
        gt = stack.enter_context(storage.open_raster(gt_uri)) if gt_uri else None
        if gt is not None and (gt.width, gt.height) != (src.width, src.height):
            raise InputMismatchError(
                f"Ground truth {gt_uri} is {gt.width} x {gt.height}, "
                f"the input {input_uri} {src.width} x {src.height}"
            )
        report = _stream(
            src,
            gt,
            predictor,
            params,
            window,
            stride,
            batch_size,
            blend,
            values,
            dtype,
            input_uri,
            model_uri,
            output_uri,
            {"confidence": confidence_uri, "probabilities": probabilities_uri},
            quality,
        )
    if vector_uri:
        from specdeepmap.vectorize import polygonize

        polygonize(output_uri, vector_uri)
    matrix = report.pop("matrix")
    if report["classified"] == 0:
        warnings.warn(
            f"{input_uri}: every pixel is nodata (or NaN): the map {output_uri} holds no class",
            stacklevel=2,
        )
    verdict = quality.verdict(predictor.config)
    quality_uri = write_quality(map_base(output_uri) + QUALITY_SUFFIX, quality.summary(verdict))
    if verdict.suspect:
        log.warning("%s: %s", input_uri, verdict.sentence())
    result = MapReport(
        output_uri=output_uri,
        windows=report["windows"],
        pixels_processed=report["pixels"],
        seconds=0.0,
        confidence_uri=confidence_uri,
        window=window,
        batch_size=batch_size,
        setup_seconds=setup_seconds,
        verdict=verdict,
        quality_uri=quality_uri,
        masked_share=quality.masked_share,
        guard_seconds=quality.seconds,
        mask_read_seconds=quality.reader_seconds,
    )
    if gt_uri is not None:
        metrics = metrics_from_matrix(matrix, [int(v) for v in values])
        result.mean_iou = metrics.mean_iou
        if iou_csv_uri:
            names = predictor.classes
            write_iou_csv(
                iou_csv_uri,
                metrics.class_values,
                metrics.iou,
                [names.name(v) for v in metrics.class_values] if names.named else None,
            )
            base = iou_csv_uri[:-4] if iou_csv_uri.endswith(".csv") else iou_csv_uri
            storage.write_text(base + "_metrics.csv", metrics.table().to_csv(index=False))
            result.iou_csv = iou_csv_uri
    result.seconds = time.perf_counter() - started
    log.info(
        "Mapped %s → %s: %d windows in %.1f s",
        input_uri,
        output_uri,
        result.windows,
        result.seconds,
    )
    return result


def load_for_engine(model_uri: str, params: MapParams) -> Predictor:
    """The model as ``params.engine`` runs it: torch, or ONNX Runtime on the model's ONNX
    file (exported and, for int8, calibrated once per model file:
    :func:`specdeepmap.onnx_model.cached_onnx`). An ``.onnx`` model always runs on ONNX
    Runtime.
    """
    if params.engine == "onnxruntime" and not model_uri.lower().endswith(".onnx"):
        if params.precision == "bf16":
            raise InvalidParameterError(
                "--engine onnxruntime maps in fp32 or int8 (bf16 is torch's autocast)"
            )
        from specdeepmap.onnx_model import cached_onnx, load_onnx

        return load_onnx(cached_onnx(model_uri, int8=params.precision == "int8"))
    return load_model(model_uri, params.device)


def prepare_predictor(
    predictor: Predictor, params: MapParams, calibration: Callable[[], list[np.ndarray]]
) -> Predictor:
    """The network as the mapper runs it: its batch norms folded, then either an int8 copy
    calibrated on ``calibration()`` (raw windows) or the network itself, with
    ``params.channels_last`` its weights channels-last. Folding and the memory format change
    ``predictor``'s network in place (its outputs stay the same), so that a process never holds
    two copies of it; folded first, the int8 trace shares the folded weights instead of fusing
    batch norms into copies of them (~45 MB for a ResNet-18 U-Net).
    """
    if predictor.model is None:  # an ONNX model: ONNX Runtime optimises its own graph
        stored = getattr(predictor, "precision", "fp32")
        if params.precision != stored:
            raise InvalidParameterError(
                f"{predictor.source} is an {stored} ONNX model: it maps in {stored} "
                f"(precision {params.precision} asked; export the model again with the "
                "precision wanted, or map a torch model with --engine onnxruntime)"
            )
        return predictor
    fold_batch_norms(predictor.model, predictor.in_channels)
    if params.precision == "int8":
        from specdeepmap.quantization import quantize_int8

        return quantize_int8(predictor, calibration())
    if params.channels_last:
        predictor.model.to(memory_format=torch.channels_last)
    return predictor


def _to_stride(size: int) -> int:
    """``size`` rounded up to a multiple of 32 px, the encoders' output stride."""
    return -(-size // 32) * 32


def _padded_shape(height: int, width: int, window: int) -> tuple[int, int]:
    """(rows, cols) of every window: ``window``, or the scene rounded up to 32 px (the
    encoders' stride) along an axis shorter than a window, which one padded window covers.
    """
    return (
        window if height > window else _to_stride(height),
        window if width > window else _to_stride(width),
    )


def _read_span(src, y: int, x0: int, x1: int, rows: int, fill: float) -> np.ndarray:
    """Input rows [y, y + rows) × columns [x0, x1), padded with ``fill`` beyond the scene."""
    h = min(rows, src.height - y)
    w = min(x1, src.width) - x0
    data = src.read(window=Window(x0, y, w, h))
    if h < rows or w < x1 - x0:
        data = np.pad(data, ((0, 0), (0, rows - h), (0, x1 - x0 - w)), constant_values=fill)
    return data


def _calibration_windows(src, size: int, count: int = 8) -> list[np.ndarray]:
    """Up to ``count`` ``size``² crops spread evenly over the scene, for int8 calibration.

    Activation ranges are per tensor, so small crops from across the scene calibrate as well as
    whole windows at a fraction of the cost (observers are slow): on the demo model eight 128²
    crops change the class of 0.029 % of pixels against fp32, as eight 256² crops do, at a third
    of the setup time. Much smaller crops leave the deepest layers only a few pixels to observe
    (32² crops: 41 % of classes kept).
    """
    size = min(size, src.height, src.width)
    ys = np.linspace(0, src.height - size, math.ceil(math.sqrt(count))).round().astype(int)
    xs = np.linspace(0, src.width - size, math.ceil(count / len(ys))).round().astype(int)
    pad = _to_stride(size)
    fill = src.nodata if src.nodata is not None else 0
    return [
        _read_span(src, int(y), int(x), int(x) + pad, pad, fill)[None]
        for y in np.unique(ys)
        for x in np.unique(xs)
    ][:count]


def _stream(
    src,
    gt,
    predictor: Predictor,
    params: MapParams,
    window: int,
    stride: int,
    batch_size: int,
    blend: np.ndarray,
    values: np.ndarray,
    dtype: str,
    input_uri: str,
    model_uri: str,
    output_uri: str,
    extras: dict[str, str | None],
    quality: SceneQuality,
) -> dict:
    """The streaming loop; writes temporary tiled GeoTIFFs, then the final COGs.

    Memory: the only float buffer that spans the scene is the carry band (classes × overlap
    rows × scene width): what a row of windows adds to the rows it shares with the next row.
    Input is read one batch of windows at a time (the next batch in a background thread while
    the model runs); pixels are finalised (blend, argmax, nodata) one batch's columns at a
    time, as soon as no later window touches them, and written straight away (GDAL's block
    cache completes the blocks two batches share).

    ``extras`` may name a ``confidence`` (top-class probability) and a ``probabilities``
    (one band per class) output; both are uint8, probability × 255. ``quality`` masks the
    finished pixels and counts what the scene's verdict needs.
    """
    height, width = src.height, src.width
    ys = window_starts(height, window, stride)
    xs = window_starts(width, window, stride)
    pad_h, pad_w = _padded_shape(height, width, window)
    weights = blend[:pad_h, :pad_w]
    k = len(values)
    nodata = src.nodata
    fill = nodata if nodata is not None else 0
    class_values = [int(v) for v in values]
    classes_schema = predictor.classes
    legend_values = class_values
    if quality.mask is not None:  # the masked pixels' value in every legend
        classes_schema = with_masked(classes_schema, quality.masked_value, quality.mask.label)
        legend_values = [*class_values, quality.masked_value]
    staging = tempfile.mkdtemp(prefix="specdeepmap-map-")
    matrix = np.zeros((k, k), dtype=np.int64)
    pixels = classified = 0
    profile = dict(
        driver="GTiff",
        width=width,
        height=height,
        count=1,
        dtype=dtype,
        crs=src.crs,
        transform=src.transform,
        nodata=0,
        tiled=True,
        blockxsize=256,
        blockysize=256,
    )
    tags = {
        "SPECDEEPMAP_MODEL": model_uri,
        "SPECDEEPMAP_MODEL_RUN_ID": str(predictor.config.get("run_id", "")),
        # the registered model version when mapped with models:/NAME/VERSION, and the
        # software that trained the model (not to be confused: they were one tag before)
        "SPECDEEPMAP_MODEL_VERSION": model_uri.rsplit("/", 1)[-1]
        if model_uri.startswith("models:/") and "@" not in model_uri
        else "",
        "SPECDEEPMAP_TRAINED_WITH": f"specdeepmap {predictor.config.get('version', '')}",
        "SPECDEEPMAP_INPUT": input_uri,
        "SPECDEEPMAP_SOFTWARE": f"specdeepmap {__version__}",
        "SPECDEEPMAP_CLASS_VALUES": ",".join(str(v) for v in class_values),
        "SPECDEEPMAP_CLASS_NAMES": json.dumps({v: classes_schema.name(v) for v in class_values}),
        "SPECDEEPMAP_PRECISION": params.precision,
        "SPECDEEPMAP_MASKED_VALUE": str(quality.masked_value) if quality.mask else "",
    }
    # every forward pass: (window row, its first window's index in xs)
    jobs = [(r, b) for r in range(len(ys)) for b in range(0, len(xs), batch_size)]

    def read_batch(r: int, b: int) -> tuple:
        """The batch's windows (N, C, rows, cols), its span (C, rows, cols), the span's
        nodata mask and its quality mask (True: masked; None without).
        """
        x0 = xs[b]
        batch_x = xs[b : b + batch_size]
        span = _read_span(src, ys[r], x0, batch_x[-1] + pad_w, pad_h, fill)
        mask = np.all(span == nodata, axis=0) if nodata is not None else None
        if np.issubdtype(span.dtype, np.floating):
            # NaN or ±inf in any band: no data (a NaN nodata never equals itself), and
            # zeroed so that no NaN reaches the network
            broken = ~np.isfinite(span).all(axis=0)
            if broken.any():
                span[:, broken] = 0
                mask = broken if mask is None else mask | broken
        windows = np.stack([span[:, :, x - x0 : x - x0 + pad_w] for x in batch_x])
        return windows, span, mask, quality.read_mask(ys[r], x0, batch_x[-1] + pad_w, pad_h)

    extras = {name: uri for name, uri in extras.items() if uri}
    bands = {"confidence": 1, "probabilities": k}
    try:
        class_tmp = os.path.join(staging, "classes.tif")
        with contextlib.ExitStack() as stack:
            out = stack.enter_context(rasterio.open(class_tmp, "w", **profile))
            extra_out = {
                name: stack.enter_context(
                    rasterio.open(
                        os.path.join(staging, f"{name}.tif"),
                        "w",
                        **{**profile, "dtype": "uint8", "count": bands[name]},
                    )
                )
                for name in extras
            }
            reader = stack.enter_context(ThreadPoolExecutor(1))
            # Channel k of each buffer holds the blending weight sum. ``carry``: what earlier
            # rows of windows added to the rows the next row of windows shares with them
            # (overlap × scene width); ``work``: the current batch's columns (constant size).
            gaps = [b - a for a, b in zip(ys, ys[1:], strict=False)] or [pad_h]
            carry = np.zeros((k + 1, max(0, pad_h - min(gaps)), max(width, pad_w)), np.float32)
            spans = [
                xs[min(b + batch_size, len(xs)) - 1] - xs[b] + pad_w
                for b in range(0, len(xs), batch_size)
            ]
            work = np.zeros((k + 1, pad_h, max(spans)), np.float32)
            work_t = torch.from_numpy(work)  # a view: torch's element-wise ops use every core
            weights_t = torch.from_numpy(np.ascontiguousarray(weights))
            future = reader.submit(read_batch, *jobs[0])
            for j, (r, b) in enumerate(jobs):
                y = ys[r]
                batch, span, mask, flagged = future.result()
                if j + 1 < len(jobs):
                    future = reader.submit(read_batch, *jobs[j + 1])
                batch_x = xs[b : b + batch_size]
                c0 = batch_x[0]
                if b == 0:  # a new row of windows
                    # rows [y, next y) are final once this row is done; the rows below them
                    # are shared with the next row and carried over to it
                    rows = (ys[r + 1] if r + 1 < len(ys) else min(height, y + pad_h)) - y
                    carried_in = ys[r - 1] + pad_h - y if r else 0
                    carry_out = pad_h - rows if r + 1 < len(ys) else 0
                    work[:] = 0
                    work_x = pulled = 0
                else:  # drop the finalised columns left of this batch
                    keep = pulled - c0
                    work[:, :, :keep] = work[:, :, c0 - work_x : pulled - work_x].copy()
                    work[:, :, keep:] = 0
                    work_x = c0
                end = batch_x[-1] + pad_w
                if carried_in and end > pulled:  # what earlier rows added to these columns
                    work[:, :carried_in, pulled - work_x : end - work_x] += carry[
                        :, :carried_in, pulled:end
                    ]
                pulled = max(pulled, end)
                probs = predictor.probabilities(
                    batch,
                    autocast=params.precision == "bf16",
                    channels_last=params.channels_last,
                    tta=params.tta,
                ).cpu()
                pixels += probs.shape[0] * pad_h * pad_w
                for i, x in enumerate(batch_x):
                    region = work_t[:, :, x - work_x : x - work_x + pad_w]
                    region[:k].addcmul_(probs[i], weights_t)
                    region[k].add_(weights_t)
                # columns [this batch's first window, the next batch's) are final: no later
                # window of this row touches them
                c1 = xs[b + batch_size] if b + batch_size < len(xs) else width
                done = work[:, :, : c1 - c0]
                if carry_out:
                    carry[:, :carry_out, c0:c1] = done[:, rows:]
                # the weight sum is the same for every class: the argmax needs no division
                classes = values[done[:k, :rows].argmax(axis=0)].astype(dtype)
                if mask is not None:
                    classes[mask[:rows, : c1 - c0]] = 0
                masked = quality.finish(
                    classes,
                    span[:, :rows, : c1 - c0],
                    flagged[:rows, : c1 - c0] if flagged is not None else None,
                    done[:, :rows],
                )
                final_window = Window(c0, y, c1 - c0, rows)
                out.write(classes[None], window=final_window)
                classified += int(np.count_nonzero(classes))
                if extra_out:
                    final = done[:k, :rows] / done[k, :rows]
                    scaled = {
                        "confidence": final.max(axis=0, keepdims=True),
                        "probabilities": final,
                    }
                for name, dst in extra_out.items():
                    data = np.round(scaled[name] * 255).astype(np.uint8)
                    data[:, (classes == 0) if masked is None else (classes == 0) | masked] = 0
                    dst.write(data, window=final_window)
                if gt is not None:
                    truth = gt.read(1, window=final_window)
                    scored = (classes if masked is None else np.where(masked, 0, classes)).astype(
                        np.int64
                    )  # masked pixels are not scored
                    accumulate(matrix, truth.astype(np.int64), scored, class_values)
            out.update_tags(**tags)
            out.write_colormap(1, classes_schema.colormap(legend_values))
            for dst in extra_out.values():
                dst.update_tags(**tags)
            if "probabilities" in extra_out:
                for band, value in enumerate(class_values, start=1):
                    extra_out["probabilities"].set_band_description(
                        band, classes_schema.name(value)
                    )
        # class names beside the map (written first: the map's presence means complete)
        storage.write_text(output_uri + ".aux.xml", pam_xml(classes_schema, legend_values))
        storage.write_text(map_base(output_uri) + ".qml", qml(classes_schema, legend_values))
        _finish_cog(class_tmp, output_uri, staging, "mode")
        for name, uri in extras.items():
            _finish_cog(os.path.join(staging, f"{name}.tif"), uri, staging, "average")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {
        "windows": len(xs) * len(ys),
        "pixels": pixels,
        "matrix": matrix,
        "classified": classified,
    }


def _finish_cog(tmp: str, uri: str, staging: str, resampling: str) -> None:
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


def map_base(uri: str) -> str:
    """``uri`` without its ``.tif`` extension (where the map's sidecars go)."""
    return uri[:-4] if uri.endswith(".tif") else uri


def output_uri_for(input_uri: str, out_folder: str, suffix: str = "_classes.tif") -> str:
    """Where the class map of ``input_uri`` goes under ``out_folder``."""
    return storage.join(out_folder, storage.stem(input_uri) + suffix)


#: what counts as a scene under a prefix: rasters, VRTs and STAC items
SCENE_SUFFIXES = (".tif", ".tiff", ".vrt", ".json")


def scenes_under(prefix: str) -> list[str]:
    """Scene URIs directly under a folder or prefix (rasters, VRTs, STAC items; not catalogs
    or collections), or the items of a STAC catalog or collection given as its JSON.
    """
    from specdeepmap.stac import catalog_items, is_item_file

    if prefix.lower().endswith(".json"):
        return catalog_items(prefix)
    scenes = []
    for uri in storage.list_files(prefix, SCENE_SUFFIXES):
        if uri.lower().endswith(".json") and not is_item_file(uri):
            # a catalog, a collection or another JSON beside the scenes: not a scene
            log.warning(
                "%s is not a STAC item: skipped (give a catalog as the input itself "
                "to map its items)",
                uri,
            )
            continue
        scenes.append(uri)
    return scenes


def quicklook(
    class_uri: str, png_uri: str, max_size: int = 1024, classes: ClassSchema | None = None
) -> str:
    """A PNG preview of a class map, read from its overviews (never the full raster), in the
    classes' colours with a legend of their names (``classes``; default: by value).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    classes = classes or ClassSchema()
    with storage.open_raster(class_uri) as src:
        scale = max(1.0, max(src.width, src.height) / max_size)
        shape = (max(1, int(src.height / scale)), max(1, int(src.width / scale)))
        labels = src.read(1, out_shape=shape, resampling=rasterio.enums.Resampling.nearest)
    values = [int(v) for v in np.unique(labels[labels > 0])]
    rgba = np.zeros((*shape, 4), dtype=np.uint8)
    for value in values:
        rgba[labels == value] = (*classes.info(value).color, 255)
    fig, ax = plt.subplots(figsize=(shape[1] / 100 + 2.2, shape[0] / 100 + 0.4), dpi=100)
    ax.imshow(rgba, interpolation="nearest")
    ax.set_axis_off()
    legend = [
        Patch(
            color=np.array(classes.info(v).color) / 255,
            label=classes.name(v) if classes.name(v) == str(v) else f"{v} {classes.name(v)}",
        )
        for v in values
    ]
    if legend:
        ax.legend(
            handles=legend,
            loc="upper left",
            bbox_to_anchor=(1.01, 1),
            fontsize=8,
            frameon=False,
            title="class",
        )
    fig.tight_layout()
    with storage.atomic_output(png_uri) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return png_uri


def class_areas(class_uri: str) -> dict[int, float]:
    """Area per class value in CRS units² (m² for projected scenes), read block by block."""
    counts: dict[int, int] = {}
    with storage.open_raster(class_uri) as src:
        pixel_area = abs(src.transform.a * src.transform.e)
        for _, window in src.block_windows(1):
            values, n = np.unique(src.read(1, window=window), return_counts=True)
            for v, c in zip(values.tolist(), n.tolist(), strict=True):
                counts[v] = counts.get(v, 0) + c
    return {v: c * pixel_area for v, c in sorted(counts.items()) if v != 0}


def map_scenes(
    inputs: list[str] | str,
    model_uri: str,
    out_folder: str,
    params: MapParams = MapParams(),
    suffix: str = "_classes.tif",
    skip_existing: bool = True,
) -> list[MapReport]:
    """Map several scenes (a list of URIs or a folder/prefix of .tif files), one output each."""
    uris = scenes_under(inputs) if isinstance(inputs, str) else list(inputs)
    predictor = load_for_engine(model_uri, params)
    reports = []
    for uri in uris:
        target = output_uri_for(uri, out_folder, suffix)
        if skip_existing and storage.exists(target):
            log.info("%s exists, skipping", target)
            continue
        reports.append(map_scene(uri, model_uri, target, params, predictor=predictor))
    return reports
