"""Models as ONNX files: exported from ours, checked against torch, run by ONNX Runtime.

``specdeepmap export MODEL OUT.onnx`` writes one self-contained file: the model's own
normalisation (scaler, per-band mean and std, nodata pixels to the band mean), the network
and the softmax over the real classes, so the graph takes raw pixel values as float32
(batch, bands, height, width) and returns class probabilities (batch, classes, height,
width), batch and window size free. The model's config (bands, classes, tile size, value
mapping) travels in the file's metadata, so ``specdeepmap test`` and ``map`` take the
``.onnx`` file as MODEL and run it with ONNX Runtime, no torch network involved.

Before the file is written the export is checked against the torch model on real chips
(the model's test chips by default) or raw windows: the share of pixels whose class agrees
and the largest probability difference; below :data:`MIN_AGREEMENT` nothing is written.

``--int8`` writes a statically quantized file instead (ONNX Runtime's quantizer, QDQ format,
int8 weights per output channel, uint8 activations): its activation ranges are calibrated
**once**, on the model's training chips (up to :data:`CALIBRATION_CHIPS`), not on each
scene as the torch int8 mapper does; the file is checked against the torch fp32 model
(at least :data:`MIN_INT8_AGREEMENT` of the pixels). Only the convolutions are quantized:
the normalisation, the softmax and the joins between blocks stay in float (quantizing them
too changed the class of a third of the pixels on the demo model).

``map --engine onnxruntime`` with a torch model file exports it once and keeps the file in
the private cache (``~/.cache/specdeepmap/onnx``, keyed by the model file's content), so a
model version is exported and calibrated once, whatever the number of scenes.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from specdeepmap import storage
from specdeepmap.errors import InputMismatchError
from specdeepmap.inference import NETWORK_LOCK, Predictor
from specdeepmap.model_config import ModelConfig

log = logging.getLogger(__name__)

#: the metadata key that holds the model's config
CONFIG_KEY = "specdeepmap_config"
#: pixels whose class must agree with the torch model's for the export to be written
MIN_AGREEMENT = 0.999
#: the same for an int8 export (against the torch fp32 model)
MIN_INT8_AGREEMENT = 0.995
#: training chips that calibrate an int8 export at most (spread over the chip list)
CALIBRATION_CHIPS = 64
#: the metadata key that says the file's arithmetic (fp32 or int8)
PRECISION_KEY = "specdeepmap_precision"


@dataclass(frozen=True)
class ExportReport:
    """What the check against torch found."""

    uri: str
    pixels: int
    agreement: float  #: share of pixels whose class is the torch model's
    max_difference: float  #: largest absolute difference of a class probability
    seconds: float


class _Portable(torch.nn.Module):
    """Raw pixels → class probabilities: the model's normalisation, network and softmax."""

    def __init__(self, predictor: Predictor) -> None:
        super().__init__()
        self.network = predictor.model
        norm = predictor.normalization
        scale = 1.0 / norm.scaler if norm.scaler else 1.0
        # bands without statistics become 0 (gain and bias 0), as Normalization.apply does
        mean, std, missing = norm.band_terms(predictor.in_channels)
        gain, bias = np.where(missing, 0.0, scale / std), -mean / std
        # ((x * scale) - mean) / std as one multiply-add per band
        self.register_buffer("gain", torch.tensor(gain, dtype=torch.float32)[:, None, None])
        self.register_buffer("bias", torch.tensor(bias, dtype=torch.float32)[:, None, None])
        nodata = norm.nodata
        self.nodata = None if nodata is None or np.isnan(nodata) else float(nodata)

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        x = torch.nan_to_num(raw * self.gain + self.bias, nan=0.0, posinf=0.0, neginf=0.0)
        if self.nodata is not None:  # nodata in every band: the band mean (0), as in torch
            x = torch.where((raw == self.nodata).all(dim=1, keepdim=True), torch.zeros_like(x), x)
        return torch.softmax(self.network(x)[:, 1:], dim=1)


