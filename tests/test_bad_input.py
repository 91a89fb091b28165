"""Bad input, second round.

Outputs never replace inputs, checkpoint prefixes belong to one training, and malformed STAC,
classes, checkpoints and numbers are one line naming the file (docs/bad-input.md lists every case
with its test).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import rasterio
from typer.testing import CliRunner

from specdeepmap import storage
from specdeepmap.cli import app
from specdeepmap.errors import (
    InputMismatchError,
    InvalidLabelError,
    InvalidParameterError,
    UnreadableInputError,
)
from specdeepmap.params import EvaluateParams
from tests.conftest import write_raster

runner = CliRunner()


def _digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _fails(args: list[str], *expected: str) -> str:
    """Run the CLI; it must exit 2 with one ``error:`` line holding every ``expected``."""
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert all(text in result.output for text in expected), result.output
    return result.output


# ---------------------------------------------------------------- outputs never replace inputs


def test_map_never_replaces_its_inputs_or_a_foreign_file(trained, dataset, tmp_path):
    """The scene, the model and the ground truth are never outputs, however spelled.

    A foreign file only with --overwrite.
    """
    _, result = trained
    scene = tmp_path / "in.tif"
    shutil.copy(dataset / "scene" / "demo_s2.tif", scene)
    model = tmp_path / "model.pt"
    shutil.copy(result.model_file, model)
    labels = tmp_path / "labels.tif"
    shutil.copy(dataset / "scene" / "demo_s2_labels.tif", labels)
    before = {p: _digest(p) for p in (scene, model, labels)}
    (tmp_path / "link").symlink_to(scene)
    base = ["map", str(scene), str(model)]
    _fails([*base, str(scene)], "would replace the input scene")
    _fails([*base, str(tmp_path / "sub" / ".." / "in.tif")], "would replace the input scene")
    _fails([*base, str(tmp_path / "link")], "would replace the input scene")
    _fails([*base, f"file://{scene}"], "would replace the input scene")
    _fails([*base, str(model)], "would replace the model file")
    _fails(
        [*base, str(tmp_path / "map.tif"), "--ground-truth", str(labels), "--iou-csv", str(labels)],
        "would replace the ground truth",
    )
    _fails(
        [*base, str(tmp_path / "map.tif"), "--confidence", str(tmp_path / "map.tif")],
        "are one file",
    )
    assert {p: _digest(p) for p in before} == before
    assert not (tmp_path / "map.tif").exists()

    foreign = tmp_path / "notes.tif"
    write_raster(foreign, np.ones((1, 8, 8), np.uint8))
    kept = _digest(foreign)
    _fails(
        [*base, str(foreign), "--device", "cpu"],
        "exists and is not a specdeepmap class map",
        "--overwrite",
    )
    assert _digest(foreign) == kept
    csv = tmp_path / "notes.csv"
    csv.write_text("my notes\n")
    _fails(
        [*base, str(tmp_path / "m.tif"), "--ground-truth", str(labels), "--iou-csv", str(csv)],
        "is not a specdeepmap IoU CSV",
    )
    assert csv.read_text() == "my notes\n"
    _fails([*base, str(tmp_path)], "is a folder")

    # an earlier map of ours is replaced by a new run; a foreign file only with --overwrite
    out = tmp_path / "map.tif"
    for args in ([*base, str(out)], [*base, str(out)], [*base, str(foreign), "--overwrite"]):
        done = runner.invoke(app, [*args, "--device", "cpu"])
        assert done.exit_code == 0, done.output
    with rasterio.open(foreign) as src:
        assert "SPECDEEPMAP_MODEL" in src.tags()


def test_stack_bands_never_replaces_a_file(tmp_path):
    """stack-bands writes a .vrt only, never over a band file; over a file with --overwrite."""
    bands = tmp_path / "bands"
    bands.mkdir()
    for i, name in enumerate(("B02", "B03", "B04")):
        write_raster(bands / f"T33UUU_{name}.tif", np.full((1, 16, 16), i + 1, np.uint16))
    first = bands / "T33UUU_B02.tif"
    kept = _digest(first)
    _fails(["stack-bands", str(first), str(bands)], "give it a .vrt name")
    scene = tmp_path / "scene.tif"
    write_raster(scene, np.ones((3, 16, 16), np.uint16))
    _fails(["stack-bands", str(scene), str(bands)], ".vrt")
    assert _digest(first) == kept
    with rasterio.open(scene) as src:
        assert src.count == 3  # the GeoTIFF is still a GeoTIFF

    vrt = tmp_path / "stack.vrt"
    assert runner.invoke(app, ["stack-bands", str(vrt), str(bands)]).exit_code == 0
    _fails(["stack-bands", str(vrt), str(bands)], "exists", "--overwrite")
    done = runner.invoke(app, ["stack-bands", str(vrt), str(bands), "--overwrite"])
    assert done.exit_code == 0, done.output
    # a VRT among its own band files, named like one of them: refused by name
    odd = bands / "T33UUU_B05.vrt"
    odd.write_text("<VRTDataset/>")
    _fails(["stack-bands", str(odd), str(odd)], "would replace the band file 1")
    assert odd.read_text() == "<VRTDataset/>"


@pytest.mark.slow
def test_sigterm_mid_map_leaves_no_staging_folder_and_no_output(trained, tmp_path):
    """SIGTERM mid-map exits 143 and leaves no staging folder, map or temporary file."""
    from specdeepmap.sample_data import generate_scene

    _, result = trained
    scene = generate_scene(str(tmp_path / "big"), 1536, 1536, seed=1)
    staging = tmp_path / "tmp"
    staging.mkdir()
    env = {**os.environ, "TMPDIR": str(staging)}
    process = subprocess.Popen(
        [
            os.path.join(os.path.dirname(sys.executable), "specdeepmap"),
            "map",
            scene.image_uri,
            result.model_file,
            str(tmp_path / "out" / "map.tif"),
            "--device",
            "cpu",
            "--window",
            "64",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 120
    while not any(p.startswith("specdeepmap-map-") for p in os.listdir(staging)):
        assert process.poll() is None, process.stderr.read()
        assert time.time() < deadline
        time.sleep(0.1)
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 128 + signal.SIGTERM
    assert not [p for p in os.listdir(staging) if p.startswith("specdeepmap-")]
    out = tmp_path / "out"
    assert not out.exists() or os.listdir(out) == []  # no map, no temporary file


# ---------------------------------------------------------------- checkpoints and resuming


def _quick(dataset_folder, out, **extra):
    from specdeepmap.training import TrainConfig

    settings = dict(
        epochs=2,
        batch_size=8,
        limit_batches=2,
        device="cpu",
        baseline=False,
        registered_model=None,
        tracking_uri=f"sqlite:///{out.parent}/mlflow.db",
    )
    return TrainConfig(dataset=str(dataset_folder), out=str(out), **(settings | extra))


def test_a_checkpoint_prefix_belongs_to_one_unfinished_training(dataset, tmp_path):
    """A finished training, another dataset or a broken resume.json are refused.

    An unlogged one is completed.
    """
    import mlflow

    from specdeepmap.resume import RESUME_STATE
    from specdeepmap.training import train

    prefix = tmp_path / "ckpt"
    first = train(_quick(dataset / "chips", tmp_path / "first", checkpoint_uri=str(prefix)))
    state = json.loads((prefix / RESUME_STATE).read_text())
    assert state["finished"] is True and state["mlflow_run_id"] == first.run_id
    assert state["dataset"] == str(dataset / "chips")
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = lambda: client.search_runs(  # noqa: E731
        [client.get_experiment_by_name("specdeepmap").experiment_id]
    )
    assert len(runs()) == 1

    with pytest.raises(InputMismatchError, match="finished training"):
        train(_quick(dataset / "chips", tmp_path / "again", checkpoint_uri=str(prefix)))
    # an older resume.json without the flag: the MLflow run itself says it finished
    legacy = {k: v for k, v in state.items() if k != "finished"}
    (prefix / RESUME_STATE).write_text(json.dumps(legacy))
    with pytest.raises(InputMismatchError, match="which has finished"):
        train(_quick(dataset / "chips", tmp_path / "again", checkpoint_uri=str(prefix)))
    other = tmp_path / "other-chips"
    shutil.copytree(dataset / "chips", other)
    with pytest.raises(InputMismatchError, match="not on"):
        train(_quick(other, tmp_path / "again", checkpoint_uri=str(prefix)))
    assert len(runs()) == 1 and runs()[0].info.status == "FINISHED"  # never reopened
    # killed after its last epoch but before it was logged (Lightning had already marked the
    # MLflow run FINISHED): the same command completes that training, in that run
    (prefix / RESUME_STATE).write_text(json.dumps({**state, "finished": False}))
    completed = train(_quick(dataset / "chips", tmp_path / "again", checkpoint_uri=str(prefix)))
    assert completed.run_id == first.run_id and len(runs()) == 1
    assert json.loads((prefix / RESUME_STATE).read_text())["finished"] is True

    for text, match in (
        ("{not json", "is not JSON"),
        ("[1, 2]", "not a resume state"),
        (
            json.dumps({**state, "finished": False, "last": "/etc/passwd"}),
            "must be a file name inside",
        ),
    ):
        (prefix / RESUME_STATE).write_text(text)
        result = runner.invoke(
            app,
            [
                "train",
                str(dataset / "chips"),
                "--out",
                str(tmp_path / "cli"),
                "--checkpoint-uri",
                str(prefix),
                "--tracking-uri",
                f"sqlite:///{tmp_path}/mlflow.db",
                "--device",
                "cpu",
                "--registered-model",
                "",
            ],
        )
        assert result.exit_code == 2 and match in result.output, result.output
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(InvalidParameterError, match="not writable"):
        train(_quick(dataset / "chips", tmp_path / "again", checkpoint_uri=str(blocker / "ckpt")))
    assert len(runs()) == 1


def test_resume_takes_only_an_unfinished_checkpoint_of_the_same_dataset(dataset, trained, tmp_path):
    """--resume takes a training checkpoint of this dataset with epochs left, nothing else."""
    from specdeepmap.training import train

    _, result = trained
    run = train(_quick(dataset / "chips", tmp_path / "run"))
    checkpoint = run.best_checkpoint
    with pytest.raises(InvalidParameterError, match="not a training checkpoint"):
        train(_quick(dataset / "chips", tmp_path / "x", resume=result.model_file))
    with pytest.raises(InvalidParameterError, match="nothing is left to train"):
        train(_quick(dataset / "chips", tmp_path / "x", resume=checkpoint))
    other = tmp_path / "other-chips"
    shutil.copytree(dataset / "chips", other)
    with pytest.raises(InputMismatchError, match="is a training on"):
        train(_quick(other, tmp_path / "x", resume=checkpoint, epochs=5))
    noise = tmp_path / "noise.ckpt"
    noise.write_bytes(os.urandom(300))
    output = _fails(
        [
            "train",
            str(dataset / "chips"),
            "--resume",
            str(noise),
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "x"),
        ],
        "noise.ckpt",
        "is not a PyTorch model or checkpoint file",
    )
    assert "weights_only" not in output  # no advice to load it unsafely
    # the dataset is recorded absolute, whichever way it was given
    here = os.getcwd()
    try:
        os.chdir(dataset)
        relative = train(_quick("chips", tmp_path / "relative"))
    finally:
        os.chdir(here)
    from specdeepmap.inference import read_model_file

    config, _ = read_model_file(relative.model_file)
    assert config.dataset == str(dataset / "chips")


def _model_file(path, config: dict, fmt: str = "specdeepmap-model/1") -> str:
    """A model file holding ``config`` and the weights of the network it describes."""
    import torch

    from specdeepmap.models import ModelSpec, build_model

    torch.manual_seed(0)
    network = build_model(ModelSpec("unet", "resnet18", 3, 3, encoder_depth=3))
    torch.save({"format": fmt, "config": config, "state_dict": network.state_dict()}, path)
    return str(path)


#: a model file's configuration as the first versions wrote it (no front-end, depth, norm,
#: ensemble or band names entries; None where a later entry did not apply)
FIRST_CONFIG = {
    "architecture": "unet",
    "backbone": "resnet18",
    "in_channels": 3,
    "num_classes": 3,
    "class_values": [4, 9],
    "ignore_index": 0,
    "tile_size": [32, 32],
    "normalization": {"scaler": 100.0, "mean": None, "std": None, "nodata": None},
}


def test_a_model_files_configuration_is_checked_when_it_is_read(tmp_path):
    """A wrong or missing entry, or a file of a later format, is refused naming the file and
    the entry; a file of the first versions (fewer entries) still loads and predicts, and an
    entry this version does not know survives a round trip.
    """
    from specdeepmap.inference import export_model_file, load_model, read_model_file

    old = _model_file(
        tmp_path / "old.pt", FIRST_CONFIG | {"encoder_depth": 3, "spectral_channels": None}
    )
    predictor = load_model(old, "cpu")
    assert predictor.config.ensemble == 1 and predictor.config.spectral_channels == 0
    assert predictor.config.band_names == [] and predictor.class_values == [4, 9]
    chips = np.random.default_rng(0).integers(0, 100, (1, 3, 32, 32)).astype(np.uint16)
    assert predictor.probabilities(chips).shape == (1, 2, 32, 32)

    missing = {k: v for k, v in FIRST_CONFIG.items() if k != "class_values"}
    with pytest.raises(UnreadableInputError, match=r"missing\.pt.*class_values: Field required"):
        read_model_file(_model_file(tmp_path / "missing.pt", missing))
    wrong = FIRST_CONFIG | {"num_classes": 5}
    with pytest.raises(UnreadableInputError, match=r"wrong\.pt.*num_classes is 5 for 2 class"):
        read_model_file(_model_file(tmp_path / "wrong.pt", wrong))
    bands = FIRST_CONFIG | {"in_channels": 0}
    with pytest.raises(UnreadableInputError, match=r"bands\.pt.*in_channels.*greater than 0"):
        read_model_file(_model_file(tmp_path / "bands.pt", bands))
    later = _model_file(tmp_path / "later.pt", FIRST_CONFIG, "specdeepmap-model/2")
    with pytest.raises(UnreadableInputError, match=r"later\.pt has format specdeepmap-model/2"):
        read_model_file(later)

    newer = _model_file(
        tmp_path / "newer.pt", FIRST_CONFIG | {"encoder_depth": 3, "calibration": {"a": 1}}
    )
    config, _ = read_model_file(newer)
    copy = export_model_file(config, load_model(newer, "cpu").model, str(tmp_path / "copy.pt"))
    assert read_model_file(copy)[0].calibration == {"a": 1}


def test_a_crafted_checkpoint_runs_nothing(tmp_path):
    """A checkpoint whose unpickling would run a command is refused, and runs nothing."""
    import torch

    marker = tmp_path / "marker"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": Payload()}, evil)
    _fails(
        ["map", str(tmp_path / "scene.tif"), str(evil), str(tmp_path / "map.tif")],
        "evil.ckpt",
        "pickled objects",
    )
    assert not marker.exists()


# ---------------------------------------------------------------- STAC input


def test_malformed_stac_is_one_line_naming_the_file(trained, tmp_path, monkeypatch):
    """Arrays, bad assets, missing hrefs, link cycles, huge catalogs and http URLs.

    One line each.
    """
    from specdeepmap import stac

    _, result = trained
    model = result.model_file
    cases = {
        "array.json": ("[1, 2]", "is a JSON list, not a STAC object"),
        "assets.json": (json.dumps({"type": "Feature", "assets": [1]}), "'assets' must be"),
        "nohref.json": (
            json.dumps(
                {
                    "type": "Feature",
                    "assets": {
                        b: {"title": b}
                        for b in (
                            "B01",
                            "B02",
                            "B03",
                            "B04",
                            "B05",
                            "B06",
                            "B07",
                            "B08",
                            "B8A",
                            "B09",
                            "B10",
                            "B11",
                            "B12",
                        )
                    },
                }
            ),
            "has no href",
        ),
        "http.json": (
            json.dumps(
                {
                    "type": "Feature",
                    "assets": {
                        b: {"href": f"https://example.invalid/{b}.tif"}
                        for b in (
                            "B01",
                            "B02",
                            "B03",
                            "B04",
                            "B05",
                            "B06",
                            "B07",
                            "B08",
                            "B8A",
                            "B09",
                            "B10",
                            "B11",
                            "B12",
                        )
                    },
                }
            ),
            "https:// URL, which is not supported",
        ),
    }
    for name, (text, match) in cases.items():
        (tmp_path / name).write_text(text)
        _fails(["map", str(tmp_path / name), model, str(tmp_path / "o.tif")], name, match)
    catalog = tmp_path / "catalog" / "catalog.json"
    catalog.parent.mkdir()
    catalog.write_text(
        json.dumps({"type": "Catalog", "links": [{"rel": "child", "href": "./catalog.json"}]})
    )
    with pytest.raises(InvalidParameterError, match="links back to itself"):
        stac.catalog_items(str(catalog))
    catalog.write_text(json.dumps({"type": "Catalog", "links": [{"rel": "item"}]}))
    with pytest.raises(InvalidParameterError, match="has no href"):
        stac.catalog_items(str(catalog))
    monkeypatch.setattr(stac, "MAX_LINKS_PER_CATALOG", 5)
    catalog.write_text(
        json.dumps(
            {"type": "Catalog", "links": [{"rel": "item", "href": f"./{i}.json"} for i in range(6)]}
        )
    )
    with pytest.raises(InvalidParameterError, match="6 links, more than the 5"):
        stac.catalog_items(str(catalog))
    _fails(
        ["map", "https://example.invalid/scene.tif", model, str(tmp_path / "o.tif")],
        "https:// URIs are not supported",
    )


def test_a_catalog_file_beside_the_scenes_does_not_stop_a_folder_run(trained, dataset, tmp_path):
    """JSON files that are not STAC items are skipped with a warning in a folder of scenes."""
    _, result = trained
    scenes = tmp_path / "in"
    scenes.mkdir()
    shutil.copy(dataset / "scene" / "demo_s2.tif", scenes / "a.tif")
    (scenes / "my-catalog.json").write_text(json.dumps({"type": "Catalog", "links": []}))
    (scenes / "notes.json").write_text("[]")
    done = runner.invoke(
        app,
        ["map", str(scenes) + "/", result.model_file, str(tmp_path / "maps"), "--device", "cpu"],
    )
    assert done.exit_code == 0, done.output
    assert "1 new scene(s)" in done.output and "my-catalog.json is not a STAC item" in done.output


# ---------------------------------------------------------------- classes files


def test_a_bad_classes_file_is_one_line_naming_it(small_scene, tmp_path):
    """Bad colours, encodings, values, names and .qml entries: one line naming the file."""
    from specdeepmap.classes import pam_xml, qml, read_classes_file, read_label_classes

    def refused(name: str, content: bytes, match: str) -> None:
        path = tmp_path / name
        path.write_bytes(content)
        _fails(
            [
                "chip",
                small_scene.image_uri,
                small_scene.label_uri,
                str(tmp_path / "out"),
                "--classes",
                str(path),
            ],
            name,
            match,
        )
        assert not (tmp_path / "out").exists()

    palette = (
        b"<qgis><pipe><rasterrenderer><colorPalette>%s</colorPalette></rasterrenderer>"
        b"</pipe></qgis>"
    )
    refused("hex.csv", b"value,name,color\n1,water,#gggggg\n", "colour '#gggggg'")
    refused("latin1.csv", "value,name\n1,Wässer\n".encode("latin-1"), "is not UTF-8 text")
    refused("big.csv", b"value,name\n1,a\n300,b\n", "value '300' is not a class value (1-255")
    refused("names.csv", b"value,name\n1,forest\n2,Forest\n", "to several values")
    refused("control.csv", b'value,name\n1,"a\x01b"\n', "control character")
    refused(
        "novalue.qml",
        palette % b'<paletteEntry color="#ff0000" label="a"/>',
        "palette entry value None",
    )
    refused(
        "text.qml",
        palette % b'<paletteEntry value="x" color="#ff0000" label="a"/>',
        "palette entry value 'x'",
    )
    refused(
        "twice.qml",
        palette
        % (
            b'<paletteEntry value="1" color="#ff0000" label="a"/>'
            b'<paletteEntry value="1" color="#00ff00" label="b"/>'
        ),
        "twice.qml lists value(s) 1 twice",
    )

    import logging

    said: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    logging.getLogger("specdeepmap.classes").addHandler(handler)
    try:
        (tmp_path / "blank.csv").write_text("value,name\n1,\n2,water\n")
        assert read_classes_file(str(tmp_path / "blank.csv")).name(1) == "1"  # warned
        assert any("class 1 has no name" in s for s in said)
        broken = tmp_path / "labels.tif"
        shutil.copy(small_scene.label_uri, broken)
        (tmp_path / "labels.tif.aux.xml").write_text("<PAMDataset><unclosed>")
        assert not read_label_classes(str(broken)).named
        assert any("labels.tif.aux.xml is not valid XML" in s for s in said)
    finally:
        logging.getLogger("specdeepmap.classes").removeHandler(handler)

    # names from anywhere (a model, a label sidecar) never break the map's sidecars
    from specdeepmap.classes import ClassInfo, ClassSchema

    schema = ClassSchema([ClassInfo(1, "a\x07b</Category>", (1, 2, 3))])
    ET.fromstring(pam_xml(schema, [1]))
    ET.fromstring(qml(schema, [1]).split("\n", 1)[1])


def test_user_text_is_inert_in_the_model_card(trained):
    """HTML, links, pipes and newlines in class names cannot change the card's markup."""
    from specdeepmap.model_card import CardScores, model_card, summary

    config, result = trained
    from specdeepmap.inference import read_model_file

    model_config, _ = read_model_file(result.model_file)
    evil = model_config.model_copy(
        update={
            "classes": {
                "classes": [
                    {"value": v, "name": name, "color": "#102030"}
                    for v, name in zip(
                        model_config.class_values,
                        [
                            "<script>alert(1)</script>",
                            "[x](javascript:alert(1))",
                            "a | b",
                            "line\nbreak",
                            "*bold*",
                            "`code`",
                        ],
                        strict=True,
                    )
                ]
            }
        }
    )
    card = model_card(evil, {"uri": "/d`x", "digest": "0"}, CardScores(), {})
    text = summary(evil, {"uri": "/d"}, CardScores())
    for rendered in (card, text):
        assert "<script>" not in rendered and "](javascript:" not in rendered
    tables, block = [], []
    for line in [*card.splitlines(), ""]:
        if line.startswith("|"):
            block.append(line)
        elif block:
            tables.append(block)
            block = []
    assert tables
    for table in tables:  # every row has as many cells as its header: no name broke one
        assert len({row.replace("\\|", "").count("|") for row in table}) == 1, table
    assert "line break" in card


