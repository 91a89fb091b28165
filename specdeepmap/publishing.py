"""Published or quarantined: where a scheduled map goes after its verdict.

A map whose scene the verdict finds suspect (:mod:`specdeepmap.drift`) is kept apart from the
trusted ones: its products (class COG and sidecars, confidence COG, quicklook, STAC item,
quality and metrics JSON) move into ``OUT/quarantine/``, which the prefix's ``catalog.json``
does not list (:func:`specdeepmap.stac.update_catalog` lists the folder's own items only). A
reviewer who checked it releases it (:func:`release`): the products move back, and its STAC
item records who released it, when and why.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from dataclasses import dataclass, field

from specdeepmap import __version__, storage
from specdeepmap.classes import ClassSchema
from specdeepmap.errors import MissingInputError
from specdeepmap.inference import Predictor
from specdeepmap.mapping import MapReport, map_base
from specdeepmap.masks import QualityMask, with_masked
from specdeepmap.params import MapParams

QUARANTINE = "quarantine"
#: a map's products: ``BASE`` + each suffix, for the map ``BASE.tif``
PRODUCT_SUFFIXES = (
    ".tif",
    ".tif.aux.xml",
    ".qml",
    "_confidence.tif",
    "_quicklook.png",
    ".json",
    "_quality.json",
    "_metrics.json",  # last: its presence means the scene is done
)


def quarantine_uri(map_uri: str) -> str:
    """Where a map of ``OUT/NAME.tif`` goes in quarantine: ``OUT/quarantine/NAME.tif``."""
    return storage.join(storage.parent(map_uri), QUARANTINE, storage.basename(map_uri))


def is_quarantined(map_uri: str) -> bool:
    """Whether the map's URI lies in a quarantine folder."""
    return storage.basename(storage.parent(map_uri)) == QUARANTINE


def move_products(map_uri: str, target_map_uri: str) -> str:
    """Move every product of a map that exists (the metrics JSON last); returns the target."""
    from specdeepmap.stac import CATALOG, relink_item

    source, target = map_base(map_uri), map_base(target_map_uri)
    for suffix in PRODUCT_SUFFIXES:
        if storage.exists(source + suffix):
            storage.move(source + suffix, target + suffix)
            if suffix == ".json":  # the STAC item: its self link and its catalog moved
                catalog = ("../" if is_quarantined(target_map_uri) else "./") + CATALOG
                relink_item(target + suffix, catalog)
    return target_map_uri


def release(map_uri: str, by: str, reason: str) -> str:
    """Publish a quarantined map: move it out of quarantine and record the release.

    Args:
        map_uri: the map in quarantine (``OUT/quarantine/NAME.tif``), or where it would be
            published (``OUT/NAME.tif``).
        by: who released it.
        reason: why it can be trusted after all.

    Returns:
        The published map's URI.

    Raises:
        MissingInputError: the map is not in quarantine.
    """
    from specdeepmap.stac import update_catalog

    held = map_uri if is_quarantined(map_uri) else quarantine_uri(map_uri)
    if not storage.exists(held):
        raise MissingInputError(f"No quarantined map at {held}")
    published = storage.join(storage.parent(storage.parent(held)), storage.basename(held))
    record = {
        "by": by,
        "reason": reason,
        "datetime": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
    }
    item_uri = map_base(held) + ".json"
    if storage.exists(item_uri):
        item = json.loads(storage.read_text(item_uri))
        item["properties"]["specdeepmap:release"] = record
        storage.write_text(item_uri, json.dumps(item, indent=2))
    move_products(held, published)
    metrics_uri = map_base(published) + "_metrics.json"
    if storage.exists(metrics_uri):  # the done marker says where the map is now, and why
        base = map_base(published)
        metrics = json.loads(storage.read_text(metrics_uri)) | {
            "output": published,
            "quicklook": base + "_quicklook.png",
            "stac_item": base + ".json",
            "quarantined": False,
            "released": record,
        }
        storage.write_text(metrics_uri, json.dumps(metrics, indent=2))
    update_catalog(storage.parent(published))
    return published


