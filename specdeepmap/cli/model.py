"""Commands around a model: train (Deep Learning Trainer), test (Tester), baseline and promote."""

from __future__ import annotations

from typing import Annotated

import typer

from specdeepmap.cli.app import app, console, errors_to_exit
from specdeepmap.cli.options import step_options
from specdeepmap.errors import InvalidParameterError
from specdeepmap.params import BaselineParams, EvaluateParams, TrainParams

TRACKING_HELP = "MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)."


@app.command()
@errors_to_exit
@step_options(TrainParams)
def train(
    dataset: Annotated[str, typer.Argument(help="Dataset folder URI (what `split` wrote).")],
    params: TrainParams,
    out: Annotated[str, typer.Option(help="Local folder for checkpoints and logs.")] = "runs/train",
    workers: Annotated[int, typer.Option(min=0, help="Data-loader workers.")] = 0,
    resume: Annotated[str | None, typer.Option(help="Checkpoint to resume from.")] = None,
    keep_top_k: Annotated[int, typer.Option(help="Best checkpoints kept (-1: all).")] = 1,
    checkpoint_uri: Annotated[
        str | None,
        typer.Option(
            help="Also write checkpoints here as training goes (s3:// or a folder); run the same "
            "command again to continue an interrupted training from its last checkpoint."
        ),
    ] = None,
    registered_model: Annotated[
        str, typer.Option(help="MLflow registered model name ('' to skip).")
    ] = "specdeepmap-segmentation",
    tracking_uri: Annotated[str | None, typer.Option(help=TRACKING_HELP)] = None,
) -> None:
    """Deep Learning Trainer: train, log to TensorBoard and MLflow, register the best model."""
    from specdeepmap.training import TrainConfig
    from specdeepmap.training import train as run_training

    result = run_training(
        TrainConfig.from_params(
            params,
            dataset=dataset,
            out=out,
            workers=workers,
            resume=resume,
            keep_top_k=keep_top_k,
            checkpoint_uri=checkpoint_uri,
            registered_model=registered_model or None,
            tracking_uri=tracking_uri,
        )
    )
    console.print(
        f"best val IoU {result.best_val_iou:.4f}: "
        + (
            result.best_checkpoint
            if params.ensemble == 1 or params.distill
            else f"the mean of {params.ensemble} networks"
        )
    )
    if result.baseline_mean_iou("validation") is not None:
        console.print(f"RandomForest baseline val IoU {result.baseline_mean_iou('validation'):.4f}")
    print(f"model_file: {result.model_file}")
    print(f"model_uri: {result.model_uri}")
    print(f"run_id: {result.run_id}")


@app.command("test")
@errors_to_exit
@step_options(EvaluateParams)
def test_cmd(
    test_csv: Annotated[str, typer.Argument(help="test_files.csv URI.")],
    model: Annotated[str, typer.Argument(help="Model file/URI or models:/NAME/VERSION|@ALIAS.")],
    params: EvaluateParams,
    out: Annotated[str, typer.Option(help="Folder for the CSVs and plots.")] = "runs/test",
    predictions: Annotated[
        str | None, typer.Option(help="Folder for per-chip prediction GeoTIFFs.")
    ] = None,
) -> None:
    """Deep Learning Tester: IoU CSV (SpecDeepMap format) and confusion-matrix metrics."""
    from specdeepmap.evaluation import evaluate_model

    report = evaluate_model(test_csv, model, out, params, predictions_folder=predictions)
    console.print(
        f"mean IoU {report.metrics.mean_iou:.4f} (pooled pixels), "
        f"{report.per_chip_mean_iou:.4f} (per-chip mean, SpecDeepMap's definition)"
    )
    print(f"iou_csv: {report.iou_csv}")
    print(f"metrics_csv: {report.metrics_csv}")


@app.command()
@errors_to_exit
@step_options(BaselineParams)
def baseline(
    dataset: Annotated[str, typer.Argument(help="Dataset folder URI (what `split` wrote).")],
    params: BaselineParams,
    out: Annotated[str, typer.Option(help="Folder for the CSVs and plots.")] = "runs/baseline",
) -> None:
    """Per-pixel RandomForest baseline: the Tester's files for the forest on the test chips."""
    from specdeepmap.baseline import baseline_dataset

    result = baseline_dataset(dataset, out, params)
    for split in ("validation", "test"):
        if result.mean_iou(split) is not None:
            console.print(
                f"RandomForest {split} mean IoU {result.mean_iou(split):.4f} (pooled pixels)"
            )
    print(f"iou_csv: {out.rstrip('/')}/test_iou.csv")


