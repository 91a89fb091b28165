"""Class schema: the name and colour of each class value, carried from the labels to the maps.

Read from the label raster (GDAL colour table; category names or a raster attribute table in
its ``.aux.xml``, as QGIS, EnMAP-Box and ArcGIS write them; ENVI ``class names``) or from a
file the user gives (``classes.csv`` with ``value,name[,color]`` or a QGIS ``.qml`` style).
Stored with the chips as ``classes.json`` and with the model; written with every map as a
colour table inside the GeoTIFF, category names in its ``.aux.xml`` (read by GDAL, QGIS,
ArcGIS) and a QGIS ``.qml`` style. Without any names a class is called by its value.
"""

from __future__ import annotations

import colorsys
import json
import logging
import math
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from io import StringIO
from typing import TYPE_CHECKING

from specdeepmap import storage
from specdeepmap.errors import InputMismatchError, InvalidLabelError, MissingInputError

if TYPE_CHECKING:
    from specdeepmap.model_config import ModelConfig

log = logging.getLogger(__name__)

CLASSES_JSON = "classes.json"
#: control characters (not allowed in XML 1.0, and they break CSV and markdown tables)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
RGB = tuple[int, int, int]
# GDAL raster attribute table field usages (GDALRATFieldUsage)
_GFU_NAME, _GFU_MIN, _GFU_MINMAX, _GFU_RED, _GFU_GREEN, _GFU_BLUE = 2, 3, 5, 6, 7, 8


@dataclass(frozen=True)
class ClassInfo:
    """One class: its label value, name and display colour (RGB 0-255)."""

    value: int
    name: str
    color: RGB


@dataclass
class ClassSchema:
    """The classes of a dataset or model, by value. ``source`` says where the names came from."""

    classes: list[ClassInfo] = field(default_factory=list)
    source: str = ""

    def info(self, value: int) -> ClassInfo:
        """The class of ``value`` (a default name and colour when the schema lacks it)."""
        for item in self.classes:
            if item.value == value:
                return item
        return ClassInfo(int(value), str(value), default_color(value))

    def name(self, value: int) -> str:
        """The class's name (its value as text when it has none)."""
        return self.info(value).name

    @property
    def named(self) -> bool:
        """True when any class has a name other than its value."""
        return any(c.name != str(c.value) for c in self.classes)

    def restrict(self, values: list[int]) -> ClassSchema:
        """Exactly ``values``, in that order, with defaults for values the schema lacks."""
        return ClassSchema([self.info(int(v)) for v in values], self.source)

    def merge(self, other: ClassSchema, where: str) -> ClassSchema:
        """This schema plus ``other``'s classes; the same value under two names is refused."""
        merged = {c.value: c for c in self.classes}
        for item in other.classes:
            known = merged.get(item.value)
            if known is not None and known.name != item.name:
                raise InputMismatchError(
                    f"Class {item.value} is '{item.name}' in {other.source or 'the new labels'} "
                    f"but '{known.name}' in {where}: give one classes file for every scene"
                )
            merged.setdefault(item.value, item)
        return ClassSchema(
            sorted(merged.values(), key=lambda c: c.value), self.source or other.source
        )

    def colormap(self, values: list[int]) -> dict[int, tuple[int, int, int, int]]:
        """GDAL colour table entries for ``values`` (0, unlabelled, transparent)."""
        table = {0: (0, 0, 0, 0)}
        table.update({int(v): (*self.info(int(v)).color, 255) for v in values if v != 0})
        return table

    def to_dict(self) -> dict:
        """JSON-ready form (colours as ``#rrggbb``)."""
        return {
            "source": self.source,
            "classes": [
                {"value": c.value, "name": c.name, "color": _hex(c.color)} for c in self.classes
            ],
        }

    @classmethod
    def from_dict(cls, data: dict | None) -> ClassSchema:
        """Inverse of :meth:`to_dict` (an empty schema for None)."""
        if not data:
            return cls()
        return cls(
            [
                ClassInfo(
                    int(c["value"]), str(c["name"]), _parse_color(c.get("color"), int(c["value"]))
                )
                for c in data.get("classes", [])
            ],
            data.get("source", ""),
        )


def default_color(value: int) -> RGB:
    """A distinct colour for a class value without one (golden-ratio hue steps)."""
    hue = (int(value) * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.65, 0.9)
    return round(r * 255), round(g * 255), round(b * 255)


