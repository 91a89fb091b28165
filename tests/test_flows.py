"""Prefect flows against a real (temporary) Prefect API, a real S3 server and MLflow."""

import base64
import io
import json
import os
import re

import numpy as np
import pytest
import rasterio
from PIL import Image

from specdeepmap import storage
from tests.conftest import PLATFORM_EPOCH_CHIPS

pytestmark = pytest.mark.integration


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("SPECDEEPMAP_RUNS_DIR", str(tmp_path / "runs"))
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(previous)  # later tests' stores are not this deleted one


def test_promotion_compares_on_the_same_chips_with_a_margin(mlflow_store, tmp_path):
    """A champion that scored better on its own (easier) test set but worse on the new run's
    chips is replaced; a win below the margin, or without a same-chips score, is not enough.
    """
    import mlflow

    from specdeepmap.registry import promote_if_better, resolve

    client = mlflow.MlflowClient()
    client.create_registered_model("m")
    versions = [client.create_model_version("m", source=str(tmp_path)).version for _ in range(4)]
    assert promote_if_better("m", versions[0], 0.90).alias == "champion"  # the first one
    # v1 scores 0.60 on its chips, where the champion (0.90 on its own chips) scores 0.50
    assert (
        promote_if_better(
            "m", versions[1], 0.60, champion_mean_iou=0.50, min_improvement=0.01
        ).alias
        == "champion"
    )
    tags = client.get_model_version("m", versions[1]).tags
    assert tags["champion_test_mean_iou_same_chips"] == "0.500000"
    assert tags["compared_with_version"] == str(versions[0])
    # better, but by less than the margin
    assert (
        promote_if_better(
            "m", versions[2], 0.605, champion_mean_iou=0.60, min_improvement=0.01
        ).alias
        == "challenger"
    )
    # a higher number measured on other chips proves nothing: the champion stays
    assert promote_if_better("m", versions[3], 0.99).alias == "challenger"
    assert resolve("models:/m@champion") == f"models:/m/{versions[1]}"
    assert resolve("models:/m@challenger") == f"models:/m/{versions[3]}"
    assert resolve("/some/model.pt") == "/some/model.pt"


def test_champion_is_scored_on_the_new_chips_without_touching_its_run(trained, dataset, tmp_path):
    """score_champion gives the Tester's pooled mean IoU of the champion on the given chips,
    logs nothing to the champion's run, and refuses a comparison across class sets.
    """
    import mlflow

    from specdeepmap.evaluation import evaluate_model
    from specdeepmap.inference import export_model_file, load_model, read_model_file
    from specdeepmap.registry import score_champion

    config, result = trained
    mlflow.set_tracking_uri(config.tracking_uri)
    client = mlflow.MlflowClient()
    client.set_registered_model_alias("test-model", "champion", result.model_version)
    before = client.get_run(result.run_id).data.metrics
    test_csv = str(dataset / "chips" / "test_files.csv")
    score = score_champion("test-model", test_csv, result.model_file, str(tmp_path / "c"))
    expected = evaluate_model(
        test_csv, result.model_file, str(tmp_path / "e"), log_to_mlflow=False
    ).metrics.mean_iou
    assert score.version == result.model_version and score.reason == ""
    assert score.mean_iou == pytest.approx(expected)
    assert client.get_run(result.run_id).data.metrics == before
    assert score.difference is None  # without the new model's per-chip figures
    # with them (here: the champion's own), the paired difference and its interval
    chips = json.loads((tmp_path / "c" / "test_metrics.json").read_text())
    paired = score_champion(
        "test-model",
        test_csv,
        result.model_file,
        str(tmp_path / "c2"),
        new_chip_matrices=chips["chip_confusion_matrices"],
    )
    assert paired.difference.difference == 0 and paired.difference.low == 0
    assert paired.difference.verdict == "undecided"
    assert paired.difference.chips == len(chips["chip_confusion_matrices"]) > 1

    other_config, _ = read_model_file(result.model_file)
    other = export_model_file(
        other_config.model_copy(update={"class_values": [1, 2, 3, 4, 5, 9]}),
        load_model(result.model_file, "cpu").model,
        str(tmp_path / "other.pt"),
    )
    refused = score_champion("test-model", test_csv, other, str(tmp_path / "o"))
    assert refused.mean_iou is None and "class_values" in refused.reason


