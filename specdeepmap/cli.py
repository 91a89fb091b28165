"""The ``specdeepmap`` command line: one sub-command per step of the pipeline.

Every path argument is a URI (local path, ``file://`` or ``s3://``). Expected errors (the
library's own, and GDAL, filesystem, S3 and MLflow errors, by family) are printed as one clear
line and exit with status 2; ``--verbose`` shows the log.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from specdeepmap import __version__
from specdeepmap.errors import SpecDeepMapError

app = typer.Typer(
    help="SpecDeepMap: semantic segmentation of multispectral and hyperspectral rasters.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)


def describe_error(error: BaseException) -> str | None:
    """One line for an error a user can act on, by family (None: a bug, show the traceback).

    The library's own errors carry their message; GDAL, filesystem, S3 (botocore) and MLflow
    errors are named by what went wrong, so no third-party traceback reaches the console.
    """
    from specdeepmap.storage import is_transient, redact

    if isinstance(error, SpecDeepMapError):
        return str(error)
    text = redact(str(error).strip().splitlines()[0] if str(error).strip() else "")
    kind = type(error).__name__
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
    from mlflow.exceptions import MlflowException
    from rasterio.errors import RasterioError

    if isinstance(error, NoCredentialsError):
        return ("no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or an "
                "instance role) and AWS_ENDPOINT_URL for a non-AWS store")
    if isinstance(error, MlflowException):
        return f"MLflow: {text}"
    if isinstance(error, RasterioError):
        return f"cannot read the raster: {text}"
    if isinstance(error, BotoCoreError | ClientError | OSError):
        if is_transient(error):
            return (f"storage unreachable ({kind}: {text}); check AWS_ENDPOINT_URL and the "
                    "network, then run again")
        if isinstance(error, NotADirectoryError):
            return f"a path that must be a folder is a file: {text}"
        if isinstance(error, IsADirectoryError):
            return f"a path that must be a file is a folder: {text}"
        if isinstance(error, PermissionError):
            return f"permission denied: {text}"
        if isinstance(error, FileNotFoundError):
            return f"not found: {text}"
        if isinstance(error, FileExistsError):
            return f"already exists: {text}"
        return f"{kind}: {text}"
    return None


def _errors_to_exit(func: Callable[..., Any]) -> Callable[..., Any]:
    """Print expected errors as one line (no traceback) and exit with status 2."""
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - classified by describe_error
            message = describe_error(error)
            if message is None:
                raise
            logging.getLogger(__name__).debug("error details", exc_info=True)
            console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=2) from None
    return wrapper


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=True)


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show the log.")] = False,
) -> None:
    """Configure logging for all commands (libraries' chatter only with --verbose)."""
    from specdeepmap.console import configure_console

    configure_console(verbose)
    _exit_cleanly_on_sigterm()


def _exit_cleanly_on_sigterm() -> None:
    """End the command on SIGTERM as Ctrl+C does.

    SIGTERM (``kill``, a scheduler's timeout, a container stopping) becomes an exception in the
    main thread, so that every ``finally`` runs and no staging folder or temporary file is left
    behind (exit status 143, as for the signal).
    """
    import signal
    import threading

    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, terminate)


@app.command()
def version() -> None:
    """Print the version."""
    print(__version__)