def _hex(color: RGB) -> str:
    return "#{:02x}{:02x}{:02x}".format(*color)


def _parse_color(text, value: int, where: str = "") -> RGB:
    if text is None or (isinstance(text, float) and math.isnan(text)) or str(text).strip() == "":
        return default_color(value)
    text = str(text).strip()
    if re.fullmatch(r"#[0-9a-fA-F]{6}(?:[0-9a-fA-F]{2})?", text):
        return int(text[1:3], 16), int(text[3:5], 16), int(text[5:7], 16)
    parts = [p for p in text.replace(";", ",").replace(" ", ",").split(",") if p]
    if len(parts) in (3, 4) and all(p.isdigit() and int(p) < 256 for p in parts):
        return int(parts[0]), int(parts[1]), int(parts[2])
    raise InvalidLabelError(
        f"{where + ': ' if where else ''}colour '{text}' of class {value}: "
        "use #rrggbb or r,g,b (0-255)"
    )


# ---------------------------------------------------------------- reading


def read_classes_file(uri: str) -> ClassSchema:
    """A classes file the user gives: ``.csv`` (columns ``value,name`` and optional ``color``
    as ``#rrggbb``) or a QGIS ``.qml`` style (paletted or unique-values renderer).
    """
    if not storage.exists(uri):
        raise MissingInputError(f"Classes file {uri} does not exist")
    text = storage.read_text(uri)
    if uri.lower().endswith(".qml"):
        return _from_qml(text, uri)
    import pandas as pd  # here, not at the top: mapping imports this module without it

    try:
        frame = pd.read_csv(StringIO(text))
    except (ValueError, pd.errors.ParserError) as error:
        raise InvalidLabelError(f"Classes file {uri} is not a CSV: {error}") from None
    frame.columns = [str(c).strip().lower() for c in frame.columns]
    if not {"value", "name"} <= set(frame.columns):
        raise InvalidLabelError(
            f"Classes file {uri} needs the columns value,name (and "
            f"optionally color); it has {', '.join(frame.columns)}"
        )
    classes = []
    for row in frame.itertuples(index=False):
        value = pd.to_numeric(row.value, errors="coerce")
        if pd.isna(value) or value != int(value) or not 0 < value < 256:
            raise InvalidLabelError(
                f"Classes file {uri}: value '{row.value}' is not a class "
                "value (1-255, as label rasters hold; 0 is unlabelled)"
            )
        name = row.name if isinstance(row.name, str) else ""
        classes.append(
            ClassInfo(
                int(value),
                _class_name(name, int(value), uri),
                _parse_color(getattr(row, "color", None), int(value), f"Classes file {uri}"),
            )
        )
    return _checked(classes, uri)


def _class_name(name: str, value: int, where: str) -> str:
    """A class name as given, stripped.

    The value when empty (with a warning); control characters refused (they make the map's .aux.xml
    and .qml unreadable).
    """
    name = str(name).strip()
    if _CONTROL.search(name):
        raise InvalidLabelError(
            f"{where}: the name of class {value} holds a control "
            f"character ({name!r}): use printable text"
        )
    if not name:
        log.warning("%s: class %d has no name; it is called %d", where, value, value)
        return str(value)
    return name


def _checked(classes: list[ClassInfo], where: str) -> ClassSchema:
    """The schema of a user's classes file: each value and each name once."""
    values = [c.value for c in classes]
    twice = sorted({v for v in values if values.count(v) > 1})
    if twice:
        raise InvalidLabelError(
            f"Classes file {where} lists value(s) {', '.join(map(str, twice))} twice"
        )
    names = [c.name.casefold() for c in classes]
    same = sorted({c.name for c in classes if names.count(c.name.casefold()) > 1})
    if same:
        raise InvalidLabelError(
            f"Classes file {where} gives the name(s) "
            f"{', '.join(repr(n) for n in same)} to several values: "
            "each class needs its own name"
        )
    return ClassSchema(sorted(classes, key=lambda c: c.value), where)


