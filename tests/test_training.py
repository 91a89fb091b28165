"""Trainer, model files, MLflow registry and Tester, with tiny models and few steps."""

import os

import numpy as np
import pandas as pd
import pytest
import torch

from specdeepmap import storage
from specdeepmap.errors import (
    InputMismatchError,
    InvalidParameterError,
    MissingInputError,
    UnsafeModelFileError,
)
from specdeepmap.evaluation import evaluate_model
from specdeepmap.inference import load_model, read_model_file
from specdeepmap.metrics import accumulate, metrics_from_matrix
from specdeepmap.model_config import ModelConfig
from specdeepmap.models import ModelSpec, build_model, canonical_architecture, load_encoder_weights
from specdeepmap.params import EvaluateParams
from specdeepmap.training import TrainConfig, train
from tests.conftest import PLATFORM_EPOCH_CHIPS


@pytest.mark.parametrize("architecture", ["U-Net", "U-Net++", "DeepLabV3+", "SegFormer"])
@pytest.mark.parametrize("bands", [13, 224])
def test_every_architecture_runs_one_step(architecture, bands):
    model = build_model(ModelSpec(architecture, "resnet18", bands, 4))
    x = torch.randn(2, bands, 64, 64)
    loss = torch.nn.functional.cross_entropy(model(x), torch.randint(0, 4, (2, 64, 64)))
    loss.backward()
    assert model(x).shape == (2, 4, 64, 64)


def test_timm_backbone_and_bad_names():
    model = build_model(ModelSpec("unet", "tu-resnet18", 5, 3))
    assert model(torch.randn(1, 5, 64, 64)).shape == (1, 3, 64, 64)
    assert canonical_architecture("U-Net++") == "unetplusplus"
    with pytest.raises(InvalidParameterError, match="unet"):
        canonical_architecture("transformer-net")
    with pytest.raises(InvalidParameterError, match="resnet18"):
        build_model(ModelSpec("unet", "resnet19", 3, 2))


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
def test_ssl4eo_weights_load_into_encoder(tmp_path, backbone):
    """A file in torchgeo's SSL4EO-S12 format: a timm ResNet state dict with 13 input bands."""
    import timm

    source = timm.create_model(backbone, in_chans=13, num_classes=0)
    state = {
        k: torch.randn_like(v) if v.is_floating_point() else v
        for k, v in source.state_dict().items()
    }
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)
    path = tmp_path / f"{backbone}_sentinel2_all_moco-abc123.pth"
    torch.save(state, path)
    model = build_model(ModelSpec("unet", backbone, 13, 3))
    load_encoder_weights(model, str(path))
    torch.testing.assert_close(model.encoder.conv1.weight, state["conv1.weight"])
    wrong = build_model(ModelSpec("unet", backbone, 10, 3))
    with pytest.raises(InputMismatchError, match="13 input bands"):
        load_encoder_weights(wrong, str(path))
    load_encoder_weights(wrong, str(path), adapt_first_conv=True)
    assert wrong.encoder.conv1.weight.shape[1] == 10


def test_crafted_pickle_payload_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.ckpt"
    torch.save({"hyper_parameters": {"config": {}}, "state_dict": {}, "x": Payload()}, path)
    with pytest.raises(UnsafeModelFileError, match="unpickle"):
        read_model_file(str(path))
    assert not (tmp_path / "pwned").exists()


def test_a_missing_model_file_is_named_as_missing_not_as_unsafe(tmp_path):
    with pytest.raises(MissingInputError, match=r"absent\.pt does not exist"):
        read_model_file(str(tmp_path / "absent.pt"))


def test_confusion_matrix_metrics_against_hand_computed_case():
    truth = np.array([1, 1, 1, 2, 2, 5, 5, 5, 0, 0])
    pred = np.array([1, 1, 2, 2, 5, 5, 5, 1, 1, 5])
    matrix = np.zeros((3, 3), dtype=np.int64)
    accumulate(matrix, truth, pred, [1, 2, 5])  # the two unlabelled pixels drop out
    np.testing.assert_array_equal(matrix, [[2, 1, 0], [0, 1, 1], [1, 0, 2]])
    m = metrics_from_matrix(matrix, [1, 2, 5])
    np.testing.assert_allclose(m.iou, [2 / 4, 1 / 3, 2 / 4])
    np.testing.assert_allclose(m.precision, [2 / 3, 1 / 2, 2 / 3])
    np.testing.assert_allclose(m.recall, [2 / 3, 1 / 2, 2 / 3])
    assert m.overall_accuracy == pytest.approx(5 / 8)
    assert m.mean_iou == pytest.approx((0.5 + 1 / 3 + 0.5) / 3)