def export_onnx(
    model_uri: str,
    out_uri: str,
    chips_csv: str | None = None,
    count: int = 8,
    int8: bool = False,
    calibration_csv: str | None = None,
) -> ExportReport:
    """Export a model to ONNX, check it against torch, then write it to ``out_uri``.

    Args:
        model_uri: a model file, ``s3://`` or ``models:/`` URI.
        out_uri: the ``.onnx`` file to write.
        chips_csv: a chip CSV whose first ``count`` images check the export (default: the
            model's dataset's ``test_files.csv`` when it can be read, else random raw windows).
        count: chips of the check.
        int8: write the statically quantized file (:func:`quantize`).
        calibration_csv: int8: the chips that calibrate it (default: the model's dataset's
            ``train_files.csv``).

    Raises:
        InputMismatchError: the ONNX model's classes agree with torch's on fewer than
            :data:`MIN_AGREEMENT` (int8: :data:`MIN_INT8_AGREEMENT`) of the pixels (nothing
            is written).
        MissingInputError: int8 without readable calibration chips.
    """
    import tempfile
    import time

    started = time.perf_counter()
    reference = _Reference.of(model_uri, chips_csv, count)
    # int8: the calibration chips are read first, so that a missing set fails before the export
    calibration = calibration_chips(reference.predictor, calibration_csv) if int8 else []
    with tempfile.TemporaryDirectory(prefix="specdeepmap-onnx-") as folder:
        path = _fp32_file(reference, folder)
        if int8:
            path = _int8_file(path, folder, calibration)
        report = reference.check(path, out_uri, started, int8)
        with storage.atomic_output(out_uri) as tmp:
            os.replace(path, tmp)
    return report


@dataclass
class _Reference:
    """What an export is checked against: the torch model as one module (raw pixels →
    probabilities) and the raw chips of the check.
    """

    source: str
    predictor: Predictor
    portable: torch.nn.Module
    sample: np.ndarray

    @classmethod
    def of(cls, model_uri: str, chips_csv: str | None, count: int) -> _Reference:
        from specdeepmap.inference import load_model

        predictor = load_model(model_uri, "cpu")
        sample = check_batch(predictor, chips_csv, count)
        return cls(model_uri, predictor, _Portable(predictor).eval(), sample)

    def check(self, path: str, uri: str, started: float, int8: bool = False) -> ExportReport:
        """The report of the ONNX file at ``path`` (to be written to ``uri``; ``int8``: a
        quantized file, held to :data:`MIN_INT8_AGREEMENT`).

        Raises:
            InputMismatchError: its classes agree with torch's on fewer than
                :data:`MIN_AGREEMENT` (int8: :data:`MIN_INT8_AGREEMENT`) of the pixels.
        """
        import time

        agreement, difference = _compare(path, self.portable, self.sample)
        needed = MIN_INT8_AGREEMENT if int8 else MIN_AGREEMENT
        if agreement < needed:
            raise InputMismatchError(
                f"The {'int8 ' if int8 else ''}ONNX export of {self.source} agrees with the "
                f"torch model on {agreement:.3%} of the pixels (at least {needed:.1%} "
                "needed): not written"
            )
        n, _, height, width = self.sample.shape
        seconds = time.perf_counter() - started
        return ExportReport(uri, int(n * height * width), agreement, difference, seconds)


def _fp32_file(reference: _Reference, folder: str) -> str:
    """``folder/model.onnx``: the torch model's graph with its config in the metadata."""
    path = _write_graph(reference.portable, reference.sample, os.path.join(folder, "model.onnx"))
    _set_metadata(
        path,
        {
            CONFIG_KEY: json.dumps(reference.predictor.config.stored()),
            PRECISION_KEY: "fp32",
            "source": storage.redact(reference.source),
        },
    )
    return path


def _int8_file(fp32: str, folder: str, calibration: list[np.ndarray]) -> str:
    """``folder/model_int8.onnx``: the fp32 file quantized (:func:`quantize`)."""
    path = quantize(fp32, os.path.join(folder, "model_int8.onnx"), calibration)
    _set_metadata(path, {PRECISION_KEY: "int8"})
    return path


def _set_metadata(path: str, props: dict[str, str]) -> None:
    """Add ``props`` to an ONNX file's metadata (a key already there is replaced)."""
    import onnx

    model = onnx.load(path)
    onnx.helper.set_model_props(model, {p.key: p.value for p in model.metadata_props} | props)
    onnx.save(model, path)


