"""Model files and prediction: what the Tester and the Mapper share.

A model file is plain data plus tensors, loaded with ``torch.load(weights_only=True)`` so that it
can never run code: either a Lightning checkpoint written by the Trainer (``*.ckpt``, the config
under ``hyper_parameters["config"]``), an exported ``model.pt`` (``{"format", "config",
"state_dict"}``), or a checkpoint of SpecDeepMap's Trainer, read without running its pickled
objects (:mod:`specdeepmap.foreign`). The config says everything inference needs:
architecture, backbone, bands, class values, ignore index, normalisation and tile size.

Model URIs: a local path, ``s3://…``, or an MLflow registry URI ``models:/NAME/VERSION`` or
``models:/NAME@ALIAS`` (the registered model carries the model file as an artifact).
"""

from __future__ import annotations

import glob
import os
import re
import threading
import warnings
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from specdeepmap import storage
from specdeepmap.augmentation import tta_d4
from specdeepmap.classes import ClassSchema, schema_from_config
from specdeepmap.errors import (
    DeviceUnavailableError,
    MissingInputError,
    UnreadableInputError,
    UnsafeModelFileError,
)
from specdeepmap.model_config import SCHEMA_VERSION, ModelConfig
from specdeepmap.models import build_network, replace_submodule
from specdeepmap.normalization import Normalization

FORMAT_NAME = "specdeepmap-model"
MODEL_FORMAT = f"{FORMAT_NAME}/{SCHEMA_VERSION}"
MODEL_FILE = "model.pt"


def resolve_device(device: str) -> torch.device:
    """'cpu', 'gpu'/'cuda' or 'auto' → a torch device; asking for an absent GPU is an error."""
    device = device.lower()
    if device in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(
                "A GPU was asked for but CUDA reports none: use --device cpu or auto"
            )
        return torch.device("cuda")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device("cpu")


def local_model_file(uri: str) -> str:
    """Local path of a model file given as path, ``s3://`` or ``models:/`` URI."""
    if uri.startswith("models:/") or uri.startswith("runs:/"):
        import mlflow

        # a registry that knows the model (an unknown one raises MLflow's own error here)
        # whose artifact store lost the files: said at once, not after MLflow's retries
        if not mlflow.artifacts.list_artifacts(artifact_uri=uri):
            raise MissingInputError(_artifacts_missing(uri, "nothing is stored under it"))
        try:
            folder = mlflow.artifacts.download_artifacts(artifact_uri=uri)
        except Exception as error:  # MLflow, HTTP and storage errors alike
            raise MissingInputError(_artifacts_missing(uri, error)) from error
        found = sorted(glob.glob(os.path.join(folder, "**", MODEL_FILE), recursive=True))
        if not found:
            raise UnsafeModelFileError(
                f"{uri} holds no {MODEL_FILE}: was it logged by specdeepmap train?"
            )
        return found[0]
    # keyed on the object's ETag: a model replaced under the same key is fetched again
    return storage.cached_version(uri, storage.private_cache_dir("models"))


def _artifacts_missing(uri: str, why: object) -> str:
    return (
        f"{uri}: model artifacts missing from the store ({str(why)[:300]}). The registry "
        "knows this model but the artifact store does not hold its files: was the object "
        "store reset (an in-memory S3 restarted) or the files deleted? Restore the store, "
        "or train and register the model again."
    )


