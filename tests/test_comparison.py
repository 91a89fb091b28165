"""The paired bootstrap that says whether the test chips can tell two models apart."""

from __future__ import annotations

import numpy as np
import pytest

from specdeepmap.comparison import Difference, paired_bootstrap
from specdeepmap.errors import InputMismatchError
from specdeepmap.metrics import accumulate, mean_iou, metrics_from_matrix

CLASSES = [1, 2, 3]


def chip_matrices(truths: list[np.ndarray], preds: list[np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for i, (truth, pred) in enumerate(zip(truths, preds, strict=True)):
        out[f"chip_{i}.tif"] = m = np.zeros((3, 3), np.int64)
        accumulate(m, truth, pred, CLASSES)
    return out


def noisy(truth: np.ndarray, share: float, rng: np.random.Generator) -> np.ndarray:
    """``truth`` with ``share`` of its pixels set to a random class."""
    pred = truth.copy()
    flip = rng.random(truth.shape) < share
    pred[flip] = rng.choice(CLASSES, flip.sum())
    return pred


@pytest.fixture
def truths() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.choice(CLASSES, (16, 16)) for _ in range(12)]


def test_pooled_mean_iou_equals_the_testers_mean_iou():
    rng = np.random.default_rng(1)
    stack = rng.integers(0, 50, (5, 4, 4))
    stack[0, 2, :] = stack[0, :, 2] = 0  # a class absent from truth and prediction
    expected = [metrics_from_matrix(m, [1, 2, 3, 4]).mean_iou for m in stack]
    assert mean_iou(stack) == pytest.approx(expected)


def test_a_model_better_on_every_chip_is_called_better(truths):
    rng = np.random.default_rng(2)
    good = chip_matrices(truths, [noisy(t, 0.1, rng) for t in truths])
    bad = chip_matrices(truths, [noisy(t, 0.5, rng) for t in truths])
    result = paired_bootstrap(good, bad)
    pooled = [metrics_from_matrix(sum(m.values()), CLASSES).mean_iou for m in (good, bad)]
    assert result.difference == pytest.approx(pooled[0] - pooled[1])
    assert 0 < result.low <= result.difference <= result.high
    assert result.verdict == "better" and result.share_a_better == 1.0
    assert result.chips == 12 and result.level == 0.9
    assert paired_bootstrap(bad, good).verdict == "worse"
    assert "the test chips favour the forest" in paired_bootstrap(bad, good).sentence(
        "the model", "the forest"
    )


def test_the_same_predictions_differ_by_exactly_nothing(truths):
    rng = np.random.default_rng(3)
    a = chip_matrices(truths, [noisy(t, 0.3, rng) for t in truths])
    result = paired_bootstrap(a, {k: v.copy() for k, v in a.items()})
    assert (result.difference, result.low, result.high) == (0.0, 0.0, 0.0)
    assert result.verdict == "undecided"


def test_models_that_win_different_chips_are_undecided(truths):
    """Each model better on half the chips: the interval spans 0, and more such chips
    narrow it.
    """
    rng = np.random.default_rng(4)
    a_preds = [noisy(t, 0.1 if i % 2 else 0.5, rng) for i, t in enumerate(truths)]
    b_preds = [noisy(t, 0.5 if i % 2 else 0.1, rng) for i, t in enumerate(truths)]
    few = paired_bootstrap(chip_matrices(truths, a_preds), chip_matrices(truths, b_preds))
    assert few.low < 0 < few.high and few.verdict == "undecided"
    assert "cannot tell the two apart" in few.sentence("A", "B")
    assert "With only" not in few.sentence("A", "B")  # 12 chips
    four = paired_bootstrap(
        chip_matrices(truths[:4], a_preds[:4]), chip_matrices(truths[:4], b_preds[:4])
    )
    assert "With only 4 test chips the interval is narrower" in four.sentence("A", "B")
    many = paired_bootstrap(
        chip_matrices(truths * 8, a_preds * 8), chip_matrices(truths * 8, b_preds * 8)
    )
    assert many.high - many.low < (few.high - few.low) / 2
    assert Difference.from_dict(few.to_dict()) == few  # it travels as plain data


def test_models_scored_on_other_chips_are_not_compared(truths):
    rng = np.random.default_rng(5)
    a = chip_matrices(truths, [noisy(t, 0.1, rng) for t in truths])
    b = dict(a)
    b["elsewhere.tif"] = b.pop("chip_0.tif")
    with pytest.raises(InputMismatchError, match="chip_0.tif"):
        paired_bootstrap(a, b)


def test_touching_chips_are_resampled_together():
    """Chips of one unit (a group of touching chips) are drawn together.

    With every chip in one unit each draw is the whole set, so the interval collapses onto the
    difference; with one unit per chip it is the chip bootstrap; the sentence counts the units.
    """
    from specdeepmap.comparison import paired_bootstrap
    from specdeepmap.leakage import chip_units

    rng = np.random.default_rng(3)
    a = {f"s_tile_{i * 32}_0.tif": rng.integers(0, 50, (3, 3)) for i in range(12)}
    b = {name: rng.integers(0, 50, (3, 3)) for name in a}
    single = paired_bootstrap(a, b, units={name: 0 for name in a})
    assert single.units == 1 and single.chips == 12
    assert single.low == pytest.approx(single.difference) == pytest.approx(single.high)
    assert single.difference != 0 and single.verdict == "undecided"  # one draw proves nothing
    text = single.sentence("A", "B")
    assert "over 1 resampled groups of neighbouring test chips (12 chips)" in text
    assert "only 1 independent groups" in single.sentence("A", "B")
    each = paired_bootstrap(a, b, units={name: i for i, name in enumerate(a)})
    plain = paired_bootstrap(a, b)
    assert (each.low, each.high, each.units) == (plain.low, plain.high, 12)
    # chips 32 px apart in a row touch: one unit; 40 px apart leave gaps: a unit each
    assert len(set(chip_units({n: (32, 32) for n in a}).values())) == 1
    apart = {f"s_tile_{i * 40}_0.tif": (32, 32) for i in range(5)}
    assert len(set(chip_units(apart).values())) == 5
    assert chip_units({"no_position.tif": (8, 8), "other.tif": (8, 8)}) == {
        "no_position.tif": 0,
        "other.tif": 1,
    }


def test_a_splits_spatial_blocks_are_resampled_together(tmp_path):
    """Chips of one block of a ``spatial-blocks`` split are one unit even where they do not
    touch (the split kept them together because they are not independent); blocks that touch
    join too; the Tester finds the block size in the dataset folder's ``split.json``.
    """
    import json

    from specdeepmap.leakage import chip_units, split_block_size

    # 32 px chips 40 px apart: none touch. Blocks of 2 x 2 chips = 64 px edges
    apart = {f"s_tile_{x}_{y}.tif": (32, 32) for x in (0, 40, 160, 200) for y in (0, 200)}
    assert len(set(chip_units(apart).values())) == 8
    units = chip_units(apart, block_size=2)
    # block x index: 0 // 64 = 40 // 64 = 0, 160 // 64 = 2, 200 // 64 = 3; y: 0 and 3
    expected = [
        {"s_tile_0_0.tif", "s_tile_40_0.tif"},
        {"s_tile_160_0.tif"},
        {"s_tile_200_0.tif"},
        {"s_tile_0_200.tif", "s_tile_40_200.tif"},
        {"s_tile_160_200.tif"},
        {"s_tile_200_200.tif"},
    ]
    found = {}
    for name, unit in units.items():
        found.setdefault(unit, set()).add(name)
    assert sorted(map(sorted, found.values())) == sorted(map(sorted, expected))
    # a touching pair in different blocks joins them: 64-px chip at 32 reaches 96 (block 1)
    joined = chip_units({"s_tile_0_0.tif": (32, 64), "s_tile_64_0.tif": (32, 32)}, block_size=1)
    assert len(set(joined.values())) == 1

    (tmp_path / "split.json").write_text(
        json.dumps({"params": {"block_size": 3}, "report": {"strategy": "spatial-blocks"}})
    )
    assert split_block_size(str(tmp_path)) == 3
    (tmp_path / "split.json").write_text(
        json.dumps({"params": {"block_size": 3}, "report": {"strategy": "balanced-groups"}})
    )
    assert split_block_size(str(tmp_path)) is None
    assert split_block_size(str(tmp_path / "missing")) is None
