"""Mapper: coverage, blending, georeferencing, COG output, errors, S3 and real EnMAP data."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import rasterio
import torch

from specdeepmap import storage
from specdeepmap.errors import InputMismatchError, InvalidParameterError
from specdeepmap.inference import export_model_file, load_model
from specdeepmap.mapping import map_scene
from specdeepmap.model_config import ModelConfig
from specdeepmap.models import ModelSpec, build_model
from specdeepmap.params import MapParams
from specdeepmap.windows import weight_window, window_starts
from tests.conftest import write_raster


def transform_of(path):
    with rasterio.open(path) as src:
        return src.transform


def test_windows_cover_every_pixel_and_weights_are_smooth():
    for size, window, stride in [
        (1000, 256, 205),
        (256, 256, 205),
        (100, 256, 205),
        (513, 128, 100),
    ]:
        starts = window_starts(size, window, stride)
        covered = np.zeros(size, bool)
        for s in starts:
            covered[s : s + window] = True
        assert covered.all() and starts[-1] + min(window, size) >= size
    w = weight_window(128, 26, "cosine")
    assert w.min() > 0 and w[64] == 1 and np.all(np.diff(w[:26]) > 0)


def test_output_is_a_georeferenced_cog_with_lineage(trained, dataset, tmp_path):
    _, result = trained
    scene = str(dataset / "scene" / "demo_s2.tif")
    out = tmp_path / "out" / "classes.tif"
    report = map_scene(
        scene,
        result.model_file,
        str(out),
        MapParams(device="cpu"),
        gt_uri=str(dataset / "scene" / "demo_s2_labels.tif"),
        iou_csv_uri=str(tmp_path / "out" / "iou.csv"),
        confidence_uri=str(tmp_path / "out" / "confidence.tif"),
        probabilities_uri=str(tmp_path / "out" / "probabilities.tif"),
        vector_uri=str(tmp_path / "out" / "classes.gpkg"),
    )
    with rasterio.open(scene) as src, rasterio.open(out) as dst:
        assert dst.crs == src.crs and dst.transform == src.transform
        assert dst.shape == src.shape and dst.dtypes[0] == "uint8" and dst.nodata == 0
        assert dst.overviews(1) and dst.profile["tiled"]
        assert dst.tags()["SPECDEEPMAP_MODEL"] == result.model_file
        assert dst.tags()["SPECDEEPMAP_INPUT"] == scene
        classes = dst.read(1)
        nodata = np.all(src.read() == 0, axis=0)
    assert set(np.unique(classes)) <= {0, 1, 2, 3, 4, 5, 6}
    assert (classes[nodata] == 0).all() and (classes[~nodata] > 0).all()
    lines = (tmp_path / "out" / "iou.csv").read_text().splitlines()
    # SpecDeepMap's two columns first; the demo labels name their classes
    assert lines[0] == "Class,IoU,Name" and lines[-1].startswith("Mean IoU,")
    # each class's IoU, computed again from the map and the label raster alone: pixels
    # labelled with a class and mapped (not nodata)
    with rasterio.open(dataset / "scene" / "demo_s2_labels.tif") as gt:
        truth = gt.read(1).astype(int)
    counted = (truth > 0) & (classes > 0)
    expected = [
        ((truth == c) & (classes == c) & counted).sum()
        / (((truth == c) | (classes == c)) & counted).sum()
        for c in range(1, 7)
    ]
    written = [float(line.split(",")[1]) for line in lines[1:-1]]
    np.testing.assert_allclose(written, expected, atol=1e-9)
    assert float(lines[-1].split(",")[1]) == pytest.approx(np.mean(expected))
    assert report.mean_iou == pytest.approx(np.mean(expected))
    assert report.pixels_processed >= classes.size
    assert sorted(os.listdir(tmp_path / "out")) == [
        "classes.gpkg",
        "classes.qml",
        "classes.tif",
        "classes.tif.aux.xml",
        "classes_quality.json",
        "confidence.tif",
        "iou.csv",
        "iou_metrics.csv",
        "probabilities.tif",
    ]
    with (
        rasterio.open(tmp_path / "out" / "probabilities.tif") as probs,
        rasterio.open(tmp_path / "out" / "confidence.tif") as conf,
    ):
        p = probs.read().astype(int)
        assert probs.count == 6 and probs.transform == transform_of(scene)
        valid = classes > 0
        # probabilities sum to ~255; the argmax band is the class; its value is the confidence
        assert np.abs(p.sum(axis=0)[valid] - 255).max() <= 6
        assert ((p.argmax(axis=0) + 1)[valid] == classes[valid]).mean() > 0.99
        np.testing.assert_array_equal(p.max(axis=0)[valid], conf.read(1)[valid])
    import pyogrio

    info = pyogrio.read_info(tmp_path / "out" / "classes.gpkg")
    assert info["features"] > 0 and "Class" in list(info["fields"])
    _, _, geometry, fields = pyogrio.raw.read(tmp_path / "out" / "classes.gpkg")
    assert set(np.unique(fields[0])) <= set(range(1, 7)) and 0 not in set(fields[0])
    import shapely

    with rasterio.open(scene) as src:
        pixel_area = abs(src.transform.a * src.transform.e)
    area = shapely.area(shapely.from_wkb(geometry)).sum()
    assert area == pytest.approx((classes > 0).sum() * pixel_area)


def _pointwise(self, batch, **kwargs):
    """A per-pixel stand-in for the network: softmax of a fixed linear map of the bands.

    Its output depends on nothing but the pixel itself, so any difference between window
    sizes or between stitched and single-window maps is the mapper's own doing.
    """
    x = torch.from_numpy(self.normalization.apply(batch))
    weights = torch.linspace(-1, 1, x.shape[1] * 6).reshape(6, x.shape[1])
    return torch.softmax(torch.einsum("kc,nchw->nkhw", weights, x) * 3, dim=1)


@pytest.mark.parametrize(
    "window, overlap, batch",
    [
        (64, 10, None),
        (96, 25, None),
        (256, 10, None),
        (384, 0, None),
        (64, 10, 2),  # several batches per row: columns carried from batch to batch
        (48, 49, 3),  # windows 16 px apart: every pixel in up to 3 rows of windows
    ],
)
def test_stitching_is_exact_for_any_window(
    trained, dataset, tmp_path, monkeypatch, window, overlap, batch
):
    """Blended windows of any size reproduce a per-pixel model everywhere, edges included."""
    from specdeepmap import inference

    _, result = trained
    monkeypatch.setattr(inference.Predictor, "probabilities", _pointwise)
    scene = str(dataset / "scene" / "demo_s2.tif")
    map_scene(
        scene,
        result.model_file,
        str(tmp_path / "m.tif"),
        MapParams(window=window, overlap=overlap, batch_size=batch, device="cpu"),
    )
    predictor = load_model(result.model_file, "cpu")
    with rasterio.open(scene) as src:
        data = src.read()
    expected = np.array([1, 2, 3, 4, 5, 6])[_pointwise(predictor, data[None])[0].argmax(0)]
    expected[np.all(data == 0, axis=0)] = 0
    np.testing.assert_array_equal(rasterio.open(tmp_path / "m.tif").read(1), expected)


def _contextual(self, batch, **kwargs):
    """A stand-in whose output depends on the whole window (its mean), not only the pixel, so
    that every window's share in the blend shows in the result.
    """
    x = torch.from_numpy(self.normalization.apply(batch))
    weights = torch.linspace(-1, 1, x.shape[1] * 6).reshape(6, x.shape[1])
    context = x.mean(dim=(1, 2, 3))[:, None, None, None] * torch.arange(6.0)[None, :, None, None]
    return torch.softmax(torch.einsum("kc,nchw->nkhw", weights, x) * 3 + context * 8, dim=1)


@pytest.mark.parametrize("window, overlap, batch", [(64, 10, 2), (48, 49, 3), (256, 10, None)])
def test_streamed_blend_equals_whole_scene_blend(
    trained, dataset, tmp_path, monkeypatch, window, overlap, batch
):
    """The streamed probabilities equal a blend computed over the whole scene in memory:
    nothing a window adds is lost between batches or between rows of windows.
    """
    from specdeepmap import inference
    from specdeepmap.windows import weight_window

    _, result = trained
    monkeypatch.setattr(inference.Predictor, "probabilities", _contextual)
    scene = str(dataset / "scene" / "demo_s2.tif")
    map_scene(
        scene,
        result.model_file,
        str(tmp_path / "m.tif"),
        MapParams(window=window, overlap=overlap, batch_size=batch, device="cpu"),
        probabilities_uri=str(tmp_path / "p.tif"),
    )
    predictor = load_model(result.model_file, "cpu")
    with rasterio.open(scene) as src:
        data = src.read()
    overlap_px = int(np.ceil(2 * overlap / 100 * max(predictor.tile_size)))
    ramp = weight_window(window, overlap_px, "cosine")
    weights = np.outer(ramp, ramp)
    acc = np.zeros((6, *data.shape[1:]))
    wsum = np.zeros(data.shape[1:])
    starts = window_starts(data.shape[1], window, window - overlap_px)
    for y in starts:
        for x in starts:
            probs = _contextual(predictor, data[None, :, y : y + window, x : x + window])[0]
            acc[:, y : y + window, x : x + window] += probs.numpy() * weights
            wsum[y : y + window, x : x + window] += weights
    expected = np.round(acc / wsum * 255)
    valid = ~np.all(data == 0, axis=0)
    got = rasterio.open(tmp_path / "p.tif").read().astype(float)
    assert np.abs(got - expected)[:, valid].max() <= 1


def test_batch_norm_folding_keeps_the_outputs(trained):
    """Every batch norm of the trained U-Net folds into its convolution, in place (no second
    copy of the weights); outputs unchanged; folding again changes nothing.
    """
    import copy

    from specdeepmap.inference import fold_batch_norms

    _, result = trained
    predictor = load_model(result.model_file, "cpu")
    # give the batch norms statistics far from identity, so that folding them matters
    generator = torch.Generator().manual_seed(1)
    for module in predictor.model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.5, generator=generator)
            module.running_var.uniform_(0.2, 3, generator=generator)
    original = copy.deepcopy(predictor.model)
    weights = {id(p) for p in predictor.model.parameters()}
    folded = fold_batch_norms(predictor.model, predictor.in_channels)
    assert folded is predictor.model
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in original.modules())
    conv_weights = [m.weight for m in folded.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(id(w) in weights for w in conv_weights)  # scaled where they are
    x = torch.rand(2, predictor.in_channels, 96, 96)
    with torch.inference_mode():
        expected, got = original(x), folded(x)
        again = fold_batch_norms(folded, predictor.in_channels)(x)
    assert torch.allclose(got, expected, atol=1e-4 * float(expected.abs().max()))
    assert torch.equal(again, got)


def test_batch_norm_folding_refuses_a_convolution_used_twice():
    """A convolution whose output also bypasses its batch norm cannot be folded: the check
    against the original notices, and the network is left as it was.
    """
    from specdeepmap.inference import fold_batch_norms

    class Residual(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    model = Residual().eval()
    model.bn.running_mean.fill_(0.7)
    model.bn.running_var.fill_(2.5)
    weight, bias = model.conv.weight.detach().clone(), model.conv.bias.detach().clone()
    with pytest.warns(UserWarning, match="not folded"):
        kept = fold_batch_norms(model, 3)
    assert isinstance(kept.bn, torch.nn.BatchNorm2d)
    assert torch.allclose(kept.conv.weight, weight) and torch.equal(kept.conv.bias, bias)


def test_tiny_scene_uint16_classes_and_errors(tmp_path):
    model = build_model(ModelSpec("unet", "resnet18", 4, 4))
    config = ModelConfig(
        architecture="unet",
        backbone="resnet18",
        in_channels=4,
        num_classes=4,
        class_values=[3, 7, 300],
        ignore_index=0,
        tile_size=[32, 32],
        normalization={"scaler": 1000.0, "mean": None, "std": None, "nodata": -1.0},
    )
    model_file = export_model_file(config, model, str(tmp_path / "m.pt"))
    data = np.random.default_rng(0).uniform(0, 1000, (4, 20, 25)).astype(np.float32)
    data[:, :3, :3] = -1
    scene = write_raster(tmp_path / "tiny.tif", data, nodata=-1.0)
    map_scene(scene, model_file, str(tmp_path / "tiny_out.tif"), MapParams(device="cpu"))
    with rasterio.open(tmp_path / "tiny_out.tif") as dst:
        out = dst.read(1)
        assert dst.dtypes[0] == "uint16" and out.shape == (20, 25)
    assert set(np.unique(out)) <= {0, 3, 7, 300} and (out[:3, :3] == 0).all()
    assert (out[3:, 3:] > 0).all()

    wrong = write_raster(tmp_path / "five.tif", np.ones((5, 20, 20), np.float32))
    with pytest.raises(InputMismatchError, match="5 bands"):
        map_scene(wrong, model_file, str(tmp_path / "x.tif"), MapParams(device="cpu"))
    assert not (tmp_path / "x.tif").exists()


def test_interrupted_run_leaves_no_output(trained, dataset, tmp_path, monkeypatch):
    from specdeepmap import inference

    _, result = trained
    calls = {"n": 0}
    real = inference.Predictor.probabilities

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(inference.Predictor, "probabilities", failing)
    with pytest.raises(KeyboardInterrupt):
        map_scene(
            str(dataset / "scene" / "demo_s2.tif"),
            result.model_file,
            str(tmp_path / "out" / "c.tif"),
            MapParams(window=64, device="cpu"),
        )
    assert os.listdir(tmp_path / "out") == []


@pytest.mark.integration
def test_s3_in_and_out(trained, dataset, s3_bucket, tmp_path):
    _, result = trained
    storage.upload(str(dataset / "scene" / "demo_s2.tif"), f"{s3_bucket}/scenes/a.tif")
    storage.upload(result.model_file, f"{s3_bucket}/models/model.pt")
    map_scene(
        f"{s3_bucket}/scenes/a.tif",
        f"{s3_bucket}/models/model.pt",
        f"{s3_bucket}/maps/a_classes.tif",
        MapParams(device="cpu"),
    )
    map_scene(
        str(dataset / "scene" / "demo_s2.tif"),
        result.model_file,
        str(tmp_path / "local.tif"),
        MapParams(device="cpu"),
    )
    with (
        storage.open_raster(f"{s3_bucket}/maps/a_classes.tif") as remote,
        rasterio.open(tmp_path / "local.tif") as local,
    ):
        np.testing.assert_array_equal(remote.read(1), local.read(1))
        assert remote.transform == local.transform


@pytest.mark.slow
@pytest.mark.shared_data
def test_real_enmap_scene_through_the_registry(enmap_folder, tmp_path):
    """A 128 x 64 EnMAP mosaic of the real chips, mapped with a model from its registry URI."""
    import mlflow

    from specdeepmap.params import SplitParams
    from specdeepmap.splitting import make_dataset
    from specdeepmap.training import TrainConfig, train

    make_dataset(
        str(enmap_folder),
        SplitParams(train_percent=60, validation_percent=20, test_percent=20),
        out_folder=str(tmp_path / "ds"),
    )
    # the CSVs hold absolute chip paths (they lie outside the chip folder)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = train(
        TrainConfig(
            dataset=str(tmp_path / "ds"),
            out=str(tmp_path / "run"),
            epochs=1,
            batch_size=4,
            device="cpu",
            tracking_uri=uri,
            registered_model="enmap",
            augment=False,
        )
    )
    mosaic = np.zeros((224, 64, 128), np.float32)
    for i, x in enumerate((96, 128, 160, 192)):
        for j, y in enumerate((96, 128)):
            with rasterio.open(enmap_folder / "images" / f"enmap_potsdam_tile_{x}_{y}.tif") as c:
                mosaic[:, j * 32 : (j + 1) * 32, i * 32 : (i + 1) * 32] = c.read()
                if (i, j) == (0, 0):
                    transform, crs = c.transform, c.crs
    scene = write_raster(
        tmp_path / "enmap.tif", mosaic, crs=crs, transform=transform, nodata=-32768
    )
    with rasterio.open(enmap_folder / "enmap_landcover_unstyled.tif") as gt:
        truth = gt.read(1, window=((96, 160), (96, 224)))
    gt_path = write_raster(
        tmp_path / "gt.tif", truth.astype(np.uint8), crs=crs, transform=transform
    )
    mlflow.set_tracking_uri(uri)
    report = map_scene(
        scene,
        f"models:/enmap/{result.model_version}",
        str(tmp_path / "enmap_classes.tif"),
        MapParams(device="cpu"),
        gt_uri=gt_path,
        iou_csv_uri=str(tmp_path / "iou.csv"),
    )
    lines = (tmp_path / "iou.csv").read_text().splitlines()
    assert len(lines) == 8 and report.mean_iou is not None
    with rasterio.open(tmp_path / "enmap_classes.tif") as out:
        assert out.shape == (64, 128) and out.crs == crs


def test_cli_maps_a_folder_of_scenes_once(trained, dataset, tmp_path):
    import shutil

    from typer.testing import CliRunner

    from specdeepmap.cli import app

    _, result = trained
    (tmp_path / "in").mkdir()
    for name in ("a.tif", "b.tif"):
        shutil.copy(dataset / "scene" / "demo_s2.tif", tmp_path / "in" / name)
    args = [
        "map",
        str(tmp_path / "in") + "/",
        result.model_file,
        str(tmp_path / "maps"),
        "--device",
        "cpu",
        "--precision",
        "int8",
    ]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert sorted(f for f in os.listdir(tmp_path / "maps") if f.endswith(".tif")) == [
        "a_classes.tif",
        "b_classes.tif",
    ]
    with rasterio.open(tmp_path / "maps" / "a_classes.tif") as dst:
        assert dst.tags()["SPECDEEPMAP_PRECISION"] == "int8"
    wrong = CliRunner().invoke(app, [*args[:4], "--precision", "fp8"])
    assert wrong.exit_code != 0 and "fp8" in wrong.output
    second = CliRunner().invoke(app, args)
    assert second.exit_code == 0 and "0 new scene(s)" in second.output


def test_unwritable_output_fails_before_work(trained, dataset, tmp_path):
    from specdeepmap.errors import InvalidParameterError

    _, result = trained
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(InvalidParameterError, match="not writable"):
        map_scene(
            str(dataset / "scene" / "demo_s2.tif"),
            result.model_file,
            str(blocker / "out.tif"),
            MapParams(device="cpu"),
        )


def test_lineage_names_the_mlflow_run(trained, dataset, tmp_path):
    _, result = trained
    map_scene(
        str(dataset / "scene" / "demo_s2.tif"),
        result.model_file,
        str(tmp_path / "m.tif"),
        MapParams(device="cpu"),
    )
    with rasterio.open(tmp_path / "m.tif") as dst:
        assert dst.tags()["SPECDEEPMAP_MODEL_RUN_ID"] == result.run_id


def test_blending_leaves_no_seams_where_cropping_does(tmp_path, monkeypatch):
    """A model whose output drifts with its window's context (as CNNs' do): cropping turns the
    drift into steps at the crop lines, blending spreads it over the overlap.
    """
    from specdeepmap import inference

    model = build_model(ModelSpec("unet", "resnet18", 2, 3))
    config = ModelConfig(
        architecture="unet",
        backbone="resnet18",
        in_channels=2,
        num_classes=3,
        class_values=[1, 2],
        ignore_index=0,
        tile_size=[64, 64],
        normalization={"scaler": None, "mean": None, "std": None, "nodata": None},
    )
    model_file = export_model_file(config, model, str(tmp_path / "m.pt"))
    y, x = np.mgrid[0:512, 0:512].astype(np.float32)
    scene = write_raster(tmp_path / "gradient.tif", np.stack([x / 512, y / 512]))

    def context_dependent(self, batch, **kwargs):
        # class 1 where x/width + a bias from the window's mean row position exceeds 0.5
        bias = 0.5 * (batch[:, 1].mean(axis=(1, 2)) - 0.5)
        p1 = np.clip(batch[:, 0] + bias[:, None, None], 0, 1)
        return torch.from_numpy(np.stack([p1, 1 - p1], axis=1).astype(np.float32))

    monkeypatch.setattr(inference.Predictor, "probabilities", context_dependent)
    steps = {}
    for blend in ("crop", "cosine"):
        out = tmp_path / f"{blend}.tif"
        map_scene(
            scene,
            model_file,
            str(out),
            MapParams(window=128, overlap=25, blend=blend, device="cpu"),
        )
        classes = rasterio.open(out).read(1)
        # largest shift of the class boundary from one row to the next
        steps[blend] = int((classes[1:] != classes[:-1]).sum(axis=1).max())
    assert steps["crop"] > 20  # the boundary jumps at crop lines
    assert steps["cosine"] <= 4  # and moves a pixel or two per row when blended


@pytest.mark.parametrize("architecture", ["unet", "deeplabv3plus", "segformer"])
def test_int8_quantization_traces_every_architecture(architecture):
    """Each architecture quantizes (SegFormer's decoder stays fp32) and keeps most classes."""
    from specdeepmap.inference import Predictor
    from specdeepmap.quantization import quantize_int8

    torch.manual_seed(0)
    model = build_model(ModelSpec(architecture, "resnet18", 4, 4)).eval()
    config = ModelConfig(
        architecture=architecture,
        backbone="resnet18",
        in_channels=4,
        num_classes=4,
        class_values=[1, 2, 3],
        tile_size=[64, 64],
        normalization={"scaler": 1000.0, "mean": None, "std": None, "nodata": None},
    )
    fp32 = Predictor(model, config, torch.device("cpu"))
    rng = np.random.default_rng(0)
    windows = [rng.integers(0, 1000, (1, 4, 64, 64)).astype(np.uint16) for _ in range(3)]
    int8 = quantize_int8(fp32, windows)
    assert int8.model is not model and any(
        "quantized" in type(m).__module__ for m in int8.model.modules()
    )
    batch = np.concatenate(windows)
    p32, p8 = fp32.probabilities(batch), int8.probabilities(batch)
    assert p8.shape == p32.shape and torch.allclose(p8.sum(1), torch.ones(1), atol=1e-4)
    assert (p32 - p8).abs().mean() < 0.05
    with pytest.raises(InvalidParameterError, match="CPU only"):
        quantize_int8(Predictor(model, config, torch.device("cuda")), windows)


def test_an_int8_calibration_does_not_carry_into_the_next(tmp_path):
    """Each map calibrates its own observers: a scene calibrated in between (here one 20 times
    brighter) leaves the next calibration of the same windows exactly as the first.
    """
    from specdeepmap.inference import Predictor
    from specdeepmap.quantization import quantize_int8

    torch.manual_seed(0)
    model = build_model(ModelSpec("unet", "resnet18", 4, 4, encoder_depth=3)).eval()
    config = ModelConfig(
        architecture="unet",
        backbone="resnet18",
        in_channels=4,
        num_classes=4,
        class_values=[1, 2, 3],
        tile_size=[64, 64],
        encoder_depth=3,
        normalization={"scaler": 1000.0, "mean": None, "std": None, "nodata": None},
    )
    fp32 = Predictor(model, config, torch.device("cpu"))
    rng = np.random.default_rng(0)
    scene = [rng.integers(0, 1000, (2, 4, 64, 64)).astype(np.uint16)]
    bright = [(scene[0].astype(np.uint32) * 20).astype(np.uint16)]
    first = quantize_int8(fp32, scene).probabilities(scene[0])
    quantize_int8(fp32, bright)
    again = quantize_int8(fp32, scene).probabilities(scene[0])
    assert torch.equal(first, again)


def test_int8_map_matches_fp32(trained, dataset, tmp_path):
    """int8 (the default engine's: OpenVINO, calibrated once on the training chips) and fp32
    maps of the demo scene agree on at least 99.5 % of the pixels that are not near-ties in
    fp32 (top-two probabilities more than 0.02 apart: over 90 % of the map), on all but one
    in 10,000 of the pixels whose top two are more than 0.25 apart (a scene's values beyond
    the training chips' ranges are clipped: 2 of 124,231 such pixels changed in one training
    run, none in another; torch's int8, calibrated on the scene itself, changed none), and on
    98.5 % of all pixels; the IoU stays. (The fixture's model is trained for seconds, so it
    has many near-ties, and how many varies between training runs; the demo model `make run`
    trains keeps 99.98 % of all its pixels' classes under int8, see docs/benchmarks.md).
    """
    _, result = trained
    scene = str(dataset / "scene" / "demo_s2.tif")
    maps, iou = {}, {}
    for precision in ("fp32", "int8"):
        out = tmp_path / f"{precision}.tif"
        iou[precision] = map_scene(
            scene,
            result.model_file,
            str(out),
            MapParams(device="cpu", precision=precision),
            gt_uri=str(dataset / "scene" / "demo_s2_labels.tif"),
            probabilities_uri=str(tmp_path / f"{precision}_p.tif"),
        ).mean_iou
        with rasterio.open(out) as dst:
            maps[precision] = dst.read(1)
            assert dst.tags()["SPECDEEPMAP_PRECISION"] == precision
            assert (
                dst.tags()["SPECDEEPMAP_ENGINE"] == {"fp32": "torch", "int8": "openvino"}[precision]
            )
    top2 = np.sort(rasterio.open(tmp_path / "fp32_p.tif").read().astype(int), axis=0)[-2:]
    valid = maps["fp32"] > 0
    clear = valid & (top2[1] - top2[0] > 0.25 * 255)
    same = maps["int8"] == maps["fp32"]
    assert ((maps["int8"] == 0) == ~valid).all()
    assert clear.sum() > 0.1 * valid.sum() and same[clear].mean() >= 0.9999
    decided = valid & (top2[1] - top2[0] > 0.02 * 255)  # not a near-tie in fp32
    assert decided.sum() > 0.9 * valid.sum() and same[decided].mean() >= 0.995
    assert same[valid].mean() >= 0.985
    assert abs(iou["int8"] - iou["fp32"]) < 0.03


@pytest.mark.slow  # waits out botocore's bounded retries (about 15 s)
def test_an_unreachable_output_store_is_not_called_a_missing_bucket(
    trained, dataset, tmp_path, monkeypatch
):
    """With the S3 endpoint down, an s3:// output is reported as unreachable (transient, so
    tasks retry it), not as a bucket that does not exist, and without minutes of waiting.
    """
    import socket
    import time

    from typer.testing import CliRunner

    from specdeepmap.cli import app

    _, result = trained
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    started = time.perf_counter()
    out = CliRunner().invoke(
        app,
        [
            "map",
            str(dataset / "scene" / "demo_s2.tif"),
            result.model_file,
            "s3://maps/scene.tif",
            "--device",
            "cpu",
        ],
    )
    assert out.exit_code == 2, out.output
    assert "unreachable" in out.output and "does not exist" not in out.output
    assert time.perf_counter() - started < 60


def test_a_scene_is_done_once_its_metrics_exist_or_for_its_model_version(tmp_path):
    """The scheduled flow's bookkeeping: a scene is mapped when its metrics JSON (written
    last) exists; asked per model version, a map made by another version is redone.
    """
    import json

    from specdeepmap.publishing import unmapped_scenes

    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    for name in ("a", "b", "c"):
        (tmp_path / "in" / f"{name}.tif").write_bytes(b"")
    (tmp_path / "out" / "a_classes.tif").write_bytes(b"")  # map without metrics: unfinished
    (tmp_path / "out" / "b_classes.tif").write_bytes(b"")
    (tmp_path / "out" / "b_classes_metrics.json").write_text(json.dumps({"model": "models:/m/1"}))
    names = [
        os.path.basename(u) for u in unmapped_scenes(str(tmp_path / "in"), str(tmp_path / "out"))
    ]
    assert names == ["a.tif", "c.tif"]
    again = unmapped_scenes(str(tmp_path / "in"), str(tmp_path / "out"), model_uri="models:/m/2")
    assert [os.path.basename(u) for u in again] == ["a.tif", "b.tif", "c.tif"]
    same = unmapped_scenes(str(tmp_path / "in"), str(tmp_path / "out"), model_uri="models:/m/1")
    assert [os.path.basename(u) for u in same] == ["a.tif", "c.tif"]


_PEAK_RSS = """
import json, sys
import specdeepmap; specdeepmap.hide_triton_without_gpu()  # as the entry points do
from specdeepmap.inference import load_model
from specdeepmap.mapping import map_scene
from specdeepmap.params import MapParams
scene, model, out, precision = sys.argv[1:]
predictor = load_model(model, "cpu")
status = lambda key: int([l for l in open("/proc/self/status") if l.startswith(key)][0].split()[1])
floor = status("VmRSS")
map_scene(scene, model, out, MapParams(device="cpu", precision=precision), predictor=predictor)
print(json.dumps({"floor": floor / 1024, "peak": status("VmHWM") / 1024}))
"""


_IMPORTS = """
import sys
import specdeepmap; specdeepmap.hide_triton_without_gpu()  # as the entry points do
import numpy as np, torch
import specdeepmap.mapping, specdeepmap.inference
loaded = [m for m in ("pandas", "specdeepmap.splitting", "specdeepmap.data") if m in sys.modules]
from specdeepmap.inference import Predictor
from specdeepmap.models import ModelSpec, build_model
from specdeepmap.quantization import quantize_int8
from specdeepmap.model_config import ModelConfig
config = ModelConfig(architecture="unet", backbone="resnet18", in_channels=4, num_classes=4,
                     class_values=[1, 2, 3], tile_size=[64, 64], encoder_depth=3,
                     normalization={"scaler": 1000.0, "mean": None, "std": None, "nodata": None})
model = build_model(ModelSpec("unet", "resnet18", 4, 4, encoder_depth=3)).eval()
windows = [np.random.default_rng(0).integers(0, 1000, (2, 4, 64, 64)).astype(np.uint16)]
quantize_int8(Predictor(model, config, torch.device("cpu")), windows)
loaded += [m for m in ("networkx", "redis") if m in sys.modules]
loaded += ["triton"] if sys.modules.get("triton") is not None else []
print(loaded)
"""


@pytest.mark.slow
def test_the_mapper_loads_no_library_it_does_not_use():
    """A mapping process, int8 included, imports neither pandas nor the Dataset Maker (~70 MB
    of resident memory in every mapping worker), nor the compiler stack that torch.fx's
    stack-trace recording would pull in while quantizing (torch.export, networkx, redis: ~35 MB),
    nor, on a host without a GPU, Triton (~70 MB), unless ``SPECDEEPMAP_HIDE_TRITON=0``.
    """
    import importlib.metadata

    from specdeepmap import GPU_DEVICE_FILES

    if any(os.path.exists(path) for path in GPU_DEVICE_FILES):
        pytest.skip("this host has a GPU: Triton stays importable")
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORTS], capture_output=True, text=True, check=True
    )
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout
    try:
        importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return  # nothing to hide: a CPU-only torch build has no Triton
    kept = subprocess.run(
        [sys.executable, "-c", _IMPORTS],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "SPECDEEPMAP_HIDE_TRITON": "0"},
    )
    assert kept.stdout.strip().splitlines()[-1] == "['triton']", kept.stdout


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_peak_memory_does_not_grow_with_the_scene(tmp_path, precision):
    """Mapping a scene 16 times larger (4 x wider, 4 x taller) raises the peak RSS above the
    runtime floor (torch and the model) by less than a quarter of what one whole-scene array of
    class probabilities would take: nothing is sized by the scene but a few overlap rows.
    """
    from specdeepmap.sample_data import generate_scene

    torch.manual_seed(0)
    config = ModelConfig(
        architecture="unet",
        backbone="resnet18",
        in_channels=13,
        num_classes=7,
        class_values=[1, 2, 3, 4, 5, 6],
        ignore_index=0,
        tile_size=[256, 256],
        normalization={"scaler": 10000.0, "mean": None, "std": None, "nodata": 0.0},
    )
    model = export_model_file(
        config, build_model(ModelSpec("unet", "resnet18", 13, 7)), str(tmp_path / "model.pt")
    )
    above_floor = {}
    for width, height in ((1024, 512), (4096, 2048)):
        scene = generate_scene(
            str(tmp_path / f"s{width}"), width=width, height=height, seed=1
        ).image_uri
        env = {**os.environ, "GDAL_CACHEMAX": "8"}  # a cache both scenes fill
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                _PEAK_RSS,
                scene,
                model,
                str(tmp_path / f"m{width}.tif"),
                precision,
            ],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        rss = json.loads(proc.stdout.strip().splitlines()[-1])
        above_floor[width] = rss["peak"] - rss["floor"]
    whole_scene_probabilities_mb = 6 * 4096 * 2048 * 4 / 2**20  # 192 MB
    assert above_floor[4096] - above_floor[1024] < 0.25 * whole_scene_probabilities_mb, above_floor
