"""Seamless blending of overlapping windows' class probabilities, in bounded memory.

Each window's probabilities are added under a weight window that ramps down at its edges
(:func:`specdeepmap.windows.weight_window`), with the weights' sum kept in one more channel.
Only two float buffers exist: ``work``, the current batch's columns (constant size), and
``carry``, what a row of windows adds to the rows it shares with the next row (classes ×
overlap rows × scene width), the one buffer that spans the scene. A batch's columns are
final as soon as no later window of its row touches them.
"""

from __future__ import annotations

import numpy as np
import torch

from specdeepmap.windows import RowPlan, WindowGrid


class Blender:
    """Blends ``classes`` probability channels over a :class:`WindowGrid`, batch by batch in
    the grid's job order: :meth:`start`, :meth:`add`, then :meth:`finish` for each batch.
    """

    def __init__(self, grid: WindowGrid, classes: int, weights: np.ndarray):
        self.grid, self.k = grid, classes
        self.carry = np.zeros(
            (classes + 1, grid.carry_rows(), max(grid.width, grid.pad_w)), np.float32
        )
        self.work = np.zeros((classes + 1, grid.pad_h, grid.widest_span()), np.float32)
        self.work_t = torch.from_numpy(self.work)  # a view: torch's element-wise ops use every core
        self.weights_t = torch.from_numpy(np.ascontiguousarray(weights[: grid.pad_h, : grid.pad_w]))
        self.plan = RowPlan(0, 0, 0)
        self.work_x = self.pulled = 0  # the work buffer's first column; columns pulled into it

    def start(self, r: int, b: int) -> None:
        """Make room for batch ``b`` of row ``r``: a new row clears the buffer; a further
        batch drops the finalised columns left of it. Then what earlier rows added to the
        batch's columns is taken in from the carry.
        """
        c0, end = self.grid.span(b)
        if b == 0:
            self.plan = self.grid.row_plan(r)
            self.work[:] = 0
            self.work_x = self.pulled = 0
        else:
            keep = self.pulled - c0
            self.work[:, :, :keep] = self.work[
                :, :, c0 - self.work_x : self.pulled - self.work_x
            ].copy()
            self.work[:, :, keep:] = 0
            self.work_x = c0
        carried_in = self.plan.carried_in
        if carried_in and end > self.pulled:
            self.work[:, :carried_in, self.pulled - self.work_x : end - self.work_x] += self.carry[
                :, :carried_in, self.pulled : end
            ]
        self.pulled = max(self.pulled, end)

    def add(self, b: int, probabilities: torch.Tensor) -> None:
        """Add the batch's (N, classes, rows, cols) probabilities under the weight window."""
        pad_w = self.grid.pad_w
        for i, x in enumerate(self.grid.batch_x(b)):
            region = self.work_t[:, :, x - self.work_x : x - self.work_x + pad_w]
            region[: self.k].addcmul_(probabilities[i], self.weights_t)
            region[self.k].add_(self.weights_t)

    def finish(self, b: int) -> np.ndarray:
        """The batch's final pixels: (classes + 1, rows, columns [c0, c1)) of weighted sums,
        the weight sum last (the same for every class: the argmax needs no division); the
        rows the next row of windows shares are carried over to it.
        """
        c0, c1 = self.grid.final_columns(b)
        done = self.work[:, :, : c1 - c0]
        if self.plan.carry_out:
            self.carry[:, : self.plan.carry_out, c0:c1] = done[:, self.plan.rows :]
        return done[:, : self.plan.rows]
