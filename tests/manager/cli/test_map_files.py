"""The CLI's map and record file readers: a file that is not UTF-8 is a CliError, not a traceback (issue 9)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bus.errors import ErrorCode
from manager.cli.app import read_application_map
from manager.cli.crud import read_data
from manager.cli.errors import CliError
from manager.cli.records import read_network_map


@pytest.mark.parametrize("reader", [read_network_map, read_application_map, read_data])
@pytest.mark.parametrize("name", ["map.yaml", "map.json", "map.xml", "map"])
def test_non_utf8_file_is_a_cli_error(tmp_path: Path, reader: Callable[[Path], Any], name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"overlays: [\xff\xfe]\n")
    with pytest.raises(CliError, match="not UTF-8") as exc:
        reader(path)
    assert exc.value.code is ErrorCode.VALIDATION


def test_utf8_with_bom_reads(tmp_path: Path) -> None:
    path = tmp_path / "map.yaml"
    path.write_bytes("\ufeffoverlays: [{id: o1, name: O1}]\n".encode())
    assert [o.id for o in read_network_map(path).overlays] == ["o1"]