def test_training_writes_checkpoints_logs_and_registers(trained, dataset):
    import mlflow

    config, result = trained
    names = sorted(os.listdir(dataset / "run" / "checkpoints"))
    assert len(names) == result.epochs_run == 4
    for epoch, name in enumerate(names):
        assert name.startswith(f"{epoch:05d}-val_iou_") and name.endswith(".ckpt")
        float(name[len("00000-val_iou_") : -5])
    events = [
        f
        for _, _, files in os.walk(dataset / "run" / "lightning_logs")
        for f in files
        if f.startswith("events.out.tfevents")
    ]
    assert events
    model_config, _ = read_model_file(result.best_checkpoint)
    assert model_config.in_channels == 13 and model_config.tile_size == [32, 32]
    assert model_config.class_values == [1, 2, 3, 4, 5, 6]
    assert model_config.normalization["scaler"] == 10000

    client = mlflow.MlflowClient(tracking_uri=config.tracking_uri)
    run = client.get_run(result.run_id)
    assert "val_iou" in run.data.metrics and "train_loss" in run.data.metrics
    assert len(client.get_metric_history(result.run_id, "val_loss")) == 4
    # the best epoch chose the checkpoint: the card gives the median epoch beside it
    val_ious = [m.value for m in client.get_metric_history(result.run_id, "val_iou")]
    assert result.val_epochs == 4 and result.best_val_iou == pytest.approx(max(val_ious))
    assert result.val_epoch_median == pytest.approx(float(np.median(val_ious)))
    assert run.data.metrics["val_iou_epoch_median"] == pytest.approx(result.val_epoch_median)
    version = client.get_model_version("test-model", result.model_version)
    assert version.tags["val_iou"] == f"{result.best_val_iou:.4f}"
    assert (
        f"the best of 4 validated epochs (their median: {result.val_epoch_median:.4f})"
        in version.description
    ), version.description
    assert version.tags["dataset"] == config.dataset and "specdeepmap_version" in version.tags
    artifacts = [a.path for a in client.list_artifacts(result.run_id, "dataset")]
    assert "dataset/Summary_train_val.csv" in artifacts
    # one digest of the dataset: MLflow's Datasets panel shows the tag's (and the card's)
    assert run.inputs.dataset_inputs[0].dataset.digest == run.data.tags["dataset_digest"]
    assert (
        run.data.params["split_seed"] == "42"
        and float(run.data.params["split_train_percent"]) == 70
    )

    mlflow.set_tracking_uri(config.tracking_uri)
    client.set_registered_model_alias("test-model", "champion", result.model_version)
    by_alias = load_model("models:/test-model@champion", device="cpu")
    by_file = load_model(result.model_file, device="cpu")
    x = np.random.default_rng(0).integers(100, 4000, (2, 13, 32, 32)).astype(np.uint16)
    np.testing.assert_array_equal(by_alias.predict_classes(x), by_file.predict_classes(x))
    pyfunc = mlflow.pyfunc.load_model(f"models:/test-model/{result.model_version}")
    np.testing.assert_array_equal(pyfunc.predict(x.astype(np.float32)), by_file.predict_classes(x))


def test_chips_are_decoded_once_and_kept_read_only_within_the_budget(dataset, tmp_path):
    """Kept chips give the same items as chips read from disk on every use; a budget of
    one image and its label keeps exactly those; a kept array cannot be changed in place.
    """
    from specdeepmap.data import ChipDataset, read_dataset_folder
    from specdeepmap.normalization import Normalization

    info = read_dataset_folder(str(dataset / "chips"))
    lookup = np.arange(256)
    norm = Normalization(scaler=10000)

    def chips(budget: int) -> ChipDataset:
        return ChipDataset(info.train, norm, lookup, True, str(tmp_path), memory_bytes=budget)

    kept, disk = chips(2**30), chips(0)
    for epoch in range(2):  # the second epoch reads kept arrays
        for index in range(len(kept)):
            torch.manual_seed(epoch * 1000 + index)  # the same augmentation for both
            x, y = kept[index]
            torch.manual_seed(epoch * 1000 + index)
            x0, y0 = disk[index]
            assert torch.equal(x, x0) and torch.equal(y, y0)
    assert len(kept._memory) == 2 * len(kept) and not disk._memory
    image = kept._read(info.train[0][0])
    with pytest.raises(ValueError, match="read-only"):
        image += 1
    one = image.nbytes + kept._read(info.train[0][1]).nbytes
    small = chips(one)
    _ = small[0], small[1]
    assert sorted(small._memory) == sorted(info.train[0]) and small._memory_used == one


