"""STAC in and out: scenes read from STAC items by band name, maps published as items."""

import json

import numpy as np
import pytest
import rasterio

from specdeepmap import storage
from specdeepmap.errors import InputMismatchError
from specdeepmap.params import MapParams
from specdeepmap.publishing import map_scene_products
from specdeepmap.stac import catalog_items, item_scene, update_catalog
from tests.conftest import write_raster

SCHEMAS = ("classification/v2.0.0", "projection/v2.0.0", "raster/v1.1.0", "processing/v1.2.0")


@pytest.fixture
def scene_item(dataset, tmp_path):
    """The demo scene as a STAC item with one single-band asset per band (shuffled keys,
    named by eo:bands).
    """
    folder = tmp_path / "item"
    folder.mkdir()
    assets = {}
    with rasterio.open(dataset / "scene" / "demo_s2.tif") as src:
        for band in reversed(range(1, src.count + 1)):
            name = src.descriptions[band - 1]
            path = write_raster(
                folder / f"{name}.tif", src.read(band), transform=src.transform, nodata=src.nodata
            )
            assets[f"asset{band}"] = {
                "href": f"./{name}.tif",
                "type": "image/tiff",
                "eo:bands": [{"name": name}],
            }
            del path
    item = {
        "type": "Feature",
        "stac_version": "1.1.0",
        "id": "S2A_20170216T102101_demo",
        "geometry": None,
        "properties": {"datetime": "2017-02-16T10:21:01Z"},
        "links": [],
        "assets": assets,
    }
    uri = folder / "S2A_20170216T102101_demo.json"
    uri.write_text(json.dumps(item))
    return str(uri), item


def test_a_map_is_published_as_a_stac_item(trained, dataset, scene_item, tmp_path):
    _, result = trained
    uri, source = scene_item
    out = tmp_path / "maps" / "S2A_20170216T102101_demo_classes.tif"
    products = map_scene_products(uri, result.model_file, str(out), MapParams(device="cpu"))
    # the item's bands, found by name in another order, map like the stacked file
    direct = tmp_path / "direct.tif"
    map_scene_products(
        str(dataset / "scene" / "demo_s2.tif"),
        result.model_file,
        str(direct),
        MapParams(device="cpu"),
    )
    with rasterio.open(out) as a, rasterio.open(direct) as b:
        np.testing.assert_array_equal(a.read(1), b.read(1))
        colormap = a.colormap(1)

    item = json.loads(open(products.stac_item).read())
    assert item["type"] == "Feature" and item["stac_version"].startswith("1.")
    assert item["id"] == "S2A_20170216T102101_demo_classes"
    for schema in SCHEMAS:
        assert any(schema in e for e in item["stac_extensions"]), schema
    west, south, east, north = item["bbox"]
    assert 12.4 < west < east < 12.7 and 52.4 < south < north < 52.6  # UTM 33N, Brandenburg
    assert item["geometry"]["type"] == "Polygon"
    assert item["properties"]["datetime"].startswith("2017-02-16T10:21:01")
    assert item["properties"]["proj:code"] == "EPSG:32633"
    assert item["properties"]["proj:shape"] == [384, 384]
    assert item["properties"]["processing:software"]["specdeepmap"]
    assets = item["assets"]
    assert assets["classes"]["href"] == out.name and "cloud-optimized" in assets["classes"]["type"]
    classes = {c["value"]: c for c in assets["classes"]["classification:classes"]}
    assert classes[0]["nodata"] is True
    assert classes[2]["title"] == "forest" and classes[6]["name"] == "bare-soil"
    assert classes[1]["color_hint"] == "{:02X}{:02X}{:02X}".format(*colormap[1][:3])
    assert assets["classes"]["raster:bands"][0]["data_type"] == "uint8"
    assert {"quicklook", "metrics", "style"} <= set(assets)
    for asset in assets.values():
        assert (out.parent / asset["href"]).exists(), asset["href"]
    derived = [link for link in item["links"] if link["rel"] == "derived_from"]
    assert derived and derived[0]["href"] == uri

    catalog = update_catalog(str(tmp_path / "maps"))
    assert catalog_items(catalog) == [products.stac_item]
    from specdeepmap.mapping import scenes_under
    from specdeepmap.stac import is_catalog

    assert is_catalog(catalog) and not is_catalog(products.stac_item)
    assert scenes_under(catalog) == [products.stac_item]  # a catalog as the input prefix


def test_an_item_without_a_models_band_is_refused(trained, scene_item, tmp_path):
    _, result = trained
    uri, item = scene_item
    del item["assets"]["asset4"]  # B04
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(item))
    from specdeepmap.inference import read_model_file

    config, _ = read_model_file(result.model_file)
    with pytest.raises(InputMismatchError, match="broken.json has no asset for band.*B04"):
        item_scene(str(broken), config.band_names, str(tmp_path / "x.vrt"))


def test_items_on_s3_are_read_through_their_relative_hrefs(scene_item, s3_bucket, tmp_path):
    uri, item = scene_item
    folder = storage.parent(uri)
    for asset in item["assets"].values():
        name = asset["href"].removeprefix("./")
        storage.upload(storage.join(folder, name), f"{s3_bucket}/items/{name}")
    storage.write_text(f"{s3_bucket}/items/item.json", json.dumps(item))
    vrt = item_scene(
        f"{s3_bucket}/items/item.json", ["B02", "B03", "B04"], str(tmp_path / "rgb.vrt")
    )
    with storage.open_raster(vrt) as src, rasterio.open(storage.join(folder, "B03.tif")) as b3:
        assert src.descriptions == ("B02", "B03", "B04")
        np.testing.assert_array_equal(src.read(2), b3.read(1))
