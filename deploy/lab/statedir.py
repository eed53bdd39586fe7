"""The lab's state directory: a marker that says which lab owns it, its re-plugs, and server roots.

``<state>/lab.json`` holds ``{"prefix", "name", "overrides"}``. A directory
that exists, is not empty and has no marker (or another lab's) is never
used nor removed: a typo in ``state_dir`` cannot wipe someone's files.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from pathlib import Path

from deploy.lab.errors import LabStateError
from deploy.lab.topology import Overrides

MARKER = "lab.json"


def default_state_dir(prefix: str) -> Path:
    """``<tmp>/skyferry-lab/<prefix>``."""
    return Path(tempfile.gettempdir()) / "skyferry-lab" / prefix


class StateDir:
    """The state directory of one lab."""

    def __init__(self, path: Path, prefix: str) -> None:
        self.path = path
        self.prefix = prefix

    @property
    def marker(self) -> Path:
        return self.path / MARKER

    def _read(self) -> dict[str, object] | None:
        try:
            data = json.loads(self.marker.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise LabStateError(
                f"unreadable lab marker {self.marker}: {exc}", details={"path": str(self.path)}
            ) from exc
        if not isinstance(data, dict):
            raise LabStateError(f"bad lab marker {self.marker}", details={"path": str(self.path)})
        return data

    def owned(self) -> bool:
        """Whether the directory carries this lab's marker."""
        data = self._read() if self.path.is_dir() else None
        return data is not None and data.get("prefix") == self.prefix

    def claim(self, name: str, overrides: Overrides) -> None:
        """Create (or re-use) the directory and write the marker; refuse a directory owned by someone else."""
        if self.path.exists():
            data = self._read()
            if data is None and any(self.path.iterdir()):
                raise LabStateError(
                    f"{self.path} is not empty and is not a lab state directory", details={"path": str(self.path)}
                )
            if data is not None and data.get("prefix") != self.prefix:
                raise LabStateError(
                    f"{self.path} belongs to lab {data.get('prefix')!r}, not {self.prefix!r}",
                    details={"path": str(self.path), "owner": data.get("prefix")},
                )
        self.path.mkdir(parents=True, exist_ok=True)
        self.save(name, overrides)

    def save(self, name: str, overrides: Overrides) -> None:
        rows = [[h, nic, *(t if t is not None else (None, None))] for (h, nic), t in sorted(overrides.items())]
        body = {"prefix": self.prefix, "name": name, "overrides": rows}
        tmp = self.marker.with_suffix(".tmp")
        tmp.write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")
        tmp.replace(self.marker)

    def overrides(self) -> dict[tuple[str, str], tuple[str, str] | None]:
        """Re-plugs recorded by this lab (empty when the directory is not ours)."""
        if not self.owned():
            return {}
        data = self._read() or {}
        out: dict[tuple[str, str], tuple[str, str] | None] = {}
        rows = data.get("overrides", [])
        for row in rows if isinstance(rows, list) else []:
            host, nic, site, lan = row
            out[(str(host), str(nic))] = (str(site), str(lan)) if site is not None else None
        return out

    def server_root(self, server: str) -> Path:
        return self.path / server / "root"

    def remove(self) -> bool:
        """Remove the directory if it is ours (or empty); returns whether it was removed."""
        if not self.path.exists():
            return False
        if self.owned():
            shutil.rmtree(self.path)
        elif not any(self.path.iterdir()):
            self.path.rmdir()
        else:
            return False
        parent = self.path.parent
        if parent.name == "skyferry-lab":
            # The shared parent goes once the last lab under it is gone (another lab may race us).
            with contextlib.suppress(OSError):
                parent.rmdir()
        return True
