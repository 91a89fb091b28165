"""The command line, end to end on the demo scene."""

import pandas as pd
import pytest
from typer.testing import CliRunner

from specdeepmap.cli import app
from specdeepmap.params import EvaluateParams

runner = CliRunner()


def test_sample_data_chip_split(tmp_path):
    result = runner.invoke(
        app, ["sample-data", str(tmp_path / "scene"), "--width", "320", "--height", "320"]
    )
    assert result.exit_code == 0, result.output
    image, label = result.stdout.split()
    result = runner.invoke(
        app,
        [
            "chip",
            image,
            label,
            str(tmp_path / "chips"),
            "--tile-x",
            "32",
            "--tile-y",
            "32",
            "--step-x",
            "32",
            "--step-y",
            "32",
        ],
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["split", str(tmp_path / "chips"), "--scaler", "10000"])
    assert result.exit_code == 0, result.output
    train = pd.read_csv(tmp_path / "chips" / "train_files.csv")
    test = pd.read_csv(tmp_path / "chips" / "test_files.csv")
    assert len(train) > 4 * len(test) > 0


def test_errors_are_one_line_and_exit_2(tmp_path):
    result = runner.invoke(
        app, ["chip", str(tmp_path / "missing.tif"), str(tmp_path / "l.tif"), str(tmp_path / "out")]
    )
    assert result.exit_code == 2
    assert "missing.tif" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["split", str(tmp_path), "--train", "90", "--test", "20"])
    assert result.exit_code == 2 and "add up to 120" in result.output
    result = runner.invoke(app, ["chip", "a", "b", "c", "--tile-x", "0"])
    assert result.exit_code == 2  # typer's own range check


