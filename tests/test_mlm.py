"""STAC MLM items of registered model versions: valid against the kept schemas, what the
model takes and returns, version links, aliases after promotion, and the map's link to it.
"""

from __future__ import annotations

import jsonschema
import numpy as np
import pytest

from tests.stac_schemas import validate_item


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A fresh SQLite MLflow store (the previous tracking URI restored afterwards)."""
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(previous)


def _links(item: dict) -> dict[str, str]:
    return {link["rel"]: link["href"] for link in item["links"]}


def test_each_registered_version_has_a_valid_mlm_item(
    trained, dataset, store, tmp_path, monkeypatch
):
    import mlflow

    from specdeepmap import registry
    from specdeepmap.inference import load_model
    from specdeepmap.mlm import model_item_href, read_model_item
    from specdeepmap.normalization import Normalization
    from specdeepmap.stac import write_map_item
    from specdeepmap.tracking import ensure_experiment, register_model
    from tests.conftest import write_raster

    _, result = trained
    config = load_model(result.model_file, "cpu").config
    ensure_experiment(store, "mlm")  # artifacts beside the store, not in the working folder
    experiment = mlflow.get_experiment_by_name("mlm").experiment_id
    versions = []
    for _ in range(2):
        with mlflow.start_run(experiment_id=experiment):
            _, version = register_model(
                result.model_file, config, "mlm-model", 0.5, str(dataset / "chips")
            )
        versions.append(version)
    first, second = (read_model_item("mlm-model", v) for v in versions)
    for item in (first, second):
        validate_item(item)  # STAC 1.1 core, MLM 1.5.2, Version 1.2.0
    wrong = {**second, "properties": {**second["properties"], "mlm:tasks": ["segmenting"]}}
    with pytest.raises(jsonschema.ValidationError):  # the schemas do check
        validate_item(wrong)
    properties = second["properties"]
    assert properties["mlm:tasks"] == ["semantic-segmentation"]
    model_input = properties["mlm:input"][0]
    assert model_input["bands"] == config.band_names
    assert model_input["input"]["shape"] == [-1, 13, *config.tile_size]
    # the value scaling reproduces the model's own normalisation on a raw pixel
    pixel = (np.arange(1, 14) * 700).astype(np.uint16)
    expected = Normalization.from_dict(config.normalization).apply(pixel[:, None, None])
    scaled = [
        (float(x) - s["mean"]) / s["stddev"]
        for x, s in zip(pixel, model_input["value_scaling"], strict=True)
    ]
    assert np.allclose(scaled, expected[:, 0, 0], atol=1e-5)
    classes = properties["mlm:output"][0]["classification:classes"]
    assert [c["value"] for c in classes] == config.class_values
    assert classes[0]["description"] == load_model(result.model_file, "cpu").classes.name(1)
    # the model asset is the model file MLflow keeps
    href = second["assets"]["model"]["href"]
    assert href.endswith("/artifacts/model.pt")
    assert load_model(href.removeprefix("file://"), "cpu").config.class_values == [
        *config.class_values
    ]
    # the ONNX export, checked against torch when the version was registered, is an asset
    # too, and the one an ONNX Runtime map of the version runs
    from specdeepmap.onnx_model import cached_onnx, load_onnx

    onnx_href = second["assets"]["onnx"]["href"]
    assert onnx_href.endswith("/artifacts/onnx/model.onnx")
    assert "mlm:model" in second["assets"]["onnx"]["roles"]
    tags = mlflow.MlflowClient().get_model_version("mlm-model", versions[1]).tags
    assert tags["onnx"] == "onnx/model.onnx" and float(tags["onnx_agreement"]) >= 0.999
    chips = np.random.default_rng(0).integers(0, 3000, (1, 13, 32, 32)).astype(np.uint16)
    exported = load_onnx(onnx_href.removeprefix("file://"))
    torch_model = load_model(result.model_file, "cpu")
    agree = (
        exported.probabilities(chips).numpy().argmax(1)
        == torch_model.probabilities(chips).numpy().argmax(1)
    ).mean()
    assert agree >= 0.999
    local = cached_onnx(f"models:/mlm-model/{versions[1]}")
    assert open(local, "rb").read() == open(onnx_href.removeprefix("file://"), "rb").read()
    # its int8 OpenVINO network, calibrated once on the training chips when it was
    # registered, is an asset (with its weights) and what every int8 OpenVINO map of the
    # version runs, on any machine
    from specdeepmap.openvino_model import load_openvino

    int8_href = second["assets"]["openvino_int8"]["href"]
    assert int8_href.endswith("/artifacts/openvino/model_int8.xml")
    assert second["assets"]["openvino_int8_weights"]["href"] == int8_href[:-4] + ".bin"
    assert tags["openvino_int8"] == "openvino/model_int8.xml"
    assert float(tags["openvino_int8_agreement"]) >= 0.995
    monkeypatch.setenv("SPECDEEPMAP_CACHE", str(tmp_path / "cache"))
    quantized = load_openvino(f"models:/mlm-model/{versions[1]}", "int8")
    assert quantized.precision == "int8"
    from specdeepmap.onnx_model import check_batch

    test_chips = check_batch(torch_model, None, 8)  # its test chips (calibrated on real data)
    assert (
        quantized.probabilities(test_chips).numpy().argmax(1)
        == torch_model.probabilities(test_chips).numpy().argmax(1)
    ).mean() >= 0.995
    assert not (tmp_path / "cache" / "openvino").exists()  # nothing quantized again
    # version links both ways, and to the latest
    assert _links(second)["predecessor-version"] == _links(first)["self"]
    assert _links(first)["successor-version"] == _links(second)["self"]
    assert _links(first)["latest-version"] == _links(second)["self"]
    # an alias that moves is rewritten into the items of both versions
    registry.set_alias("mlm-model", versions[0], "champion", "first")
    registry.set_alias("mlm-model", versions[1], "champion", "better")
    assert read_model_item("mlm-model", versions[1])["properties"]["specdeepmap:aliases"] == [
        "champion"
    ]
    assert read_model_item("mlm-model", versions[0])["properties"]["specdeepmap:aliases"] == []
    # a map made with the champion links to its model's item
    assert model_item_href("models:/mlm-model@champion") == _links(second)["self"]
    classes_map = write_raster(tmp_path / "map.tif", np.ones((16, 16), np.uint8))
    item_uri = write_map_item(
        classes_map,
        str(tmp_path / "scene.tif"),
        "models:/mlm-model@champion",
        load_model(result.model_file, "cpu").classes,
        config.class_values,
    )
    import json

    links = json.loads(open(item_uri).read())["links"]
    assert {"rel": "derived_from", "href": _links(second)["self"]}.items() <= next(
        link for link in links if link.get("title") == "model"
    ).items()
    assert model_item_href(result.model_file) is None  # a plain file has no item