def test_loader_workers_share_the_chip_memory_budget(dataset, tmp_path):
    """Each worker keeps its own chips, so with 4 workers each keeps a quarter."""
    from specdeepmap.data import CHIP_MEMORY_BYTES
    from specdeepmap.training.prepare import prepare

    for workers, share in ((0, CHIP_MEMORY_BYTES), (4, CHIP_MEMORY_BYTES // 4)):
        cfg = TrainConfig(dataset=str(dataset / "chips"), out=str(tmp_path), workers=workers)
        prepared = prepare(cfg)
        assert prepared.train_set.memory_bytes == prepared.val_set.memory_bytes == share


def test_tester_outputs_specdeepmap_csv_and_metrics(trained, dataset, tmp_path):
    config, result = trained
    report = evaluate_model(
        str(dataset / "chips" / "test_files.csv"),
        result.model_file,
        str(tmp_path / "test"),
        EvaluateParams(device="cpu"),
        predictions_folder=str(tmp_path / "preds"),
    )
    lines = (tmp_path / "test" / "test_iou.csv").read_text().splitlines()
    assert lines[0] == "Class,IoU,Name" and lines[-1].startswith("Mean IoU,")  # named classes
    assert [int(line.split(",")[0]) for line in lines[1:-1]] == [1, 2, 3, 4, 5, 6]
    n_test = len(pd.read_csv(dataset / "chips" / "test_files.csv"))
    assert len(report.predictions) == n_test
    assert report.metrics.matrix.sum() > 0
    assert (tmp_path / "test" / "confusion_matrix.png").stat().st_size > 1000
    # the figures, computed again from the exported predictions and the label chips alone
    import rasterio

    truth, pred = [], []
    for mask in pd.read_csv(dataset / "chips" / "test_files.csv")["mask"]:
        name = os.path.basename(mask).removesuffix(".tif")
        with (
            rasterio.open(dataset / "chips" / mask) as t,
            rasterio.open(tmp_path / "preds" / f"{name}_prediction.tif") as p,
        ):
            truth.append(t.read(1).astype(int))
            pred.append(p.read(1).astype(int))
    per_chip, pooled = [], []
    for c in range(1, 7):
        ious = [
            ((t == c) & (q == c)).sum() / ((t == c) | (q == c)).sum()
            for t, q in zip(truth, pred, strict=True)
            if ((t == c) | (q == c)).any()
        ]
        per_chip.append(np.mean(ious) if ious else np.nan)  # SpecDeepMap: mean over chips
        t, q = np.concatenate([x.ravel() for x in truth]), np.concatenate([x.ravel() for x in pred])
        labelled = t > 0
        union = (((t == c) | (q == c)) & labelled).sum()
        pooled.append(((t == c) & (q == c)).sum() / union if union else np.nan)
    written = [float(line.split(",")[1]) for line in lines[1:-1]]
    np.testing.assert_allclose(written, per_chip, atol=1e-9)
    assert float(lines[-1].split(",")[1]) == pytest.approx(np.nanmean(per_chip))
    np.testing.assert_allclose(report.metrics.iou, pooled, atol=1e-9)
    assert np.isfinite(written).all()


def test_errors_before_training(dataset, trained):
    with pytest.raises(MissingInputError, match="train_files.csv"):
        train(TrainConfig(dataset=str(dataset / "scene"), out=str(dataset / "x")))
    with pytest.raises(InvalidParameterError, match="batch_size"):
        train(TrainConfig(dataset=str(dataset / "chips"), out=str(dataset / "x"), batch_size=0))
    _, result = trained
    checkpoint = torch.load(result.best_checkpoint, weights_only=True)
    checkpoint["hyper_parameters"]["config"]["class_values"] = [1, 2, 3]  # another dataset's
    checkpoint["hyper_parameters"]["config"]["num_classes"] = 4
    other = dataset / "other.ckpt"
    torch.save(checkpoint, other)
    with pytest.raises(InputMismatchError, match="class_values"):
        train(
            TrainConfig(
                dataset=str(dataset / "chips"),
                out=str(dataset / "x"),
                resume=str(other),
                device="cpu",
                epochs=10,
            )
        )
    if not torch.cuda.is_available():
        from specdeepmap.errors import DeviceUnavailableError

        with pytest.raises(DeviceUnavailableError):
            train(TrainConfig(dataset=str(dataset / "chips"), out=str(dataset / "x"), device="gpu"))


def test_imagenet_offline_says_how_to_supply_a_file(monkeypatch):
    import segmentation_models_pytorch.encoders as encoders

    def offline(*args, **kwargs):
        raise OSError("Temporary failure in name resolution")  # what a closed network gives

    monkeypatch.setattr(encoders, "hf_hub_download", offline)
    with pytest.raises(InvalidParameterError, match="--weights"):
        build_model(ModelSpec("unet", "resnet18", 3, 2), imagenet=True)


def test_chips_of_different_sizes_or_bands_are_refused(tmp_path):
    from specdeepmap.data import chip_properties
    from tests.conftest import write_raster

    a = write_raster(tmp_path / "a.tif", np.ones((3, 32, 32), np.uint16))
    b = write_raster(tmp_path / "b.tif", np.ones((3, 64, 64), np.uint16))
    c = write_raster(tmp_path / "c.tif", np.ones((4, 32, 32), np.uint16))
    assert chip_properties([(a, a)])[:3] == (3, 32, 32)
    with pytest.raises(InputMismatchError, match="b.tif has 3 bands of 64 x 64"):
        chip_properties([(a, a), (b, b)])
    with pytest.raises(InputMismatchError, match="c.tif has 4 bands"):
        chip_properties([(a, a), (c, c)])


def test_tensorboard_command_serves_the_logs(trained, dataset):
    import socket
    import subprocess
    import sys
    import time

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "specdeepmap.cli",
            "tensorboard",
            "--logdir",
            str(dataset / "run"),
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/data/runs", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        runs = httpx.get(f"http://127.0.0.1:{port}/data/runs", timeout=5).json()
        assert any("lightning_logs" in r for r in runs)
    finally:
        proc.terminate()
        out = proc.communicate(timeout=20)[0]
    assert f"http://127.0.0.1:{port}/" in out


def _check_ddp_run(config_uri: str, dataset_folder: str, model_file: str):
    import mlflow

    from specdeepmap.evaluation import evaluate_model

    client = mlflow.MlflowClient(tracking_uri=config_uri)
    runs = client.search_runs([client.get_experiment_by_name("specdeepmap").experiment_id])
    assert len(runs) == 1  # one MLflow run, not one per process
    assert len(client.search_model_versions("name='ddp-model'")) == 1
    single = evaluate_model(
        f"{dataset_folder}/validation_files.csv",
        model_file,
        os.path.join(os.path.dirname(model_file), "val"),
        EvaluateParams(device="cpu"),
        log_to_mlflow=False,
    ).metrics.mean_iou
    best = runs[0].data.metrics["best_val_iou"]
    assert best == pytest.approx(single, abs=1e-6)  # every validation chip once


@pytest.mark.slow
def test_two_process_ddp_on_cpu_from_the_command_line(dataset, tmp_path):
    """`--devices 2` on CPU (gloo, spawned processes) trains to the end (it used to hang at
    the first epoch's end), logs one MLflow run and registers one version; the reported
    validation IoU is the whole validation set's, each chip counted once.
    """
    import subprocess
    import sys

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    done = subprocess.run(
        [
            os.path.join(os.path.dirname(sys.executable), "specdeepmap"),
            "train",
            str(dataset / "chips"),
            "--out",
            str(tmp_path / "run"),
            "--devices",
            "2",
            "--device",
            "cpu",
            "--epochs",
            "2",
            "--batch-size",
            "8",
            "--min-chips-per-epoch",
            str(PLATFORM_EPOCH_CHIPS),
            "--tracking-uri",
            uri,
            "--registered-model",
            "ddp-model",
            "--no-baseline",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "model_uri: models:/ddp-model/1" in done.stdout
    _check_ddp_run(uri, str(dataset / "chips"), str(tmp_path / "run" / "model.pt"))


def test_a_killed_training_continues_from_its_checkpoint_in_object_storage(
    dataset, s3_bucket, tmp_path
):
    """Checkpoints go to S3 as training goes; a training process killed (SIGKILL) after a
    checkpoint and started again with the same checkpoint URI continues from there, in the
    same MLflow run, and registers one version.
    """
    import json
    import signal
    import subprocess
    import sys
    import time

    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    epochs = 5
    command = [
        os.path.join(os.path.dirname(sys.executable), "specdeepmap"),
        "train",
        str(dataset / "chips"),
        "--device",
        "cpu",
        "--epochs",
        str(epochs),
        "--batch-size",
        "8",
        "--no-baseline",
        "--no-early-stopping",
        "--tracking-uri",
        uri,
        "--registered-model",
        "resumed",
        "--checkpoint-uri",
        f"{s3_bucket}/checkpoints/run-1",
    ]
    state = f"{s3_bucket}/checkpoints/run-1/resume.json"
    first = subprocess.Popen(
        [*command, "--out", str(tmp_path / "first")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not (storage.exists(state) and json.loads(storage.read_text(state))["epoch"] >= 1):
        assert first.poll() is None, "training ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)  # a lost worker: no clean-up, no final upload
    first.wait()
    killed_at = json.loads(storage.read_text(state))
    assert storage.exists(f"{s3_bucket}/checkpoints/run-1/last.ckpt")

    again = subprocess.run(
        [*command, "--out", str(tmp_path / "second")], capture_output=True, text=True, timeout=600
    )
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "Continuing the interrupted training" in again.stderr + again.stdout
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("specdeepmap").experiment_id])
    assert [r.info.run_id for r in runs] == [killed_at["mlflow_run_id"]]  # the same run
    history = client.get_metric_history(runs[0].info.run_id, "val_iou")
    # each epoch validated once (a kill between an epoch's validation and its checkpoint
    # can repeat that one epoch), not a restart from epoch 0
    assert epochs <= len(history) <= epochs + 1
    final = json.loads(storage.read_text(state))
    assert final["global_step"] > killed_at["global_step"] and final["epoch"] == epochs - 1
    assert len(client.search_model_versions("name='resumed'")) == 1


def test_a_registered_model_whose_files_are_gone_says_so(tmp_path):
    """A registry that knows a model whose artifact store lost its files (an object store
    reset under a registry that survived): "model artifacts missing from the store" at once,
    not an unreadable-model error; an unknown model keeps MLflow's own message.
    """
    import shutil

    import mlflow
    import torch

    from specdeepmap.errors import MissingInputError
    from specdeepmap.inference import export_model_file
    from specdeepmap.models import ModelSpec, build_model

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment("gone", artifact_location=str(tmp_path / "store"))
    run = client.create_run(experiment)
    torch.manual_seed(0)
    config = ModelConfig(
        architecture="unet",
        backbone="resnet18",
        in_channels=3,
        num_classes=3,
        class_values=[1, 2],
        ignore_index=0,
        tile_size=[32, 32],
        normalization={"scaler": 1.0, "mean": None, "std": None, "nodata": None},
    )
    model_file = export_model_file(
        config, build_model(ModelSpec("unet", "resnet18", 3, 3)), str(tmp_path / "model.pt")
    )
    client.log_artifact(run.info.run_id, model_file, "model")
    client.create_registered_model("gone-model")
    client.create_model_version(
        "gone-model", f"runs:/{run.info.run_id}/model", run_id=run.info.run_id
    )
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)  # as the alias test above: the registry follows it
    try:
        assert load_model("models:/gone-model/1", "cpu").in_channels == 3
        shutil.rmtree(tmp_path / "store")
        with pytest.raises(MissingInputError, match="model artifacts missing from the store"):
            load_model("models:/gone-model/1", "cpu")
        with pytest.raises(Exception, match="(?i)not found|does not exist") as unknown:
            load_model("models:/no-such-model/1", "cpu")
        assert not isinstance(unknown.value, MissingInputError)
    finally:
        mlflow.set_tracking_uri(previous)


def test_a_class_never_predicted_has_precision_zero_and_is_named():
    from specdeepmap.evaluation import metric_name
    from specdeepmap.metrics import never_predicted

    # truth rows, prediction columns: class 2 occurs 5 times and is never predicted; class 3
    # neither occurs nor is predicted
    matrix = np.array([[8, 0, 0], [5, 0, 0], [0, 0, 0]])
    m = metrics_from_matrix(matrix, [1, 2, 3])
    assert m.precision[0] == pytest.approx(8 / 13) and m.precision[1] == 0.0
    assert np.isnan(m.precision[2]) and np.isnan(m.iou[2])
    assert never_predicted(m) == [2]
    assert metric_name("test_iou", 2, "Mixed forest") == "test_iou_class_2_mixed_forest"
    assert metric_name("test_iou", 2, "2") == "test_iou_class_2"
