"""Dataset Maker: CSV formats, balancing, weights, band statistics and errors."""

import os

import numpy as np
import pandas as pd
import pytest
import rasterio

from specdeepmap.balancing import assign, quality
from specdeepmap.errors import (
    EmptyDatasetError,
    InvalidParameterError,
    MissingInputError,
    SplitInfeasibleError,
    UnreadableInputError,
)
from specdeepmap.params import SplitParams
from specdeepmap.splitting import band_statistics, make_dataset
from tests.conftest import write_raster

SUMMARY_COLUMNS = [
    "Class ID",
    "Train Count",
    "Train Percentage",
    "Validation Count",
    "Validation Percentage",
    "Test Count",
    "Test Percentage",
    "Class Train Weight",
    "Scaler",
    "Ignored Background : Class Zero",
]


def make_chip_folder(folder, n=40, classes=(1, 5, 200), size=16, seed=0, nodata=-1.0):
    """Chips with per-chip dominant classes, float32 images with some nodata pixels."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder / "images")
    os.makedirs(folder / "labels")
    for i in range(n):
        name = f"scene_tile_{(i % 8) * size}_{(i // 8) * size}.tif"
        labels = rng.choice(
            [0, *classes], size=(size, size), p=[0.3] + [0.7 / len(classes)] * len(classes)
        ).astype(np.uint8)
        labels[: size // 2] = classes[i % len(classes)]
        image = rng.normal(1000, 100, size=(3, size, size)).astype(np.float32)
        image[:, 0, 0] = nodata
        image[1, 1, :] = nodata  # nodata in one band only
        write_raster(folder / "images" / name, image, nodata=nodata)
        write_raster(folder / "labels" / name, labels)
    return folder


def test_outputs_have_specdeepmaps_names_columns_and_values(tmp_path):
    folder = make_chip_folder(tmp_path / "chips", n=60)
    # SpecDeepMap's own split over single chips (its neighbours touch: tests/test_leakage.py)
    report = make_dataset(str(folder), SplitParams(scaler=10000, strategy="balanced"))
    files = {k: pd.read_csv(folder / f"{k}_files.csv") for k in ("train", "validation", "test")}
    for frame in files.values():
        assert list(frame.columns) == ["image", "mask"]
        assert frame["image"].str.startswith("images/").all()
        assert (frame["image"].str[7:] == frame["mask"].str[7:]).all()
    assert [len(files[k]) for k in ("train", "validation", "test")] == [48, 6, 6]
    all_chips = pd.concat(files.values())["image"]
    assert all_chips.is_unique and len(all_chips) == 60

    summary = pd.read_csv(folder / "Summary_train_val.csv")
    assert list(summary.columns[:10]) == SUMMARY_COLUMNS
    assert list(summary["Class ID"]) == [1, 5, 200] == report.class_values
    assert (summary["Scaler"] == 10000).all()
    assert (summary["Ignored Background : Class Zero"] == "Yes").all()
    # counts recomputed from the label chips themselves
    for title, key in (("Train", "train"), ("Validation", "validation"), ("Test", "test")):
        labels = np.concatenate(
            [rasterio.open(folder / m).read(1).ravel() for m in files[key]["mask"]]
        )
        expected = [(labels == c).sum() for c in (1, 5, 200)]
        assert list(summary[f"{title} Count"]) == expected
        np.testing.assert_allclose(
            summary[f"{title} Percentage"], np.round(np.array(expected) / sum(expected) * 100, 2)
        )
    share = summary["Train Count"] / summary["Train Count"].sum()
    np.testing.assert_allclose(summary["Class Train Weight"], np.round(1 - share, 4))
    assert summary["Max Class Share Gap (pp)"].iloc[0] == pytest.approx(
        report.max_share_gap_pp, abs=1e-4
    )
    assert report.max_share_gap_pp < 3


def test_band_statistics_match_numpy_with_nodata_excluded_before_scaling(tmp_path):
    folder = make_chip_folder(tmp_path / "chips")
    make_dataset(str(folder), SplitParams(scaler=10000))
    train = pd.read_csv(folder / "train_files.csv")["image"]
    stack = np.stack([rasterio.open(folder / p).read() for p in train]).astype(np.float64)
    stats = pd.read_csv(folder / "Normalize_Bands.csv")
    assert list(stats.columns) == [
        "Band_Number",
        "std",
        "mean",
        "std and mean already scaled by scaler",
    ]
    for band in range(3):
        values = stack[:, band].ravel()
        values = values[values != -1.0] / 10000
        assert stats["mean"][band] == pytest.approx(values.mean(), rel=1e-12)
        assert stats["std"][band] == pytest.approx(values.std(), rel=1e-9)


def test_inverse_frequency_weights_and_no_background(tmp_path):
    folder = tmp_path / "chips"
    make_chip_folder(folder, classes=(2, 3))
    for name in os.listdir(folder / "labels"):  # label every pixel
        path = folder / "labels" / name
        labels = rasterio.open(path).read(1)
        write_raster(path, np.where(labels == 0, 2, labels).astype(np.uint8))
    make_dataset(str(folder), SplitParams(class_weighting="inverse-frequency", normalize=False))
    summary = pd.read_csv(folder / "Summary_train_val.csv")
    counts = summary["Train Count"].to_numpy()
    np.testing.assert_allclose(
        summary["Class Train Weight"], np.round(counts.sum() / (2 * counts), 4)
    )
    assert (summary["Ignored Background : Class Zero"] == "No").all()
    assert ",None," in (folder / "Summary_train_val.csv").read_text().splitlines()[1]
    assert not (folder / "Normalize_Bands.csv").exists()


def test_seeded_split_is_reproducible_and_seed_matters(tmp_path):
    folder = make_chip_folder(tmp_path / "chips", n=64)
    make_dataset(str(folder), SplitParams(seed=1, normalize=False))
    first = (folder / "test_files.csv").read_text()
    make_dataset(str(folder), SplitParams(seed=1, normalize=False))
    assert (folder / "test_files.csv").read_text() == first
    make_dataset(str(folder), SplitParams(seed=2, normalize=False))
    assert (folder / "test_files.csv").read_text() != first


def test_spatial_blocks_keep_neighbours_together(tmp_path):
    folder = make_chip_folder(tmp_path / "chips", n=64)
    make_dataset(
        str(folder),
        SplitParams(
            strategy="spatial-blocks",
            block_size=2,
            normalize=False,
            train_percent=50,
            validation_percent=25,
            test_percent=25,
        ),
    )
    set_of = {}
    for key in ("train", "validation", "test"):
        for image in pd.read_csv(folder / f"{key}_files.csv")["image"]:
            x, y = (int(v) for v in image[:-4].split("_")[-2:])
            set_of[(x // 32, y // 32)] = set_of.get((x // 32, y // 32), set()) | {key}
    assert all(len(sets) == 1 for sets in set_of.values())
    assert len({s for sets in set_of.values() for s in sets}) == 3


def test_balancing_beats_two_points_on_skewed_data():
    rng = np.random.default_rng(0)
    freq = rng.dirichlet(np.ones(7) * 0.7)
    counts = np.zeros((255, 7))
    for i in range(255):
        cls = rng.choice(7, size=rng.integers(1, 4), replace=False, p=freq)
        counts[i, cls] = rng.dirichlet(np.ones(len(cls))) * 40000
    sets = assign(counts, (0.8, 0.1, 0.1), seed=42)
    achieved = quality(counts, sets, 3, 0.01)
    assert np.bincount(sets, minlength=4).tolist() == [203, 26, 26, 0]
    assert achieved.max_share_gap_pp < 2 and achieved.min_share_ok
    random_sets = np.repeat([0, 1, 2], [203, 26, 26])[rng.permutation(255)]
    assert achieved.max_share_gap_pp < quality(counts, random_sets, 3, 0.01).max_share_gap_pp


def test_errors(tmp_path):
    with pytest.raises(InvalidParameterError, match="add up to 110"):
        make_dataset(
            str(tmp_path), SplitParams(train_percent=80, validation_percent=20, test_percent=10)
        )
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmptyDatasetError, match="No chips"):
        make_dataset(str(tmp_path / "empty"))

    folder = make_chip_folder(tmp_path / "nolabels", n=5)
    for name in os.listdir(folder / "labels"):
        write_raster(folder / "labels" / name, np.zeros((16, 16), np.uint8))
    with pytest.raises(EmptyDatasetError, match="no labelled pixels"):
        make_dataset(str(folder))

    folder = make_chip_folder(tmp_path / "orphan", n=5)
    os.remove(folder / "labels" / sorted(os.listdir(folder / "labels"))[0])
    with pytest.raises(MissingInputError, match="have no label chip"):
        make_dataset(str(folder))

    folder = make_chip_folder(tmp_path / "rare", n=30, classes=(1, 2))
    first = sorted(os.listdir(folder / "labels"))[0]
    labels = rasterio.open(folder / "labels" / first).read(1)
    labels[0, 0] = 9  # class 9 in one chip only
    write_raster(folder / "labels" / first, labels)
    with pytest.raises(SplitInfeasibleError, match="Class 9 occurs in only 1 chip"):
        make_dataset(str(folder))

    folder = make_chip_folder(tmp_path / "broken", n=5)
    (folder / "labels" / "scene_tile_0_0.tif").write_bytes(b"garbage")
    with pytest.raises(UnreadableInputError, match="scene_tile_0_0.tif"):
        make_dataset(str(folder))


@pytest.mark.shared_data
def test_real_enmap_chips(enmap_folder, tmp_path):
    """224-band EnMAP chips: split, NaN-free where data exist, empty stats for bad bands."""
    report = make_dataset(
        str(enmap_folder),
        SplitParams(train_percent=60, validation_percent=20, test_percent=20),
        out_folder=str(tmp_path / "csv"),
    )
    assert sum(report.chips.values()) == 18 and report.class_values == [1, 2, 3, 4, 5, 6]
    # the 18 chips all touch: a split without leakage would keep too few training chips, so
    # the default says so and splits SpecDeepMap's way, with the leak reported
    assert report.strategy == "balanced" and report.leakage["test"]["touching_chips"] > 0
    assert any("would keep only" in w for w in report.warnings)
    train = pd.read_csv(tmp_path / "csv" / "train_files.csv")
    assert train["image"].str.startswith(str(enmap_folder)).all()  # absolute: CSVs elsewhere
    stats = pd.read_csv(tmp_path / "csv" / "Normalize_Bands.csv")
    assert len(stats) == 224
    assert stats["mean"].isna().sum() == 6  # EnMAP bands 130-135 are nodata everywhere
    # SpecDeepMap's own statistics over its own training chips (no scaler) are reproduced
    theirs = pd.read_csv(enmap_folder / "Normalize_Bands.csv")
    their_train = pd.read_csv(enmap_folder / "train_files.csv")["image"]
    mean, std, nodata = band_statistics([str(enmap_folder / p) for p in their_train], None)
    assert nodata == -32768
    valid = theirs["mean"].notna().to_numpy()
    np.testing.assert_allclose(mean[valid], theirs["mean"][valid], rtol=1e-6)
    np.testing.assert_allclose(std[valid], theirs["std"][valid], rtol=1e-5)
    assert np.isnan(mean[~valid]).all()


def test_surprising_splits_are_said_and_bad_chips_refused(tmp_path, caplog):
    """Percentages below 100, a set of one chip, a text file posing as a chip outside the
    training set, a single class, and a scene whose name starts with a dot.
    """
    import logging

    from specdeepmap.errors import InvalidLabelError, UnreadableInputError

    chips = tmp_path / "chips"  # 20 chips of a scene whose name starts with a dot
    for sub in ("images", "labels"):
        (chips / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(20):
        name = f".scene_tile_{i * 8}_0.tif"
        write_raster(chips / "images" / name, rng.integers(1, 100, (2, 8, 8)).astype(np.uint16))
        label = np.ones((8, 8), np.uint8)
        label[:, 4:] = 2
        write_raster(chips / "labels" / name, label)
    with caplog.at_level(logging.WARNING):  # the chips touch in a row: SpecDeepMap's split
        report = make_dataset(
            str(chips),
            SplitParams(
                train_percent=80, validation_percent=5, test_percent=5, strategy="balanced"
            ),
        )
    assert sum(report.chips.values()) == 18  # dot-named chips are seen; 10 % left out
    assert any("= 90 %" in w and "2 of 20" in w for w in report.warnings)
    assert any("validation set holds only" in w for w in report.warnings)
    assert any("= 90 %" in r.message for r in caplog.records)

    test_chip = pd.read_csv(chips / "test_files.csv")["image"][0]
    (chips / test_chip).write_text("not a raster")
    previous = {
        n: (chips / n).read_text()
        for n in ("train_files.csv", "test_files.csv", "Normalize_Bands.csv", "split.json")
    }
    with pytest.raises(UnreadableInputError, match=test_chip.split("/")[-1]):
        make_dataset(
            str(chips), SplitParams(train_percent=70, validation_percent=15, test_percent=15)
        )
    assert {n: (chips / n).read_text() for n in previous} == previous  # the old split, whole

    one = tmp_path / "one"
    for sub in ("images", "labels"):
        (one / sub).mkdir(parents=True)
    write_raster(one / "images" / "s_tile_0_0.tif", np.ones((2, 8, 8), np.uint16))
    write_raster(one / "labels" / "s_tile_0_0.tif", np.full((8, 8), 5, np.uint8))
    with pytest.raises(InvalidLabelError, match="single class"):
        make_dataset(str(one), SplitParams(train_percent=100, validation_percent=0, test_percent=0))


def test_an_impossible_split_is_refused_before_chipping(tmp_path):
    """The label raster alone tells that a class is too rare for three sets, or that there is
    one class only: the check says so before any chip is cut.
    """
    from specdeepmap.errors import InvalidLabelError, SplitInfeasibleError
    from specdeepmap.params import ChipParams, SplitParams
    from specdeepmap.splitting import check_split_before_chipping

    labels = np.ones((128, 128), np.uint8)
    labels[:, 64:] = 2
    labels[:8, :8] = 3  # class 3 in one 32 px window only
    uri = write_raster(tmp_path / "labels.tif", labels)
    chip, split = (
        ChipParams(tile_x=32, tile_y=32, step_x=32, step_y=32, min_coverage=50),
        SplitParams(train_percent=60, validation_percent=20, test_percent=20),
    )
    with pytest.raises(SplitInfeasibleError, match="before chipping.*Class 3 occurs in only 1"):
        check_split_before_chipping([uri], chip, split)
    labels[:8, :8] = 1
    fine = write_raster(tmp_path / "fine.tif", labels)
    assert check_split_before_chipping([fine], chip, split) == 16
    single = write_raster(tmp_path / "single.tif", np.ones((64, 64), np.uint8))
    with pytest.raises(InvalidLabelError, match="single class"):
        check_split_before_chipping([single], chip, split)


def test_a_chosen_split_is_written_as_given(tmp_path):
    """write_split (what make_dataset ends with) writes the sets a caller chose, e.g. the
    folds of a cross-validation, with statistics of that training set.
    """
    from specdeepmap.splitting import chip_class_counts, write_split

    folder = make_chip_folder(tmp_path / "chips", n=12)
    frame = chip_class_counts(str(folder))
    sets = np.arange(len(frame)) % 3  # every third chip to train, validation, test
    out = tmp_path / "fold"
    report = write_split(str(folder), frame, sets, SplitParams(), out_folder=str(out))
    assert report.chips == {"train": 4, "validation": 4, "test": 4}
    for s, name in enumerate(("train", "validation", "test")):
        listed = pd.read_csv(out / f"{name}_files.csv")["image"].map(os.path.basename)
        assert sorted(listed) == sorted(frame["chip"][sets == s])
    stats = pd.read_csv(out / "Normalize_Bands.csv")
    train = [rasterio.open(folder / "images" / c).read() for c in frame["chip"][sets == 0]]
    pixels = np.concatenate([t.reshape(3, -1) for t in train], axis=1)
    expected = np.array([row[row != -1.0].mean() for row in pixels])
    np.testing.assert_allclose(stats["mean"], expected, rtol=1e-5)
