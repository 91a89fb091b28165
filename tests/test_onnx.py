"""Models exported to ONNX: one file with the normalisation and the softmax, checked against
torch before it is written, taken by the Tester and the Mapper as MODEL.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import rasterio
from typer.testing import CliRunner

from specdeepmap.cli import app
from specdeepmap.errors import InputMismatchError, InvalidParameterError
from specdeepmap.evaluation import evaluate_model
from specdeepmap.inference import load_model
from specdeepmap.mapping import map_scene
from specdeepmap.onnx_model import CONFIG_KEY, export_onnx
from specdeepmap.params import MapParams

runner = CliRunner()


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    _, result = trained
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    return export_onnx(result.model_file, str(out))


def test_the_export_is_checked_against_torch_and_carries_the_config(trained, exported):
    _, result = trained
    assert exported.agreement >= 0.999 and exported.max_difference < 1e-4
    assert exported.pixels == 8 * 32 * 32  # the model's test chips, not random windows
    model = onnx.load(exported.uri)
    onnx.checker.check_model(model)
    props = {p.key: p.value for p in model.metadata_props}
    assert CONFIG_KEY in props
    # raw pixels in, probabilities out, for any batch and window (multiples of 32 px)
    torch_model, onnx_model = load_model(result.model_file, "cpu"), load_model(exported.uri)
    raw = (np.random.default_rng(3).random((3, 13, 64, 96)) * 4000).astype(np.uint16)
    raw[0, :, :8, :8] = torch_model.normalization.nodata or 0
    expected = torch_model.probabilities(raw).numpy()
    found = onnx_model.probabilities(raw).numpy()
    assert found.shape == expected.shape == (3, 6, 64, 96)
    # float32 sums in another order: far outside the training data, logits are large
    assert np.abs(found - expected).max() < 1e-3
    assert (found.argmax(1) == expected.argmax(1)).mean() >= 0.999
    assert onnx_model.class_values == torch_model.class_values


def test_the_tester_and_the_mapper_take_the_onnx_file(trained, dataset, exported, tmp_path):
    _, result = trained
    test_csv = str(dataset / "chips" / "test_files.csv")
    scores = {
        name: evaluate_model(
            test_csv, uri, str(tmp_path / name), log_to_mlflow=False
        ).metrics.mean_iou
        for name, uri in (("torch", result.model_file), ("onnx", exported.uri))
    }
    assert scores["onnx"] == pytest.approx(scores["torch"], abs=1e-3)
    scene = str(dataset / "scene" / "demo_s2.tif")
    maps = {}
    for name, uri in (("torch", result.model_file), ("onnx", exported.uri)):
        map_scene(scene, uri, str(tmp_path / f"{name}.tif"), MapParams(device="cpu"))
        with rasterio.open(tmp_path / f"{name}.tif") as src:
            maps[name] = src.read(1)
    assert (maps["onnx"] == maps["torch"]).mean() >= 0.999
    with pytest.raises(InvalidParameterError, match="ONNX model: it maps in fp32"):
        map_scene(scene, exported.uri, str(tmp_path / "x.tif"), MapParams(precision="int8"))


def test_the_command_line_exports_and_refuses_what_it_cannot(trained, tmp_path):
    _, result = trained
    done = runner.invoke(app, ["export", result.model_file, str(tmp_path / "cli.onnx")])
    assert done.exit_code == 0, done.output
    assert "agree with torch on 100" in done.output
    done = runner.invoke(app, ["export", result.model_file, str(tmp_path / "model.pt")])
    assert done.exit_code == 2 and "must end in .onnx" in done.output
    # an ONNX file that is not ours says so
    foreign = onnx.load(str(tmp_path / "cli.onnx"))
    del foreign.metadata_props[:]
    onnx.save(foreign, str(tmp_path / "foreign.onnx"))
    with pytest.raises(InputMismatchError, match="without specdeepmap's config"):
        load_model(str(tmp_path / "foreign.onnx"))
