"""STAC in and out: scenes read from STAC items, maps published as STAC items.

In: a STAC item (JSON, local or ``s3://``) is turned into a VRT of the assets that hold the
model's bands, matched by band name (the asset key, or its ``eo:bands``/``bands`` name or
common name), in the model's order (:func:`item_scene`).

Out: every map gets ``<map>.json`` beside it (:func:`write_map_item`): the COG asset with the
classes (``classification:classes``: values, names, colours), its raster and projection
fields, the quicklook, metrics and QGIS style as assets, a ``derived_from`` link to the input,
and the software and model that made it (``processing:`` fields). :func:`update_catalog`
keeps a ``catalog.json`` of every map item under an output prefix.
"""

from __future__ import annotations

import datetime as dt
import json
import re

from rasterio.warp import transform_bounds

from specdeepmap import __version__, storage
from specdeepmap.bands import stack_bands
from specdeepmap.classes import ClassSchema
from specdeepmap.errors import InputMismatchError, InvalidParameterError
from specdeepmap.masks import QualityMask

PROCESSING_SCHEMA = "https://stac-extensions.github.io/processing/v1.2.0/schema.json"
COG_TYPE = "image/tiff; application=geotiff; profile=cloud-optimized"
ITEM_SUFFIX = ".json"
CATALOG = "catalog.json"
CATALOG_RELS = ("self", "root", "parent")


def is_item(uri: str) -> bool:
    """True for a STAC item URI (a ``.json`` file) given where a scene is expected."""
    return uri.lower().endswith(".json")


#: links one catalog file may hold, and items one walk may collect: a catalog larger than
#: this is refused (split it into child catalogs or map it in parts), not read without end
MAX_LINKS_PER_CATALOG = 10_000
MAX_ITEMS = 100_000


def _read_json(uri: str) -> dict:
    """A STAC object: a JSON object (not an array or a string), else one clear error."""
    try:
        data = json.loads(storage.read_text(uri))
    except ValueError as error:
        raise InvalidParameterError(f"{uri} is not JSON: {error}") from None
    if not isinstance(data, dict):
        raise InvalidParameterError(
            f"{uri} is a JSON {type(data).__name__}, not a STAC "
            "object (an item, catalog or collection is a JSON object)"
        )
    return data


def _href(base: str, href: object, what: str = "link") -> str:
    """An asset or link href resolved against the JSON file it is written in.

    Raises:
        InvalidParameterError: no href, or one with a scheme other than ``s3://``/``file://``.
    """
    if not isinstance(href, str) or not href.strip():
        raise InvalidParameterError(f"{base}: a {what} has no href")
    scheme = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://", href)
    if scheme and scheme.group(1).lower() not in ("s3", "file"):
        raise InvalidParameterError(
            f"{base}: {what} href {href} is a {scheme.group(1)}:// URL, which is not "
            "supported: copy the file to a local path or to s3:// and point the item there"
        )
    if scheme or href.startswith("/"):
        return href
    return storage.join(storage.parent(base), href.removeprefix("./"))


def _assets(item: dict, where: str) -> dict[str, dict]:
    """The item's assets, each checked to be an object."""
    assets = item.get("assets", {})
    if not isinstance(assets, dict) or not all(isinstance(a, dict) for a in assets.values()):
        raise InvalidParameterError(
            f"STAC item {where}: 'assets' must be an object of asset objects (key → {{href, ...}})"
        )
    return assets


def item_band_assets(item: dict, band_names: list[str], where: str) -> list[str]:
    """Asset hrefs holding ``band_names``, in that order (matched case-insensitively by asset
    key, band name or common name).
    """
    index: dict[str, tuple[str, object]] = {}
    assets = _assets(item, where)
    for key, asset in assets.items():
        names = {key}
        bands = [*(asset.get("eo:bands") or []), *(asset.get("bands") or [])]
        for band in bands if isinstance(bands, list) else []:
            if isinstance(band, dict):
                names |= {
                    band.get("name", ""),
                    band.get("common_name", ""),
                    band.get("eo:common_name", ""),
                }
        for name in names:
            if name and isinstance(name, str):
                index.setdefault(name.lower(), (key, asset.get("href")))
    missing = [b for b in band_names if b.lower() not in index]
    if missing:
        raise InputMismatchError(
            f"STAC item {where} has no asset for band(s) "
            f"{', '.join(missing)} (assets: {', '.join(assets)})"
        )
    return [_href(where, index[b.lower()][1], f"asset '{index[b.lower()][0]}'") for b in band_names]


