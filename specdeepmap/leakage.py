"""Spatial leakage between the sets of a split: chips that touch or overlap across sets.

When a field or a wood crosses a chip border and a split puts one chip in training and its
neighbour in test, both models are scored on pixels they have nearly seen: the test figures
overstate every model, and a per-pixel learner (the RandomForest) profits most. Chips touch
when their extents on the same scene overlap or share an edge or a corner (chips cut with a
step no larger than the tile always do); a step larger than the tile (SpecDeepMap's tutorial:
224 px chips, step 275) leaves a gap.

This module finds which chips touch (:func:`touching_pairs`, a spatial hash: linear in the
number of chips), groups them (:func:`touch_groups`: connected chips, the unit the default
split assigns), and measures what a split leaks (:func:`measure`): for the validation and the
test set, the chips that touch a training chip, as a share of the set's chips and of its
labelled pixels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pandas is imported where a frame is built: the mapper never needs it
    import pandas as pd

#: set indices as the Dataset Maker uses them
TRAIN, VALIDATION, TEST, UNUSED = 0, 1, 2, 3


@dataclass(frozen=True)
class SetLeakage:
    """How much of one evaluation set touches the training set."""

    chips: int
    touching_chips: int
    labelled_pixels: int
    touching_pixels: int  #: labelled pixels of the touching chips

    @property
    def chip_share(self) -> float:
        """Share of the set's chips that touch a training chip."""
        return self.touching_chips / self.chips if self.chips else 0.0

    @property
    def pixel_share(self) -> float:
        """Share of the set's labelled pixels in chips that touch a training chip."""
        return self.touching_pixels / self.labelled_pixels if self.labelled_pixels else 0.0


@dataclass(frozen=True)
class Leakage:
    """What a split leaks into validation and test."""

    validation: SetLeakage
    test: SetLeakage

    @property
    def leaks(self) -> bool:
        """True when any validation or test chip touches a training chip."""
        return bool(self.validation.touching_chips or self.test.touching_chips)

    def to_dict(self) -> dict:
        """JSON-ready, with the shares."""
        return {
            name: {
                **asdict(part),
                "chip_share": round(part.chip_share, 4),
                "pixel_share": round(part.pixel_share, 4),
            }
            for name, part in (("validation", self.validation), ("test", self.test))
        }

    @classmethod
    def from_dict(cls, data: dict) -> Leakage:
        """Inverse of :meth:`to_dict`."""
        fields = ("chips", "touching_chips", "labelled_pixels", "touching_pixels")
        return cls(
            *(
                SetLeakage(**{k: int(data[name][k]) for k in fields})
                for name in ("validation", "test")
            )
        )

    def sentence(self) -> str:
        """One line for a report: what the test (and validation) set leaks."""
        test, val = self.test, self.validation
        if not self.leaks:
            return (
                "No validation or test chip touches a training chip (no spatial leakage "
                "between the sets)."
            )
        return (
            f"{test.touching_chips} of {test.chips} test chips ({test.pixel_share:.0%} of "
            f"the test pixels) and {val.touching_chips} of {val.chips} validation chips "
            "touch a training chip: their figures overstate the models (most the per-pixel "
            "RandomForest's) on new areas."
        )


def chip_extents(frame: pd.DataFrame) -> tuple[np.ndarray, ...]:
    """(scene code, x0, y0, x1, y1) of every chip, in scene pixels (end exclusive).

    ``frame`` needs ``scene``, ``x``, ``y`` and ``tile_x``; ``tile_y`` defaults to
    ``tile_x`` (square chips, as SpecDeepMap's names do not carry the height).
    """
    import pandas as pd

    scene = (
        pd.factorize(frame["scene"].astype(str))[0]
        if "scene" in frame
        else np.zeros(len(frame), np.int64)
    )
    x0 = frame["x"].to_numpy(np.int64)
    y0 = frame["y"].to_numpy(np.int64)
    width = frame["tile_x"].to_numpy(np.int64) if "tile_x" in frame else np.full(len(frame), 256)
    height = (
        frame["tile_y"].fillna(frame["tile_x"]).to_numpy(np.int64) if "tile_y" in frame else width
    )
    return scene, x0, y0, x0 + width, y0 + height


def touching_pairs(frame: pd.DataFrame) -> np.ndarray:
    """(i, j) index pairs, i < j, of chips of one scene that overlap or touch (edge, corner).

    A spatial hash on cells as large as the largest chip: two touching chips start at most one
    cell apart, so each chip is compared with the chips of 9 cells only.
    """
    scene, x0, y0, x1, y1 = chip_extents(frame)
    if len(x0) < 2:
        return np.empty((0, 2), np.int64)
    cell = int(max((x1 - x0).max(), (y1 - y0).max(), 1))
    cx, cy = x0 // cell, y0 // cell
    buckets: dict[tuple[int, int, int], list[int]] = {}
    for i, key in enumerate(zip(scene.tolist(), cx.tolist(), cy.tolist(), strict=True)):
        buckets.setdefault(key, []).append(i)
    pairs = []
    for (s, bx, by), members in buckets.items():
        near = np.array(
            [
                j
                for dx in (-1, 0, 1)
                for dy in (-1, 0, 1)
                for j in buckets.get((s, bx + dx, by + dy), ())
            ],
            np.int64,
        )
        for i in members:
            others = near[near > i]
            touch = (
                (x0[others] <= x1[i])
                & (x0[i] <= x1[others])
                & (y0[others] <= y1[i])
                & (y0[i] <= y1[others])
            )
            pairs.extend((i, int(j)) for j in others[touch])
    return np.array(pairs, np.int64).reshape(-1, 2)


