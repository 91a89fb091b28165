"""Spatial leakage.

Chips that touch across sets are found, measured, avoided by default and named wherever models are
compared.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

from specdeepmap.leakage import Leakage, measure, touch_groups, touching_pairs
from specdeepmap.params import EvaluateParams


def _grid(n: int, tile: int, step: int, scene: str = "a") -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"scene": scene, "x": c * step, "y": r * step, "tile_x": tile, "tile_y": tile}
            for r in range(n)
            for c in range(n)
        ]
    )


def _brute_force_touching(frame: pd.DataFrame) -> set[tuple[int, int]]:
    """Every pair compared directly (no spatial hash).

    Closed extents overlap on both axes, same scene.
    """
    scene = frame["scene"].to_numpy()
    x, y = frame["x"].to_numpy(), frame["y"].to_numpy()
    w = frame["tile_x"].to_numpy()
    h = frame["tile_y"].to_numpy() if "tile_y" in frame else w
    touch = (
        (scene[:, None] == scene[None])
        & (x[:, None] <= x[None] + w[None])
        & (x[None] <= x[:, None] + w[:, None])
        & (y[:, None] <= y[None] + h[None])
        & (y[None] <= y[:, None] + h[:, None])
    )
    return {(int(i), int(j)) for i, j in zip(*np.nonzero(np.triu(touch, 1)), strict=True)}


@pytest.mark.parametrize("step, expected", [(10, 2 * 4 * 3 + 2 * 3 * 3), (11, 0), (5, None)])
def test_touching_pairs_match_the_geometry(step, expected):
    """A 4 × 4 grid of 10 px chips.

    With step 10 every chip touches its 8 neighbours (24 edge and 18 corner pairs); with step 11
    none touch; with step 5 they overlap (checked against comparing every pair).
    """
    frame = _grid(4, 10, step)
    found = {tuple(p) for p in touching_pairs(frame).tolist()}
    assert found == _brute_force_touching(frame)
    if expected is not None:
        assert len(found) == expected
    two = pd.concat([_grid(3, 10, 10, "a"), _grid(3, 10, 10, "b")], ignore_index=True)
    pairs = touching_pairs(two)
    assert all(two["scene"][i] == two["scene"][j] for i, j in pairs)  # never across scenes
    assert len(set(touch_groups(two))) == 2


def test_measure_counts_touching_chips_and_their_pixels():
    """The evaluation chips touching training chips, and their pixels, on a 3 x 3 grid."""
    frame = _grid(3, 10, 10)  # chips 0..8, row-major
    sets = np.array([0, 0, 0, 3, 3, 3, 1, 3, 2])  # val chip 6 touches nothing in train
    labelled = np.arange(1, 10) * 10
    leak = measure(frame, sets, labelled)
    assert (leak.validation.chips, leak.validation.touching_chips) == (1, 0)
    assert (leak.test.chips, leak.test.touching_chips) == (1, 0)
    sets[4] = 0  # the centre chip touches every other chip
    leak = measure(frame, sets, labelled)
    assert leak.validation.touching_chips == 1 and leak.test.touching_chips == 1
    assert leak.test.pixel_share == 1.0 and leak.leaks
    assert Leakage.from_dict(leak.to_dict()) == leak
    assert "1 of 1 test chips" in leak.sentence()


def _extents_touch(manifest: pd.DataFrame, sets: dict[str, str]) -> tuple[int, int]:
    """(validation, test) chips touching a training chip, by comparing every pair."""
    frame = manifest.reset_index(drop=True)
    role = frame["chip"].map(sets).fillna("unused").to_numpy()
    touching = {"validation": set(), "test": set()}
    for i, j in _brute_force_touching(frame):
        for a, b in ((i, j), (j, i)):
            if role[a] in touching and role[b] == "train":
                touching[role[a]].add(a)
    return len(touching["validation"]), len(touching["test"])


def _sets_of(folder) -> dict[str, str]:
    out = {}
    for name in ("train", "validation", "test"):
        for mask in pd.read_csv(folder / f"{name}_files.csv")["mask"]:
            out[os.path.basename(mask)] = name
    return out


def test_the_default_split_keeps_touching_chips_apart(tmp_path):
    """Adjacent chips of a generated scene.

    The default split leaves no validation or test chip touching a training chip (checked pair by
    pair on the chip positions), records the leakage (none) and the buffer; SpecDeepMap's plain
    split, asked for by name, leaks and says how much.
    """
    from specdeepmap.chipping import chip_scene, read_manifests
    from specdeepmap.params import ChipParams, SplitParams
    from specdeepmap.sample_data import generate_scene
    from specdeepmap.splitting import make_dataset

    scene = generate_scene(str(tmp_path / "scene"), 640, 640, seed=7, field_size=96)
    chips = tmp_path / "chips"
    chip_scene(
        scene.image_uri,
        scene.label_uri,
        str(chips),
        ChipParams(tile_x=32, tile_y=32, step_x=32, step_y=32, min_coverage=30),
    )
    manifest = read_manifests(str(chips))
    report = make_dataset(str(chips), SplitParams(scaler=10000))
    assert report.strategy == "balanced-groups"
    assert _extents_touch(manifest, _sets_of(chips)) == (0, 0)
    assert report.leakage["test"]["touching_chips"] == 0 and report.buffer_chips > 0
    record = json.loads((chips / "split.json").read_text())
    assert record["report"]["leakage"]["validation"]["touching_chips"] == 0
    table = pd.read_csv(chips / "Split_leakage.csv")
    assert list(table["Set"]) == ["Validation", "Test"]
    assert (table["Chips Touching Train"] == 0).all()
    assert any("left out of training" in w for w in report.warnings)

    plain = make_dataset(
        str(chips),
        SplitParams(scaler=10000, strategy="balanced"),
        out_folder=str(tmp_path / "plain"),
    )
    touching = _extents_touch(manifest, _sets_of(tmp_path / "plain"))
    assert touching[1] > 0
    assert (
        plain.leakage["validation"]["touching_chips"],
        plain.leakage["test"]["touching_chips"],
    ) == touching
    assert any(w.startswith("spatial leakage:") and "balanced-groups" in w for w in plain.warnings)
    # the cost of the separation, as reported: the class-share gap stays moderate
    assert report.max_share_gap_pp < plain.max_share_gap_pp + 10


def test_chips_with_gaps_split_as_before(tmp_path):
    """A step larger than the tile (SpecDeepMap's tutorial).

    No chips touch, so the default split is SpecDeepMap's balanced split, chip for chip, with no
    buffer.
    """
    from specdeepmap.chipping import chip_scene
    from specdeepmap.params import ChipParams, SplitParams
    from specdeepmap.sample_data import generate_scene
    from specdeepmap.splitting import make_dataset

    scene = generate_scene(str(tmp_path / "scene"), 640, 640, seed=7, field_size=96)
    chips = tmp_path / "chips"
    chip_scene(
        scene.image_uri,
        scene.label_uri,
        str(chips),
        ChipParams(tile_x=32, tile_y=32, step_x=40, step_y=40, min_coverage=30),
    )
    grouped = make_dataset(str(chips), SplitParams(normalize=False), out_folder=str(tmp_path / "g"))
    plain = make_dataset(
        str(chips),
        SplitParams(normalize=False, strategy="balanced"),
        out_folder=str(tmp_path / "p"),
    )
    assert _sets_of(tmp_path / "g") == _sets_of(tmp_path / "p")
    assert grouped.buffer_chips == 0 and not Leakage.from_dict(grouped.leakage).leaks
    assert grouped.max_share_gap_pp == plain.max_share_gap_pp


@pytest.mark.slow
def test_the_shared_sentinel2_scene_splits_without_leakage(shared_data, tmp_path):
    """The shared S2 scene's adjacent chips: the default split leaks nothing.

    The scene is cut into 64 px chips at 10 % coverage (the case where the forest looked
    better); SpecDeepMap's plain split leaks nearly every test chip.
    """
    from specdeepmap.chipping import chip_scene, read_manifests
    from specdeepmap.params import ChipParams, SplitParams
    from specdeepmap.splitting import make_dataset

    folder = shared_data / "s2l1c_brandenburg_osm"
    chips = tmp_path / "chips"
    chip_scene(
        str(folder / "s2l1c_T33UUU_20170216_13b_10m.tif"),
        str(folder / "osm_landuse_labels_10m.tif"),
        str(chips),
        ChipParams(tile_x=64, tile_y=64, step_x=64, step_y=64, min_coverage=10),
    )
    manifest = read_manifests(str(chips))
    report = make_dataset(str(chips), SplitParams(scaler=10000, normalize=False))
    assert report.strategy == "balanced-groups"
    assert _extents_touch(manifest, _sets_of(chips)) == (0, 0)
    assert report.chips["test"] >= 15 and report.chips["train"] >= 0.6 * len(manifest)
    plain = make_dataset(
        str(chips),
        SplitParams(scaler=10000, normalize=False, strategy="balanced"),
        out_folder=str(tmp_path / "plain"),
    )
    assert plain.leakage["test"]["chip_share"] > 0.9


def test_the_comparison_names_the_leakage(trained, dataset, tmp_path):
    """The Tester's JSON and the model card say how far the test chips touch training chips.

    The same chips split the plain way make the card say the split leaks, and leak far more than the
    session's default split of them.
    """
    import shutil

    from specdeepmap.evaluation import evaluate_model
    from specdeepmap.inference import read_model_file
    from specdeepmap.model_card import CardScores, dataset_facts, summary
    from specdeepmap.params import SplitParams
    from specdeepmap.splitting import make_dataset

    _, result = trained
    chips = tmp_path / "chips"
    shutil.copytree(dataset / "chips", chips)
    make_dataset(
        str(chips),
        SplitParams(
            train_percent=70,
            validation_percent=15,
            test_percent=15,
            scaler=10000,
            strategy="balanced",
        ),
    )
    report = evaluate_model(
        str(chips / "test_files.csv"),
        result.model_file,
        str(tmp_path / "test"),
        EvaluateParams(device="cpu"),
        log_to_mlflow=False,
    )
    assert report.split_leakage is not None and report.split_leakage.test.touching_chips > 0
    written = json.loads((tmp_path / "test" / "test_metrics.json").read_text())
    assert (
        written["split_leakage"]["test"]["touching_chips"]
        == report.split_leakage.test.touching_chips
    )
    config, _ = read_model_file(result.model_file)
    text = summary(config, dataset_facts(str(chips)), CardScores())
    assert "**The split leaks**" in text and "test chips" in text
    default = dataset_facts(str(dataset / "chips"))["leakage"]["test"]
    plain = dataset_facts(str(chips))["leakage"]["test"]
    assert default["touching_chips"] < plain["touching_chips"] == plain["chips"]