# ---------------------------------------------------------------- numbers, pixels, CSVs


def test_absurd_windows_nan_pixels_and_empty_scenes(trained, dataset, tmp_path):
    """Huge windows are clamped or refused.

    NaN pixels and empty scenes are mapped with a warning.
    """
    from specdeepmap.mapping import map_scene
    from specdeepmap.params import MapParams

    _, result = trained
    scene = str(dataset / "scene" / "demo_s2.tif")
    done = runner.invoke(
        app,
        [
            "map",
            scene,
            result.model_file,
            str(tmp_path / "w.tif"),
            "--window",
            "100000",
            "--device",
            "cpu",
        ],
    )
    assert done.exit_code == 0, done.output  # one padded window: the scene itself
    _fails(
        [
            "map",
            scene,
            result.model_file,
            str(tmp_path / "b.tif"),
            "--batch-size",
            "100000000",
            "--device",
            "cpu",
        ],
        "GiB",
        "more than the",
        "--batch-size",
    )
    assert not (tmp_path / "b.tif").exists()

    with rasterio.open(scene) as src:
        data, profile = src.read().astype("float32"), src.profile
    data[:, 10:40, 10:40] = np.nan
    data[2, 60:70, 60:70] = np.inf
    profile.update(dtype="float32", nodata=None)
    nan_scene = str(tmp_path / "nan.tif")
    with rasterio.open(nan_scene, "w", **profile) as dst:
        dst.write(data)
    with pytest.warns(UserWarning, match="NaN or infinite"):
        map_scene(
            nan_scene, result.model_file, str(tmp_path / "nan_map.tif"), MapParams(device="cpu")
        )
    with rasterio.open(tmp_path / "nan_map.tif") as src:
        out = src.read(1)
    assert (out[10:40, 10:40] == 0).all() and (out[60:70, 60:70] == 0).all()
    assert (out[100:, 100:] > 0).mean() > 0.9
    profile.update(nodata=0)
    empty = str(tmp_path / "empty.tif")
    with rasterio.open(empty, "w", **profile) as dst:
        dst.write(np.zeros_like(data))
    with pytest.warns(UserWarning, match="every pixel is nodata"):
        map_scene(
            empty, result.model_file, str(tmp_path / "empty_map.tif"), MapParams(device="cpu")
        )