def done_marker(map_uri: str) -> str | None:
    """The metrics JSON of a mapped scene, published or in quarantine (None: not mapped)."""
    for uri in (map_uri, quarantine_uri(map_uri)):
        if storage.exists(map_base(uri) + "_metrics.json"):
            return map_base(uri) + "_metrics.json"
    return None


def masks_beside(scenes: list[str], suffix: str) -> tuple[list[str], dict[str, list[str]]]:
    """Scenes whose quality mask lies beside them as ``SCENE + suffix`` (e.g. ``_SCL.tif``):
    the scenes without the mask files (a mask is no scene) and each scene's mask, if any.
    """
    scenes = [s for s in scenes if not s.endswith(suffix)]
    masks = {}
    for scene in scenes:
        mask = storage.join(storage.parent(scene), storage.stem(scene) + suffix)
        if storage.exists(mask):
            masks[scene] = [mask]
    return scenes, masks


def mapped_with(map_uri: str, model_uri: str) -> bool:
    """Whether the scene of ``map_uri`` is mapped already, by ``model_uri`` (published, in
    quarantine, or skipped as masked).
    """
    marker = done_marker(map_uri)
    return marker is not None and json.loads(storage.read_text(marker)).get("model") == model_uri


def unmapped_scenes(
    input_prefix: str, out_folder: str, suffix: str = "_classes.tif", model_uri: str | None = None
) -> list[str]:
    """Scenes (GeoTIFFs, VRTs and STAC items under ``input_prefix``) not mapped yet.

    A scene is mapped once its metrics JSON (written last, see :func:`map_scene_products`)
    exists, published or in quarantine (a suspect map is not mapped again every hour), and,
    with ``model_uri`` (``models:/NAME/VERSION``), was written for that model.
    """
    from specdeepmap.mapping import output_uri_for, scenes_under

    todo = []
    for uri in scenes_under(input_prefix):
        metrics = done_marker(output_uri_for(uri, out_folder, suffix))
        if metrics is None:
            todo.append(uri)
        elif model_uri and json.loads(storage.read_text(metrics)).get("model") != model_uri:
            todo.append(uri)
    return todo


@dataclass(frozen=True)
class SceneProducts:
    """What mapping one scene for production gave: where its products are and its headline
    figures (the verdict and the scores behind it). A scene almost all masked is ``skipped``
    (with the reason) and has only its metrics JSON.
    """

    input: str  #: the scene
    metrics: str  #: its ``*_metrics.json`` (written last: the scene is complete)
    skipped: str | None = None  #: why it was not mapped
    verdict: str | None = None  #: ``ok`` or ``suspect``
    quarantined: bool = False  #: moved into ``quarantine/`` (suspect, not published)
    classes: str | None = None  #: the class COG
    quicklook: str | None = None
    stac_item: str | None = None
    seconds: float = 0.0
    reasons: list[str] = field(default_factory=list)  #: why suspect
    scores: dict[str, float | None] = field(default_factory=dict)  #: the drift scores
    masked_share: float = 0.0
    mean_confidence: float | None = None
    class_shares: list[float] = field(default_factory=list)  #: in the model's class order

    def to_dict(self) -> dict:
        """Plain data (a flow's result, shown in the Prefect UI)."""
        return dataclasses.asdict(self)