def item_scene(
    item_uri: str, band_names: list[str], vrt_uri: str, resampling: str = "bilinear"
) -> str:
    """A VRT of the item's assets for ``band_names`` (the model's bands), at the finest
    resolution among them; returns ``vrt_uri``.
    """
    item = _read_json(item_uri)
    if item.get("type") != "Feature":
        raise InvalidParameterError(f"{item_uri} is not a STAC item (type {item.get('type')})")
    if not band_names or any(re.fullmatch(r"band \d+", b) for b in band_names):
        raise InputMismatchError(
            f"The model does not name its bands: the assets of STAC item "
            f"{item_uri} cannot be matched to them"
        )
    return stack_bands(
        item_band_assets(item, band_names, item_uri), vrt_uri, resampling, names=list(band_names)
    )


def item_mask(item_uri: str) -> QualityMask | None:
    """The quality mask a STAC item ships, by asset key or role: ``SCL`` (Sentinel-2 L2A),
    ``QL_QUALITY_*`` (EnMAP, one asset per kind) or a ``cloud`` asset (0/1). None when it has
    none.
    """
    item = _read_json(item_uri)
    assets = _assets(item, item_uri)

    def href(key: str) -> str:
        return _href(item_uri, assets[key].get("href"), f"asset '{key}'")

    def roles(key: str) -> list:
        return assets[key].get("roles") or []

    for key in assets:
        if key.upper() == "SCL" or "scl" in roles(key):
            return QualityMask.build([href(key)], "s2-scl")
    quality = [href(k) for k in sorted(assets) if k.upper().startswith("QL_QUALITY_")]
    if quality:
        return QualityMask.build(quality, "enmap-ql")
    for key in assets:
        if key.lower() == "cloud" or "cloud" in roles(key):
            return QualityMask.build([href(key)], "binary")
    return None


def _acquired(input_uri: str, input_item: dict | None) -> dt.datetime | None:
    if input_item and input_item.get("properties", {}).get("datetime"):
        return dt.datetime.fromisoformat(
            input_item["properties"]["datetime"].replace("Z", "+00:00")
        )
    found = re.search(r"(20\d{6})T?(\d{6})?", storage.stem(input_uri))
    if not found:
        return None
    stamp = found.group(1) + (found.group(2) or "000000")
    return dt.datetime.strptime(stamp, "%Y%m%d%H%M%S").replace(tzinfo=dt.UTC)


