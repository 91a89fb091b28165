"""STAC items of registered model versions (the Machine Learning Model extension, MLM v1.5).

Every registered version gets ``stac/model_item.json`` among its run's artifacts: what the
model takes (its bands in order, shape, and the value scaling it applies as MLM
``value_scaling``), what it returns (``classification:classes`` with the map's values, names
and colours), the model file as an ``mlm:model`` asset, its aliases, and the Version
extension's links to its predecessor, successor and the latest version. It is written at
registration and rewritten when an alias moves; the STAC item of every map made with a
registered version links to it (``derived_from``). Catalogs and tools that read MLM (STAC
browsers, ``stac-model``, rslearn, terrakit) can then find and describe our models.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import tempfile

from specdeepmap import __version__, storage
from specdeepmap.classes import ClassSchema
from specdeepmap.model_config import ModelConfig

MLM_SCHEMA = "https://stac-extensions.github.io/mlm/v1.5.2/schema.json"
VERSION_SCHEMA = "https://stac-extensions.github.io/version/v1.2.0/schema.json"
#: where the item is among the version's run artifacts
ITEM_FOLDER = "stac"
ITEM_FILE = "model_item.json"
#: SpecDeepMap's architecture names → the classes that implement them
ARCHITECTURES = {
    "unet": "segmentation_models_pytorch.Unet",
    "unetplusplus": "segmentation_models_pytorch.UnetPlusPlus",
    "deeplabv3plus": "segmentation_models_pytorch.DeepLabV3Plus",
    "segformer": "segmentation_models_pytorch.Segformer",
    "justo-unet": "specdeepmap.models.JustoUNetSimple",
}


def value_scaling(normalization: dict, bands: int) -> list[dict] | None:
    """The model's ``((x / scaler) - mean) / std`` as MLM value scaling, one object per band:
    a z-score in the raw units (mean × scaler, std × scaler), or a scale by 1 / scaler.
    """
    scaler = normalization.get("scaler") or 1.0
    mean, std = normalization.get("mean"), normalization.get("std")
    if mean is not None and std is not None:
        return [_band_scaling(m, s, scaler) for m, s in zip(mean, std, strict=True)]
    if scaler != 1.0:
        return [{"type": "scale", "value": 1.0 / scaler}] * bands
    return None


def _band_scaling(mean: float | None, std: float | None, scaler: float) -> dict:
    """One band's scaling; a band without statistics (nodata everywhere in training) is
    multiplied by 0, as the model's normalisation does.
    """
    if mean is None or std is None or not (math.isfinite(mean) and math.isfinite(std)) or not std:
        return {"type": "scale", "value": 0.0}
    return {"type": "z-score", "mean": float(mean) * scaler, "stddev": float(std) * scaler}


def model_item(
    config: ModelConfig,
    name: str,
    version: str,
    model_href: str,
    created: dt.datetime,
    onnx_hrefs: dict[str, str] | None = None,
) -> dict:
    """The MLM STAC item of a model version (plain JSON data).

    ``config``: the model file's config; ``model_href``: where the model file is;
    ``onnx_hrefs``: where its portable files are, by precision (fp32: the ONNX export, int8:
    the OpenVINO network's ``.xml``, its ``.bin`` beside it). The item has no geometry
    (a model is not tied to a place; the training data's extent is in its model card);
    aliases and links are filled in when it is logged.
    """
    bands = list(config.band_names or [f"band_{i + 1}" for i in range(config.in_channels)])
    values = [int(v) for v in config.class_values]
    architecture = config.architecture
    properties = {
        "datetime": created.isoformat().replace("+00:00", "Z"),
        "title": f"{name} version {version}",
        # STAC 1.1 bands, which MLM asks for in the properties and STAC core allows there
        # only when an asset has them too (the model asset below)
        "bands": [{"name": band} for band in bands],
        "description": f"Semantic segmentation of {len(bands)}-band imagery into "
        f"{len(values)} classes ({architecture} / {config.backbone}), trained with "
        f"specdeepmap {config.version or __version__}.",
        "mlm:name": f"{name} v{version}",
        "mlm:architecture": ARCHITECTURES.get(architecture, architecture),
        "mlm:tasks": ["semantic-segmentation"],
        "mlm:framework": "pytorch",
        "mlm:framework_version": _torch_version(),
        "mlm:accelerator": None,
        "mlm:accelerator_constrained": False,
        "mlm:pretrained": config.weights.lower() not in ("none", ""),
        "mlm:input": [model_input(config, bands)],
        "mlm:output": [model_output(config)],
        "version": str(version),
        "specdeepmap:aliases": [],
        "specdeepmap:band_dtype": config.dtype,
    }
    assets = {
        "model": _model_asset(
            model_href,
            "application/octet-stream; framework=pytorch",
            "model file (weights and config; torch.load with weights_only=True)",
            "torch.save",
            bands,
            ["mlm:model", "mlm:weights", "data"],
        )
    }
    assets |= _portable_assets(onnx_hrefs or {}, bands)
    return {
        "type": "Feature",
        "stac_version": "1.1.0",
        "stac_extensions": [MLM_SCHEMA, VERSION_SCHEMA],
        "id": f"{name}-v{version}",
        "geometry": None,
        "properties": properties,
        "links": [],
        "assets": assets,
    }


def _model_asset(
    href: str,
    media_type: str,
    title: str,
    artifact_type: str,
    bands: list[str],
    roles: list[str] | None = None,
) -> dict:
    """One MLM model asset: where it is, what it is, how it was made, the bands it takes."""
    return {
        "href": href,
        "type": media_type,
        "title": title,
        "roles": roles or ["mlm:model", "data"],
        "mlm:artifact_type": artifact_type,
        "bands": [{"name": band} for band in bands],
    }


def _portable_assets(onnx_hrefs: dict[str, str], bands: list[str]) -> dict:
    """The item's assets of a version's portable files: its ONNX export (``fp32``) and its
    int8 OpenVINO network (``int8``: the ``.xml``, its weights the ``.bin`` beside it).
    """
    assets = {}
    if "fp32" in onnx_hrefs:
        assets["onnx"] = _model_asset(
            onnx_hrefs["fp32"],
            "application/octet-stream; framework=onnx; profile=onnx",
            "ONNX export: raw pixel values in, class probabilities out (the "
            "normalisation and the softmax inside; the config in its metadata)",
            "torch.onnx.export",
            bands,
        )
    if "int8" in onnx_hrefs:  # OpenVINO's int8 network: its graph and its weights
        xml = onnx_hrefs["int8"]
        assets["openvino_int8"] = _model_asset(
            xml,
            "application/xml; framework=openvino",
            "the ONNX export's convolutions quantized to int8 for OpenVINO (NNCF, "
            "calibrated on the version's training chips); its weights are openvino_int8_weights",
            "nncf.quantize",
            bands,
        )
        assets["openvino_int8_weights"] = {
            "href": xml.removesuffix(".xml") + ".bin",
            "type": "application/octet-stream; framework=openvino",
            "title": "the weights of openvino_int8",
            "roles": ["mlm:weights", "data"],
        }
    return assets


def model_input(config: ModelConfig, bands: list[str]) -> dict:
    """MLM's input: the bands in order, the chip shape and the model's value scaling."""
    height, width = config.tile_size
    return {
        "name": "image chips",
        "bands": bands,
        "input": {
            "shape": [-1, len(bands), height, width],
            "dim_order": ["batch", "bands", "height", "width"],
            "data_type": "float32",
        },
        "value_scaling": value_scaling(config.normalization or {}, len(bands)),
        "pre_processing_function": None,
    }


def model_output(config: ModelConfig) -> dict:
    """MLM's output: a probability per class and pixel, the classes named and coloured
    (classification v1.1 names are slugs: the name itself is the description).
    """
    from specdeepmap.stac import slug

    height, width = config.tile_size
    classes = ClassSchema.from_dict(config.classes) if config.classes else None
    values = [int(v) for v in config.class_values]
    output_classes = []
    for v in values:
        label = classes.name(v) if classes else f"class {v}"
        entry = {"value": v, "name": slug(label), "description": label}
        if classes:
            entry["color_hint"] = "{:02X}{:02X}{:02X}".format(*classes.info(v).color)
        output_classes.append(entry)
    return {
        "name": "class probabilities",
        "tasks": ["semantic-segmentation"],
        "result": {
            "shape": [-1, len(values), height, width],
            "dim_order": ["batch", "channel", "height", "width"],
            "data_type": "float32",
        },
        "classification:classes": output_classes,
        "post_processing_function": None,
    }


def publish_model_item(
    name: str,
    version: str,
    config: ModelConfig,
    file_name: str = "model.pt",
    client=None,
    onnx_artifacts: dict[str, str] | None = None,
) -> str:
    """Write the MLM item of a newly registered version into its run's artifacts, relink its
    predecessor's (its successor and the latest version), and return the item's URI.
    """
    import mlflow

    client = client or mlflow.MlflowClient()
    version = str(version)
    found = client.get_model_version(name, version)
    created = dt.datetime.fromtimestamp(found.creation_timestamp / 1000, dt.UTC)
    # the MLflow model's folder; the model file is among its own artifacts
    folder = _location(client.get_model_version_download_uri(name, version))
    model_href = f"{folder}/artifacts/{file_name}"
    onnx_hrefs = {}
    if onnx_artifacts:  # paths among the version's run artifacts, by precision
        run = f"{_location(client.get_run(found.run_id).info.artifact_uri)}"
        onnx_hrefs = {precision: f"{run}/{path}" for precision, path in onnx_artifacts.items()}
    item = model_item(config, name, version, model_href, created, onnx_hrefs)
    _log(client, name, version, item)
    previous = _neighbours(client, name, version)[0]
    if previous is not None:
        refresh_model_item(name, previous, client)
    return item_href(client, name, version)


def refresh_model_item(name: str, version: str, client=None) -> None:
    """Rewrite a version's item with its current aliases and version links (after an alias
    moved or a version was added); a version registered without an item is left alone.
    """
    import mlflow

    client = client or mlflow.MlflowClient()
    item = _read(client, name, str(version))
    if item is not None:
        _log(client, name, str(version), item)


def item_href(client, name: str, version: str) -> str:
    """Where a version's MLM item is: its run's artifacts (over HTTP for a tracking server
    that proxies artifacts).
    """
    run_id = client.get_model_version(name, version).run_id
    return f"{_location(client.get_run(run_id).info.artifact_uri)}/{ITEM_FOLDER}/{ITEM_FILE}"


def model_item_href(model_uri: str) -> str | None:
    """The MLM item of a ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` URI (None for a
    model file, or a version without an item).
    """
    if not model_uri.startswith("models:/"):
        return None
    import mlflow
    from mlflow.exceptions import MlflowException

    from specdeepmap.registry import registered_version

    client = mlflow.MlflowClient()
    try:
        registered = registered_version(model_uri, client)
        if registered is None:  # a logged model's id
            return None
        name, version = registered
        run_id = client.get_model_version(name, version).run_id
        listed = client.list_artifacts(run_id, ITEM_FOLDER)  # listed, not downloaded
    except MlflowException:
        return None
    if not any(a.path == f"{ITEM_FOLDER}/{ITEM_FILE}" for a in listed):
        return None
    return item_href(client, name, version)


def read_model_item(name: str, version: str, client=None) -> dict | None:
    """A version's MLM item (None: it has none)."""
    import mlflow

    return _read(client or mlflow.MlflowClient(), name, str(version))


def _read(client, name: str, version: str) -> dict | None:
    from mlflow.exceptions import MlflowException

    run_id = client.get_model_version(name, version).run_id
    with tempfile.TemporaryDirectory(prefix="specdeepmap-mlm-") as folder:
        try:
            path = client.download_artifacts(run_id, f"{ITEM_FOLDER}/{ITEM_FILE}", folder)
        except (MlflowException, OSError):
            return None
        with open(path) as handle:
            return json.load(handle)


def _log(client, name: str, version: str, item: dict) -> None:
    """Log ``item`` with the version's current aliases and links."""
    found = client.get_model_version(name, version)
    previous, following, latest = _neighbours(client, name, version)
    links = [{"rel": "self", "href": item_href(client, name, version), "type": "application/json"}]
    for rel, other in (
        ("predecessor-version", previous),
        ("successor-version", following),
        ("latest-version", latest),
    ):
        if other is not None:
            links.append(
                {
                    "rel": rel,
                    "href": item_href(client, name, other),
                    "type": "application/json",
                    "title": f"{name} version {other}",
                }
            )
    item = {**item, "links": links}
    item["properties"] = {**item["properties"], "specdeepmap:aliases": sorted(found.aliases)}
    with tempfile.TemporaryDirectory(prefix="specdeepmap-mlm-") as folder:
        path = os.path.join(folder, ITEM_FILE)
        with open(path, "w") as handle:
            json.dump(item, handle, indent=2)
        client.log_artifact(found.run_id, path, ITEM_FOLDER)


def _location(artifact_uri: str) -> str:
    """An artifact URI a STAC client can open: ``mlflow-artifacts:/…`` (a tracking server
    that proxies artifacts) as the server's HTTP artifact endpoint; others as they are.
    """
    from specdeepmap.tracking import tracking_uri

    prefix = "mlflow-artifacts:"
    server = tracking_uri()
    if artifact_uri.startswith(prefix) and server.startswith(("http://", "https://")):
        path = artifact_uri[len(prefix) :].lstrip("/")
        return f"{storage.redact(server).rstrip('/')}/api/2.0/mlflow-artifacts/artifacts/{path}"
    return artifact_uri


def _neighbours(client, name: str, version: str) -> tuple[str | None, str | None, str]:
    """(the version before, the version after, the latest) among the registered versions."""
    numbers = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    here = int(version)
    before = [n for n in numbers if n < here]
    after = [n for n in numbers if n > here]
    return (
        str(before[-1]) if before else None,
        str(after[0]) if after else None,
        str(numbers[-1]) if numbers else version,
    )


def _torch_version() -> str:
    import torch

    return torch.__version__.split("+")[0]
