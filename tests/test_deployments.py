"""The platform as its users run it: deployments on a Prefect server, a process worker, an
MLflow tracking server with artifacts in S3, triggered through the REST API as the UI does.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import rasterio

from specdeepmap import storage
from tests.conftest import PLATFORM_EPOCH_CHIPS, REPO, _free_port

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent
#: the Prefect REST API as the UI reaches it (the platform fixture sets its credentials)
_API = httpx.Client(timeout=30)


def _wait_http(url: str, seconds: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} died: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not healthy after {seconds} s: {log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def platform(s3_server, tmp_path_factory):
    """MLflow server (basic-auth app, SQLite registry, artifacts in S3), Prefect server (API
    auth string), deployments, worker. The secrets are canaries: no output may hold them.
    """
    import uuid

    import boto3

    root = tmp_path_factory.mktemp("platform")
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="platform")
    mlflow_port, prefect_port = _free_port(), _free_port()
    canary = f"canary{uuid.uuid4().hex}"
    secrets = {
        "prefect": f"{canary}prefect",
        "mlflow": f"{canary}mlflow",
        "s3": f"{canary}s3",
        "flask": f"{canary}flask",
    }
    (root / "mlflow-auth.ini").write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{root}/mlflow-auth.db\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    auth_env = {
        "PREFECT_SERVER_API_AUTH_STRING": f"admin:{secrets['prefect']}",
        "PREFECT_API_AUTH_STRING": f"admin:{secrets['prefect']}",
        "MLFLOW_AUTH_CONFIG_PATH": str(root / "mlflow-auth.ini"),
        "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
        "MLFLOW_AUTH_ADMIN_PASSWORD": secrets["mlflow"],
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets["flask"],
        "MLFLOW_TRACKING_USERNAME": "admin",
        "MLFLOW_TRACKING_PASSWORD": secrets["mlflow"],
        "AWS_SECRET_ACCESS_KEY": secrets["s3"],
    }  # (the test's moto takes any key)
    env = {
        **os.environ,
        **auth_env,
        "MLFLOW_S3_ENDPOINT_URL": s3_server,
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
        "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
        "PREFECT_HOME": str(root / "prefect"),
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        # a lost worker is noticed within seconds (production: 30 s heartbeats, 90 s)
        "PREFECT_WORKER_HEARTBEAT_SECONDS": "3",
        "PREFECT_SERVER_SERVICES_FOREMAN_LOOP_SECONDS": "2",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "SPECDEEPMAP_HOME": str(REPO),
        "SPECDEEPMAP_RUNS_DIR": str(root / "runs"),
        "SPECDEEPMAP_INPUT_PREFIX": "s3://platform/scenes",
        "SPECDEEPMAP_OUTPUT_PREFIX": "s3://platform/maps",
    }
    procs = []

    def start(name: str, *args: str) -> tuple[subprocess.Popen, Path]:
        log = root / f"{name}.log"
        # each service in a session of its own: a test can take one down with its children
        proc = subprocess.Popen(
            [str(BIN / args[0]), *args[1:]],
            env=env,
            cwd=REPO,
            stdout=open(log, "a"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        procs.append(proc)
        return proc, log

    mlflow, mlflow_log = start(
        "mlflow",
        "mlflow",
        "server",
        "--app-name",
        "basic-auth",
        "--host",
        "127.0.0.1",
        "--port",
        str(mlflow_port),
        "--backend-store-uri",
        f"sqlite:///{root}/mlflow.db",
        "--artifacts-destination",
        "s3://platform/mlflow",
        "--workers",
        "1",
    )
    prefect, prefect_log = start(
        "prefect", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)
    )
    try:
        _wait_http(f"http://127.0.0.1:{mlflow_port}/health", 120, mlflow, mlflow_log)
        _wait_http(f"http://127.0.0.1:{prefect_port}/api/health", 180, prefect, prefect_log)

        def cli(*args: str) -> str:
            done = subprocess.run(
                [str(BIN / "prefect"), "--no-prompt", *args],
                env=env,
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert done.returncode == 0, done.stdout + done.stderr
            return done.stdout

        cli("work-pool", "create", "specdeepmap-process", "--type", "process", "--overwrite")
        cli("deploy", "--all")
        worker_command = ("prefect", "worker", "start", "--pool", "specdeepmap-process")
        worker, _ = start("worker", *worker_command)
        _API.auth = httpx.BasicAuth("admin", secrets["prefect"])
        with pytest.MonkeyPatch.context() as patch:  # this test's MLflow client logs in
            patch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
            patch.setenv("MLFLOW_TRACKING_PASSWORD", secrets["mlflow"])
            yield {
                "api": env["PREFECT_API_URL"],
                "tracking": env["MLFLOW_TRACKING_URI"],
                "root": root,
                "worker": [worker],
                "secrets": secrets,
                "start_worker": lambda: start("worker", *worker_command)[0],
            }
    finally:
        _API.auth = None
        for proc in reversed(procs):
            try:
                os.killpg(proc.pid, 15)  # the service and what it started (flow runs)
            except ProcessLookupError:
                pass
        for proc in procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:  # a server still draining: its group goes too
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, 9)
                proc.wait(10)


def _trigger(api: str, deployment: str, parameters: dict):
    """Create a flow run of a deployment, as the UI's 'Run' button does."""
    found = _patient(lambda: _API.get(f"{api}/deployments/name/{deployment}", timeout=30))
    found.raise_for_status()
    return _patient(
        lambda: _API.post(
            f"{api}/deployments/{found.json()['id']}/create_flow_run",
            json={"parameters": parameters},
            timeout=30,
        )
    )