def _write_graph(portable: torch.nn.Module, sample: np.ndarray, path: str) -> str:
    """The graph of ``portable`` as an ONNX file at ``path`` (dynamo exporter, the current
    opset, weights inside), batch and window size free (multiples of 32 px).
    """
    batch, rows, cols = (torch.export.Dim(n, min=1) for n in ("batch", "rows", "cols"))
    _, _, height, width = sample.shape
    # an example of at least 2 x 64 x 64 px: a size of 1 (in 32 px steps) would be fixed
    pad = [(0, 0), (0, 0), (0, max(0, 64 - height)), (0, max(0, 64 - width))]
    example = torch.from_numpy(np.pad(sample[:2], pad, mode="edge").astype(np.float32))
    with NETWORK_LOCK:  # torch.export's tracing state is process-wide: one trace at a time
        program = torch.onnx.export(
            portable,
            (example,),
            dynamo=True,
            dynamic_shapes=({0: batch, 2: 32 * rows, 3: 32 * cols},),
            input_names=["raw"],
            output_names=["probabilities"],
            verbose=False,
        )
    program.save(path, external_data=False)
    return path


def check_batch(predictor: Predictor, chips_csv: str | None, count: int) -> np.ndarray:
    """Raw (N, C, H, W) chips to check the export on: a chip CSV's, else random windows."""
    from specdeepmap.splitting import read_csv

    csv = chips_csv
    dataset = predictor.config.dataset
    if csv is None and dataset and storage.exists(storage.join(dataset, "test_files.csv")):
        csv = storage.join(dataset, "test_files.csv")
    height, width = predictor.tile_size
    if csv is not None:
        images = list(read_csv(csv)["image"])[:count]
        chips = [c[:, :height, :width] for c in _read_chips(csv, images)]
        if chips and all(c.shape == chips[0].shape for c in chips):
            return np.stack(chips)
    rng = np.random.default_rng(0)
    scaler = predictor.normalization.scaler or 1.0
    return (rng.random((count, predictor.in_channels, height, width)) * 0.5 * scaler).astype(
        np.float32
    )


def calibration_chips(predictor: Predictor, chips_csv: str | None) -> list[np.ndarray]:
    """Raw (1, C, H, W) training chips that calibrate an int8 export: up to
    :data:`CALIBRATION_CHIPS` spread over ``chips_csv`` (default: the model's dataset's
    ``train_files.csv``).
    """
    from specdeepmap.errors import MissingInputError
    from specdeepmap.splitting import read_csv

    dataset = predictor.config.dataset
    csv = chips_csv or (storage.join(dataset, "train_files.csv") if dataset else None)
    if csv is None or not storage.exists(csv):
        raise MissingInputError(
            f"{predictor.source}: an int8 export is calibrated on the model's training chips, "
            f"and {csv or 'its dataset'} cannot be read: give them with --calibration-chips CSV"
        )
    images = list(read_csv(csv)["image"])
    n = len(images)
    picked = np.unique(np.linspace(0, n - 1, min(CALIBRATION_CHIPS, n)).round().astype(int))
    return [chip[None] for chip in _read_chips(csv, [images[i] for i in picked])]


def _read_chips(csv: str, images: list[str]) -> list[np.ndarray]:
    """The raw (C, H, W) float32 images of a chip CSV's ``image`` entries."""
    from specdeepmap.data import resolve_row

    chips = []
    for image in images:
        with storage.open_raster(resolve_row(storage.parent(csv), image)) as src:
            chips.append(src.read().astype(np.float32))
    return chips


