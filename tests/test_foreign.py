"""SpecDeepMap checkpoints in: read without running pickled code, mapped to our model files,
scored with our Tester on the shipped EnMAP chips; SpecDeepMap's Justo U-Net trains here.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from specdeepmap.cli import app
from specdeepmap.errors import UnsafeModelFileError
from specdeepmap.inference import load_model, read_model_file
from specdeepmap.model_config import ModelConfig
from specdeepmap.models import JustoUNetSimple
from tests.conftest import PLATFORM_EPOCH_CHIPS

runner = CliRunner()
SHIPPED = "enmap_potsdam/00049-val_iou_0.3325.ckpt"


def test_the_shipped_checkpoint_is_read_as_data(shared_data):
    config, state = read_model_file(str(shared_data / SHIPPED))
    assert config.architecture == "justo-unet" and config.in_channels == 224
    assert config.class_values == [1, 2, 3, 4, 5, 6] and config.num_classes == 7
    assert config.tile_size == [32, 32] and config.normalization["scaler"] is None
    assert config.imported_from["epoch"] == 49
    network = JustoUNetSimple(224, 7)
    network.load_state_dict(state, strict=True)  # SpecDeepMap's layer names, every tensor


class Marker:
    """Unpickling this would create a file: a crafted checkpoint must not."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_crafted_checkpoint_is_refused_and_runs_nothing(shared_data, tmp_path):
    marker = tmp_path / "marker"
    crafted = tmp_path / "crafted.ckpt"
    # SpecDeepMap's hyper-parameters, its foreign objects, and one object that runs code
    hyper = {
        "in_channels": 3,
        "architecture": "JustoUNetSimple",
        "classes": 3,
        "img_x": 32,
        "img_y": 32,
        "class_values": [1, 2],
        "payload": Marker(str(marker)),
    }
    torch.save({"state_dict": {}, "hyper_parameters": hyper}, crafted)
    with pytest.raises(UnsafeModelFileError, match="refusing to unpickle"):
        read_model_file(str(crafted))
    assert not marker.exists()
    done = runner.invoke(app, ["import", str(crafted), str(tmp_path / "m.pt")])
    assert done.exit_code == 2 and "refusing to unpickle" in done.output
    assert not marker.exists() and not (tmp_path / "m.pt").exists()


def test_the_shipped_checkpoint_is_scored_by_our_tester(shared_data, enmap_folder, tmp_path):
    """Our Tester runs SpecDeepMap's checkpoint; its classes agree with SpecDeepMap's own
    prediction (softmax over all seven channels, background included) wherever that
    prediction is a class.
    """
    from specdeepmap.data import read_chip_list
    from specdeepmap.evaluation import evaluate_model
    from specdeepmap.params import EvaluateParams

    checkpoint = str(shared_data / SHIPPED)
    test_csv = str(enmap_folder / "test_files.csv")
    report = evaluate_model(
        test_csv,
        checkpoint,
        str(tmp_path / "test"),
        EvaluateParams(device="cpu"),
        log_to_mlflow=False,
    )
    assert 0.2 < report.metrics.mean_iou < 0.6  # recorded in docs/interop.md
    predictor = load_model(checkpoint, "cpu")
    import rasterio

    images = []
    for image_uri, _ in read_chip_list(test_csv):
        with rasterio.open(image_uri) as src:
            images.append(src.read().astype(np.float32))
    batch = torch.from_numpy(np.stack(images))
    with torch.no_grad():
        logits = predictor.model(batch)
    theirs = torch.softmax(torch.softmax(logits, 1), 1).argmax(1).numpy()  # their double softmax
    ours = predictor.predict_classes(np.stack(images))
    classes = theirs > 0
    assert (ours[classes] == theirs[classes]).mean() == 1.0
    written = json.loads((tmp_path / "test" / "test_metrics.json").read_text())
    assert written["mean_iou_pooled"] == pytest.approx(report.metrics.mean_iou)


