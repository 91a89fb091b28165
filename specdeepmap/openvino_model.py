"""Models on OpenVINO: the model's ONNX file compiled for the CPU, in fp32, bf16 or int8.

``map --engine openvino`` runs the same self-contained ONNX file that ``--engine
onnxruntime`` runs (:mod:`specdeepmap.onnx_model`: a registered version's own, else
exported once and cached), compiled by OpenVINO's CPU plugin:

* ``fp32``: OpenVINO's CPU plugin computes in bf16 by default where the CPU has bf16
  instructions; fp32 here asks for f32, so that the map is the torch model's;
* ``bf16``: the plugin's bf16 (on CPUs with AVX-512 BF16 or AMX; elsewhere it computes f32);
* ``int8``: the ONNX file's convolutions quantized by NNCF (OpenVINO's post-training
  quantizer; per-channel int8 weights, asymmetric uint8 activations) with their
  activation ranges calibrated **once per model**, on the model's training chips (up to
  :data:`specdeepmap.onnx_model.CALIBRATION_CHIPS`), kept in the private cache
  (``~/.cache/specdeepmap/openvino``, keyed by the ONNX file's content) and checked against
  the fp32 file before it is kept: at least :data:`~specdeepmap.onnx_model.MIN_INT8_AGREEMENT`
  of the pixels must keep their class.

It is the int8 path that does not rest on ``torch.ao.quantization`` (which PyTorch's
documentation marks for removal), measured against it in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid

import numpy as np
import torch

from specdeepmap import storage
from specdeepmap.errors import InputMismatchError, InvalidParameterError
from specdeepmap.model_config import ModelConfig
from specdeepmap.onnx_model import (
    CONFIG_KEY,
    MIN_INT8_AGREEMENT,
    PRECISION_KEY,
    OnnxPredictor,
    cached_onnx,
)

log = logging.getLogger(__name__)

#: OpenVINO's inference precision for each map precision (int8: what stays in float)
_PRECISION_HINT = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}
#: operations int8 leaves in float: only the convolutions are quantized, as in ONNX
#: Runtime's int8 file (quantizing the joins, the upsampling and the normalisation too was
#: 2 % faster and changed the class of 1.6 % of a small model's pixels instead of 0.2 %)
_KEPT_IN_FLOAT = ("Add", "Multiply", "Subtract", "Divide", "Concat", "Interpolate", "Softmax")


class OpenVinoPredictor(OnnxPredictor):
    """A :class:`~specdeepmap.inference.Predictor` whose probabilities come from a network
    compiled by OpenVINO (raw pixels in, class probabilities out, as the ONNX file).
    """

    engine = "openvino"

    def __init__(self, compiled, config: ModelConfig, source: str, precision: str) -> None:
        super().__init__(None, config, source, precision)
        self.compiled = compiled

    def _run(self, raw: np.ndarray) -> np.ndarray:
        return self.compiled(raw)[0]  # a copy: the next call reuses the request's buffers


def load_openvino(model_uri: str, precision: str = "fp32") -> OpenVinoPredictor:
    """``model_uri`` (a model file, ``s3://`` or ``models:/`` URI, or an ``.onnx`` file)
    compiled by OpenVINO for the CPU in ``precision`` (fp32, bf16 or int8).

    Raises:
        InvalidParameterError: fp32 or bf16 asked of an int8 ``.onnx`` file.
        InputMismatchError: an ``.onnx`` file without specdeepmap's config, or an int8
            network that changes the class of too many pixels.
        MissingInputError: int8 of a model whose training chips cannot be read.
    """
    from specdeepmap.inference import local_model_file

    if model_uri.lower().endswith(".onnx"):
        path = local_model_file(model_uri)
    else:
        path = cached_onnx(model_uri)
    config, stored = onnx_config(path, model_uri)
    if stored == "int8" and precision != "int8":
        raise InvalidParameterError(
            f"{model_uri} is an int8 ONNX model: it maps in int8 (precision {precision} asked)"
        )
    if precision == "int8" and stored != "int8":
        path = registered_int8(model_uri) or cached_int8(path, config, model_uri)
    return OpenVinoPredictor(compile_network(path, precision), config, model_uri, precision)


def registered_int8(model_uri: str) -> str | None:
    """The local ``.xml`` of a registered version's int8 network (made and checked when it
    was registered: :func:`specdeepmap.tracking.log_onnx_export`), None where it has none.
    """
    from specdeepmap.registry import registered_artifact
    from specdeepmap.tracking import OPENVINO_INT8_ARTIFACT

    return registered_artifact(model_uri, "openvino_int8", OPENVINO_INT8_ARTIFACT)


def compile_network(model, precision: str):
    """An OpenVINO model (a file: ONNX or ``.xml``, or an ``openvino.Model``) compiled for
    the CPU in ``precision``, on as many threads as torch uses.
    """
    import openvino as ov

    return ov.Core().compile_model(
        model,
        "CPU",
        {
            "INFERENCE_NUM_THREADS": torch.get_num_threads(),
            "PERFORMANCE_HINT": "LATENCY",  # one batch at a time, every core on it
            "INFERENCE_PRECISION_HINT": _PRECISION_HINT[precision],
        },
    )


def cached_int8(onnx_path: str, config: ModelConfig, source: str) -> str:
    """The int8 OpenVINO model (``.xml`` and ``.bin``) of an fp32 ONNX file, made by
    :func:`write_int8` the first time, then read from the private cache, keyed by the ONNX
    file's content, so that every scene reuses it. Threads that map with one model quantize
    it once: the others wait for the file.
    """
    from specdeepmap.inference import NETWORK_LOCK

    key = storage.content_key(onnx_path)
    path = os.path.join(storage.private_cache_dir("openvino"), f"{key}.xml")
    with NETWORK_LOCK:
        if os.path.exists(path):
            return path
        started = time.perf_counter()
        agreement = write_int8(onnx_path, path, config, source)
    log.info(
        "%s quantized to int8 for OpenVINO: %s (agreement %.4f%% with fp32, %.1f s)",
        source,
        path,
        100 * agreement,
        time.perf_counter() - started,
    )
    return path


def write_int8(onnx_path: str, out_xml: str, config: ModelConfig, source: str) -> float:
    """Quantize an fp32 ONNX file (:func:`quantize_int8`) calibrated on the model's training
    chips, check it against the fp32 file on its test chips (or raw windows), and write it
    to ``out_xml`` and its ``.bin``. Returns the share of pixels that kept their class.

    Raises:
        InputMismatchError: fewer than :data:`MIN_INT8_AGREEMENT` of the pixels kept their
            class (nothing is written).
        MissingInputError: the training chips cannot be read.
    """
    import openvino as ov

    from specdeepmap.inference import Predictor
    from specdeepmap.onnx_model import calibration_chips, check_batch

    shell = Predictor(model=None, config=config, device=torch.device("cpu"), source=source)
    calibration = calibration_chips(shell, None)  # fails before any work without them
    quantized = quantize_int8(onnx_path, calibration)
    agreement = class_agreement(onnx_path, quantized, check_batch(shell, None, 8))
    if agreement < MIN_INT8_AGREEMENT:
        raise InputMismatchError(
            f"The int8 OpenVINO network of {source} agrees with its fp32 network on "
            f"{agreement:.3%} of the pixels (at least {MIN_INT8_AGREEMENT:.1%} needed): "
            "map it in fp32"
        )
    folder, name = os.path.split(out_xml)
    tmp = os.path.join(folder, f".{uuid.uuid4().hex}-{name}")  # two maps may race here
    ov.save_model(quantized, tmp, compress_to_fp16=False)
    # the weights first: an .xml is only ever beside its complete .bin
    os.replace(tmp.removesuffix(".xml") + ".bin", out_xml.removesuffix(".xml") + ".bin")
    os.replace(tmp, out_xml)
    return agreement


def quantize_int8(onnx_path: str, calibration: list[np.ndarray]):
    """An fp32 ONNX file's convolutions quantized by NNCF (an ``openvino.Model``), their
    activation ranges calibrated on ``calibration`` (raw (1, C, H, W) chips).
    """
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    nncf.set_log_level(logging.WARNING)  # not a line per operation on the user's console
    return nncf.quantize(
        ov.Core().read_model(onnx_path),
        nncf.Dataset(calibration),
        subset_size=len(calibration),
        preset=nncf.QuantizationPreset.MIXED,  # asymmetric activations (raw, post-ReLU)
        # min-max ranges over every chip, as ONNX Runtime's int8: NNCF's default averages
        # each chip's extremes, which clipped enough to change 2 % of a small model's pixels
        advanced_parameters=AdvancedQuantizationParameters(
            activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX
        ),
        ignored_scope=nncf.IgnoredScope(types=list(_KEPT_IN_FLOAT), validate=False),
    )


def class_agreement(onnx_path: str, quantized, sample: np.ndarray) -> float:
    """Share of ``sample``'s pixels whose class the int8 network keeps (against fp32)."""
    expected = compile_network(onnx_path, "fp32")(sample)[0]
    found = compile_network(quantized, "int8")(sample)[0]
    return float((found.argmax(1) == expected.argmax(1)).mean())


def onnx_config(path: str, uri: str) -> tuple[ModelConfig, str]:
    """The model config and the arithmetic (fp32 or int8) in an ONNX file's metadata."""
    import onnx

    props = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
    if CONFIG_KEY not in props:
        raise InputMismatchError(f"{uri} is an ONNX model without specdeepmap's config")
    return ModelConfig.read(json.loads(props[CONFIG_KEY]), uri), props.get(PRECISION_KEY, "fp32")