def test_training_pipeline_then_scheduled_mapping_on_s3(
    prefect_api, s3_bucket, mlflow_store, tmp_path
):
    import mlflow

    from flows.params import ScenePair, ScheduledMappingParams, TrainingPipelineParams
    from flows.pipelines import scheduled_mapping, training_pipeline
    from specdeepmap.params import ChipParams, SplitParams, TrainParams
    from specdeepmap.sample_data import generate_scene

    scene = generate_scene(str(tmp_path / "scene"), 320, 320, seed=7, field_size=48)
    storage.upload(scene.image_uri, f"{s3_bucket}/train/demo_s2.tif")
    storage.upload(scene.label_uri, f"{s3_bucket}/train/demo_s2_labels.tif")
    # class names travel in GDAL's sidecar, as GIS tools write them
    storage.upload(scene.label_uri + ".aux.xml", f"{s3_bucket}/train/demo_s2_labels.tif.aux.xml")
    summary = training_pipeline(
        TrainingPipelineParams(
            scenes=[
                ScenePair(
                    image_uri=f"{s3_bucket}/train/demo_s2.tif",
                    label_uri=f"{s3_bucket}/train/demo_s2_labels.tif",
                )
            ],
            work_uri=f"{s3_bucket}/work",
            model_name="flow-model",
            chip=ChipParams(tile_x=32, tile_y=32, step_x=32, step_y=32, min_coverage=40),
            split=SplitParams(
                train_percent=70, validation_percent=15, test_percent=15, scaler=10000
            ),
            train=TrainParams(
                epochs=2, batch_size=16, device="cpu", min_chips_per_epoch=PLATFORM_EPOCH_CHIPS
            ),
        )
    )
    for name in (
        "train_files.csv",
        "test_files.csv",
        "Summary_train_val.csv",
        "Normalize_Bands.csv",
    ):
        assert storage.exists(f"{s3_bucket}/work/chips/{name}")
    assert storage.list_files(f"{s3_bucket}/work/chips/images", ".tif")
    assert storage.exists(f"{s3_bucket}/work/evaluation/v{summary['version']}/test_iou.csv")
    assert 0 <= summary["test_mean_iou"] <= 1 and 0 <= summary["baseline_rf_test_mean_iou"] <= 1
    # the RandomForest baseline is fitted in the run and gates automatic promotion
    below = summary["test_mean_iou"] < summary["baseline_rf_test_mean_iou"]
    assert summary["alias"] == ("challenger" if below else "champion")
    client = mlflow.MlflowClient()
    run = client.get_run(summary["run_id"])
    assert "val_iou" in run.data.metrics and "test_mean_iou" in run.data.metrics
    forest = client.get_run(run.data.tags["baseline_run_id"])  # the forest's child run
    assert forest.data.metrics["baseline_rf_test_mean_iou"] == pytest.approx(
        summary["baseline_rf_test_mean_iou"]
    )
    version = client.get_model_version("flow-model", summary["version"])
    assert version.tags["below_baseline"] == str(below).lower()
    assert float(version.tags["test_mean_iou"]) == pytest.approx(summary["test_mean_iou"], abs=1e-6)
    assert "RandomForest" in version.description
    # how far the test chips can tell the model from the forest: a paired bootstrap interval
    versus = summary["baseline_rf_difference"]
    assert versus["difference"] == pytest.approx(
        summary["test_mean_iou"] - summary["baseline_rf_test_mean_iou"]
    )
    assert versus["low"] <= versus["difference"] <= versus["high"]
    assert run.data.metrics["test_mean_iou_minus_baseline_rf_low"] == pytest.approx(versus["low"])
    assert "90% interval over" in version.description
    assert f"{summary['test_mean_iou']:.4f}" in version.description
    assert "the best of 2 validated epochs (their median:" in version.description
    # the model card: data (digest, class names and shares), input contract, results, images
    from specdeepmap.model_card import dataset_facts

    card = client.download_artifacts(summary["run_id"], "model_card/model_card.md")
    card = open(card).read()
    facts = dataset_facts(f"{s3_bucket}/work/chips")
    assert facts["digest"] in card and facts["digest"] in version.description
    for text in (
        "| water | 1 |",
        "| forest | 2 |",
        "B01",
        "| band | name | mean | std |",
        "![prediction_panels.png](prediction_panels.png)",
        "dice-ce",
        f"{summary['test_mean_iou']:.4f}",
        "The RandomForest: a per-pixel RandomForest of 100 trees",
    ):
        assert text in card, text
    images = [a.path for a in client.list_artifacts(summary["run_id"], "model_card")]
    assert {"model_card/prediction_panels.png", "model_card/confusion_matrix.png"} <= set(images)
    # the HTML card MLflow renders: its images inside it, the same tables
    page = open(client.download_artifacts(summary["run_id"], "model_card/model_card.html")).read()
    sources = re.findall(r'<img[^>]*src="([^"]+)"', page)
    assert len(sources) == len([p for p in images if p.endswith(".png")])
    assert all(src.startswith("data:image/png;base64,") for src in sources)
    assert "<td>water</td>" in page and facts["digest"] in page
    inputs = client.get_run(summary["run_id"]).inputs.dataset_inputs
    assert inputs and inputs[0].dataset.source and "chips" in inputs[0].dataset.source
    run_tags = client.get_run(summary["run_id"]).data.tags
    assert run_tags["mlflow.source.name"] == "prefect flow train"
    assert run_tags["mlflow.runName"].startswith("train ")
    experiment = client.get_experiment(client.get_run(summary["run_id"]).info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    # the test report shows the baseline beside the model, and is logged although on S3
    report = storage.read_text(
        f"{s3_bucket}/work/evaluation/v{summary['version']}/test_metrics.csv"
    )
    assert "Baseline RF IoU" in report.splitlines()[0]
    logged = [a.path for a in client.list_artifacts(summary["run_id"], "test")]
    assert "test/confusion_matrix.png" in logged and "test/test_iou.csv" in logged
    if below:  # a reviewer's decision, as in the MLflow UI
        client.set_registered_model_alias("flow-model", "champion", summary["version"])

    for i in (1, 2):
        storage.upload(scene.image_uri, f"{s3_bucket}/scenes/scene{i}.tif")
    params = ScheduledMappingParams(
        input_prefix=f"{s3_bucket}/scenes",
        output_prefix=f"{s3_bucket}/maps",
        model_name="flow-model",
    )
    first = scheduled_mapping(params)
    assert len(first) == 2
    with rasterio.open(scene.image_uri) as src:
        crs, transform, shape = src.crs, src.transform, src.shape
    for i in (1, 2):
        with storage.open_raster(f"{s3_bucket}/maps/scene{i}_classes.tif") as out:
            assert (out.crs, out.transform, out.shape) == (crs, transform, shape)
            assert set(np.unique(out.read(1))) <= {0, 1, 2, 3, 4, 5, 6}
        assert storage.exists(f"{s3_bucket}/maps/scene{i}_classes_metrics.json")
        assert storage.exists(f"{s3_bucket}/maps/scene{i}_classes_quicklook.png")
    assert scheduled_mapping(params) == []  # nothing new the second time


def test_bad_parameters_are_rejected_before_work(prefect_api, tmp_path):
    from flows.pipelines import training_pipeline
    from specdeepmap.errors import InvalidParameterError
    from specdeepmap.params import MapParams, SplitParams

    with pytest.raises(InvalidParameterError, match="add up to 110"):
        SplitParams(train_percent=80, validation_percent=20, test_percent=10)
    with pytest.raises(InvalidParameterError, match=r"overlap: .*less than 50 \(got 60\)"):
        MapParams(overlap=60)
    scenes = [{"image_uri": "a.tif", "label_uri": "b.tif"}]
    for settings, message in (
        (
            {"split": {"train_percent": 90, "validation_percent": 20, "test_percent": 0}},
            "add up to 110",
        ),
        # a cross-field rule of the recipe: refused when the run starts, before chipping
        ({"train": {"distill": True, "ensemble": 1}}, "set ensemble >= 2"),
        ({"chip": {"tile_size": 64}}, "Extra inputs are not permitted"),
    ):
        with pytest.raises(Exception, match=message):
            training_pipeline(
                params={"scenes": scenes, "work_uri": str(tmp_path / "w"), **settings}
            )
        assert not (tmp_path / "w").exists()


class _Proxy:
    """A TCP proxy in front of the S3 server that can be stopped and started again."""

    def __init__(self, target_port: int):
        import socket
        import threading

        self.target_port, self.refused = target_port, 0
        self.cut = 0  #: connections open when an outage cut them (requests that failed)
        self._open: set = set()
        self.down = False  #: an outage that resets connections (``stop(reset=True)``)
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self._threading, self._socket = threading, socket
        self._server = None
        self._connections: list = []
        self.start()

    def start(self) -> None:
        if self.down:  # the listener stayed up, resetting connections: serve again
            self.down = False
            return
        server = self._socket.socket()
        server.setsockopt(self._socket.SOL_SOCKET, self._socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(64)
        self._server = server
        self._threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def stop(self, reset: bool = False) -> None:
        """Cut the open connections and refuse new ones, as an outage does.

        By closing the port, or (``reset``) by accepting each connection and resetting it at once,
        counted in ``refused``, as a load balancer without a backend does.
        """
        if reset:
            self.down = True
        else:
            self._server.close()
        self.cut += len(self._open)
        for connection in self._connections:
            try:  # shutdown wakes the pipe threads blocked in recv; close alone would not
                connection.shutdown(self._socket.SHUT_RDWR)
                connection.close()
            except OSError:
                pass
        self._connections.clear()

    def _accept(self, server) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            if self.down:
                import struct

                self.refused += 1
                client.setsockopt(
                    self._socket.SOL_SOCKET, self._socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                client.close()  # a reset, not an orderly close
                continue
            upstream = self._socket.create_connection(("127.0.0.1", self.target_port))
            self._connections += [client, upstream]
            self._open.add(client)
            for a, b in ((client, upstream), (upstream, client)):
                self._threading.Thread(target=self._pipe, args=(a, b, client), daemon=True).start()

    def _pipe(self, a, b, client) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            self._open.discard(client)
            for s in (a, b):
                try:
                    s.close()
                except OSError:
                    pass


def test_s3_read_cut_off_mid_way_is_a_transient_error(s3_server, s3_bucket, tmp_path, monkeypatch):
    """An S3 raster that opened fine but whose blocks stop arriving raises a ConnectionError
    naming the object (retried by the tasks), not a 'bad file' error.
    """
    from urllib.parse import urlparse

    from rasterio.windows import Window

    from specdeepmap.sample_data import generate_scene

    scene = generate_scene(str(tmp_path / "scene"), 1024, 1024, seed=4)
    uri = f"{s3_bucket}/in/cut.tif"
    storage.upload(scene.image_uri, uri)
    proxy = _Proxy(urlparse(s3_server).port)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    with pytest.raises(ConnectionError, match="cut.tif") as caught:
        with storage.open_raster(uri) as src:
            assert src.read(window=Window(0, 0, 64, 64)).shape == (13, 64, 64)
            proxy.stop()
            src.read(window=Window(512, 512, 512, 512))
    assert storage.is_transient(caught.value)
    proxy.start()
    with storage.open_raster(uri) as src:  # and a retry reads it
        assert src.read(window=Window(512, 512, 512, 512)).shape == (13, 512, 512)


async def _task_states(prefix: str, since) -> list[str]:
    """The state names of the task runs named ``prefix…`` created since ``since``."""
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        names = []
        for run in await client.read_task_runs():
            if run.name.startswith(prefix) and run.created and run.created >= since:
                names += [state.name for state in await client.read_task_run_states(run.id)]
        return names


def test_s3_outage_during_a_run_is_retried_and_leaves_no_partial_object(
    prefect_api, s3_server, s3_bucket, tmp_path, monkeypatch
):
    import asyncio
    import datetime
    import threading
    from urllib.parse import urlparse

    from flows.params import ScenePair
    from flows.pipelines import chip_flow
    from specdeepmap.chipping import read_manifest
    from specdeepmap.params import ChipParams
    from specdeepmap.sample_data import generate_scene

    scene = generate_scene(str(tmp_path / "scene"), 640, 640, seed=3, field_size=64)
    storage.upload(scene.image_uri, f"{s3_bucket}/in/demo_s2.tif")
    storage.upload(scene.label_uri, f"{s3_bucket}/in/demo_s2_labels.tif")
    proxy = _Proxy(urlparse(s3_server).port)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")

    def outage():
        import boto3

        direct = boto3.client("s3", endpoint_url=s3_server)  # not through the proxy
        bucket = s3_bucket.removeprefix("s3://")
        deadline = time.time() + 120
        while (
            time.time() < deadline
            and direct.list_objects_v2(Bucket=bucket, Prefix="chips/images/").get("KeyCount", 0)
            < 20
        ):
            time.sleep(0.05)  # until chipping is well under way
        proxy.stop(reset=True)  # the S3 server goes away in the middle of the run...
        time.sleep(3)
        proxy.start()  # ...and comes back

    import time

    thread = threading.Thread(target=outage)
    started = datetime.datetime.now(datetime.UTC)
    thread.start()
    result = chip_flow(
        [
            ScenePair(
                image_uri=f"{s3_bucket}/in/demo_s2.tif",
                label_uri=f"{s3_bucket}/in/demo_s2_labels.tif",
            )
        ],
        f"{s3_bucket}/chips",
        ChipParams(tile_x=32, tile_y=32, step_x=32, step_y=32, min_coverage=0),
    )
    thread.join()
    assert result[0]["chips"] == 400
    # the outage cut requests in flight, so the run is complete only because they were
    # tried again (by botocore and GDAL, or by Prefect: the task's states say which)
    assert proxy.cut + proxy.refused > 0, "the outage hit no request: it proved nothing"
    states = asyncio.run(_task_states("chip scene", started))
    assert states[-1] == "Completed", states
    manifest = read_manifest(f"{s3_bucket}/chips/manifest/demo_s2.csv")
    images = storage.list_files(f"{s3_bucket}/chips/images", ".tif")
    assert len(manifest) == len(images) == 400
    for uri in images[::37]:  # every object present is a whole GeoTIFF
        with storage.open_raster(uri) as chip:
            assert chip.read().shape == (13, 32, 32)


def test_map_flow_on_a_dask_cluster(prefect_api, trained, dataset, tmp_path):
    import shutil

    from distributed import LocalCluster

    from flows.params import MapFlowParams
    from flows.pipelines import map_flow
    from specdeepmap.params import MapParams

    _, result = trained
    (tmp_path / "in").mkdir()
    for name in ("a.tif", "b.tif"):
        shutil.copy(dataset / "scene" / "demo_s2.tif", tmp_path / "in" / name)
    with LocalCluster(
        n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None
    ) as cluster:
        products = map_flow(
            MapFlowParams(
                model_uri=result.model_file,
                output_uri=str(tmp_path / "maps"),
                input_prefix=str(tmp_path / "in"),
                map=MapParams(device="cpu", precision="int8"),
                task_runner="dask",
                dask_address=cluster.scheduler_address,
            )
        )
    assert sorted(os.path.basename(p["classes"]) for p in products) == [
        "a_classes.tif",
        "b_classes.tif",
    ]
    for p in products:
        assert os.path.exists(p["metrics"]) and os.path.exists(p["quicklook"])
        with rasterio.open(p["classes"]) as dst:  # the form's precision reached the mapper
            assert dst.tags()["SPECDEEPMAP_PRECISION"] == "int8"


def test_a_suspect_map_is_quarantined_then_released(prefect_api, trained, dataset, tmp_path):
    from flows.params import MapFlowParams
    from flows.pipelines import map_flow, release_flow
    from specdeepmap.params import MapParams
    from specdeepmap.publishing import unmapped_scenes

    _, result = trained
    (tmp_path / "in").mkdir()
    with rasterio.open(dataset / "scene" / "demo_s2.tif") as src:
        profile, pixels = src.profile, src.read()
    for name, offset in (("plain.tif", 0), ("shifted.tif", 1000)):
        with rasterio.open(tmp_path / "in" / name, "w", **profile) as dst:
            dst.write(np.clip(pixels.astype(np.int64) + offset, 0, 65535).astype(pixels.dtype))
    maps = tmp_path / "maps"
    products = map_flow(
        MapFlowParams(
            model_uri=result.model_file,
            output_uri=str(maps),
            input_prefix=str(tmp_path / "in"),
            map=MapParams(device="cpu"),
        )
    )
    verdicts = {os.path.basename(p["input"]): (p["verdict"], p["quarantined"]) for p in products}
    assert verdicts == {"plain.tif": ("ok", False), "shifted.tif": ("suspect", True)}
    held = maps / "quarantine" / "shifted_classes.tif"
    assert held.exists() and (maps / "quarantine" / "shifted_classes_metrics.json").exists()
    assert not (maps / "shifted_classes.tif").exists()
    catalog = (maps / "catalog.json").read_text()
    assert "plain_classes.json" in catalog and "shifted_classes" not in catalog
    item = json.loads((maps / "quarantine" / "shifted_classes.json").read_text())
    quality = item["properties"]["specdeepmap:quality"]
    assert quality["verdict"] == "suspect" and "shifted by +" in quality["reasons"][0]
    assert item["assets"]["confidence"]["href"] == "shifted_classes_confidence.tif"
    links = {link["rel"]: link["href"] for link in item["links"]}
    assert links["self"] == str(maps / "quarantine" / "shifted_classes.json")
    assert links["parent"] == links["root"] == "../catalog.json"
    # the same scenes announced again: nothing is mapped twice by one model version
    first = (maps / "plain_classes_metrics.json").read_text()
    again = map_flow(
        MapFlowParams(
            model_uri=result.model_file,
            output_uri=str(maps),
            input_prefix=str(tmp_path / "in"),
            map=MapParams(device="cpu"),
        )
    )
    assert again == [] and (maps / "plain_classes_metrics.json").read_text() == first
    # a quarantined scene counts as mapped: the next scheduled run leaves it alone
    assert unmapped_scenes(str(tmp_path / "in"), str(maps)) == []

    published = release_flow(str(held), "rita", "checked: the new processing baseline")
    assert published == str(maps / "shifted_classes.tif") and not held.exists()
    item = json.loads((maps / "shifted_classes.json").read_text())
    assert item["properties"]["specdeepmap:release"]["by"] == "rita"
    metrics = json.loads((maps / "shifted_classes_metrics.json").read_text())
    assert metrics["output"] == published and metrics["quarantined"] is False
    assert metrics["released"]["reason"] == "checked: the new processing baseline"
    links = {link["rel"]: link["href"] for link in item["links"]}
    assert links["self"] == str(maps / "shifted_classes.json") and links["root"] == "./catalog.json"
    assert "shifted_classes.json" in (maps / "catalog.json").read_text()
    assert unmapped_scenes(str(tmp_path / "in"), str(maps)) == []


def _answer_review(flow_run_name_contains: str, run_input: dict, seconds: float = 120):
    """Wait for a paused review flow run and answer its form through the Prefect API, as a
    reviewer does in the UI (Resume).
    """
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.flow_runs import resume_flow_run

    deadline = time.time() + seconds
    with get_client(sync_client=True) as client:
        while time.time() < deadline:
            paused = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))
                )
            )
            paused = [r for r in paused if r.state.state_details.run_input_keyset]
            if paused:
                if "decision" in run_input:  # a form sent without a choice is refused
                    undecided = {k: v for k, v in run_input.items() if k != "decision"}
                    with pytest.raises(RuntimeError, match="Cannot resume"):
                        resume_flow_run(paused[0].id, run_input=undecided)
                resume_flow_run(paused[0].id, run_input=run_input)
                return paused[0]
            time.sleep(0.5)
    raise TimeoutError("no review flow run paused")


