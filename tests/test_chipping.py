"""Raster Splitter: layout, semantics, validation, resumption and S3."""

import os

import numpy as np
import pandas as pd
import pytest
import rasterio
from rasterio.transform import from_origin

from specdeepmap import chipping, storage
from specdeepmap.chipping import chip_scene
from specdeepmap.errors import InputMismatchError, InvalidLabelError, InvalidParameterError
from specdeepmap.params import ChipParams
from tests.conftest import write_raster


def _expected_chips(image_path, label_path, tile, stride, coverage):
    """Chips computed independently from whole arrays (fine for tiny test rasters)."""
    with rasterio.open(image_path) as img, rasterio.open(label_path) as lab:
        pixels, labels, nodata = img.read(), lab.read(1).astype(np.uint8), img.nodata
    if nodata is not None:
        labels[np.all(pixels == nodata, axis=0)] = 0
    h, w = labels.shape
    expected = {}
    for y in range(0, h, stride):
        for x in range(0, w, stride):
            chip = np.zeros((tile, tile), np.uint8)
            part = labels[y : y + tile, x : x + tile]
            chip[: part.shape[0], : part.shape[1]] = part
            if (chip != 0).mean() * 100 >= coverage:
                expected[f"scene_tile_{x}_{y}.tif"] = chip
    return expected


def test_chips_match_independent_computation(small_scene, tmp_path):
    out = tmp_path / "chips"
    report = chip_scene(
        small_scene.image_uri,
        small_scene.label_uri,
        str(out),
        ChipParams(tile_x=64, tile_y=64, step_x=48, step_y=48, min_coverage=30),
    )
    expected = _expected_chips(small_scene.image_uri, small_scene.label_uri, 64, 48, 30)
    expected = {k.replace("scene_", "demo_s2_"): v for k, v in expected.items()}
    assert sorted(os.listdir(out / "images")) == sorted(expected)
    assert sorted(os.listdir(out / "labels")) == sorted(expected)
    assert report.written == len(expected) and report.windows == 7 * 6
    for name, chip in expected.items():
        with rasterio.open(out / "labels" / name) as lab:
            np.testing.assert_array_equal(lab.read(1), chip)
            assert lab.dtypes[0] == "uint8"


def test_chip_georeferencing_padding_and_nodata(small_scene, tmp_path):
    out = tmp_path / "chips"
    chip_scene(
        small_scene.image_uri,
        small_scene.label_uri,
        str(out),
        ChipParams(tile_x=128, tile_y=128, step_x=128, step_y=128, min_coverage=0),
    )
    with rasterio.open(small_scene.image_uri) as src:
        scene = src.read()
        scene_transform, crs, descriptions = src.transform, src.crs, src.descriptions
    # the bottom-right chip at (256, 256) overhangs the 300 x 260 scene
    with rasterio.open(out / "images" / "demo_s2_tile_256_256.tif") as chip:
        assert chip.shape == (128, 128) and chip.count == 13 and chip.dtypes[0] == "uint16"
        assert chip.crs == crs and chip.nodata == 0
        assert chip.transform == scene_transform @ rasterio.Affine.translation(256, 256)
        assert chip.descriptions == descriptions
        data = chip.read()
    np.testing.assert_array_equal(data[:, :4, :44], scene[:, 256:, 256:])
    assert (data[:, 4:, :] == 0).all() and (data[:, :, 44:] == 0).all()
    with rasterio.open(out / "labels" / "demo_s2_tile_256_256.tif") as lab:
        assert lab.transform == scene_transform @ rasterio.Affine.translation(256, 256)
        labels = lab.read(1)
    assert (labels[4:, :] == 0).all() and (labels[:, 44:] == 0).all()
    # nodata pixels of the image never keep a label
    with (
        rasterio.open(out / "images" / "demo_s2_tile_256_0.tif") as img,
        rasterio.open(out / "labels" / "demo_s2_tile_256_0.tif") as lab,
    ):
        nodata = np.all(img.read() == 0, axis=0)
        assert nodata.any()
        assert (lab.read(1)[nodata] == 0).all()


def test_manifest_counts_and_zero_threshold_keeps_every_tile(small_scene, tmp_path):
    out = tmp_path / "chips"
    report = chip_scene(
        small_scene.image_uri,
        small_scene.label_uri,
        str(out),
        ChipParams(tile_x=100, tile_y=100, step_x=100, step_y=100, min_coverage=0),
    )
    assert report.written == report.windows == 9
    manifest = pd.read_csv(report.manifest_uri)
    assert len(manifest) == 9
    for row in manifest.itertuples():
        with rasterio.open(out / row.mask) as lab:
            values, counts = np.unique(lab.read(1), return_counts=True)
        for v, n in zip(values, counts, strict=True):
            assert getattr(row, f"count_{v}") == n
    total = sum(v for k, v in report.class_counts.items())
    assert total == 9 * 100 * 100