def test_a_test_csv_with_other_columns_and_foreign_classes(trained, dataset, tmp_path):
    """A chip list without image,mask is refused; labels the model does not know are warned."""
    _, result = trained
    csv = tmp_path / "test.csv"
    csv.write_text("img,label\na.tif,b.tif\n")
    _fails(
        ["test", str(csv), result.model_file],
        "test.csv",
        "must start with the columns image,mask",
        "img, label",
    )

    from specdeepmap.evaluation import evaluate_model

    chips = tmp_path / "chips"
    shutil.copytree(dataset / "chips", chips)
    first_mask = (chips / "test_files.csv").read_text().splitlines()[1].split(",")[1]
    mask = chips / first_mask if not os.path.isabs(first_mask) else first_mask
    with rasterio.open(mask, "r+") as dst:
        labels = dst.read(1)
        labels[:4, :4] = 9  # a class the model never saw
        dst.write(labels, 1)
    with pytest.warns(UserWarning, match="class value.s. 9 that the model"):
        evaluate_model(
            str(chips / "test_files.csv"),
            result.model_file,
            str(tmp_path / "t"),
            EvaluateParams(device="cpu"),
            log_to_mlflow=False,
        )


# ---------------------------------------------------------------- errors named as they are


def test_local_errors_are_not_retried_as_network_failures(tmp_path):
    """File-exists, folder and disk errors are local: not transient, not called unreachable."""
    from specdeepmap.cli import describe_error

    local = [
        FileExistsError(errno.EEXIST, "File exists", "x"),
        IsADirectoryError(errno.EISDIR, "Is a directory", "x"),
        NotADirectoryError(errno.ENOTDIR, "Not a directory", "x"),
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(errno.EROFS, "Read-only file system"),
    ]
    for error in local:
        assert not storage.is_transient(error), error
        assert "storage unreachable" not in describe_error(error)
    assert describe_error(local[0]).startswith("already exists")
    assert storage.is_transient(ConnectionRefusedError(errno.ECONNREFUSED, "refused"))
    assert storage.is_transient(OSError(errno.ETIMEDOUT, "timed out"))