def load_plain_data(path: str, uri: str | None = None) -> object:
    """A PyTorch file's contents, loaded as plain data and tensors only.

    Raises:
        MissingInputError: no such file.
        UnsafeModelFileError: it holds pickled objects other than plain data (code).
        UnreadableInputError: it is not a PyTorch file at all (random bytes, text).
    """
    uri = uri or path
    if not os.path.isfile(path):
        raise MissingInputError(f"Model file {uri} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, KeyError, RuntimeError...
        found = re.search(
            r"unsupported global:?\s*(?:GLOBAL\s+)?([\w.]+)", str(error), re.IGNORECASE
        )
        if found:
            raise UnsafeModelFileError(
                f"{uri} is not a plain-data model file: it holds pickled objects "
                f"({found.group(1)}) that loading would run; refusing to unpickle it (model "
                "files written by specdeepmap never need that)"
            ) from None
        raise UnreadableInputError(
            f"{uri} is not a PyTorch model or checkpoint file (it cannot be read as one: "
            f"{type(error).__name__})"
        ) from None


def read_model_file(uri: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(config, state dict) of a model file, never unpickling arbitrary objects.

    The config is validated (:class:`ModelConfig`): a file with a missing or wrong entry is
    refused here, naming the file and the entry. The tensors are loaded straight from the
    (local or cached) file, not from a copy of its bytes in memory, so loading holds the
    weights once.
    """
    path = local_model_file(uri)
    try:
        obj = load_plain_data(path, uri)
    except UnsafeModelFileError as refusal:  # SpecDeepMap's checkpoints pickle a few objects
        from specdeepmap import foreign

        try:
            obj = foreign.load_checkpoint(path)
        except Exception:  # noqa: BLE001 - any other object: the first refusal stands
            raise refusal from None
        if not foreign.is_specdeepmap_checkpoint(obj):
            raise refusal from None
        config, state = foreign.to_model_file(obj, uri)
        return ModelConfig.read(config, uri), state
    if isinstance(obj, dict) and str(obj.get("format", "")).startswith(FORMAT_NAME + "/"):
        _check_format_version(obj["format"], uri)
        return ModelConfig.read(obj["config"], uri), obj["state_dict"]
    if isinstance(obj, dict) and "config" in (obj.get("hyper_parameters") or {}):
        state = {
            k.removeprefix("model."): v
            for k, v in obj["state_dict"].items()
            if k.startswith("model.")
        }
        return ModelConfig.read(obj["hyper_parameters"]["config"], uri), state
    from specdeepmap import foreign

    if foreign.is_specdeepmap_checkpoint(obj):  # SpecDeepMap's, without pickled objects
        config, state = foreign.to_model_file(obj, uri)
        return ModelConfig.read(config, uri), state
    raise UnsafeModelFileError(f"{uri} is not a specdeepmap model file (no config found)")


def _check_format_version(found: str, uri: str) -> None:
    """A model file of a later schema than this code reads is refused (not misread)."""
    version = found.rsplit("/", 1)[1]
    if not version.isdigit() or int(version) > SCHEMA_VERSION:
        raise UnreadableInputError(
            f"Model file {uri} has format {found}: this specdeepmap reads "
            f"{MODEL_FORMAT} and earlier; update specdeepmap to read it"
        )


def export_model_file(config: ModelConfig, model: torch.nn.Module, path: str) -> str:
    """Write the portable model file (config + state dict) atomically."""
    with storage.atomic_output(path) as tmp:
        torch.save(
            {
                "format": MODEL_FORMAT,
                "config": config.stored(),
                "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            },
            tmp,
        )
    return path


@dataclass
class Predictor:
    """A network with its config, ready to turn raw pixel arrays into class probabilities."""

    model: torch.nn.Module
    config: ModelConfig
    device: torch.device
    source: str = ""
    #: what runs the network (a map records it): torch, onnxruntime or openvino
    engine: ClassVar[str] = "torch"

    @property
    def class_values(self) -> list[int]:
        """Original label values of output channels 1..K (channel 0 is 'unlabelled')."""
        return list(self.config.class_values)

    @property
    def classes(self) -> ClassSchema:
        """Names and colours of the class values (called by value when the model has none)."""
        return schema_from_config(self.config)

    @property
    def in_channels(self) -> int:
        """Bands the model expects."""
        return self.config.in_channels

    @property
    def tile_size(self) -> tuple[int, int]:
        """(height, width) of the training chips."""
        return tuple(self.config.tile_size)

    @property
    def normalization(self) -> Normalization:
        """Normalisation the model was trained with."""
        return Normalization.from_dict(self.config.normalization)

    def value_lut(self) -> np.ndarray:
        """Class value of every output channel (channel 0 → 0)."""
        return np.array([0, *self.class_values], dtype=np.int64)

    @torch.inference_mode()
    def probabilities(
        self,
        batch: np.ndarray,
        normalized: bool = False,
        autocast: bool = False,
        channels_last: bool = False,
        tta: bool = False,
    ) -> torch.Tensor:
        """Softmax over the real classes for a raw (N, C, H, W) batch → (N, K, H, W) tensor.

        The 'unlabelled' channel 0 was never trained (it is the ignore index), so it is left
        out: every pixel gets one of the real classes. ``tta`` averages the probabilities over
        the eight flips and quarter turns of the batch (eight forward passes).
        """
        x = batch if normalized else self.normalization.apply(batch)
        tensor = torch.from_numpy(np.ascontiguousarray(x)).to(self.device)

        def predict(view: torch.Tensor) -> torch.Tensor:
            if channels_last:
                view = view.contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=autocast):
                logits = self.model(view)
            return torch.softmax(logits[:, 1:].float(), dim=1)

        return tta_d4(predict, tensor) if tta else predict(tensor)

    def predict_classes(self, batch: np.ndarray, tta: bool = False) -> np.ndarray:
        """Class values (original label values) for a raw (N, C, H, W) batch."""
        index = self.probabilities(batch, tta=tta).argmax(dim=1).cpu().numpy()
        return np.asarray(self.class_values, dtype=np.int64)[index]


#: held while a network is changed in place or traced: folding batch norms (two threads
#: mapping with one model fold it once), torch.fx's int8 trace
#: (:mod:`specdeepmap.quantization`), which patches ``torch.nn.Module.__call__`` process-wide,
#: and the ONNX export's ``torch.export`` trace, whose tracing state is process-wide too (two
#: exports at once fail), so that the forward pass folding runs in one thread never enters
#: another thread's trace; also while a cached ONNX or OpenVINO file is made, so that threads
#: mapping with one model make it once
NETWORK_LOCK = threading.RLock()


def fold_batch_norms(model: torch.nn.Module, in_channels: int) -> torch.nn.Module:
    """Fold, in place, every BatchNorm2d of an inference network that directly follows a
    Conv2d into that convolution's weights (a tenth of a U-Net's CPU time is batch norm).

    The pairs are found by running the network once with hooks, under the lock an int8 trace
    holds too (a forward pass during another thread's trace would enter that trace). The
    folded network's output is checked against the original's on that input; should they
    differ, the original modules are put back, with a warning. In place, so that mapping never
    holds two copies of a network; a folded network has nothing left to fold, so folding again
    is a no-op. Returns ``model``.
    """
    with NETWORK_LOCK:
        return _fold_batch_norms(model, in_channels)


def _fold_batch_norms(model: torch.nn.Module, in_channels: int) -> torch.nn.Module:
    model.eval()
    outputs: dict[int, tuple[torch.nn.Module, torch.Tensor]] = {}  # tensor id → (conv, tensor)
    calls: dict[torch.nn.Module, int] = {}
    pairs: list[tuple[torch.nn.Module, torch.nn.Module]] = []

    def seen(module, inputs, output):
        calls[module] = calls.get(module, 0) + 1
        if isinstance(module, torch.nn.Conv2d):
            outputs[id(output)] = (module, output)
        elif (hit := outputs.get(id(inputs[0]))) is not None and hit[1] is inputs[0]:
            pairs.append((hit[0], module))

    hooks = [
        m.register_forward_hook(seen)
        for m in model.modules()
        if isinstance(m, (torch.nn.Conv2d, torch.nn.BatchNorm2d))
    ]
    device = next(model.parameters()).device
    example = torch.randn(1, in_channels, 64, 64, generator=torch.Generator().manual_seed(0))
    example = example.to(device)
    with torch.inference_mode():
        reference = model(example)
    for hook in hooks:
        hook.remove()
    outputs.clear()
    names = {module: name for name, module in model.named_modules()}
    folded: list[tuple[torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.Tensor, object]] = []
    for conv, bn in pairs:
        if calls[conv] == 1 and calls[bn] == 1:  # modules used once only
            scale = _bn_scale(bn)
            if bool((scale == 0).any()):  # could not be undone
                continue
            folded.append((conv, bn, scale, conv.bias))
            with torch.no_grad():  # in place: no second copy of the weights
                conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
                bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
                shift = bn.bias if bn.bias is not None else 0
                conv.bias = torch.nn.Parameter((bias - bn.running_mean) * scale + shift)
            replace_submodule(model, names[bn], torch.nn.Identity())
    if not folded:
        return model
    with torch.inference_mode():
        error = float((model(example) - reference).abs().max())
    if error > 1e-3 * max(1.0, float(reference.abs().max())):
        for conv, bn, scale, bias in folded:  # undo
            with torch.no_grad():
                conv.weight.div_(scale.reshape(-1, 1, 1, 1))
            conv.bias = bias
            replace_submodule(model, names[bn], bn)
        warnings.warn(
            f"folding batch norms changed the output by {error:.3g}; not folded", stacklevel=3
        )
    return model


def _bn_scale(bn: torch.nn.BatchNorm2d) -> torch.Tensor:
    """The per-channel factor an evaluating batch norm multiplies by."""
    with torch.no_grad():
        scale = torch.rsqrt(bn.running_var + bn.eps)
        return scale * bn.weight if bn.weight is not None else scale


def load_model(uri: str, device: str = "auto") -> Predictor:
    """Load a model file (path, ``s3://`` or ``models:/``) for inference; a ``.onnx`` file
    exported by :func:`specdeepmap.onnx_model.export_onnx` runs with ONNX Runtime.

    The network is built without initialising weights (on the meta device) and takes the
    file's tensors as they are (``assign``), so loading never holds two copies of the weights.
    """
    if uri.lower().endswith(".onnx"):  # an exported model: ONNX Runtime runs it
        from specdeepmap.onnx_model import load_onnx

        return load_onnx(uri)
    config, state = read_model_file(uri)
    with torch.device("meta"):
        model = build_network(config)
    model.load_state_dict(state, assign=True)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        model = build_network(config)  # a tensor the file lacks (a non-persistent buffer)
        model.load_state_dict(state)
    target = resolve_device(device)
    model.to(target).eval()
    return Predictor(model=model, config=config, device=target, source=uri)