def _patient(call, attempts: int = 5):
    """A request to the SQLite-backed test server, which can answer 5xx ("database is
    locked") or not at all for a while when training takes both CPU cores.
    """
    for attempt in range(attempts):
        try:
            response = call()
        except httpx.TimeoutException:
            if attempt == attempts - 1:
                raise
            continue
        if response.status_code < 500 or attempt == attempts - 1:
            return response
        time.sleep(2)


def _wait_run(api: str, run_id: str, seconds: float = 420) -> dict:
    deadline = time.time() + seconds
    while time.time() < deadline:
        response = _patient(lambda: _API.get(f"{api}/flow_runs/{run_id}", timeout=30))
        if response.status_code >= 500:
            time.sleep(1)
            continue
        run = response.json()
        if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return run
        time.sleep(1)
    raise TimeoutError(f"flow run {run_id} did not finish in {seconds} s")


def _emit(api: str, event: str, resource_id: str, payload: dict) -> None:
    """Send an event to the Prefect server, as an upstream system (or a relay) does."""
    import datetime
    import uuid

    body = [
        {
            "id": str(uuid.uuid4()),
            "event": event,
            "occurred": datetime.datetime.now(datetime.UTC).isoformat(),
            "resource": {"prefect.resource.id": resource_id},
            "payload": payload,
        }
    ]
    response = _patient(lambda: _API.post(f"{api}/events", json=body, timeout=30))
    assert response.status_code < 300, response.text


def _wait_deployment_run(api: str, deployment: str, seconds: float = 300) -> dict:
    """The first flow run of a deployment, once it has finished."""
    found = _patient(lambda: _API.get(f"{api}/deployments/name/{deployment}", timeout=30))
    deadline = time.time() + seconds
    while time.time() < deadline:
        response = _patient(
            lambda: _API.post(
                f"{api}/flow_runs/filter",
                timeout=30,
                json={"deployments": {"id": {"any_": [found.json()["id"]]}}},
            )
        )
        if response.status_code < 500 and response.json():
            return _wait_run(api, response.json()[0]["id"], deadline - time.time())
        time.sleep(1)
    raise TimeoutError(f"no run of {deployment} within {seconds} s")