@pytest.mark.slow
def test_third_party_errors_are_one_line_by_family(tmp_path, small_scene, monkeypatch):
    """GDAL, filesystem, MLflow and S3 errors reach the user as one line naming the problem
    (exit 2), never as a traceback.
    """
    import socket

    truncated = tmp_path / "truncated.tif"
    truncated.write_bytes(open(small_scene.image_uri, "rb").read()[:5000])
    result = runner.invoke(
        app, ["chip", str(truncated), small_scene.label_uri, str(tmp_path / "out")]
    )
    assert result.exit_code == 2, result.output
    assert "truncated.tif" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()  # refused before any folder is made

    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    result = runner.invoke(app, ["chip", small_scene.image_uri, small_scene.label_uri, str(a_file)])
    assert result.exit_code == 2, result.output
    assert "a_file" in result.output and "Traceback" not in result.output

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    result = runner.invoke(app, ["test", str(tmp_path / "test_files.csv"), "models:/nope/1"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output

    with socket.socket() as sock:  # a port nobody listens on: the S3 endpoint is down
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    result = runner.invoke(
        app, ["map", small_scene.image_uri, "s3://bucket/model.pt", str(tmp_path / "map.tif")]
    )
    assert result.exit_code == 2, result.output
    assert "unreachable" in result.output and "Traceback" not in result.output


def test_credentials_in_uris_are_redacted():
    from specdeepmap.storage import redact

    assert redact("http://admin:s3cret@mlflow:5000/x") == "http://admin:***@mlflow:5000/x"
    assert redact("s3://bucket/key") == "s3://bucket/key"


def test_promote_by_hand_applies_the_pipelines_checks(trained, dataset, tmp_path):
    """`specdeepmap promote` scores the version and the champion on the version's test chips:
    a first version becomes champion; an equal one is refused (no margin) unless forced; who,
    why and when are kept as version tags.
    """
    import mlflow

    config, result = trained
    # MLflow's registry resolves a models:/m-… source through the global tracking URI (not
    # the client's), which other tests' trainings moved
    mlflow.set_tracking_uri(config.tracking_uri)
    client = mlflow.MlflowClient(tracking_uri=config.tracking_uri)
    source = client.get_model_version("test-model", result.model_version)
    client.create_registered_model("by-hand")
    versions = [
        str(
            client.create_model_version(
                "by-hand",
                source=source.source,
                run_id=source.run_id,
                tags={"dataset": source.tags["dataset"]},
            ).version
        )
        for _ in range(2)
    ]
    base = [
        "promote",
        "by-hand",
        "--tracking-uri",
        config.tracking_uri,
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "promote"),
        "--by",
        "rita",
    ]

    first = CliRunner().invoke(app, [*base[:2], versions[0], *base[2:]])
    assert first.exit_code == 0, first.output
    assert "no champion yet" in first.output
    equal = CliRunner().invoke(app, [*base[:2], versions[1], *base[2:]])
    assert equal.exit_code == 2 and "does not beat champion version" in equal.output
    # the same weights: the paired interval over the test chips is exactly 0
    assert "+0.000 mean IoU against the champion (90% interval over" in equal.output
    assert "cannot tell the two apart" in " ".join(equal.output.split())
    assert str(client.get_model_version_by_alias("by-hand", "champion").version) == versions[0]
    forced = CliRunner().invoke(
        app, [*base[:2], versions[1], *base[2:], "--force", "--comment", "new labels"]
    )
    assert forced.exit_code == 0, forced.output
    assert str(client.get_model_version_by_alias("by-hand", "champion").version) == versions[1]
    tags = client.get_model_version("by-hand", versions[1]).tags
    assert tags["champion_by"] == "rita" and tags["champion_comment"] == "new labels"
    assert tags["champion_reason"].startswith("forced: does not beat")
    assert float(tags["champion_test_mean_iou_same_chips"]) == pytest.approx(
        float(tags["test_mean_iou"])
    )
    missing = CliRunner().invoke(app, [*base[:2], "99", *base[2:]])
    assert missing.exit_code == 2 and "has no version 99" in missing.output


def test_promotion_compares_two_different_models_with_the_right_sign(trained, dataset, tmp_path):
    """Promotion over a worse champion: the difference's sign and size are right.

    The champion is the trained model with its classifier weights scrambled; the trained one is
    promoted over it, and the difference matches the two models' own test figures, computed
    apart. The reverse is refused with the opposite difference.
    """
    import mlflow
    import torch

    from specdeepmap.errors import PromotionRefusedError
    from specdeepmap.evaluation import evaluate_model
    from specdeepmap.inference import export_model_file, load_model, read_model_file
    from specdeepmap.model_card import dataset_facts
    from specdeepmap.registry import CHAMPION, promote_by_hand
    from specdeepmap.tracking import ensure_experiment, register_model

    config, result = trained
    model_config, state = read_model_file(result.model_file)
    worse = load_model(result.model_file, device="cpu").model
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in worse.state_dict().items():
            if "segmentation_head" in name or "head" in name:
                tensor.copy_(torch.randn(tensor.shape, generator=generator))
    worse_file = export_model_file(model_config, worse, str(tmp_path / "worse" / "model.pt"))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    previous = mlflow.get_tracking_uri()
    ensure_experiment(uri, "specdeepmap")
    try:
        chips = str(dataset / "chips")
        digest = dataset_facts(chips)["digest"]
        versions = []
        for file in (worse_file, result.model_file):
            with mlflow.start_run():
                versions.append(
                    register_model(file, model_config, "signs", 0.5, chips, dataset_digest=digest)[
                        1
                    ]
                )
        test_csv = str(dataset / "chips" / "test_files.csv")
        scores = [
            evaluate_model(
                test_csv,
                f,
                str(tmp_path / f"t{i}"),
                EvaluateParams(device="cpu"),
                log_to_mlflow=False,
            ).metrics.mean_iou
            for i, f in enumerate((worse_file, result.model_file))
        ]
        assert scores[1] > scores[0] + 0.05  # the scrambled head is clearly worse
        promote_by_hand("signs", versions[0], str(tmp_path / "p0"), device="cpu")
        decision = promote_by_hand("signs", versions[1], str(tmp_path / "p1"), device="cpu")
        assert decision.alias == CHAMPION
        expected = f"{scores[1] - scores[0]:+.3f} mean IoU against the champion"
        assert expected in decision.reason, decision.reason
        with pytest.raises(PromotionRefusedError) as refused:
            promote_by_hand("signs", versions[0], str(tmp_path / "p2"), device="cpu")
        assert f"{scores[0] - scores[1]:+.3f} mean IoU against the champion" in str(refused.value)
    finally:
        mlflow.set_tracking_uri(previous)
