"""Map import of hostile text (issue 9, found by the atheris harness ``mapio``): only typed errors come out."""

from __future__ import annotations

import pytest

from bus.errors import ErrorCode, SkyferryError
from bus.mapio import MapFormat, MapFormatError, decode_map_text, load_network_map
from bus.models import ModelError


@pytest.mark.parametrize(
    ("text", "fmt", "message"),
    [
        ("[" * 100_000 + "]" * 100_000, "json", "nested too deeply"),
        ("a: " + "[" * 2000 + "]" * 2000, "yaml", "nested"),
        ("".join(" " * i + "a:\n" for i in range(3000)), "yaml", "nested"),
        ("overlays: " + "1" * 5000, "yaml", "digits"),
        ('{"overlays": ' + "1" * 5000 + "}", "json", "digits"),
        ("overlays: !!timestamp 2001-13-99", "yaml", "month must be in 1..12"),
        ("overlays: !!int xyz", "yaml", "invalid literal"),
        ("overlays: !!float xyz", "yaml", "could not convert"),
    ],
)
def test_hostile_text_is_a_format_error(text: str, fmt: MapFormat, message: str) -> None:
    with pytest.raises(MapFormatError, match=message):
        load_network_map(text, fmt)


def test_map_errors_are_skyferry_errors() -> None:
    with pytest.raises(SkyferryError) as exc:
        load_network_map("")
    assert isinstance(exc.value, ModelError) and isinstance(exc.value, ValueError)
    assert exc.value.code is ErrorCode.VALIDATION
    assert str(exc.value) == "the map text is empty"  # no code prefix in CLI messages


def test_map_bytes_must_be_utf8() -> None:
    assert decode_map_text("\ufeffoverlays: []".encode()) == "overlays: []"
    with pytest.raises(MapFormatError, match="not UTF-8 text"):
        decode_map_text(b"overlays: \xff\xfe")