def _look_as_a_reviewer(platform: dict, paused: dict, run_id: str, experiment_id: str) -> None:
    """Headless Chromium (driven by Playwright) opens what a reviewer opens while the run
    waits: the paused run's Resume form in the Prefect UI, whose maps must be an image that
    loaded (not text or a broken link), the model card in the MLflow UI, whose images must
    load too, and the run's metric charts, which must be the model's. Screenshots go to
    ``$SPECDEEPMAP_SCREENSHOTS`` (default: the platform's folder). Without Chromium or
    Playwright it warns and returns: the rest of the test runs.
    """
    import base64
    import shutil
    import warnings

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        chromium = None
    if chromium is None:
        warnings.warn(
            "no Chromium or Playwright: the review screen was not opened in a browser",
            stacklevel=2,
        )
        return
    shots = Path(os.environ.get("SPECDEEPMAP_SCREENSHOTS", platform["root"] / "screens"))
    shots.mkdir(parents=True, exist_ok=True)
    ui = platform["api"].removesuffix("/api")
    password = base64.b64encode(f"admin:{platform['secrets']['prefect']}".encode()).decode()
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            prefect = browser.new_page(viewport={"width": 1400, "height": 1100})
            # what the UI's login form stores: the API auth string, base64
            prefect.add_init_script(f"localStorage.setItem('prefect-password', '{password}')")
            prefect.goto(f"{ui}/runs/flow-run/{paused['id']}")
            prefect.get_by_role("button", name="Resume").first.click(timeout=60_000)
            maps = prefect.locator("img[alt='prediction panels']").first
            maps.wait_for(timeout=60_000)
            maps.scroll_into_view_if_needed()
            loaded = "i => i.complete && i.naturalWidth > 0"
            prefect.wait_for_function(loaded, arg=maps.element_handle())
            prefect.screenshot(path=shots / "prefect-resume-form.png")
            assert prefect.get_by_text("approve").count() > 0  # the required choice
            mlflow_ui = browser.new_context(
                viewport={"width": 1400, "height": 1100},
                http_credentials={"username": "admin", "password": platform["secrets"]["mlflow"]},
            ).new_page()
            run_page = f"{platform['tracking']}/#/experiments/{experiment_id}/runs/{run_id}"
            view = "?workflowType=machine_learning"
            mlflow_ui.goto(f"{run_page}/artifactPath/model_card/model_card.html{view}")
            try:  # the HTML artifact is shown in its own (sandboxed) frame
                images = mlflow_ui.frame_locator("iframe").first.locator("img")
                images.first.wait_for(timeout=120_000)
                for i in range(images.count()):
                    assert images.nth(i).evaluate(loaded), f"card image {i} is broken"
            finally:
                mlflow_ui.screenshot(path=shots / "mlflow-model-card.png")
            # the metrics a reviewer opens first are the model's (the forest's: a child run)
            mlflow_ui.goto(f"{run_page}/model-metrics{view}")
            mlflow_ui.get_by_text("test_mean_iou", exact=True).first.wait_for(timeout=60_000)
            assert mlflow_ui.get_by_text("baseline_rf_test_mean_iou").count() == 0
            mlflow_ui.screenshot(path=shots / "mlflow-model-metrics.png")
        finally:
            browser.close()


def _review(api: str, run_input: dict, seconds: float = 420, check=None) -> dict:
    """Wait for the training run's review to pause, then answer its form as the UI does
    (``check(paused run)`` first: what a reviewer sees while the run waits).
    """
    deadline = time.time() + seconds
    while time.time() < deadline:
        response = _patient(
            lambda: _API.post(
                f"{api}/flow_runs/filter",
                timeout=30,
                json={"flow_runs": {"state": {"type": {"any_": ["PAUSED"]}}}},
            )
        )
        if response.status_code < 500 and response.json():
            paused = response.json()[0]
            if check is not None:
                check(paused)
            answer = _patient(
                lambda paused=paused: _API.post(
                    f"{api}/flow_runs/{paused['id']}/resume",
                    timeout=30,
                    json={"run_input": run_input},
                )
            )
            assert answer.json()["status"] == "ACCEPT", answer.text
            return paused
        time.sleep(1)
    raise TimeoutError(f"no flow run paused for review in {seconds} s")


