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
from specdeepmap.blending import Blender
from specdeepmap.classes import ClassSchema, pam_xml, qml
from specdeepmap.clouds import check_detector, detect_clouds
from specdeepmap.drift import Verdict
from specdeepmap.errors import InputMismatchError, InvalidParameterError
from specdeepmap.evaluation import write_iou_csv
from specdeepmap.inference import Predictor, fold_batch_norms, load_model, resolve_device
from specdeepmap.map_writer import MapWriter, finish_cog
from specdeepmap.masks import MaskReader, QualityMask, check_masks, masked_value, with_masked
from specdeepmap.metrics import accumulate, metrics_from_matrix
from specdeepmap.params import MapParams
from specdeepmap.scene_quality import QUALITY_SUFFIX, SceneQuality, write_quality
from specdeepmap.windows import (
    BATCH_PIXELS,
    Batch,
    BatchReader,
    WindowGrid,
    calibration_windows,
    choose_window,
    padded_shape,
    to_stride,
    weight_window,
)

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


def _check_input(
    src: rasterio.DatasetReader, predictor: Predictor, uri: str, model_uri: str
) -> None:
    """Band count must match; warn when values look wrong for the stored normalisation."""
    if src.count != predictor.in_channels:
        raise InputMismatchError(
            f"{uri} has {src.count} bands, the model {model_uri} was "
            f"trained on {predictor.in_channels}"
        )
    same_band_order(predictor.config.band_names or [], list(src.descriptions), uri)
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

    pad_h, pad_w = padded_shape(src.height, src.width, window)
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
        The report, with the drift verdict (:mod:`specdeepmap.drift`; ``MAP_quality.json``).

    Raises:
        OutputConflictError: an output is an input, two outputs are one file, or an output
            exists and is not ours (without ``overwrite``); checked before any work.
    """
    from specdeepmap.stac import is_item

    started = time.perf_counter()
    outputs = MapOutputs(output_uri, confidence_uri, probabilities_uri, vector_uri, iou_csv_uri)
    check_detector(params.cloud_mask)
    check_outputs(input_uri, model_uri, gt_uri, outputs.named(), overwrite)
    predictor = predictor or load_for_engine(model_uri, params)
    if is_item(input_uri):  # the item's assets for the model's bands, stacked by name
        return _map_item(input_uri, model_uri, outputs, params, gt_uri, predictor, mask)
    check_writable(output_uri)
    with contextlib.ExitStack() as stack:
        # the windows' blocks decoded on as many threads as the network uses
        src = stack.enter_context(storage.open_raster(input_uri, threads=torch.get_num_threads()))
        _check_input(src, predictor, input_uri, model_uri)
        quality, skipped = _scene_quality(stack, src, input_uri, predictor, params, mask)
        if skipped:
            return MapReport(output_uri, 0, 0, time.perf_counter() - started, skipped=skipped)
        grid, blend = _plan_windows(src, predictor, params, input_uri)
        predictor, params, setup_seconds = _ready(predictor, params, src)
        gt = _open_ground_truth(stack, gt_uri, src, input_uri)
        tags = map_tags(predictor, params, model_uri, input_uri, quality)
        streamed = _stream(src, gt, predictor, params, grid, blend, outputs, quality, tags)
    if vector_uri:  # class polygons from the finished map
        _polygonize(output_uri, vector_uri)
    report = _report(outputs, streamed, grid, predictor, quality, input_uri, gt_uri is not None)
    report.setup_seconds = setup_seconds
    report.seconds = time.perf_counter() - started
    log.info(
        "Mapped %s → %s: %d windows in %.1f s", input_uri, output_uri, grid.windows, report.seconds
    )
    return report


@dataclass(frozen=True)
class MapOutputs:
    """Where one map's outputs go (None: not written)."""

    classes: str
    confidence: str | None = None
    probabilities: str | None = None
    vector: str | None = None
    iou_csv: str | None = None

    def named(self) -> dict[str, str | None]:
        """Every output by what it is, the quality JSON beside the map included."""
        return {
            "class map": self.classes,
            "confidence raster": self.confidence,
            "probability raster": self.probabilities,
            "polygon file": self.vector,
            "IoU CSV": self.iou_csv,
            "quality JSON": map_base(self.classes) + QUALITY_SUFFIX,
        }

    def extras(self) -> dict[str, str]:
        """The probability rasters asked for, by the name :class:`MapWriter` knows."""
        extras = {"confidence": self.confidence, "probabilities": self.probabilities}
        return {name: uri for name, uri in extras.items() if uri}