def test_import_writes_a_model_file_and_registers_it(shared_data, tmp_path, monkeypatch):
    import mlflow

    previous = mlflow.get_tracking_uri()
    store = f"sqlite:///{tmp_path}/mlflow.db"
    try:
        done = runner.invoke(
            app,
            [
                "import",
                str(shared_data / SHIPPED),
                str(tmp_path / "m.pt"),
                "--registered-model",
                "from-enmapbox",
                "--tracking-uri",
                store,
            ],
        )
        assert done.exit_code == 0, done.output
        assert "justo-unet" in done.output and "224 bands" in done.output
        saved = torch.load(tmp_path / "m.pt", weights_only=True)
        assert saved["config"]["imported_from"]["file"].endswith(SHIPPED.split("/")[1])
        client = mlflow.MlflowClient(store)
        version = client.get_model_version("from-enmapbox", "1")
        assert version.tags["imported_from"].endswith(".ckpt")
        assert "Not carried over" in version.description
        assert version.tags["val_iou"] == "0.3325"
        # its ONNX file is logged; its int8 network is not (no training chips came with the
        # checkpoint to calibrate it), and the tag says why instead
        assert version.tags["onnx"] == "onnx/model.onnx"
        assert version.tags["openvino_int8"].startswith("not exported: ")
        assert "training chips" in version.tags["openvino_int8"]
    finally:
        mlflow.set_tracking_uri(previous)


def test_a_justo_unet_trains_and_maps_here(dataset, tmp_path):
    from specdeepmap.mapping import map_scene
    from specdeepmap.params import MapParams
    from specdeepmap.training import TrainConfig, train

    config = TrainConfig(
        dataset=str(dataset / "chips"),
        out=str(tmp_path / "run"),
        architecture="JustoUNetSimple",
        epochs=2,
        batch_size=8,
        min_chips_per_epoch=PLATFORM_EPOCH_CHIPS,
        device="cpu",
        baseline=False,
        registered_model=None,
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
    )
    import mlflow

    previous = mlflow.get_tracking_uri()
    try:
        result = train(config)
    finally:
        mlflow.set_tracking_uri(previous)
    saved = torch.load(result.model_file, weights_only=True)
    assert saved["config"]["architecture"] == "justo-unet"
    assert saved["config"]["spectral_channels"] == 0
    assert set(saved["state_dict"]) >= {"enc_conv1.weight", "dec_bn2.running_var"}
    report = map_scene(
        str(dataset / "scene" / "demo_s2.tif"),
        result.model_file,
        str(tmp_path / "map.tif"),
        MapParams(device="cpu", precision="int8"),
    )
    assert report.windows >= 1


def test_justo_unet_refuses_pretrained_weights():
    from specdeepmap.errors import InvalidParameterError
    from specdeepmap.params import TrainParams

    with pytest.raises(InvalidParameterError, match="no encoder"):
        TrainParams(architecture="justo-unet", weights="imagenet")


class _SpecDeepMapStyleModel:
    """What EnMAP-Box's SpecDeepMap does with a checkpoint, written from its behaviour
    (``../shared/SPECDEEPMAP.md`` §3.7 and its Tester): a LightningModule whose init takes
    ``train_data``, ``val_data``, ``hparams`` and ``feedback``, builds the plain network from
    the hyper-parameters, is loaded with ``load_from_checkpoint(path, weights_only=False,
    hparams=...)``, and predicts by dividing by ``scaler``, applying ``preprocess`` and taking
    the argmax over every channel.
    """

    @staticmethod
    def load(path: str):
        import lightning as L
        import segmentation_models_pytorch as smp

        class MyModel(L.LightningModule):
            def __init__(self, train_data=None, val_data=None, hparams=None, feedback=None):
                super().__init__()
                self.hparams.update(hparams)
                self.save_hyperparameters()
                h = self.hparams
                builders = {
                    "Unet": smp.Unet,
                    "Unet++": smp.UnetPlusPlus,
                    "DeepLabV3+": smp.DeepLabV3Plus,
                }
                if h["architecture"] == "JustoUNetSimple":
                    self.model = JustoUNetSimple(h["in_channels"], h["classes"])
                else:
                    self.model = builders[h["architecture"]](
                        encoder_name=h["backbone"],
                        encoder_weights=None,
                        in_channels=h["in_channels"],
                        classes=h["classes"],
                    )

            def forward(self, image):
                return self.model(image)

            def predict(self, image):
                self.eval()
                with torch.no_grad():
                    if self.hparams["scaler"] is not None:
                        image = image / self.hparams["scaler"]
                    if self.hparams["preprocess"] is not None:
                        image = self.hparams["preprocess"](image)
                    return torch.argmax(torch.softmax(self(image), dim=1), dim=1)

        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        h = checkpoint["hyper_parameters"]
        keys = ("architecture", "backbone", "classes", "in_channels", "preprocess", "scaler")
        model = MyModel.load_from_checkpoint(
            path,
            map_location="cpu",
            weights_only=False,
            hparams={k: h[k] for k in keys} | {"remove_background_class": "Yes"},
        )
        return model, h