def write_map_item(
    map_uri: str,
    input_uri: str,
    model_uri: str,
    classes: ClassSchema,
    class_values: list[int],
    extra_assets: dict[str, str] | None = None,
    input_item_uri: str | None = None,
    properties: dict | None = None,
) -> str:
    """Write ``<map>.json``, the STAC item of a class map; returns its URI.

    ``properties`` are added to the item's (e.g. ``specdeepmap:quality``, the verdict).

    ``datetime`` is the scene's acquisition time (from the input item, or a
    ``YYYYMMDDThhmmss`` stamp in the input's name); without one the item gives the time the
    map was made as ``processing:datetime`` only and ``datetime`` null with start and end.
    """
    import pystac
    from pystac.extensions.projection import ProjectionExtension

    from specdeepmap.mlm import model_item_href

    with storage.open_raster(map_uri) as src:
        bounds = transform_bounds(src.crs, "EPSG:4326", *src.bounds, densify_pts=21)
        crs, shape, transform = src.crs, [src.height, src.width], list(src.transform)[:6]
        dtype, resolution = src.dtypes[0], abs(src.transform.a)
    input_item = _read_json(input_item_uri) if input_item_uri else None
    made = dt.datetime.now(dt.UTC).replace(microsecond=0)
    acquired = _acquired(input_uri, input_item)
    item = pystac.Item(
        id=storage.stem(map_uri),
        geometry=_bounds_polygon(bounds),
        bbox=list(bounds),
        datetime=acquired,
        start_datetime=None if acquired else made,
        end_datetime=None if acquired else made,
        properties={"title": f"Land-cover classes of {storage.basename(input_uri)}"},
    )
    item.stac_extensions.append(PROCESSING_SCHEMA)
    item.properties |= {
        "processing:software": {"specdeepmap": __version__},
        "processing:datetime": made.isoformat().replace("+00:00", "Z"),
        "processing:lineage": f"semantic segmentation of {input_uri} with {model_uri} "
        "(overlapping windows, blended probabilities)",
        "specdeepmap:model": model_uri,
    } | (properties or {})
    projection = ProjectionExtension.ext(item, add_if_missing=True)
    projection.code = crs.to_string() if crs else None
    projection.shape, projection.transform = shape, transform
    _add_class_map_asset(item, map_uri, classes, class_values, dtype, resolution)
    for key, uri in (extra_assets or {}).items():
        if uri is not None:
            media_type, roles = EXTRA_ASSETS.get(key, (None, ["metadata"]))
            asset = pystac.Asset(href=storage.basename(uri), media_type=media_type, roles=roles)
            item.add_asset(key, asset)
    model_item = model_item_href(model_uri)
    if model_item is not None:  # the model version's MLM item (specdeepmap.mlm)
        item.add_link(
            pystac.Link("derived_from", model_item, media_type="application/json", title="model")
        )
    source = input_item_uri or input_uri
    item.add_link(
        pystac.Link(
            "derived_from",
            source,
            media_type="application/json" if input_item_uri else "image/tiff",
        )
    )
    uri = _item_uri(map_uri)
    data = item.to_dict(include_self_link=False, transform_hrefs=False)
    data["links"] = catalog_links(uri, "./" + CATALOG) + data["links"]
    storage.write_text(uri, json.dumps(data, indent=2))
    return uri


#: a map item's other assets: media type and roles
EXTRA_ASSETS = {
    "confidence": (COG_TYPE, ["data", "quality"]),
    "quality": ("application/json", ["metadata", "quality"]),
    "quicklook": ("image/png", ["overview", "visual"]),
    "metrics": ("application/json", ["metadata"]),
    "style": ("text/xml", ["style", "metadata"]),
}


def _bounds_polygon(bounds: tuple[float, float, float, float]) -> dict:
    """GeoJSON polygon of (west, south, east, north)."""
    w, s, e, n = bounds
    return {"type": "Polygon", "coordinates": [[[w, s], [e, s], [e, n], [w, n], [w, s]]]}


def _add_class_map_asset(
    item,
    map_uri: str,
    classes: ClassSchema,
    class_values: list[int],
    dtype: str,
    resolution: float,
) -> None:
    """Add the class map's asset to ``item``: its classes (Classification extension; 0 is
    nodata) and its band (Raster extension).
    """
    import pystac
    from pystac.extensions.classification import Classification, ClassificationExtension
    from pystac.extensions.raster import DataType, RasterBand, RasterExtension

    asset = pystac.Asset(
        href=storage.basename(map_uri), media_type=COG_TYPE, roles=["data"], title="class map"
    )
    item.add_asset("classes", asset)  # first: the extensions are declared on the item
    ClassificationExtension.ext(asset, add_if_missing=True).classes = [
        Classification.create(
            value=0, name="unlabelled", description="no class (nodata)", nodata=True
        )
    ] + [
        Classification.create(
            value=int(v),
            name=slug(classes.name(v)),
            title=classes.name(v),
            color_hint="{:02X}{:02X}{:02X}".format(*classes.info(v).color),
        )
        for v in class_values
    ]
    RasterExtension.ext(asset, add_if_missing=True).bands = [
        RasterBand.create(nodata=0, data_type=DataType(dtype), spatial_resolution=resolution)
    ]


def catalog_links(item_uri: str, catalog_href: str) -> list[dict]:
    """An item's ``self`` (absolute), ``root`` and ``parent`` (the catalog, relative) links."""
    return [
        {"rel": "self", "href": storage.absolute(item_uri), "type": "application/json"},
        {"rel": "root", "href": catalog_href, "type": "application/json"},
        {"rel": "parent", "href": catalog_href, "type": "application/json"},
    ]