def test_deployed_training_and_scheduled_mapping(platform, tmp_path):
    import mlflow

    from specdeepmap.sample_data import generate_scene

    scene = generate_scene(str(tmp_path / "scene"), 320, 320, seed=11, field_size=48)
    storage.upload(scene.image_uri, "s3://platform/train/demo_s2.tif")
    storage.upload(scene.label_uri, "s3://platform/train/demo_s2_labels.tif")
    params = {
        "params": {
            "scenes": [
                {
                    "image_uri": "s3://platform/train/demo_s2.tif",
                    "label_uri": "s3://platform/train/demo_s2_labels.tif",
                }
            ],
            "work_uri": "s3://platform/work",
            "chip": {"tile_x": 32, "tile_y": 32, "step_x": 32, "step_y": 32, "min_coverage": 40},
            "split": {
                "train_percent": 70,
                "validation_percent": 15,
                "test_percent": 15,
                "scaler": 10000,
            },
            "train": {
                "epochs": 2,
                "batch_size": 16,
                "device": "cpu",
                "min_chips_per_epoch": PLATFORM_EPOCH_CHIPS,
            },
        }
    }
    created = _trigger(platform["api"], "training-pipeline/training-pipeline", params)
    assert created.status_code == 201, created.text
    client = mlflow.MlflowClient(tracking_uri=platform["tracking"])

    def while_waiting(paused: dict) -> None:
        """The decision on one screen: the version's description holds the figures, the
        parent run says that it waits.
        """
        version = client.get_model_version("specdeepmap-segmentation", "1")
        assert "RandomForest" in version.description
        assert "waiting for a reviewer" in version.description
        waiting = _patient(
            lambda: _API.post(
                f"{platform['api']}/flow_runs/filter",
                timeout=30,
                json={"flow_runs": {"name": {"like_": "waiting for a review"}}},
            )
        )
        assert [r["id"] for r in waiting.json()] == [created.json()["id"]]
        run = client.get_run(version.run_id)
        _look_as_a_reviewer(platform, paused, version.run_id, run.info.experiment_id)

    # the deployment asks for approval: the reviewer approves in the run's form
    _review(
        platform["api"],
        {"decision": "approve", "reviewer": "rita", "comment": "first model"},
        check=while_waiting,
    )
    run = _wait_run(platform["api"], created.json()["id"])
    assert run["state"]["type"] == "COMPLETED", run["state"]
    assert "waiting for a review" not in run["name"]  # its own name again once answered

    assert storage.exists("s3://platform/work/chips/train_files.csv")
    assert storage.exists("s3://platform/work/evaluation/v1/test_iou.csv")
    version = client.get_model_version("specdeepmap-segmentation", "1")
    assert "test_mean_iou" in version.tags and "RandomForest" in version.description
    assert version.tags["champion_by"] == "rita"
    assert version.tags["champion_comment"] == "first model"
    champion = client.get_model_version_by_alias("specdeepmap-segmentation", "champion")
    assert champion.version == "1"
    # the model card is in the run's artifacts, the run links back to its flow run
    cards = [a.path for a in client.list_artifacts(champion.run_id, "model_card")]
    assert "model_card/model_card.md" in cards and "model_card/prediction_panels.png" in cards
    tags = client.get_run(champion.run_id).data.tags
    assert tags["mlflow.source.name"] == "prefect flow train" and "prefect.flow_run_id" in tags
    metrics = client.get_run(champion.run_id).data.metrics
    assert {"val_iou", "train_loss", "test_mean_iou"} <= set(metrics)
    # the model's artifacts went through the tracking server into the bucket
    fs, _ = storage.filesystem("s3://platform")
    assert any(p.endswith("/model.pt") for p in fs.find("platform/mlflow"))

    storage.upload(scene.image_uri, "s3://platform/scenes/new_scene.tif")
    created = _trigger(platform["api"], "scheduled-mapping/scheduled-mapping", {})
    assert created.status_code == 201, created.text
    run = _wait_run(platform["api"], created.json()["id"])
    assert run["state"]["type"] == "COMPLETED", run["state"]
    with (
        storage.open_raster("s3://platform/maps/new_scene_classes.tif") as out,
        storage.open_raster(scene.image_uri) as src,
    ):
        assert (out.crs, out.transform, out.shape) == (src.crs, src.transform, src.shape)
        assert set(np.unique(out.read(1))) <= set(range(7))
    # (a second scheduled run maps nothing again: tests/test_flows.py checks it in-process)
    # the map is published as a STAC item, listed in the output prefix's catalog
    item = json.loads(storage.read_text("s3://platform/maps/new_scene_classes.json"))
    assert item["assets"]["classes"]["href"] == "new_scene_classes.tif"
    assert "new_scene_classes.json" in storage.read_text("s3://platform/maps/catalog.json")

    # event-driven: an upstream system announces a scene; the trigger maps it at once
    storage.upload(scene.image_uri, "s3://platform/arrivals/announced.tif")
    _emit(
        platform["api"],
        "specdeepmap.scene.arrived",
        "specdeepmap.scene.announced",
        {"scene_uri": "s3://platform/arrivals/announced.tif"},
    )
    run = _wait_deployment_run(platform["api"], "map/map-on-arrival")
    assert run["state"]["type"] == "COMPLETED", run["state"]
    assert run["parameters"]["params"]["scenes"] == ["s3://platform/arrivals/announced.tif"]
    assert storage.exists("s3://platform/maps/announced_classes.tif")

    # a scene whose numbers changed (+1000 on every band): mapped, but quarantined, kept out of
    # the catalog, announced by the event specdeepmap.map.suspect, whose automation asks for a
    # review; the verdict of every scene is charted in the version's monitoring run
    shifted = tmp_path / "shifted.tif"
    with rasterio.open(scene.image_uri) as src:
        profile, pixels = src.profile, src.read()
    with rasterio.open(shifted, "w", **profile) as dst:
        dst.write(np.clip(pixels.astype(np.int64) + 1000, 0, 65535).astype(pixels.dtype))
    storage.upload(str(shifted), "s3://platform/arrivals/shifted.tif")
    _emit(
        platform["api"],
        "specdeepmap.scene.arrived",
        "specdeepmap.scene.shifted",
        {"scene_uri": "s3://platform/arrivals/shifted.tif"},
    )
    review = _wait_deployment_run(platform["api"], "suspect-map/suspect-map-review")
    assert review["state"]["type"] == "COMPLETED", review["state"]
    held = "s3://platform/maps/quarantine/shifted_classes.tif"
    assert review["parameters"]["map_uri"] == held
    assert "shifted by +" in review["parameters"]["reasons"]
    assert storage.exists(held) and not storage.exists("s3://platform/maps/shifted_classes.tif")
    item = json.loads(storage.read_text("s3://platform/maps/quarantine/shifted_classes.json"))
    assert item["properties"]["specdeepmap:quality"]["verdict"] == "suspect"
    assert "shifted_classes" not in storage.read_text("s3://platform/maps/catalog.json")
    # the map flow emits the suspect event from its scene's task and charts the scenes in its
    # last task, so the review can finish before the shifted scene's step is logged: wait
    deadline, suspect = time.time() + 120, []
    while len(suspect) < 3 and time.time() < deadline:
        monitoring = client.search_runs(
            [client.get_experiment_by_name("specdeepmap-monitoring").experiment_id],
            filter_string="tags.`specdeepmap.model` = 'models:/specdeepmap-segmentation/1'",
        )
        suspect = client.get_metric_history(monitoring[0].info.run_id, "suspect")
        time.sleep(0 if len(suspect) >= 3 else 1)
    assert sorted(m.value for m in suspect) == [0.0, 0.0, 1.0]  # new_scene, announced, shifted


