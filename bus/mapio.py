"""Import and export of network and application maps as YAML, JSON and XML.

XML is derived from the pydantic models rather than hand-written: every field is an
element named after it (snake_case -> kebab-case), list items are repeated child
elements named after their model (``<overlay-network>``) or ``<item>`` for scalars,
dicts are ``<entry key="...">value</entry>``, and None is omitted (every optional
field defaults to None, so omission round-trips). Parsing walks the same field types
and hands the strings to pydantic, so a round trip gives an equal model.
"""

from __future__ import annotations

import json
import os
import re
import types
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from bus.models import ApplicationMap, ModelError, NetworkMap

__all__ = [
    "ErrorDetail",
    "MapFormat",
    "MapFormatError",
    "MapValidationError",
    "decode_map_text",
    "detect_format",
    "dump_map",
    "load_application_map",
    "load_map",
    "load_network_map",
]

MapFormat = Literal["yaml", "json", "xml"]
MapModel = NetworkMap | ApplicationMap
M = TypeVar("M", NetworkMap, ApplicationMap)

ROOT_ELEMENTS: dict[type[BaseModel], str] = {NetworkMap: "network-map", ApplicationMap: "application-map"}
_EXTENSIONS: dict[str, MapFormat] = {".yaml": "yaml", ".yml": "yaml", ".json": "json", ".xml": "xml"}


class MapFormatError(ModelError):
    """The text is not well-formed YAML, JSON or XML, or cannot be written in the format."""


@dataclass(frozen=True)
class ErrorDetail:
    """One schema violation: where it is and what is wrong."""

    location: tuple[str | int, ...]
    message: str
    type: str = "value_error"

    @property
    def path(self) -> str:
        """The location as a dotted path, e.g. ``domains.0.vnas.1.id``."""
        return ".".join(str(part) for part in self.location) or "(root)"


class MapValidationError(ModelError):
    """The text parsed but does not describe a valid map; ``errors`` lists every violation."""

    def __init__(self, errors: list[ErrorDetail], *, what: str = "map") -> None:
        lines = "\n".join(f"  {error.path}: {error.message}" for error in errors)
        super().__init__(f"{what} is invalid ({len(errors)} error(s)):\n{lines}")
        self.errors = errors

    @classmethod
    def from_validation_error(cls, exc: ValidationError, *, what: str = "map") -> MapValidationError:
        """Wrap a pydantic ValidationError, keeping each location and message."""
        details = [ErrorDetail(tuple(e["loc"]), e["msg"], e["type"]) for e in exc.errors()]
        return cls(details, what=what)


# --- format detection ----------------------------------------------------------------------------


def detect_format(filename_or_text: str | os.PathLike[str]) -> MapFormat:
    """The format of a file name (by extension) or of map text (by its first character).

    A one-line string ending in .yaml/.yml/.json/.xml is taken as a file name.
    """
    if isinstance(filename_or_text, os.PathLike):
        suffix = os.path.splitext(os.fspath(filename_or_text))[1].lower()
        if suffix not in _EXTENSIONS:
            raise MapFormatError(f"cannot tell the map format of {os.fspath(filename_or_text)!r}")
        return _EXTENSIONS[suffix]
    text = filename_or_text.lstrip("\ufeff").strip()
    suffix = os.path.splitext(text)[1].lower()
    if "\n" not in text and suffix in _EXTENSIONS:
        return _EXTENSIONS[suffix]
    return _sniff(text)


def _sniff(text: str) -> MapFormat:
    text = text.lstrip("\ufeff \t\r\n")
    if text.startswith("<"):
        return "xml"
    if text.startswith(("{", "[")):
        return "json"
    return "yaml"


# --- export --------------------------------------------------------------------------------------


def dump_map(obj: MapModel, fmt: MapFormat, *, include_secrets: bool = False) -> str:
    """Export a map; secrets are masked unless include_secrets is true."""
    data = obj.model_dump(mode="json", exclude_none=True, context={"include_secrets": include_secrets})
    if fmt == "json":
        return json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    if fmt == "yaml":
        return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, default_flow_style=False)
    if fmt == "xml":
        return _to_xml(type(obj), data)
    raise MapFormatError(f"unknown map format {fmt!r}")


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        # Indent list items under their key, as people write YAML by hand.
        super().increase_indent(flow, False)


# --- import --------------------------------------------------------------------------------------


