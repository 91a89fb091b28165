"""The offline cloud detector (s2cloudless) on the real Sentinel-2 L1C scene, on a generated
scene with a painted cloud through the mapper and the CLI, and its refusals.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import rasterio
from rasterio.enums import Resampling
from typer.testing import CliRunner

from specdeepmap.cli import app
from specdeepmap.clouds import AVERAGE_OVER, DILATION_SIZE, detect_clouds
from specdeepmap.errors import InputMismatchError, InvalidParameterError
from specdeepmap.mapping import map_scene
from specdeepmap.masks import QualityMask
from specdeepmap.params import MapParams
from tests.conftest import write_raster

runner = CliRunner()
S2 = "s2l1c_brandenburg_osm/s2l1c_T33UUU_20170216_13b_10m.tif"
#: a thick cloud's top-of-atmosphere spectrum (reflectance × 10 000, B01…B12): bright and
#: flat from blue to near infrared, some cirrus-band signal
THICK_CLOUD = (5000, 4800, 4700, 4700, 4800, 4900, 5000, 5000, 5000, 2000, 300, 3500, 2500)


def test_the_real_scenes_haze_is_found_and_is_brighter_than_the_clear_land(shared_data, tmp_path):
    """The February scene has thin cloud across its middle (its README): the detector flags
    part of it, and what it flags is brighter in the blue band than what it leaves.
    """
    with rasterio.open(shared_data / S2) as src:
        clouds = detect_clouds(src, S2, str(tmp_path / "clouds.tif"))
        with rasterio.open(clouds.path) as mask_src:
            mask = mask_src.read(1)
            assert mask_src.transform.a == 120 and mask_src.crs == src.crs
            assert mask_src.bounds == src.bounds  # 1536 x 768 px: 128 x 64 cells of 12 x 12
        blue = src.read(2, out_shape=mask.shape, resampling=Resampling.average)
    assert 0.05 < clouds.share < 0.5
    assert clouds.share == pytest.approx(mask.mean())
    assert blue[mask == 1].mean() > 1.1 * blue[mask == 0].mean()
    # a lower threshold masks more
    with rasterio.open(shared_data / S2) as src:
        more = detect_clouds(src, S2, str(tmp_path / "more.tif"), threshold=0.2)
    assert more.share > clouds.share


def _cloudy_scene(dataset, tmp_path) -> str:
    """The demo scene with a thick cloud painted over rows 120-239, columns 60-179."""
    with rasterio.open(dataset / "scene" / "demo_s2.tif") as src:
        image, profile, names = src.read(), src.profile, src.descriptions
    image[:, 120:240, 60:180] = np.array(THICK_CLOUD, image.dtype)[:, None, None]
    path = tmp_path / "cloudy.tif"
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(image)
        dst.descriptions = names
    return str(path)


def test_a_painted_cloud_is_masked_in_the_map(trained, dataset, tmp_path):
    _, result = trained
    scene = _cloudy_scene(dataset, tmp_path)
    out = tmp_path / "map.tif"
    report = map_scene(
        scene, result.model_file, str(out), MapParams(device="cpu", cloud_mask="s2cloudless")
    )
    with rasterio.open(out) as dst:
        classes = dst.read(1)
    masked = classes == 255
    assert masked[120:240, 60:180].all()  # the cloud
    # smoothing and dilation reach a few 120 m cells (12 px) beyond it, no further
    reach = 12 * (AVERAGE_OVER + DILATION_SIZE + 1)
    far = np.ones_like(masked)
    far[120 - reach : 240 + reach, 60 - reach : 180 + reach] = False
    assert not masked[far].any()
    assert report.masked_share == pytest.approx(masked.sum() / np.count_nonzero(classes))
    quality = json.loads((tmp_path / "map_quality.json").read_text())
    assert quality["mask"]["detector"] == "s2cloudless, threshold 0.4"
    assert quality["masked_share"] == pytest.approx(report.masked_share, abs=1e-6)
    assert "masked: cloud (s2cloudless" in (tmp_path / "map.tif.aux.xml").read_text()
    assert not list(tmp_path.glob("*clouds*"))  # the detector's mask was temporary


def test_a_scenes_own_mask_wins_and_the_cli_takes_the_detector(trained, dataset, tmp_path):
    _, result = trained
    scene = _cloudy_scene(dataset, tmp_path)
    own = np.zeros((384, 384), np.uint8)
    own[:10, :10] = 1
    own_uri = write_raster(tmp_path / "own.tif", own)
    map_scene(
        scene,
        result.model_file,
        str(tmp_path / "own_map.tif"),
        MapParams(device="cpu", cloud_mask="s2cloudless"),
        mask=QualityMask.build([own_uri], "binary"),
    )
    quality = json.loads((tmp_path / "own_map_quality.json").read_text())
    assert quality["mask"]["uris"] == [own_uri]
    with rasterio.open(tmp_path / "own_map.tif") as dst:
        assert not (dst.read(1)[120:240, 60:180] == 255).any()  # the detector did not run
    done = runner.invoke(
        app,
        [
            "map",
            scene,
            result.model_file,
            str(tmp_path / "cli.tif"),
            "--device",
            "cpu",
            "--cloud-mask",
            "s2cloudless",
            "--cloud-threshold",
            "0.3",
        ],
    )
    assert done.exit_code == 0, done.output
    assert "masked:" in done.output
    quality = json.loads((tmp_path / "cli_quality.json").read_text())
    assert quality["mask"]["detector"] == "s2cloudless, threshold 0.3"


def test_a_scene_without_the_l1c_bands_or_without_the_package_is_refused(
    trained, dataset, tmp_path, monkeypatch
):
    _, result = trained
    four = write_raster(tmp_path / "four.tif", np.full((4, 64, 64), 1000, np.uint16))
    with rasterio.open(four) as src, pytest.raises(InputMismatchError, match="four.tif.*B8A"):
        detect_clouds(src, four, str(tmp_path / "c.tif"))
    assert not (tmp_path / "c.tif").exists()
    monkeypatch.setitem(sys.modules, "s2cloudless", None)  # as if not installed
    with pytest.raises(InvalidParameterError, match="specdeepmap\\[cloud\\]"):
        map_scene(
            str(dataset / "scene" / "demo_s2.tif"),
            result.model_file,
            str(tmp_path / "x.tif"),
            MapParams(device="cpu", cloud_mask="s2cloudless"),
        )
    done = runner.invoke(
        app,
        [
            "map",
            str(dataset / "scene" / "demo_s2.tif"),
            result.model_file,
            str(tmp_path / "x.tif"),
            "--cloud-mask",
            "fmask",
        ],
    )
    assert done.exit_code == 2 and "fmask" in done.output
    assert not list(tmp_path.glob("x*"))