def test_the_documented_event_command_is_accepted(platform):
    """infrastructure/README.md's curl as an operator pastes it (another event name, so that
    nothing is mapped): accepted with the stack's credentials, refused without them.
    """
    import textwrap

    text = (REPO / "infrastructure" / "README.md").read_text()
    block = textwrap.dedent(text[text.index("    curl -fsS") :].split("\n\n")[0])
    command = block.replace("specdeepmap.scene.arrived", "specdeepmap.test.ping")
    for auth, accepted in ((f"admin:{platform['secrets']['prefect']}", True), ("admin:no", False)):
        env = {
            "PATH": os.environ["PATH"],
            "PREFECT_API_URL": platform["api"],
            "PREFECT_API_AUTH_STRING": auth,
        }
        done = subprocess.run(
            ["bash", "-c", command], env=env, capture_output=True, text=True, timeout=60
        )
        assert (done.returncode == 0) is accepted, done.stderr


def test_bad_parameters_are_rejected_by_the_api(platform):
    bad = {
        "params": {
            "scenes": [{"image_uri": "a.tif", "label_uri": "b.tif"}],
            "work_uri": "w",
            "train": {"epochs": 0},
        }
    }
    created = _trigger(platform["api"], "training-pipeline/training-pipeline", bad)
    assert created.status_code in (409, 422), created.text
    assert "epochs" in created.text


