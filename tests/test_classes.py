"""Class schema: names and colours read from labels or a file, kept with the chips and the
model, and written with the Tester's CSVs and every map.
"""

import json

import numpy as np
import pandas as pd
import pytest
import rasterio

from specdeepmap.chipping import chip_scene
from specdeepmap.classes import ClassInfo, ClassSchema, qml, read_classes_file, read_label_classes
from specdeepmap.errors import InputMismatchError, InvalidLabelError
from specdeepmap.evaluation import evaluate_model
from specdeepmap.params import ChipParams, EvaluateParams
from specdeepmap.publishing import map_scene_products
from specdeepmap.sample_data import CLASS_SIGNATURES, generate_scene
from tests.conftest import gdal_category_names, write_raster


def test_names_and_colours_read_from_the_label_raster_are_kept_with_the_chips(tmp_path):
    scene = generate_scene(str(tmp_path / "scene"), 128, 128, seed=1)
    schema = read_label_classes(scene.label_uri)
    assert {c.value: c.name for c in schema.classes} == {
        v: name for v, (name, _) in CLASS_SIGNATURES.items()
    }
    with rasterio.open(scene.label_uri) as src:
        assert schema.info(1).color == src.colormap(1)[1][:3]
    report = chip_scene(
        scene.image_uri,
        scene.label_uri,
        str(tmp_path / "chips"),
        ChipParams(tile_x=32, tile_y=32, step_x=32, step_y=32, min_coverage=0),
    )
    assert report.class_names[2] == "forest"
    stored = json.loads((tmp_path / "chips" / "classes.json").read_text())
    assert [c["name"] for c in stored["classes"]][:2] == ["water", "forest"]


def test_a_classes_csv_names_the_classes_and_a_conflicting_one_is_refused(tmp_path):
    labels = np.array([[1, 2], [2, 1]], dtype=np.uint8).repeat(16, 0).repeat(16, 1)
    image = write_raster(tmp_path / "a.tif", np.ones((2, 32, 32), np.float32))
    label = write_raster(tmp_path / "a_labels.tif", labels)
    csv = tmp_path / "classes.csv"
    csv.write_text('value,name,color\n1,water,#0000ff\n2,"forest, mixed",20 120 30\n')
    out = str(tmp_path / "chips")
    chip_scene(
        image,
        label,
        out,
        ChipParams(tile_x=16, tile_y=16, step_x=16, step_y=16, min_coverage=0),
        classes_uri=str(csv),
    )
    schema = read_classes_file(str(csv))
    assert schema.info(2) == ClassInfo(2, "forest, mixed", (20, 120, 30))
    other = tmp_path / "other.csv"
    other.write_text("value,name\n1,lake\n")
    image_b = write_raster(tmp_path / "b.tif", np.ones((2, 32, 32), np.float32))
    with pytest.raises(InputMismatchError, match="'lake'.*'water'"):
        chip_scene(
            image_b,
            label,
            out,
            ChipParams(tile_x=16, tile_y=16, step_x=16, step_y=16, min_coverage=0),
            classes_uri=str(other),
        )
    assert not (tmp_path / "chips" / "manifest" / "b.csv").exists()  # refused before work


@pytest.mark.parametrize(
    "text, message",
    [
        ("id,label\n1,water\n", "needs the columns value,name"),
        ("value,name\n0,nothing\n", "'0' is not a class value"),
        ("value,name,color\n1,water,blue\n", "colour 'blue' of class 1"),
        ("value,name\n1,a\n1,b\n", "lists value.s. 1 twice"),
    ],
)
def test_a_bad_classes_file_is_refused_with_its_name(tmp_path, text, message):
    csv = tmp_path / "bad.csv"
    csv.write_text(text)
    with pytest.raises(InvalidLabelError, match=message) as error:
        read_classes_file(str(csv))
    assert "bad.csv" in str(error.value)


def test_a_qgis_style_is_read_back_as_written(tmp_path):
    schema = ClassSchema(
        [ClassInfo(3, "cropland", (240, 200, 60)), ClassInfo(7, "built-up", (215, 48, 39))]
    )
    path = tmp_path / "style.qml"
    path.write_text(qml(schema, [3, 7]))
    again = read_classes_file(str(path))
    assert again.classes == schema.classes


def test_tester_and_mapper_name_the_classes(trained, dataset, tmp_path):
    config, result = trained
    report = evaluate_model(
        str(dataset / "chips" / "test_files.csv"),
        result.model_file,
        str(tmp_path / "test"),
        EvaluateParams(device="cpu"),
        log_to_mlflow=False,
    )
    iou = pd.read_csv(report.iou_csv)
    assert list(iou.columns) == ["Class", "IoU", "Name"]
    named = dict(zip(iou["Class"][:-1].astype(int), iou["Name"][:-1], strict=True))
    assert all(named[v] == CLASS_SIGNATURES[v][0] for v in named)
    assert iou["Class"].iloc[-1] == "Mean IoU"

    out = tmp_path / "map" / "scene_classes.tif"
    products = map_scene_products(
        str(dataset / "scene" / "demo_s2.tif"), result.model_file, str(out)
    )
    with rasterio.open(out) as src:
        colormap = src.colormap(1)
        values = np.unique(src.read(1))
    given = read_label_classes(str(dataset / "scene" / "demo_s2_labels.tif"))
    for value in values[values > 0]:
        assert colormap[int(value)][:3] == given.info(int(value)).color
    names = gdal_category_names(str(out))
    assert names[0] == "unlabelled"
    assert names[1:] == [CLASS_SIGNATURES[v][0] for v in range(1, len(names))]
    style = (tmp_path / "map" / "scene_classes.qml").read_text()
    assert 'label="forest"' in style
    metrics = json.loads(open(products.metrics).read())
    assert set(metrics["class_names"].values()) <= {n for n, _ in CLASS_SIGNATURES.values()}
