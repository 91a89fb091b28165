"""The ``specdeepmap`` command line: one sub-command per step of the pipeline.

Every path argument is a URI (local path, ``file://`` or ``s3://``). Errors of the library are
printed as one clear line and exit with status 2; ``--verbose`` shows the log.
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


def _errors_to_exit(func: Callable[..., Any]) -> Callable[..., Any]:
    """Print library errors as one line (no traceback) and exit with status 2."""
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except SpecDeepMapError as error:
            console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=2) from None
    return wrapper


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=True)


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show the log.")] = False,
) -> None:
    """Configure logging for all commands."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


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
) -> None:
    """Raster Splitter: cut an image and its labels into chip pairs."""
    from specdeepmap.chipping import ChipParams, chip_scene

    params = ChipParams((tile_x, tile_y), (step_x, step_y), min_coverage)
    with _progress() as bar:
        task = bar.add_task("chipping", total=None)
        report = chip_scene(image, label, out, params, workers=workers,
                            progress=lambda done, total: bar.update(task, completed=done,
                                                                    total=total))
    console.print(f"{report.chips} chip pairs in {out} ({report.written} new, {report.reused} "
                  f"kept, {report.below_coverage} below coverage) in {report.seconds:.1f} s")


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
    strategy: Annotated[str, typer.Option(help="'balanced' or 'spatial-blocks'.")] = "balanced",
    block_size: Annotated[int, typer.Option(
        min=1, help="spatial-blocks: chips per block edge.")] = 4,
    class_weighting: Annotated[str, typer.Option(
        help="'one-minus-share' (SpecDeepMap) or 'inverse-frequency'.")] = "one-minus-share",
    out: Annotated[str | None, typer.Option(help="Folder for the CSVs (default: FOLDER).")] = None,
) -> None:
    """Dataset Maker: balanced train/validation/test CSVs, class weights, band statistics."""
    from specdeepmap.splitting import SplitParams, make_dataset

    params = SplitParams(train, validation, test, seed, scaler, normalize, strategy,
                         class_weighting, block_size)
    report = make_dataset(folder, params, out_folder=out,
                          progress=lambda message: console.log(message))
    console.print(
        f"train {report.chips['train']}, validation {report.chips['validation']}, test "
        f"{report.chips['test']} chips; largest class-share gap "
        f"{report.max_share_gap_pp:.2f} pp, JS divergence {report.js_divergence:.2e}")
    for name, uri in report.outputs.items():
        print(f"{name}: {uri}")


if __name__ == "__main__":
    app()
