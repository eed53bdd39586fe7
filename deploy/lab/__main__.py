"""``python -m deploy.lab up|down|status|plan|caps FILE [--prefix P] [--state-dir D]``.

Without ``--prefix`` the prefix is derived from the file's absolute path
(``sf`` + 4 hex digits), so ``up FILE`` and ``down FILE`` find the same lab.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bus.logs import configure_logging
from deploy.lab.builder import Lab
from deploy.lab.errors import LabError
from deploy.lab.naming import prefix_for


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m deploy.lab", description="Build or tear down a Skyferry lab.")
    p.add_argument("command", choices=["up", "down", "status", "plan", "caps"])
    p.add_argument("file", type=Path, help="lab YAML")
    p.add_argument("--prefix", help="name prefix (default: derived from the file path)")
    p.add_argument("--state-dir", type=Path, help="state directory (default <tmp>/skyferry-lab/<prefix>)")
    p.add_argument("--keep-state", action="store_true", help="down: keep the state directory")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--log-level", default="WARNING")
    return p


def _print_status(lab: Lab, as_json: bool) -> None:
    rows = lab.status()
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    for row in rows:
        mark = "up  " if row["exists"] else "--  "
        print(f"{mark}{row['host']:<14} {row['role']:<9} {row['ns']}")
        for link in row["links"]:
            print(f"      {link['nic']:<10} {link['operstate'] or 'absent':<8} {' '.join(link['addresses'])}")


def _print_plan(lab: Lab) -> None:
    topo = lab.topology
    print(f"lab {lab.spec.name} prefix {lab.prefix} lan_mode {topo.lan_mode}")
    for h in topo.hosts.values():
        print(f"  {h.ns:<24} {h.role}")
        for nic in topo.nics_of(h.host):
            att = nic.attach
            to = f"{att.sw_host}/{att.bridge}" if att else "unplugged"
            print(f"      {nic.ifname:<8} {nic.mac} {nic.address or '-'!s:<18} port {nic.port} -> {to}")
    for r in topo.routes:
        print(f"  route {r.host}: {r.dst} via {r.gateway}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging(args.log_level)
    prefix = args.prefix or prefix_for(str(args.file.resolve()))
    try:
        lab = Lab(args.file, prefix=prefix, state_dir=args.state_dir, keep_state=args.keep_state)
        if args.command == "up":
            changes = lab.up()
            print(f"lab {lab.spec.name} up: prefix {lab.prefix}, {changes} changes, state {lab.state_dir}")
        elif args.command == "down":
            removed = lab.down()
            print(f"lab {lab.spec.name} down: prefix {lab.prefix}, {removed} namespaces removed")
        elif args.command == "status":
            _print_status(lab, args.json)
        elif args.command == "plan":
            _print_plan(lab)
        else:
            print(json.dumps(lab.capabilities().as_dict(), indent=2))
    except LabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