def _map_item(
    item_uri: str,
    model_uri: str,
    outputs: MapOutputs,
    params: MapParams,
    gt_uri: str | None,
    predictor: Predictor,
    mask: QualityMask | None,
) -> MapReport:
    """Map a STAC item: the assets of the model's bands stacked by name into a VRT, the
    item's own mask asset unless a mask is given. Its outputs were checked already.
    """
    from specdeepmap.stac import item_mask, item_scene

    with tempfile.TemporaryDirectory(prefix="specdeepmap-scene-") as folder:
        scene = item_scene(
            item_uri, predictor.config.band_names or [], os.path.join(folder, "scene.vrt")
        )
        return map_scene(
            scene,
            model_uri,
            outputs.classes,
            params,
            gt_uri,
            outputs.iou_csv,
            outputs.confidence,
            outputs.probabilities,
            outputs.vector,
            predictor,
            overwrite=True,
            mask=mask or item_mask(item_uri),
        )


def _scene_quality(
    stack: contextlib.ExitStack,
    src,
    input_uri: str,
    predictor: Predictor,
    params: MapParams,
    mask: QualityMask | None,
) -> tuple[SceneQuality, str | None]:
    """The scene's quality record, its mask (the scene's own, else the cloud detector's when
    ``params`` names one) open for reading; and why the scene is not mapped (more of it
    masked than ``params.max_masked_share``), None when it is.
    """
    detecting = time.perf_counter()
    if mask is None and params.cloud_mask:  # a scene's own mask wins over the detector
        folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="specdeepmap-clouds-"))
        clouds = detect_clouds(
            src, input_uri, os.path.join(folder, "clouds.tif"), params.cloud_threshold
        )
        log.info("%s: %s flags %.1f%% as cloud", input_uri, clouds.detector, 100 * clouds.share)
        mask = clouds.quality_mask()
    values = predictor.value_lut()[1:]
    quality = SceneQuality(src.count, len(values), predictor.normalization.scaler, mask)
    quality.seconds += time.perf_counter() - detecting
    if mask is None:
        return quality, None
    checking = time.perf_counter()
    share = check_masks(mask, src)
    quality.seconds += time.perf_counter() - checking
    if share > params.max_masked_share:
        reason = (
            f"{share:.0%} of the scene is masked (more than "
            f"{params.max_masked_share:.0%}): not mapped"
        )
        log.warning("%s: %s", input_uri, reason)
        return quality, reason
    quality.masked_value = masked_value(list(values))
    quality.reader = stack.enter_context(MaskReader(mask, src))
    return quality, None