def test_a_lost_worker_does_not_lose_the_training(platform, tmp_path):
    """The worker (and the flow run it started) is killed mid-training, as when its machine
    is lost; a new worker picks up the restarted flow run, which continues the training from
    its last checkpoint in object storage: one MLflow run, one registered version.
    """
    import signal

    import mlflow

    from specdeepmap.sample_data import generate_scene

    scene = generate_scene(str(tmp_path / "scene"), 320, 320, seed=12, field_size=48)
    storage.upload(scene.image_uri, "s3://platform/lost/image.tif")
    storage.upload(scene.label_uri, "s3://platform/lost/labels.tif")
    params = {
        "promotion": "auto",
        "params": {
            "scenes": [
                {
                    "image_uri": "s3://platform/lost/image.tif",
                    "label_uri": "s3://platform/lost/labels.tif",
                }
            ],
            "work_uri": "s3://platform/lost-work",
            "model_name": "survivor",
            "chip": {"tile_x": 32, "tile_y": 32, "step_x": 32, "step_y": 32, "min_coverage": 40},
            "split": {
                "train_percent": 70,
                "validation_percent": 15,
                "test_percent": 15,
                "scaler": 10000,
            },
            "train": {
                "epochs": 6,
                "batch_size": 8,
                "device": "cpu",
                "early_stopping": False,
                "baseline": False,
            },
        },
    }
    created = _trigger(platform["api"], "training-pipeline/training-pipeline", params)
    assert created.status_code == 201, created.text
    run_id = created.json()["id"]
    state = f"s3://platform/lost-work/checkpoints/{run_id}/resume.json"
    deadline = time.time() + 400
    while not (storage.exists(state) and json.loads(storage.read_text(state))["epoch"] >= 1):
        assert time.time() < deadline, "no checkpoint in object storage"
        time.sleep(0.5)
    for worker in platform["worker"]:
        os.killpg(worker.pid, signal.SIGKILL)  # the worker and its flow-run process
    killed_at = json.loads(storage.read_text(state))
    # the server notices the lost worker and marks its run crashed ...
    deadline = time.time() + 120
    while (
        _patient(lambda: _API.get(f"{platform['api']}/flow_runs/{run_id}", timeout=30)).json()[
            "state"
        ]["type"]
        != "CRASHED"
    ):
        assert time.time() < deadline, "the lost worker's run was never marked crashed"
        time.sleep(1)
    # ... the operator (or an automation) reschedules it; a new worker takes it
    response = _patient(
        lambda: _API.post(
            f"{platform['api']}/flow_runs/{run_id}/set_state",
            timeout=30,
            json={"state": {"type": "SCHEDULED", "name": "Scheduled"}, "force": True},
        )
    )
    assert response.status_code < 300, response.text
    rescheduled = response.json()["state"]["timestamp"]
    platform["worker"][:] = [platform["start_worker"]()]
    deadline = time.time() + 420
    while (run := _wait_run(platform["api"], run_id, deadline - time.time()))["state"][
        "type"
    ] == "CRASHED" and run["state"]["timestamp"] < rescheduled:
        time.sleep(1)  # the crash recorded before the reschedule
    assert run["state"]["type"] == "COMPLETED", run["state"]

    client = mlflow.MlflowClient(tracking_uri=platform["tracking"])
    versions = client.search_model_versions("name='survivor'")
    assert len(versions) == 1
    history = client.get_metric_history(versions[0].run_id, "val_iou")
    assert versions[0].run_id == killed_at["mlflow_run_id"]  # the same MLflow run
    assert 6 <= len(history) <= 7  # each epoch once (not again from epoch 0)


def test_secrets_reach_no_output(platform):
    """After the whole pipeline ran through the deployments with authentication on, none of
    the services' secrets (Prefect's auth string, MLflow's password, the S3 secret key, Flask's
    key) is in any output: the runs folder, the service logs, MLflow's and Prefect's
    databases (parameters, tags, artifacts' metadata, flow-run parameters, Prefect artifacts),
    or any object in the bucket (MLflow artifacts, chips, maps and their tags).
    """
    import boto3

    assert _API.get(f"{platform['api']}/flows/filter", auth=None).status_code == 401
    secrets = {name: value.encode() for name, value in platform["secrets"].items()}
    found = [
        f"{path}: {name}"
        for path in platform["root"].rglob("*")
        if path.is_file()
        for name, secret in secrets.items()
        if secret in path.read_bytes()
    ]
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    keys = [
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket="platform")
        for o in page.get("Contents", [])
    ]
    assert len(keys) > 20  # chips, models, maps: the pipeline did write
    for key in keys:
        body = s3.get_object(Bucket="platform", Key=key)["Body"].read()
        found += [
            f"s3://platform/{key}: {name}" for name, secret in secrets.items() if secret in body
        ]
    assert not found
