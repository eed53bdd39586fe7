"""Run a shipped systemd unit without systemd: parse ExecStart, Environment and EnvironmentFile.

Follows systemd's rules where the units use them: ``\\`` continues a line; ``Environment=`` holds
shell-quoted ``KEY=VALUE`` words; ``EnvironmentFile=`` (``-`` prefix: optional) is read in order and
overrides ``Environment=``; in ExecStart ``${VAR}`` is replaced inside its word, a word that is exactly
``$VAR`` becomes the variable's whitespace-split words (none if empty); ``%H`` is the host name and
``%%`` a literal ``%``. Paths are rewritten like ``deploy/install.sh`` does (``replace``).
"""

from __future__ import annotations

import re
import shlex
import socket
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
UNITS_DIR = REPO / "deploy" / "systemd"

_BRACED = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_BARE = re.compile(r"^\$([A-Za-z_][A-Za-z0-9_]*)$")


@dataclass
class Unit:
    """The parts of a ``[Service]`` section a test needs to start the daemon."""

    name: str
    exec_start: list[str]
    environment: dict[str, str] = field(default_factory=dict)
    environment_files: list[tuple[Path, bool]] = field(default_factory=list)
    """(path, optional) in order."""

    def env(self) -> dict[str, str]:
        """The variables systemd would set: Environment=, then each EnvironmentFile= over them."""
        env = dict(self.environment)
        for path, optional in self.environment_files:
            if not path.exists():
                if optional:
                    continue
                raise FileNotFoundError(f"{self.name}: EnvironmentFile {path} does not exist")
            env.update(read_env_file(path))
        return env

    def argv(self, env: dict[str, str] | None = None) -> list[str]:
        """ExecStart with the variables expanded."""
        env = self.env() if env is None else env
        out: list[str] = []
        for word in self.exec_start:
            bare = _BARE.match(word)
            if bare:
                out += env.get(bare.group(1), "").split()
                continue
            out.append(_BRACED.sub(lambda m: env.get(m.group(1), ""), word))
        return out


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines; ``#`` / ``;`` comments; values may be quoted."""
    env: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        key, _, value = line.partition("=")
        words = shlex.split(value) if value.strip() else []
        env[key.strip()] = " ".join(words)
    return env


def _specifiers(text: str) -> str:
    return re.sub(r"%[%H]", lambda m: "%" if m.group(0) == "%%" else socket.gethostname(), text)


def load_unit(name: str, replace: dict[str, str] | None = None, *, units_dir: Path = UNITS_DIR) -> Unit:
    """Parse ``deploy/systemd/<name>`` with the paths in ``replace`` rewritten (longest first)."""
    text = (units_dir / name).read_text()
    for old in sorted(replace or {}, key=len, reverse=True):
        text = text.replace(old, (replace or {})[old])
    text = text.replace("\\\n", " ")
    section = ""
    unit = Unit(name=name, exec_start=[])
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        if section != "Service":
            continue
        key, _, value = line.partition("=")
        value = _specifiers(value.strip())
        if key == "ExecStart":
            unit.exec_start = shlex.split(value.lstrip("-@+!:"))
        elif key == "Environment":
            for word in shlex.split(value):
                k, _, v = word.partition("=")
                unit.environment[k] = v
        elif key == "EnvironmentFile":
            optional = value.startswith("-")
            unit.environment_files.append((Path(value.lstrip("-")), optional))
    if not unit.exec_start:
        raise ValueError(f"{name} has no ExecStart")
    return unit
