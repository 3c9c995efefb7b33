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


def _cmd_demo(args) -> int:
    from .demo import main as demo_main

    return demo_main(args)


def _cmd_bench(args) -> int:
    from .bench_runner import main as bench_main

    return bench_main(args)


def _add_workflow_commands(sub) -> None:
    from .bench_runner import add_arguments as bench_arguments
    from .demo import add_arguments as demo_arguments

    p = sub.add_parser(
        "demo",
        help="teacher -> distilled -> pruned -> int8 student on sklearn digits; table, JSON, PNG",
        description="Distill, prune and quantize a student on scikit-learn's digits and report "
        "parameters, state_dict bytes, accuracy, agreement with the teacher and latency per model.",
    )
    demo_arguments(p)
    p.set_defaults(func=_cmd_demo)
    p = sub.add_parser(
        "bench",
        help="run the kernel benchmarks available on this device; table and JSON",
        description="Run every bench/bench_<family>.py that defines "
        "run(device, quick) -> list[dict].",
    )
    bench_arguments(p)
    p.set_defaults(func=_cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fastkd",
        description="fastkd: fused kernels for knowledge distillation and model compression.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("info", help="versions, the CUDA extension, and backends per op")
    p.add_argument("--json", action="store_true", help="print the info dict as JSON")
    p.set_defaults(func=_cmd_info)
    _add_workflow_commands(sub)
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