def test_promote_refuses_a_version_whose_dataset_changed(dataset, tmp_path):
    """A version whose test chips changed since training is not scored on them."""
    import mlflow

    from specdeepmap.errors import PromotionRefusedError
    from specdeepmap.registry import promote_by_hand
    from specdeepmap.training import TrainConfig, train

    chips = tmp_path / "chips"
    shutil.copytree(dataset / "chips", chips)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    train(
        TrainConfig(
            dataset=str(chips),
            out=str(tmp_path / "run"),
            epochs=1,
            batch_size=8,
            limit_batches=2,
            device="cpu",
            baseline=False,
            tracking_uri=uri,
            registered_model="changing",
        )
    )
    lines = (chips / "test_files.csv").read_text().splitlines()
    (chips / "test_files.csv").write_text("\n".join(lines[:-1]) + "\n")  # one chip less
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        with pytest.raises(PromotionRefusedError, match="changed since it was trained"):
            promote_by_hand("changing", "1", str(tmp_path / "promote"), device="cpu")
    finally:
        mlflow.set_tracking_uri(previous)  # later tests' stores are not this one


def test_the_default_chip_cache_is_private(dataset, monkeypatch, tmp_path):
    """The training chips' default cache is private, and refused when others may write to it."""
    from specdeepmap.data import ChipDataset, read_dataset_folder
    from specdeepmap.normalization import Normalization

    monkeypatch.setenv("SPECDEEPMAP_CACHE", str(tmp_path / "cache"))
    info = read_dataset_folder(str(dataset / "chips"))
    chips = ChipDataset(info.train, Normalization(), np.arange(256))
    assert chips.cache_dir.startswith(str(tmp_path / "cache"))
    assert os.stat(chips.cache_dir).st_mode & 0o077 == 0
    os.chmod(tmp_path / "cache", 0o777)
    with pytest.raises(InvalidParameterError, match="not private"):
        ChipDataset(info.train, Normalization(), np.arange(256))


def test_unreadable_text_is_named(tmp_path):
    """Text that is not UTF-8 is named as such, with the file."""
    path = tmp_path / "latin.txt"
    path.write_bytes("Wässer".encode("latin-1"))
    with pytest.raises(UnreadableInputError, match="latin.txt is not UTF-8"):
        storage.read_text(str(path))
    with pytest.raises(InvalidLabelError):
        from specdeepmap.classes import read_classes_file

        (tmp_path / "c.csv").write_text("value,name,color\n1,a,#12345z\n")
        read_classes_file(str(tmp_path / "c.csv"))
