"""Commands that prepare training data: sample-data, stack-bands, chip (Raster Splitter) and
split (Dataset Maker).
"""

from __future__ import annotations

from typing import Annotated

import typer

from specdeepmap.cli.app import app, console, errors_to_exit, progress_bar
from specdeepmap.cli.options import step_options
from specdeepmap.params import ChipParams, SplitParams


@app.command("sample-data")
@errors_to_exit
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
@errors_to_exit
def stack_bands_cmd(
    out: Annotated[str, typer.Argument(help="VRT to write (e.g. scene.vrt; local or s3://).")],
    bands: Annotated[
        list[str],
        typer.Argument(
            help="Band files in band order, or one folder of band files (Sentinel-2 names are "
            "ordered B01…B12)."
        ),
    ],
    resampling: Annotated[
        str,
        typer.Option(
            help="How coarser bands reach the finest grid: bilinear (reflectance), nearest, "
            "cubic or average."
        ),
    ] = "bilinear",
    order: Annotated[
        str | None, typer.Option(help="Band order for a folder, as names: e.g. B02,B03,B04,B08.")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Replace an existing OUT (a band file is never replaced).")
    ] = False,
) -> None:
    """Stack one-file-per-band scenes (e.g. Sentinel-2 JP2 at 10/20/60 m) as a GDAL VRT at
    the finest resolution, without copying pixels; use the VRT wherever an image is asked.
    """
    from specdeepmap.bands import band_files, stack_bands

    files = band_files(bands[0], order.split(",") if order else None) if len(bands) == 1 else bands
    stack_bands(files, out, resampling, overwrite=overwrite)
    console.print(f"{out}: {len(files)} bands ({resampling} resampling to the finest grid)")


@app.command()
@errors_to_exit
@step_options(ChipParams)
def chip(
    image: Annotated[str, typer.Argument(help="Image raster URI.")],
    label: Annotated[str, typer.Argument(help="Label raster URI (class values 0-255).")],
    out: Annotated[str, typer.Argument(help="Output folder URI.")],
    params: ChipParams,
    workers: Annotated[int, typer.Option(min=1, help="Reader/writer threads.")] = 2,
    classes: Annotated[
        str | None,
        typer.Option(
            help="Class names and colours: a CSV (value,name[,color as #rrggbb]) or a QGIS .qml "
            "style (default: those stored with the label raster, if any)."
        ),
    ] = None,
) -> None:
    """Raster Splitter: cut an image and its labels into chip pairs."""
    from specdeepmap.chipping import chip_scene

    with progress_bar() as bar:
        task = bar.add_task("chipping", total=None)
        report = chip_scene(
            image,
            label,
            out,
            params,
            workers=workers,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
            classes_uri=classes,
        )
    console.print(
        f"{report.chips} chip pairs in {out} ({report.written} new, {report.reused} "
        f"kept, {report.below_coverage} below coverage) in {report.seconds:.1f} s"
    )
    if report.class_names:
        console.print("classes: " + ", ".join(f"{v} {n}" for v, n in report.class_names.items()))


@app.command()
@errors_to_exit
@step_options(SplitParams)
def split(
    folder: Annotated[str, typer.Argument(help="Chip folder URI (images/ and labels/).")],
    params: SplitParams,
    out: Annotated[str | None, typer.Option(help="Folder for the CSVs (default: FOLDER).")] = None,
) -> None:
    """Dataset Maker: balanced train/validation/test CSVs, class weights, band statistics."""
    from specdeepmap.splitting import make_dataset

    report = make_dataset(
        folder, params, out_folder=out, progress=lambda message: console.log(message)
    )
    console.print(
        f"train {report.chips['train']}, validation {report.chips['validation']}, test "
        f"{report.chips['test']} chips; largest class-share gap "
        f"{report.max_share_gap_pp:.2f} pp, JS divergence {report.js_divergence:.2e}"
    )
    test = report.leakage["test"]
    console.print(
        f"spatial leakage: {test['touching_chips']} of {test['chips']} test chips "
        "touch a training chip"
        + (
            f" ({report.buffer_chips} training chips left out as a buffer)"
            if report.buffer_chips
            else ""
        )
    )
    for name, uri in report.outputs.items():
        print(f"{name}: {uri}")