@app.command()
@errors_to_exit
def promote(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[str, typer.Argument(help="Model version to promote.")],
    alias: Annotated[
        str, typer.Option(help="Alias to move (champion is checked first).")
    ] = "champion",
    comment: Annotated[str, typer.Option(help="Why (kept as a version tag).")] = "",
    by: Annotated[str | None, typer.Option(help="Who (default: the login name).")] = None,
    force: Annotated[
        bool,
        typer.Option(
            help="Promote even if the version does not beat the champion on its test chips by "
            "the margin, or is below the RandomForest baseline."
        ),
    ] = False,
    min_improvement: Annotated[
        float, typer.Option(min=0, max=1, help="Mean IoU the version must gain over the champion.")
    ] = 0.01,
    out: Annotated[
        str, typer.Option(help="Folder for the comparison's test files.")
    ] = "runs/promote",
    device: Annotated[str, typer.Option(help="cpu, gpu or auto.")] = "auto",
    tracking_uri: Annotated[str | None, typer.Option(help=TRACKING_HELP)] = None,
) -> None:
    """Move an alias (champion by default) to a model version, with the training pipeline's
    checks: scored against the champion on the version's own test chips.
    """
    import getpass

    import mlflow

    from specdeepmap.registry import CHAMPION, promote_by_hand
    from specdeepmap.tracking import tracking_uri as default_tracking_uri

    mlflow.set_tracking_uri(default_tracking_uri(tracking_uri))
    decision = promote_by_hand(
        name, version, out, alias, by or getpass.getuser(), comment, force, min_improvement, device
    )
    forced = alias == CHAMPION and decision.alias != CHAMPION
    console.print(
        f"{name} version {version} is now {alias}{' (forced)' if forced else ''}: {decision.reason}"
    )


@app.command()
@errors_to_exit
def export(
    model: Annotated[str, typer.Argument(help="Model file, s3:// URI or models:/NAME@ALIAS.")],
    out: Annotated[
        str,
        typer.Argument(help="The file to write: OUT.onnx, or OUT.ckpt with --format specdeepmap."),
    ],
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            help="onnx, or specdeepmap: a checkpoint EnMAP-Box's SpecDeepMap Tester and Mapper "
            "load (plain networks only).",
        ),
    ] = "onnx",
    chips: Annotated[
        str | None,
        typer.Option(help="Chip CSV to check the export on (default: the model's test chips)."),
    ] = None,
    int8: Annotated[
        bool,
        typer.Option(
            "--int8",
            help="Write a statically quantized int8 file, calibrated once on the model's "
            "training chips.",
        ),
    ] = False,
    calibration_chips: Annotated[
        str | None,
        typer.Option(help="--int8: chip CSV to calibrate on (default: the training chips)."),
    ] = None,
) -> None:
    """Export a model to ONNX (normalisation, network and softmax in one file, checked
    against torch before it is written; test and map take the .onnx file as MODEL), or as a
    SpecDeepMap checkpoint for EnMAP-Box (--format specdeepmap).
    """
    from specdeepmap.onnx_model import export_onnx

    if fmt not in ("onnx", "specdeepmap"):
        raise InvalidParameterError(f"--format {fmt}: onnx or specdeepmap")
    if fmt == "specdeepmap":
        from specdeepmap.foreign import export_checkpoint

        if not out.lower().endswith(".ckpt"):
            raise InvalidParameterError(f"{out}: a SpecDeepMap checkpoint's name ends in .ckpt")
        hyper = export_checkpoint(model, out)
        console.print(
            f"{out}: SpecDeepMap {hyper['architecture']} ({hyper['backbone']}), "
            f"{hyper['in_channels']} bands, classes {hyper['class_values']}, "
            f"{hyper['img_x']} px chips: load it in EnMAP-Box's Tester or Mapper"
        )
        return
    if not out.lower().endswith(".onnx"):
        raise InvalidParameterError(f"{out}: the ONNX file's name must end in .onnx")
    report = export_onnx(model, out, chips, int8=int8, calibration_csv=calibration_chips)
    console.print(
        f"{out}: classes agree with torch on {report.agreement:.4%} of {report.pixels} pixels, "
        f"largest probability difference {report.max_difference:.1e} ({report.seconds:.1f} s)"
    )


@app.command("import")
@errors_to_exit
def import_cmd(
    checkpoint: Annotated[
        str, typer.Argument(help="A checkpoint of SpecDeepMap's Trainer (.ckpt).")
    ],
    out: Annotated[str, typer.Argument(help="The model file to write (model.pt format).")],
    registered_model: Annotated[
        str | None, typer.Option(help="Also register it in MLflow under this name.")
    ] = None,
    tracking_uri: Annotated[str | None, typer.Option(help=TRACKING_HELP)] = None,
) -> None:
    """Import a SpecDeepMap checkpoint: read without running its pickled objects, written as
    a specdeepmap model file that test, map and promote take (and registered, if asked).
    """
    from specdeepmap.foreign import convert, import_card

    config = convert(checkpoint, out)
    console.print(
        f"{out}: {config.architecture}, {config.in_channels} bands, classes "
        f"{config.class_values}, {config.tile_size[1]} px chips"
    )
    if registered_model:
        from specdeepmap.tracking import register_imported

        uri = register_imported(out, config, registered_model, import_card(config), tracking_uri)
        print(f"model_uri: {uri}")
