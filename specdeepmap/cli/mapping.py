"""The map command (Deep Learning Mapper)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from specdeepmap.cli.app import app, console, errors_to_exit
from specdeepmap.cli.options import step_options
from specdeepmap.errors import InvalidParameterError
from specdeepmap.params import MapParams

if TYPE_CHECKING:
    from specdeepmap.mapping import MapReport


@app.command("map")
@errors_to_exit
@step_options(MapParams)
def map_cmd(
    image: Annotated[
        str,
        typer.Argument(
            help="Input raster URI, or a folder / s3:// prefix ending in '/' of scenes."
        ),
    ],
    model: Annotated[str, typer.Argument(help="Model file/URI or models:/NAME/VERSION|@ALIAS.")],
    output: Annotated[
        str, typer.Argument(help="Output GeoTIFF (COG) URI; a folder for several scenes.")
    ],
    params: MapParams,
    ground_truth: Annotated[str | None, typer.Option(help="Label raster for IoU.")] = None,
    iou_csv: Annotated[str | None, typer.Option(help="IoU CSV output URI.")] = None,
    confidence: Annotated[str | None, typer.Option(help="Confidence GeoTIFF output URI.")] = None,
    probabilities: Annotated[
        str | None, typer.Option(help="Per-class probability GeoTIFF output URI.")
    ] = None,
    vector: Annotated[
        str | None, typer.Option(help="GeoPackage of class polygons (class 0 dropped).")
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            help="Replace existing output files that are not maps of ours (an input is never "
            "replaced; earlier maps are replaced anyway)."
        ),
    ] = False,
    mask: Annotated[
        list[str] | None,
        typer.Option(
            help="Quality mask raster (repeat for several, e.g. EnMAP's QL_QUALITY_* layers): "
            "its flagged pixels (--mask-preset or --mask-values) are left unclassified, with "
            "their own map value."
        ),
    ] = None,
    fail_on_suspect: Annotated[
        bool,
        typer.Option(
            help="Exit with status 3 when the scene's verdict is suspect (the map is written "
            "anyway)."
        ),
    ] = False,
) -> None:
    """Deep Learning Mapper: whole-scene prediction to a Cloud Optimized GeoTIFF.

    Every map gets a verdict: does the scene (and its map) look like the model's training
    data? It is printed and written to MAP_quality.json beside the map.
    """
    import os

    from specdeepmap.mapping import map_scene, map_scenes

    quality_mask = params.quality_mask(mask or [])
    if image.endswith("/") or os.path.isdir(image):
        if quality_mask is not None:
            raise InvalidParameterError(
                "--mask belongs to one scene: map a folder's scenes one by one, or give "
                "STAC items with their mask assets"
            )
        reports = map_scenes(image, model, output, params)
        console.print(f"{len(reports)} new scene(s) mapped into {output}")
        return
    report = map_scene(
        image,
        model,
        output,
        params,
        gt_uri=ground_truth,
        iou_csv_uri=iou_csv,
        confidence_uri=confidence,
        probabilities_uri=probabilities,
        vector_uri=vector,
        overwrite=overwrite,
        mask=quality_mask,
    )
    _print_report(report, image, output, quality_mask is not None or bool(params.cloud_mask))
    if report.verdict is not None and report.verdict.suspect and fail_on_suspect:
        raise typer.Exit(code=3)


def _print_report(report: MapReport, image: str, output: str, masked: bool) -> None:
    """What the map took, its IoU against ground truth, the masked share and the verdict."""
    if report.skipped:
        console.print(f"skipped {image}: {report.skipped}")
        return
    console.print(f"{report.windows} windows in {report.seconds:.1f} s → {output}")
    if report.mean_iou is not None:
        console.print(f"mean IoU {report.mean_iou:.4f}")
    if masked:
        console.print(f"masked: {report.masked_share:.1%} of the pixels with data")
    verdict = report.verdict
    style = "bold yellow" if verdict.suspect else "green"
    console.print(
        f"[{style}]verdict {verdict.sentence()}[/] ({report.quality_uri})",
        highlight=False,
        soft_wrap=True,
    )


@app.command()
@errors_to_exit
def release(
    map_uri: Annotated[
        str, typer.Argument(help="The quarantined map (OUT/quarantine/NAME.tif) or OUT/NAME.tif.")
    ],
    reason: Annotated[str, typer.Option(help="Why the map can be trusted after all.")],
    by: Annotated[str | None, typer.Option(help="Who (default: the login name).")] = None,
) -> None:
    """Publish a quarantined map: it leaves quarantine/, its STAC item records who released it
    and why, and the folder's catalog.json lists it.
    """
    import getpass

    from specdeepmap.publishing import release as release_map

    published = release_map(map_uri, by or getpass.getuser(), reason)
    console.print(f"released: {published}")
