"""Map import from any user: YAML, JSON and XML network and application maps.

Mode byte: bit 0 the model (network / application map), bits 1-2 the format
(sniffed, yaml, json, xml). The rest is the file's bytes. Garbage may only
raise a :class:`~bus.errors.SkyferryError` (``MapFormatError`` /
``MapValidationError``); a map that imports must export in every format and
import back equal.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import get_args

from bus.errors import SkyferryError
from bus.mapio import MapFormat, decode_map_text, dump_map, load_application_map, load_network_map

from ._input import Reader

MAX_LEN = 32768
LOADERS = (load_network_map, load_application_map)
FORMATS: tuple[MapFormat | None, ...] = (None, *get_args(MapFormat))
SAMPLES = Path(__file__).resolve().parents[3] / "deploy" / "samples"


def one_input(data: bytes) -> None:
    r = Reader(data)
    mode = r.byte()
    load = LOADERS[mode & 1]
    fmt = FORMATS[(mode >> 1) & 3]
    try:
        loaded = load(decode_map_text(r.rest()), fmt)
    except SkyferryError:
        return
    for out in get_args(MapFormat):
        try:
            text = dump_map(loaded, out, include_secrets=True)
        except SkyferryError:  # e.g. a string XML cannot carry
            continue
        again = load(text, out)
        assert again == loaded, (out, text)


def seeds() -> Iterator[bytes]:
    """The sample maps of deploy/samples in every format."""
    for mode_model, name in enumerate(("network-map.yaml", "app-3tier.yaml")):
        m = LOADERS[mode_model]((SAMPLES / name).read_text(), "yaml")
        for i, fmt in enumerate(FORMATS):
            text = dump_map(m, fmt or "yaml", include_secrets=True)
            yield bytes([mode_model | i << 1]) + text.encode()
