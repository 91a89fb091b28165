"""The generated demo scene looks like a Sentinel-2 scene with reference labels."""

import numpy as np
import rasterio


def test_demo_scene_is_realistic(small_scene):
    with rasterio.open(small_scene.image_uri) as img, rasterio.open(small_scene.label_uri) as lab:
        assert img.count == 13 and img.dtypes[0] == "uint16"
        assert img.crs.to_epsg() == 32633 and img.res == (10.0, 10.0)
        assert img.profile["tiled"] and img.nodata == 0
        assert (img.width, img.height) == (300, 260) == (lab.width, lab.height)
        assert img.transform == lab.transform and lab.dtypes[0] == "uint8"
        pixels, labels = img.read(), lab.read(1)
    classes = set(np.unique(labels)) - {0}
    assert len(classes) >= 5
    assert 0.1 < (labels == 0).mean() < 0.7  # unlabelled fields
    nodata = np.all(pixels == 0, axis=0)
    assert 0.01 < nodata.mean() < 0.3
    # each class has its own spectrum: NIR (B08) of vegetation exceeds water's by far
    valid = ~nodata
    nir = pixels[7]
    assert nir[(labels == 2) & valid].mean() > 5 * nir[(labels == 1) & valid].mean()