def _artifact(flow_run_id, key: str) -> str:
    """The newest artifact ``key`` of a flow run (its Markdown)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
    )

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[key]),
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
            )
        )
    return found[-1].data


@pytest.mark.parametrize("approve", [False, True])
def test_a_reviewer_approves_or_rejects_through_the_prefect_api(
    prefect_api, mlflow_store, tmp_path, approve
):
    """In approval mode the version waits as challenger; the review flow pauses with a typed
    form; the answer (given through the API, as the UI does) moves the alias or not, and
    who, when and why are kept as version tags.
    """
    import threading

    import mlflow

    from flows.pipelines import review_flow
    from specdeepmap.registry import promote_if_better

    client = mlflow.MlflowClient()
    client.create_registered_model("reviewed")
    first, second = [
        str(client.create_model_version("reviewed", source=str(tmp_path)).version) for _ in range(2)
    ]
    promote_if_better("reviewed", first, 0.5)
    decision = promote_if_better(
        "reviewed", second, 0.7, champion_mean_iou=0.6, min_improvement=0.01, mode="approval"
    )
    assert decision.alias == "champion"  # what the rule advises ...
    assert str(client.get_model_version_by_alias("reviewed", "challenger").version) == second
    assert str(client.get_model_version_by_alias("reviewed", "champion").version) == first

    # the card's maps of the version's run (1200 px wide): the request embeds them
    artifacts = (tmp_path / "artifacts").as_uri()  # not the working folder's mlruns/
    with mlflow.start_run(
        experiment_id=mlflow.create_experiment(f"review-{approve}", artifact_location=artifacts)
    ) as run:
        panels = tmp_path / "model_card" / "prediction_panels.png"
        panels.parent.mkdir()
        Image.fromarray(np.tile(np.arange(1200, dtype=np.uint8), (300, 1))).save(panels)
        mlflow.log_artifact(str(panels), "model_card")
    result = {}
    worker = threading.Thread(
        target=lambda: result.update(
            review_flow(
                "reviewed",
                second,
                decision.reason,
                "| comparison |",
                timeout_hours=0.05,
                run_id=run.info.run_id,
            )
        )
    )
    worker.start()
    answer = {"decision": "approve" if approve else "reject", "reviewer": "rita"}
    paused = _answer_review("review", answer | {"comment": "checked"})
    worker.join(timeout=120)
    assert result["approved"] is approve and result["reviewer"] == "rita"
    request = _artifact(paused.id, "review-request")
    embedded = re.search(r"!\[prediction panels\]\(data:image/png;base64,([^)]+)\)", request)
    with Image.open(io.BytesIO(base64.b64decode(embedded.group(1)))) as shown:
        assert shown.size == (900, 225)  # scaled to fit the form
    champion = str(client.get_model_version_by_alias("reviewed", "champion").version)
    assert champion == (second if approve else first)
    version = client.get_model_version("reviewed", second)
    alias = "champion" if approve else "challenger"
    assert version.tags[f"{alias}_by"] == "rita" and version.tags[f"{alias}_comment"] == "checked"
    assert ("approved" if approve else "rejected") in version.tags[f"{alias}_reason"]
    # champion and challenger exclude each other; the alias given up is history
    assert version.aliases == [alias]
    if approve:
        assert not [k for k in version.tags if k.startswith("challenger_")]
        history = json.loads(version.tags["alias_history"])
        assert history[-1]["alias"] == "challenger"
        assert history[-1]["reason"].startswith("waiting for a reviewer")
        old = client.get_model_version("reviewed", first)
        assert old.aliases == [] and "champion_since" not in old.tags
        assert json.loads(old.tags["alias_history"])[-1]["alias"] == "champion"


def test_training_pipeline_refuses_impossible_labels_before_chipping(
    prefect_api, mlflow_store, tmp_path
):
    """A label raster with one class stops the run at its first task: no chips are cut."""
    from flows.params import ScenePair, TrainingPipelineParams
    from flows.pipelines import training_pipeline
    from specdeepmap.errors import InvalidLabelError
    from specdeepmap.params import ChipParams
    from tests.conftest import write_raster

    image = write_raster(tmp_path / "image.tif", np.ones((3, 64, 64), np.uint16))
    label = write_raster(tmp_path / "label.tif", np.full((64, 64), 4, np.uint8))
    params = TrainingPipelineParams(
        scenes=[ScenePair(image_uri=image, label_uri=label)],
        work_uri=str(tmp_path / "work"),
        chip=ChipParams(tile_x=32, tile_y=32, step_x=32, step_y=32),
    )
    with pytest.raises(InvalidLabelError, match="single class"):
        training_pipeline(params)
    assert not (tmp_path / "work" / "chips").exists()


def test_two_process_training_inside_a_flow_run(prefect_api, mlflow_store, dataset):
    """Multi-device training inside a Prefect flow run: the processes are spawned (the flow
    is not re-entered by a re-run command line), one MLflow run, one registered version.
    """
    from flows.pipelines import train_flow
    from specdeepmap.params import TrainParams
    from tests.test_training import _check_ddp_run

    result = train_flow(
        str(dataset / "chips"),
        TrainParams(
            devices=2,
            device="cpu",
            epochs=2,
            batch_size=8,
            baseline=False,
            min_chips_per_epoch=PLATFORM_EPOCH_CHIPS,
        ),
        "ddp-model",
    )
    assert result.model_version == "1"
    _check_ddp_run(mlflow_store, str(dataset / "chips"), result.model_file)