def _plan_windows(
    src, predictor: Predictor, params: MapParams, input_uri: str
) -> tuple[WindowGrid, np.ndarray]:
    """The scene's windows (``params.window``, or the size that processes fewest pixels)
    and their 2-D blending weights; the memory they need checked first.
    """
    tile = max(predictor.tile_size)
    overlap_px = math.ceil(2 * params.overlap / 100 * tile)
    window = params.window or choose_window(src.height, src.width, tile, overlap_px)
    # a window larger than the scene maps it in one padded window either way
    window = min(window, max(to_stride(src.height), to_stride(src.width)))
    batch_size = params.batch_size or max(1, BATCH_PIXELS // (window * window))
    classes = len(predictor.value_lut()) - 1
    check_memory(src, window, batch_size, classes, input_uri)
    grid = WindowGrid(src.height, src.width, window, max(1, window - overlap_px), batch_size)
    blend_1d = weight_window(window, overlap_px, params.blend)
    return grid, np.outer(blend_1d, blend_1d)


def _polygonize(map_uri: str, vector_uri: str) -> None:
    from specdeepmap.vectorize import polygonize

    polygonize(map_uri, vector_uri)


def _ready(predictor: Predictor, params: MapParams, src) -> tuple[Predictor, MapParams, float]:
    """The network as the mapper runs it on ``src`` (:func:`prepare_predictor`), the
    parameters it runs with (a quantized network takes plain NCHW input) and the seconds
    its preparation took.
    """
    started = time.perf_counter()
    predictor = prepare_predictor(predictor, params, lambda: calibration_windows(src, 128))
    if params.precision == "int8":
        params = params.model_copy(update={"channels_last": False})
    return predictor, params, time.perf_counter() - started


def _open_ground_truth(stack: contextlib.ExitStack, gt_uri: str | None, src, input_uri: str):
    """The ground-truth raster, open, on the input's grid (refused otherwise); None."""
    if gt_uri is None:
        return None
    gt = stack.enter_context(storage.open_raster(gt_uri))
    if (gt.width, gt.height) != (src.width, src.height):
        raise InputMismatchError(
            f"Ground truth {gt_uri} is {gt.width} x {gt.height}, "
            f"the input {input_uri} {src.width} x {src.height}"
        )
    return gt


def _report(
    outputs: MapOutputs,
    streamed: Streamed,
    grid: WindowGrid,
    predictor: Predictor,
    quality: SceneQuality,
    input_uri: str,
    scored: bool,
) -> MapReport:
    """The map's report: its drift verdict written to the quality JSON beside it, and with
    ground truth its IoU (SpecDeepMap's CSV and a ``*_metrics.csv`` beside it when asked).
    """
    if streamed.classified == 0:
        warnings.warn(
            f"{input_uri}: every pixel is nodata (or NaN): the map {outputs.classes} holds "
            "no class",
            stacklevel=3,
        )
    verdict = quality.verdict(predictor.config)
    quality_uri = write_quality(
        map_base(outputs.classes) + QUALITY_SUFFIX, quality.summary(verdict)
    )
    if verdict.suspect:
        log.warning("%s: %s", input_uri, verdict.sentence())
    report = MapReport(
        output_uri=outputs.classes,
        windows=streamed.windows,
        pixels_processed=streamed.pixels,
        seconds=0.0,
        confidence_uri=outputs.confidence,
        window=grid.window,
        batch_size=grid.batch_size,
        verdict=verdict,
        quality_uri=quality_uri,
        masked_share=quality.masked_share,
        guard_seconds=quality.seconds,
        mask_read_seconds=quality.reader_seconds,
    )
    if scored:
        values = [int(v) for v in predictor.value_lut()[1:]]
        metrics = metrics_from_matrix(streamed.matrix, values)
        report.mean_iou = metrics.mean_iou
        if outputs.iou_csv:
            names = predictor.classes
            write_iou_csv(
                outputs.iou_csv,
                metrics.class_values,
                metrics.iou,
                [names.name(v) for v in metrics.class_values] if names.named else None,
            )
            base = outputs.iou_csv.removesuffix(".csv")
            storage.write_text(base + "_metrics.csv", metrics.table().to_csv(index=False))
            report.iou_csv = outputs.iou_csv
    return report


def load_for_engine(model_uri: str, params: MapParams) -> Predictor:
    """The model as ``params.engine`` runs it: torch, ONNX Runtime or OpenVINO on the
    model's ONNX file (exported and, for int8, calibrated once per model file:
    :func:`specdeepmap.onnx_model.cached_onnx`,
    :func:`specdeepmap.openvino_model.load_openvino`). An ``.onnx`` model runs on
    OpenVINO when that is the engine, else on ONNX Runtime.
    """
    engine = _auto_engine(model_uri, params) if params.engine == "auto" else params.engine
    if engine == "openvino":
        from specdeepmap.openvino_model import load_openvino

        try:
            return load_openvino(model_uri, params.precision)
        except Exception as error:  # noqa: BLE001 - no training chips, an export failed
            if params.engine != "auto":  # asked for by name: the user hears why
                raise
            log.warning(
                "%s: %s; int8 on torch instead (calibrated on the scene, through the "
                "torch.ao.quantization that PyTorch deprecates)",
                type(error).__name__,
                error,
            )
            return load_model(model_uri, params.device)
    if engine == "onnxruntime" and not model_uri.lower().endswith(".onnx"):
        if params.precision == "bf16":
            raise InvalidParameterError(
                "--engine onnxruntime maps in fp32 or int8 (bf16 is torch's autocast)"
            )
        from specdeepmap.onnx_model import cached_onnx, load_onnx

        return load_onnx(cached_onnx(model_uri, int8=params.precision == "int8"))
    return load_model(model_uri, params.device)


def _auto_engine(model_uri: str, params: MapParams) -> str:
    """``engine="auto"``: OpenVINO for int8 on the CPU where it is installed (the fastest
    int8 measured, and not the deprecated ``torch.ao.quantization``), else torch; an
    ``.onnx`` MODEL on ONNX Runtime.
    """
    import importlib.util

    if model_uri.lower().endswith(".onnx"):
        return "onnxruntime"
    on_cpu = resolve_device(params.device).type == "cpu"
    if params.precision == "int8" and on_cpu and importlib.util.find_spec("nncf"):
        return "openvino"
    return "torch"


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


@dataclass
class Streamed:
    """What streaming a scene did: windows run, pixels the network processed, pixels
    given a class, and the confusion matrix against the ground truth (when given).
    """

    windows: int
    matrix: np.ndarray
    pixels: int = 0
    classified: int = 0


def _stream(
    src,
    gt,
    predictor: Predictor,
    params: MapParams,
    grid: WindowGrid,
    blend: np.ndarray,
    outputs: MapOutputs,
    quality: SceneQuality,
    tags: dict[str, str],
) -> Streamed:
    """The streaming loop: read a batch of windows (the next one in a background thread
    while the network runs), blend its probabilities, finish and write the pixels it
    finalises; then the final COGs.

    Memory: the only float buffer that spans the scene is the blender's carry band (classes
    × overlap rows × scene width, :mod:`specdeepmap.blending`); GDAL's block cache completes
    the blocks two batches share.

    Class values above 255 make the map uint16, else uint8. ``outputs`` may name a
    ``confidence`` (top-class probability) and a ``probabilities`` (one band per class)
    output. ``quality`` masks the finished pixels and counts what the scene's verdict needs.
    """
    values = predictor.value_lut()[1:]
    dtype = "uint8" if values.max() < 256 else "uint16"
    class_values = [int(v) for v in values]
    schema, legend_values = legend(predictor, quality)
    extras = outputs.extras()
    blender = Blender(grid, len(values), blend)
    reader = BatchReader(src, grid, quality.read_mask)
    streamed = Streamed(grid.windows, np.zeros((len(values), len(values)), dtype=np.int64))
    staging = tempfile.mkdtemp(prefix="specdeepmap-map-")
    try:
        with (
            MapWriter(src, staging, dtype, len(values), list(extras)) as writer,
            ThreadPoolExecutor(1) as pool,
        ):
            future = pool.submit(reader.read, *grid.jobs[0])
            for j, (r, b) in enumerate(grid.jobs):
                batch = future.result()
                if j + 1 < len(grid.jobs):
                    future = pool.submit(reader.read, *grid.jobs[j + 1])
                blender.start(r, b)
                probabilities = predictor.probabilities(
                    batch.windows,
                    autocast=params.precision == "bf16",
                    channels_last=params.channels_last,
                    tta=params.tta,
                ).cpu()
                streamed.pixels += probabilities.shape[0] * grid.pad_h * grid.pad_w
                blender.add(b, probabilities)
                sums = blender.finish(b)
                c0, c1 = grid.final_columns(b)
                window = Window(c0, grid.ys[r], c1 - c0, sums.shape[1])
                classes, masked = _finish_pixels(sums, batch, values, dtype, quality)
                writer.write(window, classes, sums, masked)
                streamed.classified += int(np.count_nonzero(classes))
                if gt is not None:  # masked pixels are not scored
                    scored = classes if masked is None else np.where(masked, 0, classes)
                    truth = gt.read(1, window=window).astype(np.int64)
                    accumulate(streamed.matrix, truth, scored.astype(np.int64), class_values)
            writer.label(tags, schema, legend_values, class_values)
        # class names beside the map (written first: the map's presence means complete)
        storage.write_text(outputs.classes + ".aux.xml", pam_xml(schema, legend_values))
        storage.write_text(map_base(outputs.classes) + ".qml", qml(schema, legend_values))
        finish_cog(writer.path("classes"), outputs.classes, staging, "mode")
        for name, uri in extras.items():
            finish_cog(writer.path(name), uri, staging, "average")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return streamed


def _finish_pixels(
    sums: np.ndarray, batch: Batch, values: np.ndarray, dtype: str, quality: SceneQuality
) -> tuple[np.ndarray, np.ndarray | None]:
    """The classes of finished pixels (the weight sum is the same for every class: the argmax
    needs no division), 0 where the input has no data, and the quality mask over them.
    """
    rows, cols = sums.shape[1:]
    classes = values[sums[:-1].argmax(axis=0)].astype(dtype)
    if batch.nodata is not None:
        classes[batch.nodata[:rows, :cols]] = 0
    flagged = batch.flagged[:rows, :cols] if batch.flagged is not None else None
    masked = quality.finish(classes, batch.span[:, :rows, :cols], flagged, sums)
    return classes, masked


def legend(predictor: Predictor, quality: SceneQuality) -> tuple[ClassSchema, list[int]]:
    """The map's classes and the values its legend lists: the model's, and the masked
    pixels' reserved value when the scene has a mask.
    """
    values = [int(v) for v in predictor.value_lut()[1:]]
    if quality.mask is None:
        return predictor.classes, values
    schema = with_masked(predictor.classes, quality.masked_value, quality.mask.label)
    return schema, [*values, quality.masked_value]


def map_tags(
    predictor: Predictor, params: MapParams, model_uri: str, input_uri: str, quality: SceneQuality
) -> dict[str, str]:
    """The lineage tags every output of a map carries: model, run, version, input,
    software, classes, precision, the masked pixels' value.
    """
    schema, _ = legend(predictor, quality)
    class_values = [int(v) for v in predictor.value_lut()[1:]]
    return {
        "SPECDEEPMAP_MODEL": model_uri,
        "SPECDEEPMAP_MODEL_RUN_ID": predictor.config.run_id or "",
        # the registered model version when mapped with models:/NAME/VERSION, and the
        # software that trained the model (not to be confused: they were one tag before)
        "SPECDEEPMAP_MODEL_VERSION": model_uri.rsplit("/", 1)[-1]
        if model_uri.startswith("models:/") and "@" not in model_uri
        else "",
        "SPECDEEPMAP_TRAINED_WITH": f"specdeepmap {predictor.config.version or ''}",
        "SPECDEEPMAP_INPUT": input_uri,
        "SPECDEEPMAP_SOFTWARE": f"specdeepmap {__version__}",
        "SPECDEEPMAP_CLASS_VALUES": ",".join(str(v) for v in class_values),
        "SPECDEEPMAP_CLASS_NAMES": json.dumps({v: schema.name(v) for v in class_values}),
        "SPECDEEPMAP_PRECISION": params.precision,
        "SPECDEEPMAP_ENGINE": predictor.engine,  # what ran the network (engine auto chooses)
        "SPECDEEPMAP_MASKED_VALUE": str(quality.masked_value) if quality.mask else "",
    }


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
