"""Storage: URIs, atomic writes, and a real S3 server."""

import os

import numpy as np
import pytest

from specdeepmap import storage
from specdeepmap.errors import MissingInputError, UnreadableInputError
from tests.conftest import write_raster

#: the least a model file's configuration holds (ModelConfig's required entries)
MINIMAL_CONFIG = {
    "architecture": "unet",
    "backbone": "resnet18",
    "in_channels": 1,
    "num_classes": 2,
    "class_values": [1],
    "tile_size": [32, 32],
}


def test_join_stem_parent():
    assert storage.join("s3://b/x/", "images", "a.tif") == "s3://b/x/images/a.tif"
    assert storage.stem("s3://b/scene.tiff") == "scene"
    assert storage.stem("/d/scene.bsq") == "scene"
    assert storage.parent("s3://b/x/a.tif") == "s3://b/x"
    assert storage.local_path("file:///tmp/a.tif") == "/tmp/a.tif"


def test_atomic_write_replaces_whole_file_and_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out" / "a.txt"
    storage.write_text(str(target), "first")
    assert target.read_text() == "first"
    with pytest.raises(RuntimeError):
        with storage.atomic_output(str(target)) as tmp:
            with open(tmp, "w") as handle:
                handle.write("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "first"
    assert os.listdir(target.parent) == ["a.txt"]


def test_missing_and_unreadable_rasters_are_named(tmp_path):
    with pytest.raises(MissingInputError, match="nope.tif"):
        with storage.open_raster(str(tmp_path / "nope.tif")):
            pass
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"not a tiff")
    with pytest.raises(UnreadableInputError, match="bad.tif"):
        with storage.open_raster(str(bad)):
            pass


@pytest.mark.integration
def test_s3_round_trip(s3_bucket, tmp_path):
    uri = f"{s3_bucket}/dir/hello.txt"
    storage.write_text(uri, "hello")
    assert storage.exists(uri)
    assert storage.read_text(uri) == "hello"
    assert storage.list_files(f"{s3_bucket}/dir", ".txt") == [uri]
    with pytest.raises(MissingInputError, match="missing.txt"):
        storage.read_text(f"{s3_bucket}/dir/missing.txt")

    data = np.arange(4 * 50 * 60, dtype=np.uint16).reshape(4, 50, 60)
    local = write_raster(tmp_path / "r.tif", data, nodata=0)
    storage.upload(local, f"{s3_bucket}/r.tif")
    with storage.open_raster(f"{s3_bucket}/r.tif") as src:
        window = src.read(window=((10, 20), (5, 25)))
        assert src.crs.to_epsg() == 32633 and src.nodata == 0
    np.testing.assert_array_equal(window, data[:, 10:20, 5:25])
    with pytest.raises(MissingInputError, match="absent.tif"):
        with storage.open_raster(f"{s3_bucket}/absent.tif"):
            pass
    cached = storage.cached_local_copy(f"{s3_bucket}/r.tif", str(tmp_path / "cache"))
    assert os.path.getsize(cached) == os.path.getsize(local)


def test_transient_errors_are_told_apart_from_bad_input():
    from botocore.exceptions import ClientError, EndpointConnectionError

    from specdeepmap.errors import InvalidLabelError

    def client_error(code, status):
        return ClientError(
            {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject"
        )

    assert storage.is_transient(EndpointConnectionError(endpoint_url="http://x"))
    assert storage.is_transient(client_error("SlowDown", 503))
    assert storage.is_transient(client_error("InternalError", 500))
    assert storage.is_transient(OSError("CURL error: Failed to connect to 127.0.0.1"))
    assert storage.is_transient(TimeoutError())
    assert not storage.is_transient(client_error("NoSuchKey", 404))
    assert not storage.is_transient(InvalidLabelError("bad label"))
    assert not storage.is_transient(MissingInputError("gone"))
    assert not storage.is_transient(TypeError("a bug"))
    assert not storage.is_transient(UnreadableInputError("not a raster"))


@pytest.mark.integration
def test_a_model_replaced_under_the_same_key_is_fetched_again(s3_bucket, tmp_path, monkeypatch):
    """The model cache keys on the object's ETag, lives in a private folder, and keeps every
    cached file inside it whatever the key.
    """
    import stat

    import torch

    from specdeepmap.errors import InvalidParameterError
    from specdeepmap.inference import MODEL_FORMAT, read_model_file

    monkeypatch.setenv("SPECDEEPMAP_CACHE", str(tmp_path / "cache"))
    uri = f"{s3_bucket}/models/model.pt"
    for run in ("first", "second"):
        local = tmp_path / f"{run}.pt"
        config = {**MINIMAL_CONFIG, "run_id": run}
        torch.save({"format": MODEL_FORMAT, "config": config, "state_dict": {}}, local)
        storage.upload(str(local), uri)
        config, _ = read_model_file(uri)
        assert config.run_id == run  # not the first download again
    folder = tmp_path / "cache" / "models"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert len(list(folder.iterdir())) == 2
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in folder.iterdir())
    # a key with ".." parts is cached inside the cache folder all the same
    storage.write_text(f"{s3_bucket}/a/../../escape.txt", "x")
    cached = storage.cached_local_copy(f"{s3_bucket}/a/../../escape.txt", str(tmp_path / "c"))
    assert os.path.commonpath([cached, str(tmp_path / "c")]) == str(tmp_path / "c")
    # a cache folder others may write to is refused
    os.chmod(tmp_path / "cache", 0o777)
    with pytest.raises(InvalidParameterError, match="not private"):
        storage.private_cache_dir("models")