def _from_qml(text: str, uri: str) -> ClassSchema:
    try:
        root = ET.fromstring(text)
    except ET.ParseError as error:
        raise InvalidLabelError(f"QGIS style {uri} is not valid XML: {error}") from None
    classes = []
    entries = list(root.iter("paletteEntry")) or [  # paletted renderer, else singleband
        item for item in root.iter("item") if item.get("value") is not None
    ]  # pseudocolor
    for entry in entries:
        value = _qml_value(entry.get("value"), uri)
        if value == 0:
            continue
        classes.append(
            ClassInfo(
                value,
                _class_name(entry.get("label") or str(value), value, f"QGIS style {uri}"),
                _parse_color(entry.get("color"), value, f"QGIS style {uri}"),
            )
        )
    if not classes:
        raise InvalidLabelError(f"QGIS style {uri} has no paletted classes")
    return _checked(classes, uri)


def _qml_value(text: str | None, uri: str) -> int:
    """A palette entry's class value (a whole number 0-255)."""
    try:
        value = float(text) if text is not None else math.nan
    except ValueError:
        value = math.nan
    if math.isnan(value) or value != int(value) or not 0 <= value < 256:
        raise InvalidLabelError(
            f"QGIS style {uri}: palette entry value {text!r} is not a "
            "class value (a whole number 0-255)"
        )
    return int(value)


def read_label_classes(label_uri: str, values: list[int] | None = None) -> ClassSchema:
    """Class names and colours stored with a label raster (empty schema when it has none).

    Names: category names or a raster attribute table in ``LABEL.aux.xml`` (GDAL's PAM
    sidecar), or ENVI ``class names``. Colours: the raster's colour table, kept for ``values``
    (or for the named classes) only, since a palette has 256 entries whatever the classes.
    """
    names: dict[int, str] = {}
    colors: dict[int, RGB] = {}
    aux = label_uri + ".aux.xml"
    if storage.exists(aux):
        names, colors = _from_pam(storage.read_bytes(aux).decode("utf-8", "replace"), aux)
    with storage.open_raster(label_uri) as src:
        envi = src.tags(ns="ENVI")
        if not names and envi.get("class_names"):
            listed = [n.strip() for n in envi["class_names"].strip("{} ").split(",")]
            names = {i: n for i, n in enumerate(listed) if n}
        try:
            palette = src.colormap(1)
        except ValueError:  # no colour table
            palette = {}
    names.pop(0, None)
    keep = set(values) if values is not None else set(names)
    for value, rgba in palette.items():
        if value in keep and value not in colors:
            colors[value] = tuple(int(c) for c in rgba[:3])
    chosen = sorted((set(names) | set(colors)) & keep if values is not None else set(names))
    if not chosen or (not names and not palette):
        return ClassSchema()
    return ClassSchema(
        [
            ClassInfo(v, names.get(v, str(v)), colors.get(v, default_color(v)))
            for v in chosen
            if v != 0
        ],
        label_uri,
    )


def _from_pam(text: str, where: str = "") -> tuple[dict[int, str], dict[int, RGB]]:
    """Category names and colours of band 1 from a GDAL PAM ``.aux.xml``.

    None, with a warning, when it cannot be read: the labels are still usable, called by value.
    """
    try:
        root = ET.fromstring(text)
    except ET.ParseError as error:
        log.warning(
            "%s is not valid XML (%s): its class names are not used; give them with --classes",
            where or "the label's .aux.xml",
            error,
        )
        return {}, {}
    band = next((b for b in root.iter("PAMRasterBand") if b.get("band", "1") == "1"), None)
    if band is None:
        return {}, {}
    names, colors = {}, {}
    categories = band.find("CategoryNames")
    if categories is not None:
        names = {
            i: _printable(c.text)
            for i, c in enumerate(categories.iter("Category"))
            if _printable(c.text)
        }
    rat = band.find("GDALRasterAttributeTable")
    if rat is not None:
        try:
            _read_rat(rat, names, colors)
        except (ValueError, TypeError, IndexError) as error:
            log.warning(
                "%s: its raster attribute table cannot be read (%s): its class names "
                "are not used; give them with --classes",
                where or "the label's .aux.xml",
                error,
            )
            return {}, {}
    return names, colors


