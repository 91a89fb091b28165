"""Validate STAC items offline: STAC core 1.1.0 and GeoJSON from pystac's copies, the
extensions from ``tests/schemas`` (see its README); an extension the item names but that is
not kept there fails the validation instead of being skipped.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
from pystac.validation.local_validator import get_local_schema_cache
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7

SCHEMAS = Path(__file__).parent / "schemas"
CORE_ITEM = "https://schemas.stacspec.org/v1.1.0/item-spec/json-schema/item.json"


def _registry() -> Registry:
    resources = {}
    for uri, schema in get_local_schema_cache().items():
        resources[uri] = Resource.from_contents(schema, default_specification=DRAFT7)
    for path in SCHEMAS.glob("*/*/schema.json"):
        name, version = path.parent.parent.name, path.parent.name
        uri = f"https://stac-extensions.github.io/{name}/{version}/schema.json"
        schema = json.loads(path.read_text())
        resources[uri] = Resource.from_contents(schema, default_specification=DRAFT7)
    return Registry().with_resources(resources.items())


def validate_item(item: dict) -> None:
    """Raise ``jsonschema.ValidationError`` unless ``item`` is valid STAC 1.1 and valid under
    every extension schema it declares.
    """
    registry = _registry()
    for uri in [CORE_ITEM, *item.get("stac_extensions", [])]:
        schema = registry.contents(uri.rstrip("#"))
        validator = jsonschema.validators.validator_for(schema)(schema, registry=registry)
        validator.validate(item)