def touch_groups(frame: pd.DataFrame, pairs: np.ndarray | None = None) -> np.ndarray:
    """Group index of every chip: chips connected through touching chips share a group."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    pairs = touching_pairs(frame) if pairs is None else pairs
    n = len(frame)
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def touching_other_sets(
    sets: np.ndarray, pairs: np.ndarray, which: int, others: tuple[int, ...]
) -> np.ndarray:
    """Boolean mask of the chips of set ``which`` that touch a chip of any set in ``others``."""
    hit = np.zeros(len(sets), bool)
    for a, b in ((pairs[:, 0], pairs[:, 1]), (pairs[:, 1], pairs[:, 0])):
        mine = (sets[a] == which) & np.isin(sets[b], others)
        hit[a[mine]] = True
    return hit


def measure(
    frame: pd.DataFrame, sets: np.ndarray, labelled: np.ndarray, pairs: np.ndarray | None = None
) -> Leakage:
    """What a split leaks.

    Per evaluation set, its chips (and labelled pixels) that touch a training chip.

    Args:
        frame: one row per chip with ``scene``, ``x``, ``y``, ``tile_x`` (``tile_y``).
        sets: set index of every chip (0 train, 1 validation, 2 test, 3 unused).
        labelled: labelled pixels of every chip.
        pairs: :func:`touching_pairs` of ``frame``, if already known.
    """
    pairs = touching_pairs(frame) if pairs is None else pairs
    labelled = np.asarray(labelled, np.int64)
    parts = []
    for which in (VALIDATION, TEST):
        mine = sets == which
        leak = touching_other_sets(sets, pairs, which, (TRAIN,))
        parts.append(
            SetLeakage(
                int(mine.sum()),
                int(leak.sum()),
                int(labelled[mine].sum()),
                int(labelled[leak].sum()),
            )
        )
    return Leakage(*parts)


def spatial_blocks(frame: pd.DataFrame, block_size: int) -> np.ndarray:
    """Block index of every chip: the chip grid of each scene cut into squares of
    ``block_size`` × ``block_size`` chips (the units of the ``spatial-blocks`` split).

    Args:
        frame: one row per chip with ``scene``, ``x``, ``y`` and ``tile_x`` (``tile_y``, default
            ``tile_x``) in pixels.
        block_size: chips per block edge.
    """
    import pandas as pd

    tile_x = frame["tile_x"] if "tile_x" in frame else pd.Series(256, index=frame.index)
    tile_y = frame["tile_y"] if "tile_y" in frame else tile_x
    keys = pd.Series(
        list(
            zip(
                frame["scene"],
                frame["x"] // (block_size * tile_x),
                frame["y"] // (block_size * tile_y),
                strict=True,
            )
        )
    )
    return pd.factorize(keys)[0]


def chip_units(chips: dict[str, tuple[int, int]], block_size: int | None = None) -> dict[str, int]:
    """The independent units of a set of chips, for resampling.

    Chips named by the Raster Splitter (``{scene}_tile_{x}_{y}.tif``, SpecDeepMap's names too) that
    touch share a unit, and so do chips of one spatial block when the split was made in blocks
    (``block_size``): the split kept a block's chips together because they are not independent,
    so the bootstrap draws them together too. Units are the connected groups of both relations.
    Chips without a position in their name are units of their own.

    Args:
        chips: (height, width) of each chip, by file name.
        block_size: chips per block edge of a ``spatial-blocks`` split; None when the split
            was not made in blocks.
    """
    import pandas as pd
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    from specdeepmap.chipping import CHIP_NAME

    rows = []
    for name, (height, width) in chips.items():
        found = CHIP_NAME.match(name)
        rows.append(
            {
                "scene": found["scene"] if found else f"\0{name}",
                "x": int(found["x"]) if found else 0,
                "y": int(found["y"]) if found else 0,
                "tile_x": int(width),
                "tile_y": int(height),
            }
        )
    if not rows:
        return {}
    frame = pd.DataFrame(rows)
    units = touch_groups(frame)
    if block_size:
        blocks = spatial_blocks(frame, block_size)
        n = len(frame)
        # link each chip to its touch group's and its block's node: chips sharing either meet
        left = np.arange(n)
        graph = coo_matrix(
            (
                np.ones(2 * n),
                (np.concatenate([left, left]), np.concatenate([n + units, 2 * n + blocks])),
            ),
            shape=(3 * n, 3 * n),
        )
        units = connected_components(graph, directed=False)[1][:n]
        units = pd.factorize(units)[0]
    return dict(zip(chips, units.tolist(), strict=True))


def split_block_size(folder: str) -> int | None:
    """The block size of a dataset folder's ``spatial-blocks`` split (its ``split.json``);
    None for other strategies or a folder without the record.
    """
    import json

    from specdeepmap import storage

    try:
        record = json.loads(storage.read_text(storage.join(folder, "split.json")))
        if record.get("report", {}).get("strategy") != "spatial-blocks":
            return None
        return int(record["params"]["block_size"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def read_split_leakage(folder: str) -> Leakage | None:
    """The leakage recorded in a dataset folder's ``split.json``.

    None when the split was made before leakage was measured, or elsewhere.
    """
    import json

    from specdeepmap import storage

    uri = storage.join(folder, "split.json")
    try:
        data = json.loads(storage.read_text(uri)).get("report", {}).get("leakage")
        return Leakage.from_dict(data) if data else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


__all__ = [
    "Leakage",
    "SetLeakage",
    "chip_extents",
    "chip_units",
    "spatial_blocks",
    "split_block_size",
    "measure",
    "read_split_leakage",
    "touch_groups",
    "touching_other_sets",
    "touching_pairs",
]
