"""Shared fixtures: small georeferenced rasters, a real S3 server, the shared real data."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

REPO = Path(__file__).resolve().parents[1]
#: chips an epoch draws at least in tests of the platform (flows, deployments, DDP, foreign
#: networks), not of the recipe: the default 256 is for a network's quality on a small set
#: (docs/recipe.md, experiment 15), and these tests only need training to run and finish
PLATFORM_EPOCH_CHIPS = 64
# the private cache (ONNX exports, OpenVINO int8 networks) of this test session, not the
# user's ~/.cache: every session starts without one
os.environ.setdefault("SPECDEEPMAP_CACHE", tempfile.mkdtemp(prefix="specdeepmap-test-cache-"))
SHARED_DATA = Path(os.environ.get("SPECDEEPMAP_SHARED_DATA", REPO.parent / "shared" / "data"))
UTM33 = "EPSG:32633"


#: fixtures that start a real service: a test using one is marked ``integration``, so that
#: ``make test-fast`` (``-m "not integration and not slow"``) never waits for a server
SERVICE_FIXTURES = {"s3_server", "s3_bucket", "prefect_api", "platform", "stack"}


def pytest_collection_modifyitems(config, items):
    """Mark every test that uses a service fixture as ``integration``."""
    for item in items:
        if SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


def write_raster(path, array, crs=UTM33, transform=None, nodata=None, **extra) -> str:
    """Write a (bands, rows, cols) or (rows, cols) array as a GeoTIFF and return its path."""
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[None]
    transform = transform or from_origin(330000, 5822040, 10, 10)
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=array.shape[2],
        height=array.shape[1],
        count=array.shape[0],
        dtype=array.dtype,
        crs=crs,
        transform=transform,
        nodata=nodata,
        **extra,
    ) as dst:
        dst.write(array)
    return str(path)


@pytest.fixture
def small_scene(tmp_path):
    """A 13-band 300 x 260 demo scene (odd size, nodata strip, unlabelled fields)."""
    from specdeepmap.sample_data import generate_scene

    return generate_scene(str(tmp_path / "scene"), width=300, height=260, seed=3, field_size=40)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto in server mode) on a free loopback port.

    Runs as a separate process: GDAL's writes hang against moto inside the test process. Sets
    the same environment variables a user sets for MinIO or AWS.
    """
    port = _free_port()
    exe = Path(sys.executable).with_name("moto_server")
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"moto-{port}.log", "w")
    proc = subprocess.Popen(
        [str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT
    )
    endpoint = f"http://127.0.0.1:{port}"
    saved = {
        k: os.environ.get(k)
        for k in (
            "AWS_ENDPOINT_URL",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_DEFAULT_REGION",
        )
    }
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    deadline = time.time() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError as error:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError(f"moto_server did not start on port {port}") from error
            time.sleep(0.2)
    yield endpoint
    proc.terminate()
    proc.wait(10)
    log.close()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket on the S3 server; yields its ``s3://`` URI."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data; skipped when absent, except under CI=true where absence fails."""
    if not SHARED_DATA.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"shared data folder {SHARED_DATA} is missing in CI")
        pytest.skip(f"real data folder {SHARED_DATA} not present on this machine")
    return SHARED_DATA


@pytest.fixture(scope="session")
def enmap_folder(shared_data) -> Path:
    """The real EnMAP Potsdam chips (224 bands) and SpecDeepMap's CSVs for them."""
    folder = shared_data / "enmap_potsdam"
    if not folder.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{folder} is missing in CI")
        pytest.skip(f"{folder} not present")
    return folder


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    """A 384² demo scene chipped into 32 px chips and split 70/15/15 (scaler 10000)."""
    from specdeepmap.chipping import chip_scene
    from specdeepmap.params import ChipParams, SplitParams
    from specdeepmap.sample_data import generate_scene
    from specdeepmap.splitting import make_dataset

    root = tmp_path_factory.mktemp("train")
    scene = generate_scene(str(root / "scene"), 384, 384, seed=5, field_size=48)
    chip_scene(
        scene.image_uri,
        scene.label_uri,
        str(root / "chips"),
        ChipParams(tile_x=32, tile_y=32, step_x=32, step_y=32, min_coverage=40),
    )
    make_dataset(
        str(root / "chips"),
        SplitParams(train_percent=70, validation_percent=15, test_percent=15, scaler=10000),
    )
    return root


@pytest.fixture(scope="session")
def trained(dataset):
    """A tiny U-Net trained for 2 short epochs, registered as 'test-model' in SQLite MLflow."""
    from specdeepmap.training import TrainConfig, train

    config = TrainConfig(
        dataset=str(dataset / "chips"),
        out=str(dataset / "run"),
        epochs=4,
        batch_size=8,
        device="cpu",
        keep_top_k=-1,
        tracking_uri=f"sqlite:///{dataset}/mlflow.db",
        registered_model="test-model",
    )
    return config, train(config)


@pytest.fixture(scope="session")
def prefect_api():
    """One temporary Prefect API (SQLite) for the whole session: it takes 8-15 s to start."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def gdal_category_names(path: str) -> list[str]:
    """Band 1's category names as GDAL itself reads them (through the libgdal that rasterio
    ships; rasterio has no API for them). GDAL's GTiff driver loads the ``.aux.xml`` sidecar
    lazily, so the band's metadata is asked for first.
    """
    import ctypes
    import glob
    import os

    import rasterio

    found = glob.glob(
        os.path.join(os.path.dirname(rasterio.__file__), os.pardir, "rasterio.libs", "libgdal*")
    )
    if not found:
        pytest.skip("rasterio's libgdal was not found (not a manylinux wheel)")
    lib = ctypes.CDLL(found[0])
    lib.GDALAllRegister()
    lib.GDALOpen.restype = ctypes.c_void_p
    lib.GDALOpen.argtypes = [ctypes.c_char_p, ctypes.c_int]
    lib.GDALGetRasterBand.restype = ctypes.c_void_p
    lib.GDALGetRasterBand.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.GDALGetMetadata.restype = ctypes.c_void_p
    lib.GDALGetMetadata.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.GDALGetRasterCategoryNames.restype = ctypes.POINTER(ctypes.c_char_p)
    lib.GDALGetRasterCategoryNames.argtypes = [ctypes.c_void_p]
    lib.GDALClose.argtypes = [ctypes.c_void_p]
    dataset = lib.GDALOpen(path.encode(), 0)
    assert dataset, f"GDAL cannot open {path}"
    band = lib.GDALGetRasterBand(dataset, 1)
    lib.GDALGetMetadata(band, None)
    names, i = lib.GDALGetRasterCategoryNames(band), 0
    out = []
    while names and names[i] is not None:
        out.append(names[i].decode())
        i += 1
    lib.GDALClose(dataset)
    return out