def quantize(path: str, out_path: str, calibration: list[np.ndarray]) -> str:
    """Static int8 quantization of an exported file's convolutions (QDQ, per-channel int8
    weights, uint8 activations, min-max ranges over ``calibration``); returns ``out_path``.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Chips(CalibrationDataReader):
        def __init__(self) -> None:
            self.chips = iter(calibration)

        def get_next(self) -> dict | None:
            chip = next(self.chips, None)
            return None if chip is None else {"raw": chip}

    prepared = out_path + ".pre.onnx"
    quant_pre_process(path, prepared, skip_symbolic_shape=True)
    quantize_static(
        prepared,
        out_path,
        Chips(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        op_types_to_quantize=["Conv"],
        calibrate_method=CalibrationMethod.MinMax,
    )
    os.remove(prepared)
    return out_path


def cached_onnx(model_uri: str, int8: bool = False) -> str:
    """The ONNX file of a torch model for ``map --engine onnxruntime``: a registered
    version's own (exported and checked when it was registered), else exported (and, int8,
    calibrated on the model's training chips) the first time, then read from the private
    cache, keyed by the model file's content, so that every scene reuses it. Threads that
    map with one model export it once: the others wait for the file.
    """
    from specdeepmap.inference import local_model_file

    if not int8:
        registered = registered_onnx(model_uri)
        if registered:
            return registered

    local = local_model_file(model_uri)
    name = f"{storage.content_key(local)}-{'int8' if int8 else 'fp32'}.onnx"
    path = os.path.join(storage.private_cache_dir("onnx"), name)
    with NETWORK_LOCK:
        if not os.path.exists(path):
            _export_to_cache(model_uri, local, path, int8)
    return path


def _export_to_cache(model_uri: str, local: str, path: str, int8: bool) -> None:
    """:func:`export_onnx` of the local model file ``local`` (from ``model_uri``) to the
    cache file ``path``, its figures logged.
    """
    from specdeepmap.errors import MissingInputError

    try:
        report = export_onnx(local, path, int8=int8)
    except MissingInputError as error:  # int8 without readable training chips
        raise MissingInputError(
            f"{error}. For a map: `specdeepmap export {model_uri} OUT.onnx --int8 "
            "--calibration-chips CSV`, then map OUT.onnx"
        ) from None
    log.info(
        "%s exported to ONNX%s for ONNX Runtime: %s (agreement %.4f%%, %.1f s)",
        model_uri,
        " int8" if int8 else "",
        path,
        100 * report.agreement,
        report.seconds,
    )


def registered_onnx(model_uri: str) -> str | None:
    """The local copy of a registered version's ONNX export (``models:/NAME/VERSION`` or
    ``@ALIAS``; :func:`specdeepmap.tracking.log_onnx_export`), None where it has none or
    ``model_uri`` is no registered version.
    """
    from specdeepmap.registry import registered_artifact
    from specdeepmap.tracking import ONNX_ARTIFACT

    return registered_artifact(model_uri, "onnx", ONNX_ARTIFACT)


def _compare(path: str, portable: torch.nn.Module, sample: np.ndarray) -> tuple[float, float]:
    """(class agreement, largest probability difference) of the ONNX file against torch."""
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    with torch.inference_mode():
        expected = portable(torch.from_numpy(sample)).numpy()
    found = session.run(None, {"raw": sample})[0]
    agreement = float((found.argmax(1) == expected.argmax(1)).mean())
    return agreement, float(np.abs(found - expected).max())


class OnnxPredictor(Predictor):
    """A :class:`Predictor` whose probabilities come from an ONNX Runtime session (or, in
    :class:`specdeepmap.openvino_model.OpenVinoPredictor`, another runtime's network).
    """

    engine = "onnxruntime"

    def __init__(self, session, config: ModelConfig, source: str, precision: str = "fp32") -> None:
        super().__init__(model=None, config=config, device=torch.device("cpu"), source=source)
        self.session = session
        self.precision = precision  #: the file's arithmetic: fp32 or int8

    @torch.inference_mode()
    def probabilities(
        self,
        batch: np.ndarray,
        normalized: bool = False,
        autocast: bool = False,
        channels_last: bool = False,
        tta: bool = False,
    ) -> torch.Tensor:
        """Class probabilities of a raw (N, C, H, W) batch (the graph normalises)."""
        if normalized or tta:
            raise InputMismatchError(
                f"{self.source}: an ONNX model takes raw pixels and maps without TTA"
            )
        return torch.from_numpy(self._run(np.ascontiguousarray(batch, dtype=np.float32)))

    def _run(self, raw: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"raw": raw})[0]


def load_onnx(uri: str) -> OnnxPredictor:
    """An exported ``.onnx`` model (local or ``s3://``) ready for the Tester and the Mapper."""
    import onnxruntime as ort

    from specdeepmap.inference import local_model_file

    path = local_model_file(uri)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # as many threads as torch's
    session = ort.InferenceSession(path, options, providers=_providers())
    props = session.get_modelmeta().custom_metadata_map
    if CONFIG_KEY not in props:
        raise InputMismatchError(f"{uri} is an ONNX model without specdeepmap's config")
    config = ModelConfig.read(json.loads(props[CONFIG_KEY]), uri)
    return OnnxPredictor(session, config, uri, props.get(PRECISION_KEY, "fp32"))


def _providers() -> list[str]:
    """CUDA where ONNX Runtime has it and a GPU is present, else the CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    cuda = "CUDAExecutionProvider" in available and torch.cuda.is_available()
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
