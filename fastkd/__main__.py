"""Command line: ``python -m fastkd <command>``."""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_info(args) -> int:
    from .info import format_info, info

    data = info()
    print(json.dumps(data, indent=2, default=str) if args.json else format_info(data))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fastkd",
        description="fastkd: fused kernels for knowledge distillation and model compression.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("info", help="versions, the CUDA extension, and backends per op")
    p.add_argument("--json", action="store_true", help="print the info dict as JSON")
    p.set_defaults(func=_cmd_info)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