def _read_rat(rat: ET.Element, names: dict[int, str], colors: dict[int, RGB]) -> None:
    """Names and colours from a GDAL raster attribute table (into ``names``, ``colors``)."""
    usage = {int(f.findtext("Usage", "0")): int(f.get("index")) for f in rat.iter("FieldDefn")}
    real = {int(f.get("index")) for f in rat.iter("FieldDefn") if f.findtext("Type") == "1"}
    value_col = usage.get(_GFU_MINMAX, usage.get(_GFU_MIN))
    for row in rat.iter("Row"):
        cells = [c.text or "" for c in row.findall("F")]
        value = int(float(cells[value_col])) if value_col is not None else int(row.get("index"))
        if _GFU_NAME in usage and _printable(cells[usage[_GFU_NAME]]):
            names.setdefault(value, _printable(cells[usage[_GFU_NAME]]))
        if all(u in usage for u in (_GFU_RED, _GFU_GREEN, _GFU_BLUE)):
            columns = [usage[u] for u in (_GFU_RED, _GFU_GREEN, _GFU_BLUE)]
            rgb = [float(cells[c]) for c in columns]
            scale = 255 if set(columns) <= real and max(rgb) <= 1 else 1  # 0-1 reals
            colors[value] = tuple(int(round(c * scale)) for c in rgb)


def _printable(name: str | None) -> str:
    """A name with control characters blanked and spaces stripped.

    For names read from label sidecars and written into XML, where control characters are not
    allowed.
    """
    return _CONTROL.sub(" ", name or "").strip()


def read_dataset_classes(folder: str) -> ClassSchema:
    """The ``classes.json`` of a chip/dataset folder (empty schema when there is none)."""
    uri = storage.join(folder, CLASSES_JSON)
    if not storage.exists(uri):
        return ClassSchema()
    try:
        return ClassSchema.from_dict(json.loads(storage.read_text(uri)))
    except (ValueError, KeyError, TypeError) as error:
        raise InvalidLabelError(
            f"{uri} is not a classes file written by specdeepmap: {error}"
        ) from None


def write_dataset_classes(folder: str, schema: ClassSchema) -> str:
    """Merge ``schema`` into the folder's ``classes.json`` (atomic); return its URI."""
    uri = storage.join(folder, CLASSES_JSON)
    merged = read_dataset_classes(folder).merge(schema, uri)
    storage.write_text(uri, json.dumps(merged.to_dict(), indent=2))
    return uri


# ---------------------------------------------------------------- writing with a map


def pam_xml(schema: ClassSchema, values: list[int]) -> str:
    """A GDAL ``.aux.xml`` giving band 1 category names (index = class value, 0
    'unlabelled'), which GDAL, QGIS and ArcGIS show as the classes' names.
    """
    top = max([0, *values])
    names = [""] * (top + 1)
    names[0] = "unlabelled"
    for v in values:
        names[int(v)] = _printable(schema.name(int(v)))
    root = ET.Element("PAMDataset")
    band = ET.SubElement(root, "PAMRasterBand", band="1")
    categories = ET.SubElement(band, "CategoryNames")
    for name in names:
        ET.SubElement(categories, "Category").text = name
    return ET.tostring(root, encoding="unicode") + "\n"


def qml(schema: ClassSchema, values: list[int]) -> str:
    """A QGIS style (paletted renderer, names as labels) for a class map; QGIS loads it with
    the map when it sits beside it under the same name.
    """
    root = ET.Element("qgis", version="3.28.0", styleCategories="Symbology")
    pipe = ET.SubElement(root, "pipe")
    renderer = ET.SubElement(
        pipe,
        "rasterrenderer",
        type="paletted",
        band="1",
        opacity="1",
        alphaBand="-1",
        nodataColor="",
    )
    palette = ET.SubElement(renderer, "colorPalette")
    for v in values:
        item = schema.info(int(v))
        ET.SubElement(
            palette,
            "paletteEntry",
            value=str(item.value),
            color=_hex(item.color),
            alpha="255",
            label=_printable(item.name),
        )
    ET.indent(root)
    return (
        "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n"
        + ET.tostring(root, encoding="unicode")
        + "\n"
    )


def schema_from_config(config: ModelConfig) -> ClassSchema:
    """A model's class schema (from its config; classes called by value without one)."""
    schema = ClassSchema.from_dict(config.classes)
    return schema.restrict(list(config.class_values))


__all__ = [
    "CLASSES_JSON",
    "ClassInfo",
    "ClassSchema",
    "default_color",
    "read_classes_file",
    "read_label_classes",
    "read_dataset_classes",
    "write_dataset_classes",
    "pam_xml",
    "qml",
    "schema_from_config",
]