def decode_map_text(data: bytes) -> str:
    """A map file's bytes as text: UTF-8, a byte-order mark dropped; anything else is a MapFormatError."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise MapFormatError(f"the map is not UTF-8 text (byte {exc.start}: {exc.reason})") from None


def load_network_map(text: str, fmt: MapFormat | None = None) -> NetworkMap:
    """Import a network map; the format is detected when not given."""
    return load_map(text, NetworkMap, fmt)


def load_application_map(text: str, fmt: MapFormat | None = None) -> ApplicationMap:
    """Import an application map; the format is detected when not given."""
    return load_map(text, ApplicationMap, fmt)


def load_map(text: str, model: type[M], fmt: MapFormat | None = None) -> M:
    """Import a map of the given model type."""
    if not text.strip():
        raise MapFormatError("the map text is empty")
    fmt = fmt or _sniff(text)
    what = ROOT_ELEMENTS[model]
    if fmt == "json":
        data = _parse_json(text)
    elif fmt == "yaml":
        data = _parse_yaml(text)
    elif fmt == "xml":
        data = _parse_xml(text, model)
    else:
        raise MapFormatError(f"unknown map format {fmt!r}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise MapValidationError.from_validation_error(exc, what=what) from exc


def _parse_json(text: str) -> Any:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, value in pairs:
            if key in result:
                raise MapFormatError(f"JSON object has duplicate key {key!r}")
            result[key] = value
        return result

    try:
        return json.loads(text.lstrip("\ufeff"), object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as exc:
        raise MapFormatError(f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except RecursionError:
        raise MapFormatError("invalid JSON: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer past Python's digit limit
        raise MapFormatError(f"invalid JSON: {exc}") from None


#: Deepest nesting a YAML map may have (the models need fewer than ten levels).
MAX_DEPTH = 64


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses aliases (exponential expansion) and duplicate keys (silent loss)."""

    depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise yaml.composer.ComposerError(None, None, "aliases are not allowed in maps", event.start_mark)
        # Maps nest a few levels; deep flow nesting makes PyYAML's scanner quadratic (seconds for 2,000 '[').
        if self.depth >= MAX_DEPTH:
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels", event.start_mark)
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[tuple[str, str]] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                key = (key_node.tag, key_node.value)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key_node.value!r}", key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep)