def relink_item(item_uri: str, catalog_href: str) -> None:
    """Point a moved item's ``self``, ``root`` and ``parent`` links at its new place."""
    item = _read_json(item_uri)
    kept = [link for link in item.get("links", []) if link.get("rel") not in CATALOG_RELS]
    item["links"] = catalog_links(item_uri, catalog_href) + kept
    storage.write_text(item_uri, json.dumps(item, indent=2))


def slug(name: str) -> str:
    """A ``classification:classes`` name: lowercase words joined by ``-``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "class"


def _item_uri(map_uri: str) -> str:
    return (map_uri[:-4] if map_uri.endswith(".tif") else map_uri) + ITEM_SUFFIX


def update_catalog(prefix: str, title: str = "specdeepmap maps") -> str:
    """Write ``prefix/catalog.json`` linking every map item under the prefix (one writer at a
    time: the flow calls it after mapping).
    """
    items = [u for u in storage.list_files(prefix, "_classes" + ITEM_SUFFIX)]
    catalog = {
        "type": "Catalog",
        "stac_version": "1.1.0",
        "id": slug(storage.basename(prefix)) or "maps",
        "title": title,
        "description": "Class maps made by specdeepmap, one STAC item per scene.",
        "links": [{"rel": "root", "href": "./" + CATALOG, "type": "application/json"}]
        + [
            {"rel": "item", "href": "./" + storage.basename(u), "type": "application/json"}
            for u in items
        ],
    }
    uri = storage.join(prefix, CATALOG)
    storage.write_text(uri, json.dumps(catalog, indent=2))
    return uri


def is_item_file(uri: str) -> bool:
    """True for a JSON file holding a STAC item (False for catalogs and any other JSON)."""
    try:
        return _read_json(uri).get("type") == "Feature"
    except InvalidParameterError:
        return False


def is_catalog(uri: str) -> bool:
    """True for a STAC catalog or collection JSON (not an item)."""
    return uri.lower().endswith(".json") and _read_json(uri).get("type") in (
        "Catalog",
        "Collection",
    )


def catalog_items(uri: str) -> list[str]:
    """Item URIs of a static catalog or collection (following child catalogs), or of one
    item.

    Raises:
        InvalidParameterError: a link without href, a catalog that links back to itself or
            to one of its parents, more than :data:`MAX_LINKS_PER_CATALOG` links in one file
            or :data:`MAX_ITEMS` items in all.
    """
    found: list[str] = []
    _walk_catalog(uri, found, [])
    return list(dict.fromkeys(found))  # an item linked from two catalogs is mapped once


def _walk_catalog(uri: str, found: list[str], parents: list[str]) -> None:
    from specdeepmap.guards import location

    where = location(uri)
    if where in parents:
        raise InvalidParameterError(
            f"STAC catalog {uri} links back to itself (a child link cycle): fix its 'child' links"
        )
    data = _read_json(uri)
    if data.get("type") == "Feature":
        found.append(uri)
        return
    links = data.get("links", [])
    if not isinstance(links, list) or not all(isinstance(k, dict) for k in links):
        raise InvalidParameterError(f"{uri}: 'links' must be a list of link objects")
    if len(links) > MAX_LINKS_PER_CATALOG:
        raise InvalidParameterError(
            f"STAC catalog {uri} has {len(links)} links, more than the "
            f"{MAX_LINKS_PER_CATALOG} read from one file: split it into child catalogs"
        )
    for link in links:
        if link.get("rel") == "item":
            found.append(_href(uri, link.get("href")))
            if len(found) > MAX_ITEMS:
                raise InvalidParameterError(
                    f"STAC catalog {uri} lists more than {MAX_ITEMS} "
                    "items: map it in parts (child catalogs)"
                )
        elif link.get("rel") == "child":
            _walk_catalog(_href(uri, link.get("href")), found, [*parents, where])


__all__ = [
    "is_item",
    "is_item_file",
    "is_catalog",
    "item_scene",
    "item_band_assets",
    "write_map_item",
    "update_catalog",
    "catalog_items",
]
