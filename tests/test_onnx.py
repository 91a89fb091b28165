"""Models exported to ONNX: one file with the normalisation and the softmax, checked against
torch before it is written, taken by the Tester and the Mapper as MODEL.
"""

from __future__ import annotations

import numpy as np
import onnx
import pandas as pd
import pytest
import rasterio
from typer.testing import CliRunner

from specdeepmap.cli import app
from specdeepmap.errors import InputMismatchError, InvalidParameterError, MissingInputError
from specdeepmap.evaluation import evaluate_model
from specdeepmap.inference import load_model
from specdeepmap.mapping import map_scene
from specdeepmap.onnx_model import CONFIG_KEY, PRECISION_KEY, export_onnx
from specdeepmap.params import MapParams

runner = CliRunner()


def _without_training_chips(model_file: str, folder) -> str:
    """A copy of ``model_file`` whose dataset (its training chips) is gone."""
    from specdeepmap.inference import export_model_file, read_model_file

    config, state = read_model_file(model_file)
    network = load_model(model_file, "cpu").model
    network.load_state_dict(state)
    return export_model_file(
        config.model_copy(update={"dataset": str(folder / "gone")}),
        network,
        str(folder / "moved.pt"),
    )


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


def test_an_int8_export_is_calibrated_once_on_the_training_chips(trained, dataset, tmp_path):
    """``--int8``: convolutions quantized (QDQ), the file says int8, its classes checked
    here against the torch fp32 model on the test chips; without readable training chips it
    is refused before anything is written.
    """
    from specdeepmap.errors import MissingInputError

    _, result = trained
    out = tmp_path / "int8.onnx"
    done = runner.invoke(app, ["export", result.model_file, str(out), "--int8"])
    assert done.exit_code == 0, done.output
    model = onnx.load(str(out))
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("DequantizeLinear") > ops.count("Conv") > 0  # weights and activations
    props = {p.key: p.value for p in model.metadata_props}
    assert props["specdeepmap_precision"] == "int8"
    chips = []
    for image in pd.read_csv(dataset / "chips" / "test_files.csv")["image"]:
        with rasterio.open(dataset / "chips" / image) as src:
            chips.append(src.read())
    raw = np.stack(chips)
    expected = load_model(result.model_file, "cpu").probabilities(raw).numpy().argmax(1)
    found = load_model(str(out)).probabilities(raw).numpy().argmax(1)
    assert (found == expected).mean() >= 0.99
    with pytest.raises(MissingInputError, match="--calibration-chips"):
        export_onnx(
            result.model_file,
            str(tmp_path / "none.onnx"),
            int8=True,
            calibration_csv=str(tmp_path / "missing.csv"),
        )
    assert not (tmp_path / "none.onnx").exists()


def test_map_engine_onnxruntime_exports_once_and_reuses_the_file(
    trained, dataset, tmp_path, monkeypatch
):
    """``--engine onnxruntime`` maps a torch model file through its cached ONNX export:
    the same classes as torch, one export per model file and precision, whatever the
    number of scenes.
    """
    from specdeepmap.onnx_model import cached_onnx

    _, result = trained
    monkeypatch.setenv("SPECDEEPMAP_CACHE", str(tmp_path / "cache"))
    scene = str(dataset / "scene" / "demo_s2.tif")
    maps = {}
    for name, params in (
        ("torch", MapParams(device="cpu")),
        ("ort", MapParams(device="cpu", engine="onnxruntime")),
        ("ort-int8", MapParams(device="cpu", engine="onnxruntime", precision="int8")),
    ):
        map_scene(scene, result.model_file, str(tmp_path / f"{name}.tif"), params)
        with rasterio.open(tmp_path / f"{name}.tif") as src:
            maps[name] = src.read(1)
    assert (maps["ort"] == maps["torch"]).mean() >= 0.999
    assert (maps["ort-int8"] == maps["torch"]).mean() >= 0.98
    files = sorted((tmp_path / "cache" / "onnx").iterdir())
    assert [p.name.split("-")[1] for p in files] == ["fp32.onnx", "int8.onnx"]
    stamps = [p.stat().st_mtime_ns for p in files]
    # the next scene's map finds the same files and exports nothing
    assert cached_onnx(result.model_file) == str(files[0])
    assert cached_onnx(result.model_file, int8=True) == str(files[1])
    assert [p.stat().st_mtime_ns for p in files] == stamps
    with pytest.raises(InvalidParameterError, match="fp32 or int8"):
        map_scene(
            scene,
            result.model_file,
            str(tmp_path / "bf16.tif"),
            MapParams(engine="onnxruntime", precision="bf16"),
        )
    # a model whose training chips cannot be read: int8 is refused before any export,
    # with the command that calibrates it on chips the user gives
    moved = _without_training_chips(result.model_file, tmp_path)
    with pytest.raises(MissingInputError, match="--calibration-chips CSV`, then map"):
        map_scene(
            scene,
            moved,
            str(tmp_path / "moved.tif"),
            MapParams(engine="onnxruntime", precision="int8"),
        )
    assert not (tmp_path / "moved.tif").exists()


