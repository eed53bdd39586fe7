"""Rendering: rich tables for people, JSON or YAML on stdout for scripts.

Data goes to stdout; notes, progress and errors go to stderr, so
``skyferry -o json ... | jq`` always sees one clean document.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import yaml
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table
from rich.text import Text

from bus.errors import SkyferryError


class OutputFormat(StrEnum):
    """How results are printed."""

    TABLE = "table"
    JSON = "json"
    YAML = "yaml"


def jsonable(value: Any) -> Any:
    """Plain JSON-able data from models, lists of models and plain values."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, dt.datetime):
        return value.isoformat()
    return value


def cell(value: Any) -> str:
    """One value as compact table text."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple | set):
        return ", ".join(cell(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"), default=str)
    return str(value)


def pick(data: Any, path: str) -> Any:
    """Value at a dotted path of plain data; ``#field`` counts a list."""
    if path.startswith("#"):
        found = pick(data, path[1:])
        return len(found) if isinstance(found, list) else 0
    for part in path.split("."):
        if isinstance(data, dict):
            data = data.get(part)
        else:
            return None
    return data


@dataclass(frozen=True)
class Column:
    """A table column: its header and the dotted path of the value."""

    header: str
    path: str


class Output:
    """Prints results in the chosen format and errors on stderr."""

    def __init__(self, fmt: OutputFormat = OutputFormat.TABLE) -> None:
        self.fmt = fmt
        self.out = Console(highlight=False)
        self.err = Console(stderr=True, highlight=False)

    @property
    def human(self) -> bool:
        return self.fmt is OutputFormat.TABLE

    # --- documents ---------------------------------------------------------------------------------

    def document(self, value: Any) -> None:
        """Print one JSON or YAML document of ``value`` (table mode: a key/value table)."""
        data = jsonable(value)
        if self.fmt is OutputFormat.JSON:
            sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        elif self.fmt is OutputFormat.YAML:
            sys.stdout.write(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
        elif isinstance(data, dict):
            self.mapping(data)
        else:
            self.out.print(cell(data))
        sys.stdout.flush()

    def line(self, value: Any) -> None:
        """One streamed item: a JSON line, or a YAML document with its ``---``."""
        data = jsonable(value)
        if self.fmt is OutputFormat.YAML:
            sys.stdout.write("---\n" + yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
        else:
            sys.stdout.write(json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n")
        sys.stdout.flush()

    # --- tables ------------------------------------------------------------------------------------

    def table(self, title: str, columns: Sequence[Column], rows: Iterable[Any], *, empty: str = "none") -> None:
        """A rich table of ``rows`` (plain dicts or models)."""
        table = Table(title=title, title_justify="left", title_style="bold")
        for col in columns:
            table.add_column(col.header, overflow="fold")
        count = 0
        for row in rows:
            data = jsonable(row)
            table.add_row(*(cell(pick(data, c.path)) for c in columns))
            count += 1
        if count == 0:
            self.out.print(Text(f"{title}: {empty}", style="dim"))
            return
        self.out.print(table)

    def mapping(self, data: Mapping[str, Any], title: str | None = None) -> None:
        """A two-column key/value table; nested values are shown compactly."""
        table = Table(title=title, title_justify="left", title_style="bold", show_header=False)
        table.add_column("field", style="bold")
        table.add_column("value", overflow="fold")
        for key, value in data.items():
            if value is not None:
                table.add_row(key, cell(value))
        self.out.print(table)

    # --- messages ----------------------------------------------------------------------------------

    def success(self, message: str) -> None:
        """A confirmation for people (stdout, table mode only)."""
        if self.human:
            self.out.print(Text("✓ ", style="green") + Text(message))

    def refused(self, message: str) -> None:
        """An expected refusal, shown to people (stdout, table mode only)."""
        if self.human:
            self.out.print(Text("✗ ", style="yellow") + Text(message))

    def note(self, message: str, style: str = "dim") -> None:
        """A remark that is not data (stderr, every mode)."""
        self.err.print(Text(message, style=style), soft_wrap=True)

    def heading(self, title: str) -> None:
        if self.human:
            self.out.rule(Text(title, style="bold cyan"))

    def error(self, err: SkyferryError) -> None:
        """One red line ``error[<code>]: message``; validation errors listed below; details in JSON mode."""
        self.err.print(Text(f"error[{err.code}]: {err.message}", style="bold red"), soft_wrap=True)
        if self.fmt is not OutputFormat.TABLE:
            body = {"error": {"code": str(err.code), "message": err.message, "details": jsonable(err.details)}}
            self.err.print(Text(json.dumps(body, ensure_ascii=False, default=str)), soft_wrap=True)
            return
        errors = err.details.get("errors")
        if isinstance(errors, list) and len(errors) > 1:
            for item in errors[:20]:
                if isinstance(item, dict):
                    self.err.print(Text(f"  {item.get('loc') or '(root)'}: {item.get('msg')}"), soft_wrap=True)
