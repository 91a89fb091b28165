"""The command line, end to end on the demo scene."""

import pandas as pd
from typer.testing import CliRunner

from specdeepmap.cli import app

runner = CliRunner()


def test_sample_data_chip_split(tmp_path):
    result = runner.invoke(app, ["sample-data", str(tmp_path / "scene"), "--width", "320",
                                 "--height", "320"])
    assert result.exit_code == 0, result.output
    image, label = result.stdout.split()
    result = runner.invoke(app, ["chip", image, label, str(tmp_path / "chips"), "--tile-x", "32",
                                 "--tile-y", "32", "--step-x", "32", "--step-y", "32"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["split", str(tmp_path / "chips"), "--scaler", "10000"])
    assert result.exit_code == 0, result.output
    train = pd.read_csv(tmp_path / "chips" / "train_files.csv")
    test = pd.read_csv(tmp_path / "chips" / "test_files.csv")
    assert len(train) > 4 * len(test) > 0


def test_errors_are_one_line_and_exit_2(tmp_path):
    result = runner.invoke(app, ["chip", str(tmp_path / "missing.tif"), str(tmp_path / "l.tif"),
                                 str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "missing.tif" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["split", str(tmp_path), "--train", "90", "--test", "20"])
    assert result.exit_code == 2 and "add up to 120" in result.output
    result = runner.invoke(app, ["chip", "a", "b", "c", "--tile-x", "0"])
    assert result.exit_code == 2  # typer's own range check