def test_map_engine_openvino_runs_the_onnx_file_in_fp32_bf16_and_int8(
    trained, dataset, exported, tmp_path, monkeypatch, caplog
):
    """``--engine openvino`` compiles the model's ONNX file: fp32 gives torch's classes
    (OpenVINO's default on bf16 CPUs is bf16, so fp32 must be asked for); int8 is quantized
    once, calibrated on the training chips, cached and checked against fp32; an int8 file
    refuses another precision.
    """
    from specdeepmap.openvino_model import OpenVinoPredictor, load_openvino

    _, result = trained
    monkeypatch.setenv("SPECDEEPMAP_CACHE", str(tmp_path / "cache"))
    scene = str(dataset / "scene" / "demo_s2.tif")
    maps = {}
    for name, model, params in (
        ("torch", result.model_file, MapParams(device="cpu")),
        ("ov", result.model_file, MapParams(device="cpu", engine="openvino")),
        ("ov-bf16", result.model_file, MapParams(engine="openvino", precision="bf16")),
        ("ov-int8", result.model_file, MapParams(engine="openvino", precision="int8")),
    ):
        report = map_scene(scene, model, str(tmp_path / f"{name}.tif"), params)
        assert report.seconds > 0
        with rasterio.open(tmp_path / f"{name}.tif") as src:
            maps[name] = src.read(1)
    assert (maps["ov"] == maps["torch"]).mean() >= 0.999
    assert (maps["ov-bf16"] == maps["torch"]).mean() >= 0.98
    assert (maps["ov-int8"] == maps["torch"]).mean() >= 0.98
    cached = sorted(p.name for p in (tmp_path / "cache" / "openvino").iterdir())
    assert [p.rsplit(".", 1)[1] for p in cached] == ["bin", "xml"]  # nothing half-written
    stamp = (tmp_path / "cache" / "openvino" / cached[1]).stat().st_mtime_ns
    again = load_openvino(result.model_file, "int8")  # the next scene: quantized once
    assert isinstance(again, OpenVinoPredictor) and again.precision == "int8"
    assert (tmp_path / "cache" / "openvino" / cached[1]).stat().st_mtime_ns == stamp
    raw = (np.random.default_rng(5).random((2, 13, 64, 64)) * 4000).astype(np.float32)
    torch_model = load_model(result.model_file, "cpu")
    expected = torch_model.probabilities(raw).numpy()
    found = load_openvino(exported.uri, "fp32").probabilities(raw).numpy()  # an .onnx MODEL
    assert np.abs(found - expected).max() < 1e-3
    # engine auto (the default): int8 on the CPU runs on OpenVINO, fp32 on torch, and the
    # map says which; a model without training chips maps its int8 on torch, with a warning
    auto = {}
    for precision in ("int8", "fp32"):
        map_scene(
            scene,
            result.model_file,
            str(tmp_path / f"auto-{precision}.tif"),
            MapParams(device="cpu", precision=precision),
        )
        with rasterio.open(tmp_path / f"auto-{precision}.tif") as src:
            auto[precision] = src.tags()["SPECDEEPMAP_ENGINE"]
            if precision == "int8":
                assert (src.read(1) == maps["ov-int8"]).all()
    assert auto == {"int8": "openvino", "fp32": "torch"}
    moved = _without_training_chips(result.model_file, tmp_path)
    with caplog.at_level("WARNING", logger="specdeepmap.mapping"):
        map_scene(scene, moved, str(tmp_path / "moved.tif"), MapParams(precision="int8"))
    assert "int8 on torch instead" in caplog.text
    with rasterio.open(tmp_path / "moved.tif") as src:
        assert src.tags()["SPECDEEPMAP_ENGINE"] == "torch"
    with pytest.raises(MissingInputError, match="training chips"):  # asked for by name
        map_scene(
            scene, moved, str(tmp_path / "x.tif"), MapParams(engine="openvino", precision="int8")
        )
    # an int8 file (its metadata says so) maps in int8 only
    int8_file = onnx.load(exported.uri)
    onnx.helper.set_model_props(
        int8_file, {p.key: p.value for p in int8_file.metadata_props} | {PRECISION_KEY: "int8"}
    )
    onnx.save(int8_file, str(tmp_path / "int8.onnx"))
    with pytest.raises(InvalidParameterError, match="int8 ONNX model"):
        load_openvino(str(tmp_path / "int8.onnx"), "fp32")


def test_threads_mapping_with_one_model_export_and_quantize_it_once(trained, tmp_path, monkeypatch):
    """Two scenes mapped at once in one process (a Dask worker's threads) with one model in
    int8 on OpenVINO: the two ``torch.export`` traces of the ONNX export must not overlap (the
    tracing state is process-wide: one of them failed), and the second thread waits for the
    first's files instead of exporting and quantizing again.
    """
    import threading

    from specdeepmap.mapping import load_for_engine
    from specdeepmap.openvino_model import OpenVinoPredictor

    _, result = trained
    monkeypatch.setenv("SPECDEEPMAP_CACHE", str(tmp_path / "cache"))
    start = threading.Barrier(2)
    loaded, errors = [], []

    def load() -> None:
        start.wait()
        try:
            params = MapParams(device="cpu", engine="openvino", precision="int8")
            loaded.append(load_for_engine(result.model_file, params))
        except Exception as error:  # noqa: BLE001 - the test reports it
            errors.append(error)

    threads = [threading.Thread(target=load) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert [type(p) for p in loaded] == [OpenVinoPredictor] * 2
    assert len(list((tmp_path / "cache" / "onnx").iterdir())) == 1
    assert len(list((tmp_path / "cache" / "openvino").glob("*.xml"))) == 1
    raw = np.random.default_rng(0).random((1, loaded[0].in_channels, 64, 64), np.float32)
    raw *= loaded[0].normalization.scaler or 1.0
    np.testing.assert_array_equal(loaded[0].predict_classes(raw), loaded[1].predict_classes(raw))