def _their_classes(path: str, chips: np.ndarray) -> np.ndarray:
    model, hyper = _SpecDeepMapStyleModel.load(path)
    index = model.predict(torch.from_numpy(chips.astype(np.float32))).numpy()
    lut = np.zeros(hyper["classes"], np.int64)
    for i, value in hyper["reverse_mapping"].items():
        lut[int(i)] = value
    return lut[index]


def test_export_specdeepmap_round_trips_the_shipped_checkpoint(shared_data, tmp_path):
    """The shipped checkpoint imported, then exported with ``--format specdeepmap``: loaded
    the way SpecDeepMap loads it, it predicts what our import predicts on the shipped chips,
    and our importer reads it back to the same model.
    """
    import rasterio

    from specdeepmap.foreign import convert

    convert(str(shared_data / SHIPPED), str(tmp_path / "imported.pt"))
    done = runner.invoke(
        app,
        [
            "export",
            str(tmp_path / "imported.pt"),
            str(tmp_path / "out.ckpt"),
            "--format",
            "specdeepmap",
        ],
    )
    assert done.exit_code == 0, done.output
    assert "JustoUNetSimple" in done.output
    images = sorted((shared_data / "enmap_potsdam" / "images").glob("*.tif"))[:6]
    chips = []
    for path in images:
        with rasterio.open(path) as src:
            chips.append(src.read())
    chips = np.stack(chips)
    ours = load_model(str(tmp_path / "imported.pt"), "cpu")
    expected = np.asarray(ours.class_values)[ours.probabilities(chips).numpy().argmax(1)]
    found = _their_classes(str(tmp_path / "out.ckpt"), chips)
    assert (found == expected).mean() >= 0.999
    assert (found > 0).all()  # the background channel never wins
    again, _ = read_model_file(str(tmp_path / "out.ckpt"))  # our importer reads it back
    assert again.class_values == [1, 2, 3, 4, 5, 6] and again.tile_size == [32, 32]
    assert again.architecture == "justo-unet" and again.in_channels == 224


def test_export_specdeepmap_writes_a_normalised_unet_and_refuses_what_it_cannot(tmp_path):
    """A plain U-Net with per-band statistics (one band without them) is predicted alike by
    SpecDeepMap's way of loading; a model with a spectral front-end is refused, naming it.
    """
    from specdeepmap.errors import InputMismatchError
    from specdeepmap.foreign import export_checkpoint
    from specdeepmap.inference import export_model_file
    from specdeepmap.models import ModelSpec, build_model

    torch.manual_seed(0)
    mean = [float(m) for m in np.linspace(0.05, 0.3, 13)]
    std = [0.1] * 13
    mean[9], std[9] = None, None  # a band without statistics: 0, as ours makes it
    config = ModelConfig(
        architecture="unet",
        backbone="resnet18",
        in_channels=13,
        num_classes=4,
        class_values=[2, 5, 9],
        ignore_index=0,
        tile_size=[64, 64],
        normalization={"scaler": 10000.0, "mean": mean, "std": std, "nodata": None},
    )
    plain = export_model_file(
        config, build_model(ModelSpec("unet", "resnet18", 13, 4)), str(tmp_path / "plain.pt")
    )
    hyper = export_checkpoint(plain, str(tmp_path / "plain.ckpt"))
    assert hyper["reverse_mapping"] == {1: 2, 2: 5, 3: 9} and hyper["scaler"] == 10000.0
    chips = np.random.default_rng(1).integers(1, 4000, (2, 13, 64, 64)).astype(np.uint16)
    ours = load_model(plain, "cpu")
    expected = np.asarray(ours.class_values)[ours.probabilities(chips).numpy().argmax(1)]
    found = _their_classes(str(tmp_path / "plain.ckpt"), chips)
    assert (found == expected).mean() >= 0.999
    front = export_model_file(
        config.model_copy(update={"spectral_channels": 8}),
        build_model(ModelSpec("unet", "resnet18", 13, 4, spectral_channels=8)),
        str(tmp_path / "front.pt"),
    )
    with pytest.raises(InputMismatchError, match="spectral front-end of 8 channels"):
        export_checkpoint(front, str(tmp_path / "front.ckpt"))
    assert not (tmp_path / "front.ckpt").exists()
