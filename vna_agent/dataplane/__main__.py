"""``python -m vna_agent.dataplane``: keys, MTU report, and one tunnel endpoint by hand."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from bus.logs import configure_logging

from .endpoint import EndpointConfig, run_endpoint
from .errors import DataplaneError
from .keys import StaticKeyPair
from .mtu import report


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vna_agent.dataplane", description=__doc__)
    p.add_argument("--log-level", default="INFO")
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("genkey", help="write a new private key (0600) and print its public key")
    g.add_argument("out")
    k = sub.add_parser("pubkey", help="print the public key of a private key file")
    k.add_argument("keyfile")
    m = sub.add_parser("mtu", help="overlay MTU report for an underlay path MTU")
    m.add_argument("--mode", default="datagram", help="stream | datagram | plain-stream | plain-datagram | vxlan")
    m.add_argument("--path-mtu", type=int, default=1500)
    m.add_argument("--ipv6", action="store_true")
    m.add_argument("--no-offload", action="store_true")
    r = sub.add_parser("run", help="run one tunnel endpoint from a YAML/JSON config")
    r.add_argument("config")
    r.add_argument("--status-file", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        if args.cmd == "genkey":
            key = StaticKeyPair.generate()
            key.save(args.out)
            print(key.public.b64())
        elif args.cmd == "pubkey":
            print(StaticKeyPair.load(args.keyfile).public.b64())
        elif args.cmd == "mtu":
            rep = report(
                args.mode,
                args.path_mtu,
                ipv6=args.ipv6,
                encrypted=not args.mode.startswith("plain"),
                vnet=not args.no_offload,
            )
            print(json.dumps(rep.as_dict(), indent=2))
        elif args.cmd == "run":
            cfg = EndpointConfig.load(args.config)
            if args.status_file:
                cfg = cfg.model_copy(update={"status_file": args.status_file})
            asyncio.run(run_endpoint(cfg))
    except DataplaneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as exc:  # bad config file (pydantic errors are ValueErrors), unreadable paths
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
