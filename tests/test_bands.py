"""Scenes as one file per band: stacked on the fly as a VRT at the finest resolution."""

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from typer.testing import CliRunner

from specdeepmap import storage
from specdeepmap.bands import band_files, band_name, scene_name, stack_bands
from specdeepmap.chipping import chip_scene
from specdeepmap.cli import app
from specdeepmap.errors import InputMismatchError
from specdeepmap.params import ChipParams
from tests.conftest import write_raster

ORIGIN = (330000, 5822040)


@pytest.fixture
def band_folder(tmp_path):
    """Three bands of one 640 m × 640 m scene at 10, 20 and 40 m, named like Sentinel-2."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "bands"
    folder.mkdir()
    data = {}
    for name, res in (("B04", 10), ("B05", 20), ("B01", 40)):
        size = 640 // res
        data[name] = rng.integers(100, 5000, (size, size), dtype=np.uint16)
        write_raster(
            folder / f"T33UUU_20170216T102101_{name}.tif",
            data[name],
            transform=from_origin(*ORIGIN, res, res),
        )
    return folder, data


def test_band_files_stack_at_the_finest_resolution(band_folder, tmp_path):
    folder, data = band_folder
    files = band_files(str(folder))
    assert [band_name(f) for f in files] == ["B01", "B04", "B05"]  # Sentinel-2 order
    assert scene_name(files) == "T33UUU_20170216T102101"
    vrt = stack_bands(files, str(tmp_path / "scene.vrt"), resampling="nearest")
    with rasterio.open(vrt) as src:
        assert src.shape == (64, 64) and src.count == 3 and src.res == (10.0, 10.0)
        assert src.descriptions == ("B01", "B04", "B05") and src.crs.to_epsg() == 32633
        stacked = src.read()
    np.testing.assert_array_equal(stacked[0], data["B01"].repeat(4, 0).repeat(4, 1))
    np.testing.assert_array_equal(stacked[1], data["B04"])
    np.testing.assert_array_equal(stacked[2], data["B05"].repeat(2, 0).repeat(2, 1))
    smooth = stack_bands(files, str(tmp_path / "smooth.vrt"))  # bilinear by default
    with rasterio.open(smooth) as src:
        bilinear = src.read(3).astype(float)
    assert 0 < np.abs(bilinear - stacked[2]).mean() < np.abs(np.diff(stacked[2], axis=1)).mean()


def test_chips_from_band_files_equal_chips_from_a_stacked_file(band_folder, tmp_path):
    folder, data = band_folder
    vrt = stack_bands(band_files(str(folder)), str(tmp_path / "scene.vrt"), "nearest")
    with rasterio.open(vrt) as src:
        stacked = write_raster(tmp_path / "scene.tif", src.read())
    labels = write_raster(
        tmp_path / "labels.tif", (np.arange(64 * 64).reshape(64, 64) % 3 + 1).astype(np.uint8)
    )
    params = ChipParams(tile_x=32, tile_y=32, step_x=32, step_y=32, min_coverage=0)
    chip_scene(vrt, labels, str(tmp_path / "from_vrt"), params)
    chip_scene(stacked, labels, str(tmp_path / "from_tif"), params)
    for x, y in ((0, 0), (32, 32)):
        with (
            rasterio.open(tmp_path / "from_vrt" / "images" / f"scene_tile_{x}_{y}.tif") as a,
            rasterio.open(tmp_path / "from_tif" / "images" / f"scene_tile_{x}_{y}.tif") as b,
        ):
            np.testing.assert_array_equal(a.read(), b.read())
            assert a.transform == b.transform and a.descriptions == ("B01", "B04", "B05")


def test_band_files_that_do_not_fit_are_refused(band_folder, tmp_path):
    folder, data = band_folder
    shifted = write_raster(
        tmp_path / "T33UUU_B08.tif",
        data["B04"],
        transform=from_origin(ORIGIN[0] + 100, ORIGIN[1], 10, 10),
    )
    with pytest.raises(InputMismatchError, match="T33UUU_B08.tif cover different extents"):
        stack_bands(
            [str(folder / "T33UUU_20170216T102101_B04.tif"), shifted], str(tmp_path / "x.vrt")
        )
    other = write_raster(tmp_path / "T33UUU_B09.tif", data["B04"], crs="EPSG:32632")
    with pytest.raises(InputMismatchError, match="CRS"):
        stack_bands(
            [str(folder / "T33UUU_20170216T102101_B04.tif"), other], str(tmp_path / "x.vrt")
        )
    assert not (tmp_path / "x.vrt").exists()


def test_stack_bands_command_and_s3_band_files(band_folder, s3_bucket, tmp_path):
    folder, data = band_folder
    result = CliRunner().invoke(
        app,
        [
            "stack-bands",
            str(tmp_path / "cli.vrt"),
            str(folder),
            "--order",
            "B04,B05",
            "--resampling",
            "nearest",
        ],
    )
    assert result.exit_code == 0, result.output
    with rasterio.open(tmp_path / "cli.vrt") as src:
        assert src.descriptions == ("B04", "B05")
    uris = []
    for path in sorted(folder.iterdir()):
        uris.append(f"{s3_bucket}/bands/{path.name}")
        storage.upload(str(path), uris[-1])
    vrt = stack_bands(band_files(f"{s3_bucket}/bands"), f"{s3_bucket}/scene.vrt", "nearest")
    with storage.open_raster(vrt) as src:
        np.testing.assert_array_equal(src.read(2), data["B04"])


def test_shared_sentinel2_jp2_bands_give_the_stacked_files_chips(shared_data, tmp_path):
    """The original JP2 files (10/20/60 m) stacked with nearest resampling give exactly the
    chips of the shared 10 m stack, which was made by pixel repetition (see its README).
    """
    folder = shared_data / "s2l1c_brandenburg_osm"
    vrt = stack_bands(band_files(str(folder / "original_jp2")), str(tmp_path / "s2.vrt"), "nearest")
    labels = str(folder / "osm_landuse_labels_10m.tif")
    params = ChipParams(tile_x=256, tile_y=256, step_x=256, step_y=256, min_coverage=10)
    from_jp2 = chip_scene(vrt, labels, str(tmp_path / "jp2"), params)
    from_tif = chip_scene(
        str(folder / "s2l1c_T33UUU_20170216_13b_10m.tif"), labels, str(tmp_path / "tif"), params
    )
    assert from_jp2.chips == from_tif.chips > 0
    for name in sorted(p.name for p in (tmp_path / "jp2" / "images").iterdir())[:4]:
        with (
            rasterio.open(tmp_path / "jp2" / "images" / name) as a,
            rasterio.open(
                tmp_path
                / "tif"
                / "images"
                / name.replace("s2_tile", "s2l1c_T33UUU_20170216_13b_10m_tile")
            ) as b,
        ):
            np.testing.assert_array_equal(a.read(), b.read())
            assert a.descriptions == b.descriptions


def test_a_scene_in_another_band_order_is_refused_by_name(trained, dataset, tmp_path):
    """The model knows its bands by name (B01…B12 of the demo chips): the same bands in
    another order are refused before mapping, although the band count matches.
    """
    import shutil

    from specdeepmap.mapping import map_scene
    from specdeepmap.params import MapParams

    _, result = trained
    scene = tmp_path / "reordered.tif"
    shutil.copy(dataset / "scene" / "demo_s2.tif", scene)
    with rasterio.open(scene, "r+") as dst:
        names = dst.descriptions
        for band, name in enumerate(reversed(names), start=1):
            dst.set_band_description(band, name)
    out = tmp_path / "map.tif"
    with pytest.raises(
        InputMismatchError,
        match="another order than the model: band 1 is B12, the model expects B01",
    ):
        map_scene(str(scene), result.model_file, str(out), MapParams(device="cpu"))
    assert not out.exists()


def test_chip_flow_stacks_scenes_given_as_band_files(prefect_api, band_folder, tmp_path):
    from flows.params import ScenePair
    from flows.pipelines import chip_flow
    from specdeepmap.params import ChipParams

    folder, _ = band_folder
    labels = write_raster(tmp_path / "labels.tif", np.ones((64, 64), np.uint8))
    scenes = [ScenePair(band_uris=band_files(str(folder)), label_uri=labels, resampling="nearest")]
    result = chip_flow(
        scenes, str(tmp_path / "chips"), ChipParams(tile_x=32, tile_y=32, step_x=32, step_y=32)
    )
    assert result[0]["chips"] == 4
    assert (tmp_path / "chips" / "scenes" / "T33UUU_20170216T102101.vrt").exists()
    with pytest.raises(ValueError, match="either image_uri or band_uris"):
        ScenePair(label_uri=labels)