# YAML 1.1 reads 52:54:00:00:01:0a as a base-60 integer and "no"/"off" as false; maps are hand-written,
# so only plain forms of booleans and numbers are resolved and everything else stays a string. These forms
# are a subset of YAML 1.1's, so the SafeDumper still quotes every string that either reading would change.
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag.rsplit(":", 1)[-1] not in ("bool", "int", "float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?(?:0|[1-9][0-9]*)|0x[0-9a-fA-F]+)$"), list("-+0123456789")
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+\.[0-9]*)(?:[eE][-+][0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)


def _parse_yaml(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # _Loader is a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise MapFormatError(f"invalid YAML{where}: {problem}") from None
    except RecursionError:
        raise MapFormatError("invalid YAML: nested too deeply") from None
    except ValueError as exc:  # a tagged scalar its constructor refuses (!!int x, !!timestamp 2001-13-01, huge ints)
        raise MapFormatError(f"invalid YAML value: {exc}") from None


# --- XML -----------------------------------------------------------------------------------------

Shape = Literal["model", "list", "dict", "scalar"]
# XML 1.0 cannot carry these characters at all, not even as character references.
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
_DTD = re.compile(r"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)


def _tag(field_name: str) -> str:
    return field_name.replace("_", "-")


def _kebab(class_name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "-", class_name).lower()


def _shape(annotation: Any) -> tuple[Shape, Any]:
    """Classify a field type, returning the item/value type for containers and the class for models."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _shape(get_args(annotation)[0])
    if origin is Union or origin is types.UnionType:
        members = [arg for arg in get_args(annotation) if arg is not type(None)]
        shapes = [_shape(member) for member in members]
        if len(shapes) == 1:
            return shapes[0]
        if all(shape == "scalar" for shape, _ in shapes):
            return "scalar", annotation
        raise TypeError(f"cannot map union {annotation} to XML")
    if origin in (list, set, frozenset):
        return "list", get_args(annotation)[0]
    if origin is dict:
        return "dict", get_args(annotation)[1]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "model", annotation
    return "scalar", annotation


def _item_tag(item_annotation: Any) -> str:
    shape, target = _shape(item_annotation)
    return _kebab(target.__name__) if shape == "model" else "item"


def _text(value: Any) -> str:
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str | int | float):
        text = str(value)
    else:
        raise TypeError(f"cannot write {type(value).__name__} as XML text")
    if _XML_INVALID.search(text):
        raise MapFormatError(f"value {text!r} contains characters that XML cannot represent")
    return text


def _to_xml(model: type[BaseModel], data: dict[str, Any]) -> str:
    root = ET.Element(ROOT_ELEMENTS[model])
    _fill_model(root, model, data)
    ET.indent(root, space="  ")
    body = ET.tostring(root, encoding="unicode")
    # ElementTree leaves CR raw in text, where a parser would turn it into LF.
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + body.replace("\r", "&#13;") + "\n"


def _fill_model(element: ET.Element, model: type[BaseModel], data: dict[str, Any]) -> None:
    for name, field in model.model_fields.items():
        if name in data:
            _fill_value(ET.SubElement(element, _tag(name)), field.annotation, data[name])


def _fill_value(element: ET.Element, annotation: Any, value: Any) -> None:
    shape, target = _shape(annotation)
    if shape == "model":
        _fill_model(element, target, value)
    elif shape == "list":
        for item in value:
            _fill_value(ET.SubElement(element, _item_tag(target)), target, item)
    elif shape == "dict":
        for key, item in value.items():
            ET.SubElement(element, "entry", key=_text(key)).text = _text(item)
    else:
        element.text = _text(value)


def _parse_xml(text: str, model: type[BaseModel]) -> Any:
    if _DTD.search(text):
        raise MapFormatError("XML maps must not contain a DOCTYPE or entity declarations")
    try:
        root = ET.fromstring(text.lstrip("\ufeff"))
    except ET.ParseError as exc:
        line, column = exc.position
        raise MapFormatError(f"invalid XML at line {line} column {column + 1}: {exc.msg}") from None
    expected = ROOT_ELEMENTS[model]
    if root.tag != expected:
        raise MapValidationError(
            [ErrorDetail((), f"root element is <{root.tag}>, expected <{expected}>", "root_element")],
            what=expected,
        )
    reader = _XmlReader()
    data = reader.model(root, model, ())
    if reader.errors:
        raise MapValidationError(reader.errors, what=expected)
    return data


class _XmlReader:
    """Turns elements into plain data shaped like the model, collecting structural errors."""

    def __init__(self) -> None:
        self.errors: list[ErrorDetail] = []

    def error(self, location: tuple[str | int, ...], message: str) -> None:
        self.errors.append(ErrorDetail(location, message, "xml_structure"))

    def only_whitespace(self, element: ET.Element, location: tuple[str | int, ...]) -> None:
        if element.attrib:
            self.error(location, f"unexpected attributes {sorted(element.attrib)}")
        if element.text and element.text.strip():
            self.error(location, f"unexpected text {element.text.strip()!r}")
        for child in element:
            if child.tail and child.tail.strip():
                self.error(location, f"unexpected text {child.tail.strip()!r}")

    def model(self, element: ET.Element, model: type[BaseModel], location: tuple[str | int, ...]) -> Any:
        self.only_whitespace(element, location)
        fields = {_tag(name): (name, field.annotation) for name, field in model.model_fields.items()}
        result: dict[str, Any] = {}
        for child in element:
            name, annotation = fields.get(child.tag, (child.tag.replace("-", "_"), None))
            if name in result:
                self.error((*location, name), f"<{child.tag}> appears more than once")
            elif annotation is None:
                # Unknown element: let the model report it like an unknown YAML/JSON key.
                result[name] = child.text or ""
            else:
                result[name] = self.value(child, annotation, (*location, name))
        return result

    def value(self, element: ET.Element, annotation: Any, location: tuple[str | int, ...]) -> Any:
        shape, target = _shape(annotation)
        if shape == "model":
            return self.model(element, target, location)
        if shape == "list":
            self.only_whitespace(element, location)
            expected = _item_tag(target)
            items: list[Any] = []
            for index, child in enumerate(element):
                if child.tag != expected:
                    self.error((*location, index), f"expected <{expected}>, found <{child.tag}>")
                items.append(self.value(child, target, (*location, index)))
            return items
        if shape == "dict":
            return self.entries(element, location)
        if len(element) or element.attrib:
            self.error(location, "expected a plain value, found child elements or attributes")
        return element.text or ""

    def entries(self, element: ET.Element, location: tuple[str | int, ...]) -> dict[str, str]:
        self.only_whitespace(element, location)
        result: dict[str, str] = {}
        for child in element:
            key = child.get("key")
            if child.tag != "entry" or key is None or set(child.attrib) != {"key"} or len(child):
                self.error(location, f'expected <entry key="...">value</entry>, found <{child.tag}>')
            elif key in result:
                self.error((*location, key), "duplicate entry key")
            else:
                result[key] = child.text or ""
        return result
