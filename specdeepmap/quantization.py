"""Post-training int8 quantization of a network for CPU mapping.

On CPUs without bfloat16 units (no AVX512-BF16/AMX) bf16 autocast is slower than fp32, but
int8 convolutions run on AVX512-VNNI/AVX-VNNI, which most x86 servers have: the network is
several times faster. The network is traced with torch.fx, conv + batch-norm + ReLU are fused,
and activation ranges are calibrated on crops of the scene being mapped (histogram observers,
robust to a few extreme pixels; weights quantized per channel). That is static post-training
quantization: no retraining, ~1.5 s of setup per scene, and a small share of pixels whose
class changes (``benchmarks/bench_mapping.py`` measures it with a trained model: 0.03 % on the
demo).

DeepLabV3+'s ASPP concatenates branches whose int8 scales differ; torch requantizes them (and
warns once), which costs a little accuracy: check a model with ``bench_mapping.py
--quality-model`` before mapping production scenes in int8.

torch.ao's FX quantization is used because it ships with the pinned torch; its successor
(torchao's PT2E flow) needs torch.compile, which did not speed up this network on CPU.

Threads: torch.fx traces by patching ``torch.nn.Module.__call__`` process-wide, so a module
called by another thread during a trace ends up in (and breaks) that trace. Traces are
therefore serialised by a lock (:data:`specdeepmap.inference.NETWORK_LOCK`, which folding
batch norms, a forward pass, also holds) and done once per network per process: scenes
mapped in parallel threads with the same model share the traced, not yet calibrated,
template. Do not
run other networks in the same process while a *new* network is first quantized.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import warnings
from collections import OrderedDict
from collections.abc import Iterable

import numpy as np
import torch

from specdeepmap.errors import InvalidParameterError
from specdeepmap.inference import NETWORK_LOCK, Predictor
from specdeepmap.model_config import ModelConfig
from specdeepmap.models import EnsembleSegmentation, SpectralSegmentation

#: the quantized-kernel library: oneDNN uses VNNI and changed fewer classes than fbgemm
ENGINE = "onednn"
# torch warns, at the first forward pass of a process, that a quantized concatenation (a
# U-Net's skip connections, DeepLabV3+'s ASPP) requantizes inputs of different scales: that
# is the accuracy cost measured and reported above, not news to a mapping run's log
warnings.filterwarnings(
    "ignore", message="All inputs of this cat operator must share", category=UserWarning
)
#: pixels per calibration pass (observers cost per call, so few passes; memory: no more than
#: one mapping batch holds): the mapper's eight 128² crops make one pass
CALIBRATION_PIXELS = 4 * 256 * 256
#: fingerprint of the weights → traced network with fresh observers (a few, most recent last)
_TEMPLATES: OrderedDict[str, torch.nn.Module] = OrderedDict()
_MAX_TEMPLATES = 2
#: (tensor addresses and versions) → weights digest, see :func:`_fingerprint`
_DIGESTS: dict[tuple, str] = {}


def int8_supported() -> bool:
    """Whether this torch build has the int8 CPU kernels used here."""
    return ENGINE in torch.backends.quantized.supported_engines


class _EncoderDecoder(torch.nn.Module):
    """An smp model's encoder → decoder → head without its input-shape check, which torch.fx
    cannot trace (the mapper's windows are multiples of 32 px already).
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.encoder = model.encoder
        self.decoder = model.decoder
        self.segmentation_head = model.segmentation_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.segmentation_head(self.decoder(self.encoder(x)))


def _traceable(model: torch.nn.Module) -> torch.nn.Module:
    if isinstance(model, EnsembleSegmentation):
        model.members = torch.nn.ModuleList(_traceable(m) for m in model.members)
    elif isinstance(model, SpectralSegmentation):
        model.net = _traceable(model.net)
    elif all(hasattr(model, name) for name in ("encoder", "decoder", "segmentation_head")):
        model = _EncoderDecoder(model)
    return model.eval()


def _prepare(model: torch.nn.Module, example: tuple, config: ModelConfig) -> torch.nn.Module:
    """Trace and insert observers; a decoder torch.fx cannot trace (SegFormer's) stays fp32."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.fx.custom_config import PrepareCustomConfig
    from torch.ao.quantization.quantize_fx import prepare_fx

    qconfig = get_default_qconfig_mapping(ENGINE)
    with _without_stack_traces():
        try:
            return prepare_fx(model, qconfig, example)
        except Exception:  # torch.fx raises many types on untraceable code
            # the decoders, of one network or of each member of an ensemble
            decoders = {
                type(module)
                for name, module in model.named_modules()
                if name.rpartition(".")[2] == "decoder"
            }
            if not decoders:
                raise
        custom = PrepareCustomConfig().set_non_traceable_module_classes(list(decoders))
        try:
            return prepare_fx(model, qconfig, example, prepare_custom_config=custom)
        except Exception as error:
            raise InvalidParameterError(
                f"int8: the {config.architecture}/{config.backbone} network "
                f"cannot be traced for quantization ({type(error).__name__}: "
                f"{str(error).splitlines()[0][:200]}); use fp32"
            ) from error


@contextlib.contextmanager
def _without_stack_traces():
    """Trace without recording each node's Python stack (``torch.fx.config``).

    The stacks are only for debugging messages, and filtering them imports torch.export,
    Inductor and their dependencies (networkx, redis, OpenTelemetry): ~35 MB more resident
    memory in every int8 mapping process and a slower first trace. Callers hold the trace lock.
    """
    import torch.fx.config

    before = torch.fx.config.do_not_emit_stack_traces
    torch.fx.config.do_not_emit_stack_traces = True
    try:
        yield
    finally:
        torch.fx.config.do_not_emit_stack_traces = before


def _fingerprint(model: torch.nn.Module) -> str:
    """A digest of the network's class and weights: equal for every copy of one model.

    Hashing 50 MB of weights takes ~0.2 s, so the digest is remembered for the tensors it was
    computed from: their storage addresses and version counters (an in-place change such as
    batch-norm folding bumps the counter and gets a new digest).
    """
    state = model.state_dict()
    identity = (
        type(model).__qualname__,
        tuple((name, t.data_ptr(), t._version) for name, t in state.items()),
    )
    if identity in _DIGESTS:
        return _DIGESTS[identity]
    digest = hashlib.blake2b(type(model).__qualname__.encode(), digest_size=16)
    for name, tensor in state.items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    if len(_DIGESTS) >= _MAX_TEMPLATES * 4:
        _DIGESTS.pop(next(iter(_DIGESTS), None), None)
    _DIGESTS[identity] = digest.hexdigest()
    return _DIGESTS[identity]


def _sharing_tensors(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are ``model``'s own tensors.

    Tracing, calibrating and converting never write to the float weights (fusion and
    conversion make new tensors), so the copies share them: one copy of the weights in memory,
    not three. Channels-last tensors are copied, so that making the copy contiguous leaves the
    original's layout alone.
    """
    memo = {id(t): t for t in (*model.parameters(), *model.buffers()) if t.is_contiguous()}
    return copy.deepcopy(model, memo)


def _prepared_copy(predictor: Predictor, example: tuple) -> torch.nn.Module:
    """A fresh copy of the network traced with observers, tracing at most once per model."""
    with NETWORK_LOCK:  # the weights are read while no thread folds them
        key = _fingerprint(predictor.model)
        if key not in _TEMPLATES:
            model = _traceable(
                _sharing_tensors(predictor.model).to(memory_format=torch.contiguous_format)
            )
            _TEMPLATES[key] = _prepare(model, example, predictor.config)
            while len(_TEMPLATES) > _MAX_TEMPLATES:
                _TEMPLATES.popitem(last=False)
        _TEMPLATES.move_to_end(key)
        return _sharing_weights(_TEMPLATES[key])


def _sharing_weights(template: torch.nn.Module) -> torch.nn.Module:
    """A copy of a traced template that shares its weights but has observers of its own.

    The observers' statistics (ranges, histograms) are buffers that calibration writes in
    place: shared, one map's calibration would start from another's, and two threads
    calibrating at once (a Dask worker mapping two scenes) would corrupt each other's
    histograms (it happened: "update_max must be >= orig_max").
    """
    from torch.ao.quantization.observer import ObserverBase

    own = {
        id(t)
        for module in template.modules()
        if isinstance(module, ObserverBase)
        for t in (*module.parameters(), *module.buffers())
    }
    memo = {
        id(t): t
        for t in (*template.parameters(), *template.buffers())
        if t.is_contiguous() and id(t) not in own
    }
    return copy.deepcopy(template, memo)


def quantize_int8(predictor: Predictor, calibration: Iterable[np.ndarray]) -> Predictor:
    """An int8 copy of ``predictor`` calibrated on raw (N, C, H, W) windows.

    Raises:
        InvalidParameterError: not on CPU, no int8 kernels, or the network cannot be traced.
    """
    if predictor.device.type != "cpu":
        raise InvalidParameterError("int8 precision runs on the CPU only; on a GPU use bf16")
    if not int8_supported():
        raise InvalidParameterError(f"this torch build has no {ENGINE} int8 kernels")
    from torch.ao.quantization.quantize_fx import convert_fx

    torch.backends.quantized.engine = ENGINE  # process-wide: the packed weights need it
    batches = list(calibration)
    if len({batch.shape[1:] for batch in batches}) == 1:
        # few passes (observers cost per call), each no bigger than a mapping batch (memory)
        stacked = np.concatenate(batches)
        per_pass = max(1, CALIBRATION_PIXELS // (stacked.shape[2] * stacked.shape[3]))
        batches = [stacked[i : i + per_pass] for i in range(0, len(stacked), per_pass)]
    batches = [predictor.normalization.apply(batch) for batch in batches]
    example = (torch.from_numpy(np.ascontiguousarray(batches[0])),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notices
        prepared = _prepared_copy(predictor, example)
        with torch.inference_mode():
            for batch in batches:
                prepared(torch.from_numpy(np.ascontiguousarray(batch)))
        quantized = convert_fx(prepared)
    return Predictor(
        model=quantized, config=predictor.config, device=predictor.device, source=predictor.source
    )