@app.command("sample-data")
@_errors_to_exit
def sample_data(
    out: Annotated[str, typer.Argument(help="Output folder URI.")],
    width: Annotated[int, typer.Option(min=64, help="Scene width in pixels.")] = 1024,
    height: Annotated[int, typer.Option(min=64, help="Scene height in pixels.")] = 1024,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Write a Sentinel-2-like 13-band demo scene and its label raster (no downloads)."""
    from specdeepmap.sample_data import generate_scene

    scene = generate_scene(out, width=width, height=height, seed=seed)
    print(scene.image_uri)
    print(scene.label_uri)


@app.command("stack-bands")
@_errors_to_exit
def stack_bands_cmd(
    out: Annotated[str, typer.Argument(help="VRT to write (e.g. scene.vrt; local or s3://).")],
    bands: Annotated[list[str], typer.Argument(
        help="Band files in band order, or one folder of band files (Sentinel-2 names are "
        "ordered B01…B12).")],
    resampling: Annotated[str, typer.Option(
        help="How coarser bands reach the finest grid: bilinear (reflectance), nearest, "
        "cubic or average.")] = "bilinear",
    order: Annotated[str | None, typer.Option(
        help="Band order for a folder, as names: e.g. B02,B03,B04,B08.")] = None,
    overwrite: Annotated[bool, typer.Option(
        help="Replace an existing OUT (a band file is never replaced).")] = False,
) -> None:
    """Stack one-file-per-band scenes (e.g. Sentinel-2 JP2 at 10/20/60 m) as a GDAL VRT at
    the finest resolution, without copying pixels; use the VRT wherever an image is asked."""
    from specdeepmap.bands import band_files, stack_bands

    files = band_files(bands[0], order.split(",") if order else None) if len(bands) == 1 \
        else bands
    stack_bands(files, out, resampling, overwrite=overwrite)
    console.print(f"{out}: {len(files)} bands ({resampling} resampling to the finest grid)")


@app.command()
@_errors_to_exit
def chip(
    image: Annotated[str, typer.Argument(help="Image raster URI.")],
    label: Annotated[str, typer.Argument(help="Label raster URI (class values 0-255).")],
    out: Annotated[str, typer.Argument(help="Output folder URI.")],
    tile_x: Annotated[int, typer.Option(min=1, help="Tile size X (pixels).")] = 256,
    tile_y: Annotated[int, typer.Option(min=1, help="Tile size Y (pixels).")] = 256,
    step_x: Annotated[int, typer.Option(min=1, help="Step size X (pixels).")] = 256,
    step_y: Annotated[int, typer.Option(min=1, help="Step size Y (pixels).")] = 256,
    min_coverage: Annotated[float, typer.Option(
        min=0, max=100, help="Minimum labelled share per tile in % (0 keeps every tile).")] = 50,
    workers: Annotated[int, typer.Option(min=1, help="Reader/writer threads.")] = 2,
    classes: Annotated[str | None, typer.Option(
        help="Class names and colours: a CSV (value,name[,color as #rrggbb]) or a QGIS .qml "
        "style (default: those stored with the label raster, if any).")] = None,
) -> None:
    """Raster Splitter: cut an image and its labels into chip pairs."""
    from specdeepmap.chipping import ChipParams, chip_scene

    params = ChipParams((tile_x, tile_y), (step_x, step_y), min_coverage)
    with _progress() as bar:
        task = bar.add_task("chipping", total=None)
        report = chip_scene(image, label, out, params, workers=workers,
                            progress=lambda done, total: bar.update(task, completed=done,
                                                                    total=total),
                            classes_uri=classes)
    console.print(f"{report.chips} chip pairs in {out} ({report.written} new, {report.reused} "
                  f"kept, {report.below_coverage} below coverage) in {report.seconds:.1f} s")
    if report.class_names:
        console.print("classes: " + ", ".join(f"{v} {n}" for v, n in report.class_names.items()))


@app.command()
@_errors_to_exit
def split(
    folder: Annotated[str, typer.Argument(help="Chip folder URI (images/ and labels/).")],
    train: Annotated[float, typer.Option(min=0, max=100, help="Train percentage.")] = 80,
    validation: Annotated[float, typer.Option(min=0, max=100, help="Validation percentage.")] = 10,
    test: Annotated[float, typer.Option(min=0, max=100, help="Test percentage.")] = 10,
    seed: Annotated[int, typer.Option(min=0, help="Random seed.")] = 42,
    scaler: Annotated[float | None, typer.Option(
        help="Divide pixel values by this (e.g. 10000) before statistics and training.")] = None,
    normalize: Annotated[bool, typer.Option(help="Write Normalize_Bands.csv.")] = True,
    strategy: Annotated[str, typer.Option(
        help="'balanced-groups' (class-balanced; chips that touch stay in one set, training "
        "chips touching a validation or test chip are left out: no spatial leakage), "
        "'balanced' (SpecDeepMap's, over single chips) or 'spatial-blocks'.")
    ] = "balanced-groups",
    block_size: Annotated[int, typer.Option(
        min=1, help="spatial-blocks: chips per block edge.")] = 4,
    class_weighting: Annotated[str, typer.Option(
        help="'one-minus-share' (SpecDeepMap) or 'inverse-frequency'.")] = "one-minus-share",
    min_class_share: Annotated[float, typer.Option(
        min=0, max=1, help="Each set holds at least this share of every class's pixels "
        "(SpecDeepMap: 0.01).")] = 0.01,
    out: Annotated[str | None, typer.Option(help="Folder for the CSVs (default: FOLDER).")] = None,
) -> None:
    """Dataset Maker: balanced train/validation/test CSVs, class weights, band statistics."""
    from specdeepmap.splitting import SplitParams, make_dataset

    params = SplitParams(train, validation, test, seed, scaler, normalize, strategy,
                         class_weighting, block_size, min_class_share)
    report = make_dataset(folder, params, out_folder=out,
                          progress=lambda message: console.log(message))
    console.print(
        f"train {report.chips['train']}, validation {report.chips['validation']}, test "
        f"{report.chips['test']} chips; largest class-share gap "
        f"{report.max_share_gap_pp:.2f} pp, JS divergence {report.js_divergence:.2e}")
    test = report.leakage["test"]
    console.print(f"spatial leakage: {test['touching_chips']} of {test['chips']} test chips "
                  "touch a training chip" + (f" ({report.buffer_chips} training chips left out "
                                             "as a buffer)" if report.buffer_chips else ""))
    for name, uri in report.outputs.items():
        print(f"{name}: {uri}")


@app.command()
@_errors_to_exit
def train(
    dataset: Annotated[str, typer.Argument(help="Dataset folder URI (what `split` wrote).")],
    out: Annotated[str, typer.Option(help="Local folder for checkpoints and logs.")] = "runs/train",
    architecture: Annotated[str, typer.Option(
        help="unet, unetplusplus, deeplabv3plus, segformer "
             "(or 'U-Net', 'U-Net++', ...).")] = "unet",
    backbone: Annotated[str, typer.Option(help="smp encoder or tu-<timm model>.")] = "resnet18",
    weights: Annotated[str | None, typer.Option(
        help="None, 'imagenet', or a weights file/URI (state dict, SSL4EO-S12 MoCo).")] = None,
    adapt_first_conv: Annotated[bool, typer.Option(
        help="Repeat pretrained first-conv kernels over another band count.")] = False,
    freeze_backbone: Annotated[bool | None, typer.Option(
        help="Freeze the encoder (default: on with pretrained weights).")] = None,
    augment: Annotated[bool, typer.Option(
        help="Augmentation on/off (SpecDeepMap's data_aug; what it does: --augmentation, "
        "--spectral-jitter).")] = True,
    augmentation: Annotated[str, typer.Option(
        help="d4 (flips and quarter turns), d4-rotate (also ±45°), none.")] = "d4",
    spectral_jitter: Annotated[bool, typer.Option(
        help="Random spectral gain per chip (brightness and per band).")] = True,
    spectral_channels: Annotated[int, typer.Option(
        min=-1, help="Learned per-pixel front-end (and per-pixel head) width: -1 auto (32; "
        "off with pretrained weights), 0 off.")] = -1,
    spectral_init: Annotated[str, typer.Option(
        help="pca: the front-end's first filters start on the training chips' principal "
        "axes (every pixel, labelled or not); random: the usual random start.")] = "pca",
    encoder_depth: Annotated[int, typer.Option(
        min=-1, max=5, help="Encoder stages 3-5 (U-Net, U-Net++); -1 auto: deepest features "
        ">= 4 px on a chip (32 px chips: 3).")] = -1,
    loss: Annotated[str, typer.Option(help="dice-ce, lovasz-ce or ce.")] = "dice-ce",
    cutmix: Annotated[float, typer.Option(
        min=0, max=1, help="Share of training chips given a random box of another chip "
        "(image and labels; 0: off).")] = 0.5,
    band_dropout: Annotated[float, typer.Option(
        min=0, max=0.9, help="Share of the bands zeroed at random in each training chip "
        "(dropout over bands; 0: off).")] = 0.0,
    consistency: Annotated[float, typer.Option(
        min=0, help="Weight of a FixMatch consistency loss on unlabelled pixels (0: off).")
    ] = 0.0,
    pseudo_labels: Annotated[float, typer.Option(
        min=0, max=1, help="Label the training chips' unlabelled pixels with the "
        "RandomForest's class where its vote share reaches this (0: off).")] = 0.0,
    pixel_loss_weight: Annotated[float, typer.Option(
        min=0, help="Also train the per-pixel head alone, with this loss weight.")] = 0.0,
    norm: Annotated[str, typer.Option(
        help="batch or group normalisation (networks trained from scratch).")] = "batch",
    weight_decay: Annotated[float, typer.Option(
        min=0, help="AdamW weight decay (0: Adam).")] = 0.0,
    weight_averaging: Annotated[str, typer.Option(
        help="none, or ema (validate and keep an exponential moving average of the "
        "weights).")] = "none",
    warmup_epochs: Annotated[float, typer.Option(
        min=0, help="Linear learning-rate warm-up before the cosine decay.")] = 1.0,
    min_chips_per_epoch: Annotated[int, typer.Option(
        min=0, help="Draw a small training set repeatedly until an epoch holds this many "
        "chips (0: one pass).")] = 128,
    sampling: Annotated[str, typer.Option(
        help="uniform, or class-balanced (chips rich in rare classes drawn more often).")
    ] = "uniform",
    ensemble: Annotated[int, typer.Option(
        min=1, help="Train this many networks from different random starts; the model file "
        "gives their mean class probabilities (N x the training and mapping time).")] = 1,
    distill: Annotated[bool, typer.Option(
        help="With --ensemble N: one more network learns the members' mean probabilities on "
        "every pixel; the model file is that network (one network's mapping time).")] = False,
    baseline: Annotated[bool, typer.Option(
        help="Fit and score the per-pixel RandomForest baseline.")] = True,
    balanced: Annotated[bool, typer.Option(help="Class weights in the loss.")] = True,
    normalize: Annotated[bool, typer.Option(help="Z-score with Normalize_Bands.csv.")] = True,
    batch_size: Annotated[int, typer.Option(min=1)] = 2,
    epochs: Annotated[int, typer.Option(min=1)] = 1,
    lr: Annotated[float, typer.Option(min=1e-7, help="Learning rate.")] = 1e-3,
    lr_finder: Annotated[bool, typer.Option(help="Find and use a learning rate.")] = False,
    early_stopping: Annotated[bool, typer.Option(help="Stop when val IoU stalls.")] = True,
    patience: Annotated[int, typer.Option(min=1)] = 20,
    device: Annotated[str, typer.Option(help="cpu, gpu or auto.")] = "auto",
    devices: Annotated[int, typer.Option(min=1, help="Number of devices (DDP if > 1).")] = 1,
    precision: Annotated[str, typer.Option(help="32, bf16-mixed or 16-mixed.")] = "32",
    workers: Annotated[int, typer.Option(min=0, help="Data-loader workers.")] = 0,
    resume: Annotated[str | None, typer.Option(help="Checkpoint to resume from.")] = None,
    keep_top_k: Annotated[int, typer.Option(help="Best checkpoints kept (-1: all).")] = 1,
    checkpoint_uri: Annotated[str | None, typer.Option(
        help="Also write checkpoints here as training goes (s3:// or a folder); run the same "
        "command again to continue an interrupted training from its last checkpoint.")] = None,
    registered_model: Annotated[str, typer.Option(
        help="MLflow registered model name ('' to skip).")] = "specdeepmap-segmentation",
    tracking_uri: Annotated[str | None, typer.Option(
        help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db).")] = None,
) -> None:
    """Deep Learning Trainer: train, log to TensorBoard and MLflow, register the best model."""
    from specdeepmap.training import TrainConfig
    from specdeepmap.training import train as run_training

    result = run_training(TrainConfig(
        dataset=dataset, out=out, architecture=architecture, backbone=backbone,
        weights=weights, adapt_first_conv=adapt_first_conv, freeze_backbone=freeze_backbone,
        augment=augment, augmentation=augmentation, spectral_jitter=spectral_jitter,
        spectral_channels=spectral_channels, spectral_init=spectral_init,
        encoder_depth=encoder_depth, loss=loss,
        cutmix=cutmix, band_dropout=band_dropout, consistency=consistency,
        pseudo_labels=pseudo_labels,
        pixel_loss_weight=pixel_loss_weight, norm=norm, weight_decay=weight_decay,
        weight_averaging=weight_averaging, warmup_epochs=warmup_epochs,
        min_chips_per_epoch=min_chips_per_epoch, sampling=sampling, ensemble=ensemble,
        distill=distill, baseline=baseline,
        balanced=balanced, normalize=normalize, batch_size=batch_size,
        epochs=epochs, lr=lr, lr_finder=lr_finder, early_stopping=early_stopping,
        patience=patience, device=device, devices=devices, precision=precision,
        workers=workers, resume=resume, keep_top_k=keep_top_k,
        registered_model=registered_model or None, tracking_uri=tracking_uri,
        checkpoint_uri=checkpoint_uri))
    console.print(f"best val IoU {result.best_val_iou:.4f}: " + (
        result.best_checkpoint if ensemble == 1 or distill
        else f"the mean of {ensemble} networks"))
    if result.baseline_mean_iou("validation") is not None:
        console.print(f"RandomForest baseline val IoU "
                      f"{result.baseline_mean_iou('validation'):.4f}")
    print(f"model_file: {result.model_file}")
    print(f"model_uri: {result.model_uri}")
    print(f"run_id: {result.run_id}")


@app.command("test")
@_errors_to_exit
def test_cmd(
    test_csv: Annotated[str, typer.Argument(help="test_files.csv URI.")],
    model: Annotated[str, typer.Argument(help="Model file/URI or models:/NAME/VERSION|@ALIAS.")],
    out: Annotated[str, typer.Option(help="Folder for the CSVs and plots.")] = "runs/test",
    device: Annotated[str, typer.Option(help="cpu, gpu or auto.")] = "auto",
    predictions: Annotated[str | None, typer.Option(
        help="Folder for per-chip prediction GeoTIFFs.")] = None,
    mask_unlabelled: Annotated[bool, typer.Option(
        help="Set exported predictions to 0 where the label is 0.")] = True,
    tta: Annotated[bool, typer.Option(
        help="Average predictions over the 8 flips and quarter turns of each chip.")] = False,
) -> None:
    """Deep Learning Tester: IoU CSV (SpecDeepMap format) and confusion-matrix metrics."""
    from specdeepmap.evaluation import evaluate_model

    report = evaluate_model(test_csv, model, out, device=device, predictions_folder=predictions,
                            mask_unlabelled=mask_unlabelled, tta=tta)
    console.print(f"mean IoU {report.metrics.mean_iou:.4f} (pooled pixels), "
                  f"{report.per_chip_mean_iou:.4f} (per-chip mean, SpecDeepMap's definition)")
    print(f"iou_csv: {report.iou_csv}")
    print(f"metrics_csv: {report.metrics_csv}")


@app.command("map")
@_errors_to_exit
def map_cmd(
    image: Annotated[str, typer.Argument(
        help="Input raster URI, or a folder / s3:// prefix ending in '/' of scenes.")],
    model: Annotated[str, typer.Argument(help="Model file/URI or models:/NAME/VERSION|@ALIAS.")],
    output: Annotated[str, typer.Argument(
        help="Output GeoTIFF (COG) URI; a folder for several scenes.")],
    overlap: Annotated[float, typer.Option(min=0, max=49.9,
                                           help="Minimum tile overlap in %.")] = 10,
    window: Annotated[int | None, typer.Option(
        min=32, help="Window edge in px (default: 1, 2 or 4 × training tile, fewest "
        "pixels processed).")] = None,
    batch_size: Annotated[int | None, typer.Option(
        min=1, help="Windows per forward pass (default: ~4 tiles of 256² px).")] = None,
    device: Annotated[str, typer.Option(help="cpu, gpu or auto.")] = "auto",
    precision: Annotated[str, typer.Option(
        help="fp32; bf16 (autocast: GPUs, AMX CPUs); int8 (CPU, quantized network, "
        "several times faster on VNNI CPUs).")] = "fp32",
    blend: Annotated[str, typer.Option(
        help="cosine, linear, gaussian, none, or crop (SpecDeepMap's margins).")] = "cosine",
    ground_truth: Annotated[str | None, typer.Option(help="Label raster for IoU.")] = None,
    iou_csv: Annotated[str | None, typer.Option(help="IoU CSV output URI.")] = None,
    confidence: Annotated[str | None, typer.Option(
        help="Confidence GeoTIFF output URI.")] = None,
    probabilities: Annotated[str | None, typer.Option(
        help="Per-class probability GeoTIFF output URI.")] = None,
    vector: Annotated[str | None, typer.Option(
        help="GeoPackage of class polygons (class 0 dropped).")] = None,
    tta: Annotated[bool, typer.Option(
        help="Average each window over its 8 flips and quarter turns (8x the time).")] = False,
    overwrite: Annotated[bool, typer.Option(
        help="Replace existing output files that are not maps of ours (an input is never "
        "replaced; earlier maps are replaced anyway).")] = False,
) -> None:
    """Deep Learning Mapper: whole-scene prediction to a Cloud Optimized GeoTIFF."""
    import os

    from specdeepmap.mapping import MapParams, map_scene, map_scenes

    params = MapParams(overlap, window, batch_size, blend, precision, True, device, tta)
    if image.endswith("/") or os.path.isdir(image):
        reports = map_scenes(image, model, output, params)
        console.print(f"{len(reports)} new scene(s) mapped into {output}")
        return
    report = map_scene(image, model, output, params,
                       gt_uri=ground_truth, iou_csv_uri=iou_csv, confidence_uri=confidence,
                       probabilities_uri=probabilities, vector_uri=vector, overwrite=overwrite)
    console.print(f"{report.windows} windows in {report.seconds:.1f} s → {output}")
    if report.mean_iou is not None:
        console.print(f"mean IoU {report.mean_iou:.4f}")


@app.command()
@_errors_to_exit
def baseline(
    dataset: Annotated[str, typer.Argument(help="Dataset folder URI (what `split` wrote).")],
    out: Annotated[str, typer.Option(help="Folder for the CSVs and plots.")] = "runs/baseline",
    trees: Annotated[int, typer.Option(min=1, help="Trees of the forest.")] = 100,
    max_pixels: Annotated[int, typer.Option(
        min=1, help="Labelled training pixels sampled at most.")] = 100_000,
    seed: Annotated[int, typer.Option(min=0, help="Random seed.")] = 0,
) -> None:
    """Per-pixel RandomForest baseline: the Tester's files for the forest on the test chips."""
    from specdeepmap.baseline import BaselineParams, baseline_dataset

    result = baseline_dataset(dataset, out, BaselineParams(trees, max_pixels, seed))
    for split in ("validation", "test"):
        if result.mean_iou(split) is not None:
            console.print(f"RandomForest {split} mean IoU {result.mean_iou(split):.4f} "
                          "(pooled pixels)")
    print(f"iou_csv: {out.rstrip('/')}/test_iou.csv")


@app.command()
@_errors_to_exit
def promote(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[str, typer.Argument(help="Model version to promote.")],
    alias: Annotated[str, typer.Option(help="Alias to move (champion is checked first).")]
    = "champion",
    comment: Annotated[str, typer.Option(help="Why (kept as a version tag).")] = "",
    by: Annotated[str | None, typer.Option(help="Who (default: the login name).")] = None,
    force: Annotated[bool, typer.Option(
        help="Promote even if the version does not beat the champion on its test chips by "
        "the margin, or is below the RandomForest baseline.")] = False,
    min_improvement: Annotated[float, typer.Option(
        min=0, max=1, help="Mean IoU the version must gain over the champion.")] = 0.01,
    out: Annotated[str, typer.Option(help="Folder for the comparison's test files.")]
    = "runs/promote",
    device: Annotated[str, typer.Option(help="cpu, gpu or auto.")] = "auto",
    tracking_uri: Annotated[str | None, typer.Option(
        help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db).")] = None,
) -> None:
    """Move an alias (champion by default) to a model version, with the training pipeline's
    checks: scored against the champion on the version's own test chips."""
    import getpass

    import mlflow

    from specdeepmap.registry import CHAMPION, promote_by_hand
    from specdeepmap.tracking import tracking_uri as default_tracking_uri

    mlflow.set_tracking_uri(default_tracking_uri(tracking_uri))
    decision = promote_by_hand(name, version, out, alias, by or getpass.getuser(), comment,
                               force, min_improvement, device)
    forced = alias == CHAMPION and decision.alias != CHAMPION
    console.print(f"{name} version {version} is now {alias}"
                  f"{' (forced)' if forced else ''}: {decision.reason}")


@app.command()
def tensorboard(
    logdir: Annotated[str, typer.Option(help="Training log folder URI.")] = "runs/train",
    port: Annotated[int, typer.Option(min=1024, max=65535)] = 6006,
) -> None:
    """TensorBoard Visualizer: serve the training logs on 127.0.0.1 and print the address."""
    import os
    import sys

    print(f"TensorBoard at http://127.0.0.1:{port}/ (Ctrl+C stops it)", flush=True)
    # replace this process, so that Ctrl+C and signals reach TensorBoard itself
    os.execv(sys.executable, [sys.executable, "-m", "tensorboard.main", "--logdir", logdir,
                              "--port", str(port), "--host", "127.0.0.1"])


if __name__ == "__main__":
    app()
