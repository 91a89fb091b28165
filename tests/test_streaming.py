"""The Mapper's streaming pieces on their own: the window grid, the batch reader, the blender
and the map writer, each against an independent computation on a small case.
"""

from __future__ import annotations

import numpy as np
import rasterio
import torch
from rasterio.transform import from_origin
from rasterio.windows import Window

from specdeepmap.blending import Blender
from specdeepmap.map_writer import MapWriter
from specdeepmap.windows import BatchReader, WindowGrid, weight_window

CASES = [(70, 90, 32, 24, 2), (64, 64, 32, 32, 1), (20, 100, 32, 20, 3), (33, 33, 32, 8, 4)]


def test_the_grid_finalises_every_row_and_column_once():
    for height, width, window, stride, batch in CASES:
        grid = WindowGrid(height, width, window, stride, batch)
        rows = [grid.row_plan(r).rows for r in range(len(grid.ys))]
        assert sum(rows) == height
        assert [grid.ys[r] for r in range(len(grid.ys))] == list(np.cumsum([0, *rows[:-1]]))
        bounds = [grid.final_columns(b) for b in range(0, len(grid.xs), batch)]
        assert bounds[0][0] == 0 and bounds[-1][1] == width
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
        assert len(grid.jobs) == len(grid.ys) * len(bounds)


def test_the_blender_gives_the_weighted_mean_of_every_window_that_covers_a_pixel():
    rng = np.random.default_rng(1)
    for height, width, window, stride, batch in CASES:
        grid = WindowGrid(height, width, window, stride, batch)
        ramp = weight_window(window, window - stride, "cosine")
        weights = np.outer(ramp, ramp)[: grid.pad_h, : grid.pad_w]
        k = 3
        probs = {
            (y, x): rng.random((k, grid.pad_h, grid.pad_w), dtype=np.float32)
            for y in grid.ys
            for x in grid.xs
        }
        # independent: every window added onto a whole-scene canvas
        canvas = np.zeros(
            (k + 1, max(height, grid.pad_h) + window, max(width, grid.pad_w) + window)
        )
        for (y, x), p in probs.items():
            canvas[:k, y : y + grid.pad_h, x : x + grid.pad_w] += p * weights
            canvas[k, y : y + grid.pad_h, x : x + grid.pad_w] += weights
        blended = np.zeros((k + 1, height, width))
        blender = Blender(grid, k, np.outer(ramp, ramp))
        for r, b in grid.jobs:
            blender.start(r, b)
            batch_p = np.stack([probs[(grid.ys[r], x)] for x in grid.batch_x(b)])
            blender.add(b, torch.from_numpy(batch_p))
            sums = blender.finish(b)
            c0, c1 = grid.final_columns(b)
            blended[:, grid.ys[r] : grid.ys[r] + sums.shape[1], c0:c1] = sums
        np.testing.assert_allclose(blended, canvas[:, :height, :width], rtol=1e-5, atol=1e-5)


def _scene(path, data: np.ndarray, nodata) -> str:
    profile = dict(
        driver="GTiff",
        width=data.shape[2],
        height=data.shape[1],
        count=data.shape[0],
        dtype=data.dtype,
        crs="EPSG:32633",
        transform=from_origin(500000, 5800000, 10, 10),
        nodata=nodata,
    )
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return str(path)


def test_the_reader_marks_nodata_and_non_finite_pixels_and_pads_beyond_the_edge(tmp_path):
    data = np.arange(2 * 40 * 20, dtype=np.float32).reshape(2, 40, 20)
    data[:, 3, 4] = -9999  # nodata in every band
    data[1, 5, 6] = np.nan  # not finite in one band
    grid = WindowGrid(40, 20, 32, 24, 2)  # one column of windows, padded to 32 px
    with rasterio.open(_scene(tmp_path / "s.tif", data, -9999)) as src:
        batch = BatchReader(src, grid).read(0, 0)
    assert batch.windows.shape == (1, 2, 32, 32)
    assert batch.nodata[3, 4] and batch.nodata[5, 6] and batch.nodata[:, :20].sum() == 2
    assert batch.span[1, 5, 6] == 0  # zeroed: no NaN reaches the network
    x0, x1 = grid.span(0)
    assert batch.span.shape[2] == x1 - x0 == 32  # padded past the scene's edge
    assert np.all(batch.span[:, :, 20:] == -9999) and batch.nodata[:, 20:].all()
    assert batch.flagged is None


def test_the_writer_gives_no_probability_where_there_is_no_class(tmp_path):
    data = np.zeros((1, 8, 8), np.float32)
    with rasterio.open(_scene(tmp_path / "s.tif", data, None)) as src:
        writer = MapWriter(src, str(tmp_path), "uint8", 2, ["confidence", "probabilities"])
    sums = np.zeros((3, 8, 8), np.float32)
    sums[0], sums[1], sums[2] = 3.0, 1.0, 4.0  # probabilities 0.75 and 0.25
    classes = np.full((8, 8), 1, np.uint8)
    classes[0, 0] = 0
    masked = np.zeros((8, 8), bool)
    masked[7, 7] = True
    with writer:
        writer.write(Window(0, 0, 8, 8), classes, sums, masked)
    with (
        rasterio.open(writer.path("probabilities")) as p,
        rasterio.open(writer.path("confidence")) as c,
    ):
        probabilities, confidence = p.read(), c.read(1)
    assert probabilities[:, 1, 1].tolist() == [191, 64]  # round(0.75 × 255), round(0.25 × 255)
    assert confidence[1, 1] == 191
    assert probabilities[:, 0, 0].tolist() == [0, 0] and confidence[7, 7] == 0