def test_rerun_skips_complete_chips_and_interrupted_run_leaves_no_partial(
    small_scene, tmp_path, monkeypatch
):
    out = tmp_path / "chips"
    params = ChipParams(tile_x=64, tile_y=64, step_x=64, step_y=64, min_coverage=20)
    real_write = chipping._write_geotiff
    calls = {"n": 0}

    def failing_write(uri, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:
            with storage.atomic_output(uri) as tmp:
                open(tmp, "wb").write(b"half a chip")
                raise OSError("disk full")
        return real_write(uri, *args, **kwargs)

    monkeypatch.setattr(chipping, "_write_geotiff", failing_write)
    with pytest.raises(OSError, match="disk full"):
        chip_scene(small_scene.image_uri, small_scene.label_uri, str(out), params, workers=1)
    leftovers = [f for d in ("images", "labels") for f in os.listdir(out / d) if "tmp" in f]
    assert leftovers == []
    for d in ("images", "labels"):
        for name in os.listdir(out / d):
            with rasterio.open(out / d / name) as src:
                src.read()  # every file present is complete
    monkeypatch.setattr(chipping, "_write_geotiff", real_write)
    first = chip_scene(small_scene.image_uri, small_scene.label_uri, str(out), params)
    assert first.reused >= 3 and first.written > 0
    mtimes = {n: os.path.getmtime(out / "images" / n) for n in os.listdir(out / "images")}
    second = chip_scene(small_scene.image_uri, small_scene.label_uri, str(out), params)
    assert second.written == 0 and second.reused == first.chips
    assert mtimes == {n: os.path.getmtime(out / "images" / n) for n in os.listdir(out / "images")}
    assert pd.read_csv(second.manifest_uri).equals(pd.read_csv(first.manifest_uri))
    with pytest.raises(InvalidParameterError, match="new folder"):
        chip_scene(
            small_scene.image_uri,
            small_scene.label_uri,
            str(out),
            ChipParams(tile_x=32, tile_y=32, step_x=32, step_y=32, min_coverage=20),
        )


@pytest.fixture
def pair(tmp_path):
    image = write_raster(tmp_path / "img.tif", np.ones((3, 40, 50), np.uint16), nodata=0)
    write_raster(tmp_path / "lab.tif", np.ones((40, 50), np.uint8))
    return image, tmp_path


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"crs": "EPSG:32632"}, "CRS"),
        ({"transform": from_origin(330000, 5822040, 20, 20)}, "pixel size"),
        ({"transform": from_origin(330010, 5822040, 10, 10)}, "origin"),
        ({"shape": (41, 50)}, "size"),
    ],
)
def test_grid_mismatch_names_both_files_and_the_property(pair, kwargs, message):
    image, tmp_path = pair
    shape = kwargs.pop("shape", (40, 50))
    label = write_raster(tmp_path / "other.tif", np.ones(shape, np.uint8), **kwargs)
    with pytest.raises(InputMismatchError, match=message) as error:
        chip_scene(
            image,
            label,
            str(tmp_path / "out"),
            ChipParams(tile_x=16, tile_y=16, step_x=16, step_y=16, min_coverage=0),
        )
    assert "img.tif" in str(error.value) and "other.tif" in str(error.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "value, dtype", [(2.5, "float32"), (300, "int16"), (-1, "int16"), (np.nan, "float32")]
)
def test_bad_label_values_are_refused_with_file_and_value(pair, value, dtype):
    image, tmp_path = pair
    labels = np.ones((40, 50), dtype)
    labels[17, 23] = value
    label = write_raster(tmp_path / "badlab.tif", labels)
    with pytest.raises(InvalidLabelError, match="badlab.tif") as error:
        chip_scene(
            image,
            label,
            str(tmp_path / "out"),
            ChipParams(tile_x=16, tile_y=16, step_x=16, step_y=16, min_coverage=0),
        )
    assert "row 17, column 23" in str(error.value)
    assert not (tmp_path / "out").exists()


def test_float_labels_with_whole_numbers_are_fine(pair):
    image, tmp_path = pair
    label = write_raster(tmp_path / "flt.tif", np.full((40, 50), 7.0, np.float32))
    report = chip_scene(
        image,
        label,
        str(tmp_path / "out"),
        ChipParams(tile_x=16, tile_y=16, step_x=16, step_y=16, min_coverage=0),
    )
    assert report.written == 12 and report.class_counts[7] == 40 * 50


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"tile_x": 0}, r"tile_x: Input should be greater than or equal to 1 \(got 0\)"),
        ({"step_y": 0}, "step_y: Input should be greater than or equal to 1"),
        ({"min_coverage": 101}, "min_coverage: Input should be less than or equal to 100"),
        ({"tile_size": 16}, "tile_size: Extra inputs are not permitted"),
    ],
)
def test_bad_parameters(settings, message):
    with pytest.raises(InvalidParameterError, match=message):
        ChipParams(**settings)