def map_scene_products(
    input_uri: str,
    model_uri: str,
    output_uri: str,
    params: MapParams = MapParams(),
    predictor: Predictor | None = None,
    mask: QualityMask | None = None,
    quarantine: bool = False,
) -> SceneProducts:
    """Map a scene for production: beside the class COG, a confidence COG, a quicklook, the
    quality JSON with the scene's verdict, the map's STAC item and ``*_metrics.json``.

    ``input_uri`` may be a raster, a VRT or a STAC item (its band assets are stacked by band
    name; its mask asset is used unless ``mask`` is given). With ``quarantine`` a suspect
    map's products move into ``quarantine/`` beside it before the metrics JSON is written
    (last, so that a scene whose metrics exist is complete). A scene almost all masked is not
    mapped: its metrics JSON says why. Returns the output URIs and the headline figures.
    """
    from specdeepmap.mapping import class_areas, load_for_engine, map_scene, quicklook

    predictor = predictor or load_for_engine(model_uri, params)
    base = map_base(output_uri)
    report = map_scene(
        input_uri,
        model_uri,
        output_uri,
        params,
        confidence_uri=base + "_confidence.tif",
        predictor=predictor,
        mask=mask,
    )
    head = {"input": input_uri, "model": model_uri, "software": f"specdeepmap {__version__}"}
    if report.skipped:
        storage.write_text(base + "_metrics.json", json.dumps(head | {"skipped": report.skipped}))
        return SceneProducts(input_uri, base + "_metrics.json", skipped=report.skipped)
    quality = json.loads(storage.read_text(report.quality_uri))
    classes, values = predictor.classes, list(predictor.class_values)
    if quality["masked_value"] is not None:
        classes = with_masked(classes, quality["masked_value"], quality["mask"]["label"])
        values.append(quality["masked_value"])
    png = quicklook(output_uri, base + "_quicklook.png", classes=classes)
    item = _write_item(report, input_uri, model_uri, classes, values, png, quality)
    quarantined = quarantine and report.verdict.suspect
    if quarantined:  # before the metrics JSON exists: a crash leaves it unpublished
        output_uri = move_products(output_uri, quarantine_uri(output_uri))
        base = map_base(output_uri)
        png, item = base + "_quicklook.png", base + ".json"
    areas = class_areas(output_uri)
    metrics = head | {
        "output": output_uri,
        "quicklook": png,
        "stac_item": item,
        "quarantined": quarantined,
        **_run_figures(report),
        "class_area": {str(k): v for k, v in areas.items()},
        "class_names": {str(k): classes.name(k) for k in areas},
    }
    storage.write_text(base + "_metrics.json", json.dumps(metrics, indent=2))
    return SceneProducts(
        input_uri,
        base + "_metrics.json",
        verdict=report.verdict.status,
        quarantined=quarantined,
        classes=output_uri,
        quicklook=png,
        stac_item=item,
        seconds=round(report.seconds, 2),
        reasons=report.verdict.reasons,
        scores=report.verdict.scores,
        masked_share=round(report.masked_share, 6),
        mean_confidence=quality["mean_confidence"],
        class_shares=quality["class_shares"],
    )


def _write_item(
    report: MapReport,
    input_uri: str,
    model_uri: str,
    classes: ClassSchema,
    values: list[int],
    quicklook_uri: str,
    quality: dict,
) -> str:
    """The map's STAC item, its products as assets and its quality as a property."""
    from specdeepmap.stac import is_item, write_map_item

    base = map_base(report.output_uri)
    return write_map_item(
        report.output_uri,
        input_uri,
        model_uri,
        classes,
        values,
        {
            "quicklook": quicklook_uri,
            "metrics": base + "_metrics.json",
            "style": base + ".qml",
            "quality": report.quality_uri,
            "confidence": report.confidence_uri,
        },
        input_item_uri=input_uri if is_item(input_uri) else None,
        properties={"specdeepmap:quality": item_quality(quality)},
    )


def _run_figures(report: MapReport) -> dict:
    """The map's verdict and what mapping it took, for the metrics JSON."""
    return {
        "verdict": report.verdict.status,
        "reasons": report.verdict.reasons,
        "masked_share": round(report.masked_share, 6),
        "windows": report.windows,
        "seconds": round(report.seconds, 3),
        "pixels_processed": report.pixels_processed,
    }


def item_quality(quality: dict) -> dict:
    """The ``specdeepmap:quality`` property of a map's STAC item."""
    return {
        "verdict": quality["verdict"],
        "reasons": quality["reasons"],
        "masked_share": quality["masked_share"],
        "mean_confidence": quality["mean_confidence"],
        "scores": quality["scores"],
    }
