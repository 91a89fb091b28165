"""Quality masks and the per-scene drift verdict: real Sentinel-2 halves and shifted copies,
a generated SCL raster, the mapper and the CLI.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
from rasterio.transform import Affine
from typer.testing import CliRunner

from specdeepmap.cli import app
from specdeepmap.drift import (
    THRESHOLDS,
    OutputStatistics,
    SceneStatistics,
    js_divergence,
    judge,
)
from specdeepmap.errors import InputMismatchError, InvalidParameterError
from specdeepmap.mapping import map_scene
from specdeepmap.masks import QualityMask
from specdeepmap.params import MapParams
from tests.conftest import write_raster

runner = CliRunner()
S2 = "s2l1c_brandenburg_osm/s2l1c_T33UUU_20170216_13b_10m.tif"


@pytest.fixture(scope="module")
def s2_halves(shared_data):
    """The shared Sentinel-2 scene's west half as training statistics, its east half raw."""
    with rasterio.open(shared_data / S2) as src:
        pixels = src.read().astype(np.float64)
    width = pixels.shape[2]
    west = pixels[:, :, : width // 2].reshape(13, -1) / 10000
    normalization = {"mean": west.mean(1).tolist(), "std": west.std(1).tolist()}
    return normalization, pixels[:, :, width // 2 :]


def _verdict(normalization: dict, scene: np.ndarray):
    stats = SceneStatistics(scene.shape[0], 10000)
    stats.add(scene.reshape(scene.shape[0], -1))
    return judge(stats, OutputStatistics(2), normalization, None)


def test_the_other_half_of_a_real_scene_is_ok(s2_halves):
    config, east = s2_halves
    verdict = _verdict(config, east)
    assert verdict.status == "ok" and verdict.reasons == []
    assert verdict.scores["median_band_shift"] < THRESHOLDS["median_band_shift"] / 2
    assert 0.9 < verdict.scores["gain"] < 1.2 and abs(verdict.scores["offset"]) < 0.1


def test_an_offset_a_gain_and_unscaled_reflectance_are_suspect(s2_halves):
    config, east = s2_halves
    offset = _verdict(config, east + 1000)
    assert offset.suspect and "bands 1–13 are shifted by +1" in offset.reasons[0]
    assert offset.scores["gain"] == pytest.approx(_verdict(config, east).scores["gain"])
    doubled = _verdict(config, east * 2)
    assert doubled.suspect and "scaled by 2.1" in doubled.reasons[0]
    reflectance = _verdict(config, east / 10000)  # 0-1 where the model expects × 10 000
    assert reflectance.suspect and "scaled by 0.0001" in reflectance.reasons[0]


def test_js_divergence_bounds_and_output_drift():
    assert js_divergence([1, 0], [1, 0]) == 0
    assert js_divergence([1, 0], [0, 1]) == pytest.approx(1.0)
    assert js_divergence([0.5, 0.5], [1, 0]) == pytest.approx(0.311, abs=1e-3)
    reference = {"class_shares": [0.5, 0.3, 0.2], "low_confidence_share": 0.1}
    same = OutputStatistics(3)
    index = np.repeat([0, 1, 2], [50, 30, 20]).reshape(10, 10)
    same.add(index, np.full((10, 10), 0.9), np.ones((10, 10), bool))
    assert judge(SceneStatistics(1), same, {}, reference).status == "ok"
    drifted = OutputStatistics(3)
    drifted.add(np.full((10, 10), 2), np.full((10, 10), 0.4), np.ones((10, 10), bool))
    verdict = judge(SceneStatistics(1), drifted, {}, reference)
    assert verdict.suspect and len(verdict.reasons) == 2
    assert "100% of pixels below 0.5 confidence; 10% on the validation chips" in verdict.reasons


def _scl(dataset, tmp_path, values: dict, crs="EPSG:32633", shift=0.0, name="scl") -> str:
    """An SCL-like uint8 raster at twice the scene's pixel size over its extent; ``values``:
    value → (row slice, col slice) in SCL pixels.
    """
    with rasterio.open(dataset / "scene" / "demo_s2.tif") as src:
        t, height, width = src.transform, src.height, src.width
    scl = np.full((height // 2, width // 2), 4, np.uint8)  # 4: vegetation
    for value, (rows, cols) in values.items():
        scl[rows, cols] = value
    transform = Affine(t.a * 2, 0, t.c + shift, 0, t.e * 2, t.f)
    path = tmp_path / f"{name}.tif"
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=width // 2,
        height=height // 2,
        count=1,
        dtype="uint8",
        crs=crs,
        transform=transform,
    ) as dst:
        dst.write(scl, 1)
    return str(path)


def test_masked_pixels_get_their_own_value_name_and_colour(trained, dataset, tmp_path):
    _, result = trained
    scene = str(dataset / "scene" / "demo_s2.tif")
    mask_uri = _scl(
        dataset, tmp_path, {9: (slice(0, 48), slice(0, 96)), 3: (slice(150, 160), slice(0, 10))}
    )
    out = tmp_path / "map.tif"
    report = map_scene(
        scene,
        result.model_file,
        str(out),
        MapParams(device="cpu", mask_preset="s2-scl"),
        mask=MapParams(mask_preset="s2-scl").quality_mask([mask_uri]),
    )
    with rasterio.open(out) as dst:
        classes = dst.read(1)
        colormap = dst.colormap(1)
    assert np.all(classes[:96, :192] == 255)  # the cloud, resampled nearest to 10 m
    assert np.all(classes[300:320, :20] == 255)  # the shadow
    assert not np.any(classes[100:290] == 255)
    assert colormap[255][:3] == (200, 200, 200)
    names = (tmp_path / "map.tif.aux.xml").read_text()
    assert "masked: cloud / shadow / cirrus / snow" in names
    assert "masked: cloud" in (tmp_path / "map.qml").read_text()
    assert np.count_nonzero(classes == 255) == 96 * 192 + 20 * 20
    expected = (96 * 192 + 20 * 20) / np.count_nonzero(classes)  # of the pixels with data
    assert report.masked_share == pytest.approx(expected, rel=1e-6)
    quality = json.loads((tmp_path / "map_quality.json").read_text())
    assert quality["masked_value"] == 255
    assert quality["masked_share"] == pytest.approx(expected, abs=1e-6)
    assert quality["verdict"] == report.verdict.status


def test_the_trained_model_carries_its_reference_and_its_own_scene_is_ok(
    trained, dataset, tmp_path
):
    import torch

    _, result = trained
    config = torch.load(result.model_file, weights_only=True)["config"]
    reference = config["reference"]
    assert sum(reference["class_shares"]) == pytest.approx(1.0, abs=1e-4)
    assert len(reference["class_shares"]) == len(config["class_values"])
    done = runner.invoke(
        app,
        [
            "map",
            str(dataset / "scene" / "demo_s2.tif"),
            result.model_file,
            str(tmp_path / "m.tif"),
            "--device",
            "cpu",
            "--fail-on-suspect",
        ],
    )
    assert done.exit_code == 0, done.output
    assert "verdict ok" in done.output


def test_a_shifted_scene_is_suspect_on_the_command_line(trained, dataset, tmp_path):
    _, result = trained
    with rasterio.open(dataset / "scene" / "demo_s2.tif") as src:
        profile, pixels = src.profile, src.read()
    shifted = tmp_path / "shifted.tif"
    with rasterio.open(shifted, "w", **profile) as dst:
        dst.write(np.clip(pixels.astype(np.int64) + 1000, 0, 65535).astype(pixels.dtype))
    args = ["map", str(shifted), result.model_file, str(tmp_path / "s.tif"), "--device", "cpu"]
    done = runner.invoke(app, args)
    assert done.exit_code == 0 and "verdict suspect" in done.output, done.output
    assert "shifted by +" in done.output
    again = runner.invoke(app, [*args, "--fail-on-suspect"])
    assert again.exit_code == 3
    quality = json.loads((tmp_path / "s_quality.json").read_text())
    assert quality["verdict"] == "suspect" and quality["reasons"]


def test_bad_masks_are_refused_before_any_work(trained, dataset, tmp_path):
    _, result = trained
    scene = str(dataset / "scene" / "demo_s2.tif")
    cases = [
        (
            _scl(dataset, tmp_path, {}, crs="EPSG:32632", name="utm32"),
            "s2-scl",
            InputMismatchError,
            "CRS",
        ),
        (
            _scl(dataset, tmp_path, {}, shift=500.0, name="shifted"),
            "s2-scl",
            InputMismatchError,
            "does not hold the scene's extent",
        ),
    ]
    for mask_uri, preset, error, message in cases:
        with pytest.raises(error, match=message):
            map_scene(
                scene,
                result.model_file,
                str(tmp_path / "x.tif"),
                MapParams(device="cpu"),
                mask=QualityMask.build([mask_uri], preset),
            )
    mask_uri = _scl(dataset, tmp_path, {})
    with pytest.raises(InvalidParameterError, match="never holds the value.s. 300"):
        map_scene(
            scene,
            result.model_file,
            str(tmp_path / "x.tif"),
            MapParams(device="cpu"),
            mask=QualityMask.build([mask_uri], values=[300]),
        )
    with pytest.raises(InvalidParameterError, match="say which values flag a pixel"):
        QualityMask.build([mask_uri])
    done = runner.invoke(
        app,
        [
            "map",
            scene,
            result.model_file,
            str(tmp_path / "x.tif"),
            "--mask",
            mask_uri,
            "--mask-preset",
            "landsat",
        ],
    )
    assert done.exit_code == 2 and "landsat" in done.output
    assert not list(tmp_path.glob("x*"))


def test_an_almost_all_masked_scene_is_skipped(trained, dataset, tmp_path):
    _, result = trained
    mask_uri = _scl(dataset, tmp_path, {9: (slice(0, 192), slice(0, 192))})
    done = runner.invoke(
        app,
        [
            "map",
            str(dataset / "scene" / "demo_s2.tif"),
            result.model_file,
            str(tmp_path / "cloudy.tif"),
            "--device",
            "cpu",
            "--mask",
            mask_uri,
            "--mask-preset",
            "s2-scl",
        ],
    )
    assert done.exit_code == 0, done.output
    assert "100% of the scene is masked" in done.output
    assert not list(tmp_path.glob("cloudy*"))


def test_each_mapped_scene_is_a_step_of_the_versions_monitoring_run(trained, monkeypatch):
    import mlflow

    from specdeepmap.monitoring import EXPERIMENT, log_scenes
    from specdeepmap.publishing import SceneProducts

    config, _ = trained
    previous = mlflow.get_tracking_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", config.tracking_uri)

    def product(name: str, verdict: str, shares: list[float]) -> SceneProducts:
        scores = {"median_band_shift": 0.4, "gain": 1.02, "offset": None}
        return SceneProducts(
            name,
            f"{name}_metrics.json",
            verdict=verdict,
            masked_share=0.1,
            scores=scores,
            mean_confidence=0.8,
            class_shares=shares,
        )

    try:
        first = log_scenes("models:/test-model/1", [product("a.tif", "ok", [0.7, 0.3])], [1, 5])
        second = log_scenes(
            "models:/test-model/1",
            [
                product("b.tif", "suspect", [0.1, 0.9]),
                SceneProducts("c.tif", "c_metrics.json", skipped="masked"),
            ],
            [1, 5],
        )
        client = mlflow.MlflowClient(config.tracking_uri)
        assert first == second  # one run per model version
        history = client.get_metric_history(first, "suspect")
        assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
            (0, 0.0),
            (1, 1.0),
        ]
        shares = client.get_metric_history(first, "class_share_5")
        assert sorted(m.value for m in shares) == [0.3, 0.9]
        run = client.get_run(first)
        assert run.data.tags["scene_1"] == "b.tif" and "drift_offset" not in run.data.metrics
        assert run.data.metrics["skipped_scenes"] == 1
        assert client.get_experiment(run.info.experiment_id).name == EXPERIMENT
    finally:
        mlflow.set_tracking_uri(previous)


def test_releasing_a_map_that_is_not_in_quarantine_is_refused(tmp_path):
    from specdeepmap.errors import MissingInputError

    done = runner.invoke(
        app, ["release", str(tmp_path / "maps" / "x_classes.tif"), "--reason", "checked"]
    )
    assert done.exit_code == 2 and "No quarantined map at" in done.output
    with pytest.raises(MissingInputError, match="quarantine/x_classes.tif"):
        from specdeepmap.publishing import release

        release(str(tmp_path / "maps" / "x_classes.tif"), "rita", "checked")


def test_a_nested_mask_reads_like_gdals_nearest_resampling(tmp_path):
    """A mask whose pixels each cover 3 x 3 scene pixels, its grid one scene pixel off the
    scene's origin: read at its own resolution and repeated, it equals GDAL's warp.
    """
    from rasterio.enums import Resampling
    from rasterio.vrt import WarpedVRT

    from specdeepmap.masks import MaskReader

    scene_transform = Affine(10, 0, 330010, 0, -10, 5822000)
    scene = write_raster(
        tmp_path / "scene.tif", np.ones((1, 70, 95), np.uint16), transform=scene_transform
    )
    values = np.random.default_rng(3).integers(0, 12, (30, 40)).astype(np.uint8)
    mask = write_raster(
        tmp_path / "mask.tif", values, transform=Affine(30, 0, 330000, 0, -30, 5822020)
    )
    with rasterio.open(scene) as src, rasterio.open(mask) as m:
        with MaskReader(QualityMask.build([mask], "s2-scl"), src) as reader:
            assert reader._sources[0][0] == "nested"
            got = reader.read(40, 7, 90, 50)
        with WarpedVRT(
            m,
            crs=src.crs,
            transform=src.transform,
            width=src.width,
            height=src.height,
            resampling=Resampling.nearest,
        ) as vrt:
            expected = np.isin(vrt.read(1), (3, 8, 9, 10, 11))[40:70, 7:90]
    np.testing.assert_array_equal(got[:30], expected)
    assert expected.any() and not got[30:].any()  # beyond the scene's last row: not masked