def test_several_scenes_share_one_folder(tmp_path):
    from specdeepmap.sample_data import generate_scene

    a = generate_scene(str(tmp_path / "a"), 128, 128, seed=1, name="north")
    b = generate_scene(str(tmp_path / "b"), 128, 128, seed=2, name="south")
    out = str(tmp_path / "chips")
    ra = chip_scene(
        a.image_uri,
        a.label_uri,
        out,
        ChipParams(tile_x=64, tile_y=64, step_x=64, step_y=64, min_coverage=0),
    )
    rb = chip_scene(
        b.image_uri,
        b.label_uri,
        out,
        ChipParams(tile_x=64, tile_y=64, step_x=64, step_y=64, min_coverage=0),
    )
    assert len(os.listdir(tmp_path / "chips" / "images")) == ra.chips + rb.chips == 8
    assert len(chipping.read_manifests(out)) == 8


@pytest.mark.shared_data
def test_enmap_grid_gives_specdeepmaps_18_chips(enmap_folder, tmp_path):
    """SpecDeepMap's upstream test: tile/step 32, coverage 10 % on the Potsdam grid → 18 chips."""
    label_path = enmap_folder / "enmap_landcover_unstyled.tif"
    with rasterio.open(label_path) as lab:
        profile = lab.profile
    image = write_raster(
        tmp_path / "enmap_potsdam.tif",
        np.full((2, profile["height"], profile["width"]), 500, np.float32),
        crs=profile["crs"],
        transform=profile["transform"],
        nodata=-32768,
    )
    report = chip_scene(
        image,
        str(label_path),
        str(tmp_path / "chips"),
        ChipParams(tile_x=32, tile_y=32, step_x=32, step_y=32, min_coverage=10),
    )
    shipped = sorted(os.listdir(enmap_folder / "labels"))
    assert sorted(os.listdir(tmp_path / "chips" / "labels")) == shipped
    assert report.written == 18
    for name in shipped[:4]:
        with (
            rasterio.open(enmap_folder / "labels" / name) as a,
            rasterio.open(tmp_path / "chips" / "labels" / name) as b,
        ):
            np.testing.assert_array_equal(a.read(1).astype(np.uint8), b.read(1))
            assert a.transform == b.transform


@pytest.mark.integration
def test_chip_from_s3_to_s3_matches_local(small_scene, s3_bucket, tmp_path):
    storage.upload(small_scene.image_uri, f"{s3_bucket}/in/demo_s2.tif")
    storage.upload(small_scene.label_uri, f"{s3_bucket}/in/demo_s2_labels.tif")
    params = ChipParams(tile_x=64, tile_y=64, step_x=64, step_y=64, min_coverage=25)
    remote = chip_scene(
        f"{s3_bucket}/in/demo_s2.tif",
        f"{s3_bucket}/in/demo_s2_labels.tif",
        f"{s3_bucket}/chips",
        params,
    )
    local = chip_scene(small_scene.image_uri, small_scene.label_uri, str(tmp_path / "c"), params)
    assert remote.written == local.written > 0
    names = [storage.basename(u) for u in storage.list_files(f"{s3_bucket}/chips/images")]
    assert names == sorted(os.listdir(tmp_path / "c" / "images"))
    for name in names[:3]:
        with (
            storage.open_raster(f"{s3_bucket}/chips/images/{name}") as r,
            rasterio.open(tmp_path / "c" / "images" / name) as local,
        ):
            np.testing.assert_array_equal(r.read(), local.read())
            assert r.transform == local.transform
    again = chip_scene(
        f"{s3_bucket}/in/demo_s2.tif",
        f"{s3_bucket}/in/demo_s2_labels.tif",
        f"{s3_bucket}/chips",
        params,
    )
    assert again.written == 0 and again.reused == remote.written


def test_another_scene_under_the_same_name_is_not_mixed_with_old_chips(tmp_path):
    """Re-chipping the same scene reuses its chips; a different file with the same name
    (another folder, or the same path replaced) is refused instead of keeping the old chips.
    """
    from specdeepmap.errors import InputMismatchError
    from specdeepmap.sample_data import generate_scene

    first = generate_scene(str(tmp_path / "a"), 128, 128, seed=1, field_size=32)
    other = generate_scene(str(tmp_path / "b"), 128, 128, seed=2, field_size=32)
    assert os.path.basename(first.image_uri) == os.path.basename(other.image_uri)
    params = ChipParams(tile_x=64, tile_y=64, step_x=64, step_y=64, min_coverage=0)
    out = str(tmp_path / "chips")
    report = chip_scene(first.image_uri, first.label_uri, out, params)
    again = chip_scene(first.image_uri, first.label_uri, out, params)
    assert again.reused == report.written > 0 and again.written == 0
    before = sorted(os.listdir(os.path.join(out, "images")))
    with pytest.raises(InputMismatchError, match="another file"):
        chip_scene(other.image_uri, other.label_uri, out, params)
    assert sorted(os.listdir(os.path.join(out, "images"))) == before
