"""How the Mapper covers a scene with windows, and reads them.

Overlapping windows cover the scene, the last of each row and column aligned to the scene
edge; an axis shorter than a window is covered by one window padded to the encoders' stride.
Windows run a row at a time, a batch of neighbouring windows per forward pass
(:class:`WindowGrid`), and are read one batch at a time as one span of the scene
(:class:`BatchReader`), nodata and non-finite pixels marked.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from rasterio.windows import Window

#: pixels per forward pass (a batch of windows, or one window): what bounds the network's
#: activations, the mapper's largest memory (a U-Net/ResNet-18 at 512² holds ~120 MB at its
#: peak, at 1024² four times that), and enough to batch
BATCH_PIXELS = 512 * 512


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start offsets covering [0, size) with the fewest windows no more than ``stride`` apart,
    spread evenly: the first at 0, the last aligned to the end, every overlap about equal
    (an edge-aligned last window spaced like the others, not piled onto its neighbour).
    """
    if size <= window:
        return [0]
    gaps = math.ceil((size - window) / stride)
    return [round(i * (size - window) / gaps) for i in range(gaps + 1)]


def to_stride(size: int) -> int:
    """``size`` rounded up to a multiple of 32 px, the encoders' output stride."""
    return -(-size // 32) * 32


def padded_shape(height: int, width: int, window: int) -> tuple[int, int]:
    """(rows, cols) of every window: ``window``, or the scene rounded up to 32 px (the
    encoders' stride) along an axis shorter than a window, which one padded window covers.
    """
    return (
        window if height > window else to_stride(height),
        window if width > window else to_stride(width),
    )


def processed_pixels(height: int, width: int, window: int, stride: int) -> int:
    """Pixels the network processes for a scene: windows × their padded size."""
    rows, cols = padded_shape(height, width, window)
    return (
        len(window_starts(height, window, stride))
        * len(window_starts(width, window, stride))
        * rows
        * cols
    )


def choose_window(height: int, width: int, tile: int, overlap_px: int) -> int:
    """The window (1, 2 or 4 × the training tile, no more than :data:`BATCH_PIXELS`) that
    processes the fewest pixels.

    A fully convolutional model accepts windows larger than its training chips; larger
    windows repeat less of the overlap (at 10 % overlap a 2 × tile window processes about
    1.23 × the scene's pixels where a 1 × tile window processes 1.56 ×), but near the scene
    size the edge-aligned last window repeats more. Capped so that memory stays bounded
    whatever the scene (one forward pass of a bigger window costs more memory than its saved
    overlap is worth).
    """
    candidates = [tile * f for f in (1, 2, 4) if f == 1 or (tile * f) ** 2 <= BATCH_PIXELS]
    return min(
        candidates, key=lambda w: (processed_pixels(height, width, w, max(1, w - overlap_px)), -w)
    )


def weight_window(size: int, ramp: int, kind: str) -> np.ndarray:
    """1-D blending weights: rising over ``ramp`` px at both ends, 1 in the middle, never 0."""
    w = np.ones(size, dtype=np.float32)
    if kind == "none" or ramp <= 0:
        return w
    if kind == "crop":  # margins of half the overlap count (almost) nothing
        margin = ramp // 2
        w[:margin] = w[size - margin :] = 1e-6
        return w
    i = np.arange(ramp, dtype=np.float32) + 0.5
    if kind == "linear":
        edge = i / ramp
    elif kind == "gaussian":
        edge = np.exp(-0.5 * ((ramp - i) / (ramp / 2.5)) ** 2)
    else:
        edge = 0.5 - 0.5 * np.cos(np.pi * i / ramp)
    w[:ramp] = np.minimum(w[:ramp], edge)
    w[-ramp:] = np.minimum(w[-ramp:], edge[::-1])
    return np.maximum(w, 1e-3)  # a pixel only one window covers keeps that window's vote


@dataclass(frozen=True)
class RowPlan:
    """What one row of windows finalises: ``rows`` scene rows from its top, having taken
    ``carried_in`` rows from the row above and leaving ``carry_out`` to the row below.
    """

    rows: int
    carried_in: int
    carry_out: int


class WindowGrid:
    """The windows of a scene of ``height`` × ``width`` px, ``window`` px each, ``stride``
    apart, run ``batch_size`` neighbouring windows of a row at a time.

    A batch finalises the columns from its first window to the next batch's first window
    (no later window of the row touches them); a row finalises the rows down to the next
    row's first (its lower rows are shared with the next row and carried over).
    """

    def __init__(self, height: int, width: int, window: int, stride: int, batch_size: int):
        self.height, self.width, self.window, self.batch_size = height, width, window, batch_size
        self.ys = window_starts(height, window, stride)
        self.xs = window_starts(width, window, stride)
        self.pad_h, self.pad_w = padded_shape(height, width, window)
        #: every forward pass: (window row, its first window's index in ``xs``)
        self.jobs = [
            (r, b) for r in range(len(self.ys)) for b in range(0, len(self.xs), batch_size)
        ]

    @property
    def windows(self) -> int:
        """How many windows cover the scene."""
        return len(self.xs) * len(self.ys)

    def batch_x(self, b: int) -> list[int]:
        """Left edges of the windows of the batch that starts at ``xs[b]``."""
        return self.xs[b : b + self.batch_size]

    def span(self, b: int) -> tuple[int, int]:
        """Columns [x0, x1) the batch's windows cover (x1 may pass the scene edge)."""
        batch_x = self.batch_x(b)
        return batch_x[0], batch_x[-1] + self.pad_w

    def final_columns(self, b: int) -> tuple[int, int]:
        """Columns [c0, c1) the batch finalises."""
        nxt = b + self.batch_size
        return self.xs[b], self.xs[nxt] if nxt < len(self.xs) else self.width

    def row_plan(self, r: int) -> RowPlan:
        """The rows row ``r`` of windows finalises, takes from above and carries below."""
        y, last = self.ys[r], r + 1 == len(self.ys)
        rows = (min(self.height, y + self.pad_h) if last else self.ys[r + 1]) - y
        carried_in = self.ys[r - 1] + self.pad_h - y if r else 0
        return RowPlan(rows, carried_in, 0 if last else self.pad_h - rows)

    def carry_rows(self) -> int:
        """The most rows one row of windows shares with the next."""
        gaps = [b - a for a, b in zip(self.ys, self.ys[1:], strict=False)] or [self.pad_h]
        return max(0, self.pad_h - min(gaps))

    def widest_span(self) -> int:
        """The widest span of one batch, in columns."""
        return max(
            x1 - x0 for x0, x1 in (self.span(b) for b in range(0, len(self.xs), self.batch_size))
        )


def read_span(src, y: int, x0: int, x1: int, rows: int, fill: float) -> np.ndarray:
    """Input rows [y, y + rows) × columns [x0, x1), padded with ``fill`` beyond the scene."""
    h = min(rows, src.height - y)
    w = min(x1, src.width) - x0
    data = src.read(window=Window(x0, y, w, h))
    if h < rows or w < x1 - x0:
        data = np.pad(data, ((0, 0), (0, rows - h), (0, x1 - x0 - w)), constant_values=fill)
    return data


@dataclass
class Batch:
    """One forward pass's input and what is known of its pixels."""

    windows: np.ndarray  #: (N, C, rows, cols)
    span: np.ndarray  #: (C, rows, span columns): the scene under the batch's windows
    nodata: np.ndarray | None  #: True where the span has no data (None: the scene has none)
    flagged: np.ndarray | None  #: the quality mask over the span (True: masked)


class BatchReader:
    """Reads a :class:`WindowGrid`'s batches from an open raster ``src``, with
    ``read_mask(y, x0, x1, rows)`` the quality mask of the same span (None: no mask).

    Pixels equal to the scene's nodata in every band, and NaN or ±inf in any band, are no
    data; non-finite values are zeroed so that no NaN reaches the network.
    """

    def __init__(self, src, grid: WindowGrid, read_mask: Callable | None = None):
        self.src, self.grid, self.read_mask = src, grid, read_mask
        self.nodata = src.nodata
        self.fill = self.nodata if self.nodata is not None else 0

    def read(self, r: int, b: int) -> Batch:
        """The batch of row ``r`` that starts at window ``b``."""
        g = self.grid
        x0, x1 = g.span(b)
        span = read_span(self.src, g.ys[r], x0, x1, g.pad_h, self.fill)
        nodata = np.all(span == self.nodata, axis=0) if self.nodata is not None else None
        if np.issubdtype(span.dtype, np.floating):
            broken = ~np.isfinite(span).all(axis=0)
            if broken.any():
                span[:, broken] = 0
                nodata = broken if nodata is None else nodata | broken
        windows = np.stack([span[:, :, x - x0 : x - x0 + g.pad_w] for x in g.batch_x(b)])
        flagged = self.read_mask(g.ys[r], x0, x1, g.pad_h) if self.read_mask else None
        return Batch(windows, span, nodata, flagged)


def calibration_windows(src, size: int, count: int = 8) -> list[np.ndarray]:
    """Up to ``count`` ``size``² crops spread evenly over the scene, for int8 calibration.

    Activation ranges are per tensor, so small crops from across the scene calibrate as well as
    whole windows at a fraction of the cost (observers are slow): on the demo model eight 128²
    crops change the class of 0.029 % of pixels against fp32, as eight 256² crops do, at a third
    of the setup time. Much smaller crops leave the deepest layers only a few pixels to observe
    (32² crops: 41 % of classes kept).
    """
    size = min(size, src.height, src.width)
    ys = np.linspace(0, src.height - size, math.ceil(math.sqrt(count))).round().astype(int)
    xs = np.linspace(0, src.width - size, math.ceil(count / len(ys))).round().astype(int)
    pad = to_stride(size)
    fill = src.nodata if src.nodata is not None else 0
    return [
        read_span(src, int(y), int(x), int(x) + pad, pad, fill)[None]
        for y in np.unique(ys)
        for x in np.unique(xs)
    ][:count]
