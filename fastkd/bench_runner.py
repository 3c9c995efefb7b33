"""``python -m fastkd bench``: run the kernel benchmarks that this device can run.

The convention (one file per op family, nothing to register):

* A benchmark is a file ``bench/bench_<family>.py`` that defines
  ``run(device: str, quick: bool) -> list[dict]``. ``device`` is a torch device string
  ("cpu", "cuda", "cuda:1"); ``quick=True`` asks for a small sweep that finishes in seconds (the
  default on the CPU, where only the reference path runs); ``quick=False`` for the full sweep of the
  issue (the default on a GPU). Each dict is one measured row with flat JSON-able values, e.g.
  ``{"shape": "4096x32000", "dtype": "bf16", "impl": "triton", "ms": 0.81, "baseline": "torch",
  "baseline_ms": 2.4, "speedup": 2.96}``; the runner prints every key as a column.
* Optionally ``DEVICES = ("cuda",)``: the device types the file supports; on others it is skipped
  and the reason shown. A file may also raise ``BenchSkipped("why")`` (or any exception whose class
  is named ``BenchSkipped``, so it need not import fastkd to do so) from ``run``.
* Other files in ``bench/`` (pytest-benchmark tests, helpers, results/) are ignored; a helper module
  next to the benchmarks can be imported by them (the folder is on ``sys.path`` while they run).

The folder is ``--dir``, else ``$FASTKD_BENCH_DIR``, else ``bench/`` of the source checkout that
fastkd is imported from, else ``./bench``. Results: a table per family on stdout and one JSON file
(``--out``) with the device, versions, and each family's rows, or its error or skip reason.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import importlib.util
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Optional

import torch

ENV_DIR = "FASTKD_BENCH_DIR"
PREFIX = "bench_"


class BenchSkipped(Exception):
    """Raised by a benchmark's ``run`` when it cannot run here (the message says why)."""


def default_bench_dir() -> Path:
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR])
    checkout = Path(__file__).resolve().parent.parent / "bench"
    if checkout.is_dir():
        return checkout
    return Path.cwd() / "bench"


def discover(bench_dir: Path) -> dict[str, Path]:
    """{family: path} for every bench_<family>.py in bench_dir, sorted by family."""
    if not bench_dir.is_dir():
        return {}
    return {
        p.stem[len(PREFIX) :]: p
        for p in sorted(bench_dir.glob(f"{PREFIX}*.py"))
        if p.is_file() and len(p.stem) > len(PREFIX)
    }


def _load(family: str, path: Path):
    name = f"fastkd_bench_{family}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def run_benchmarks(
    device: str,
    quick: bool,
    bench_dir: Optional[Path] = None,
    only: Optional[list[str]] = None,
    log=print,
) -> dict:
    """Run the benchmarks and return the report dict (see the module docstring)."""
    import fastkd

    bench_dir = Path(bench_dir) if bench_dir is not None else default_bench_dir()
    dev = torch.device(device)
    found = discover(bench_dir)
    if only:
        unknown = sorted(set(only) - set(found))
        if unknown:
            raise ValueError(
                f"no benchmark named {', '.join(unknown)} in {bench_dir} "
                f"(found: {', '.join(found) or 'none'})"
            )
        found = {k: v for k, v in found.items() if k in only}
    families: dict[str, dict] = {}
    sys.path.insert(0, str(bench_dir))
    try:
        for family, path in found.items():
            entry: dict = {"file": str(path)}
            families[family] = entry
            t0 = time.perf_counter()
            try:
                module = _load(family, path)
                run = getattr(module, "run", None)
                if not callable(run):
                    entry["skipped"] = "defines no run(device, quick)"
                    continue
                devices = getattr(module, "DEVICES", None)
                if devices is not None and dev.type not in tuple(devices):
                    entry["skipped"] = f"supports {', '.join(devices)}, not {dev.type}"
                    continue
                log(f"running {family} on {dev} ({'quick' if quick else 'full'}) ...")
                # the benchmarks compare device == "cuda": "cuda:1" made them take CPU shapes
                # and CPU timers; the index selects the current device instead
                if dev.type == "cuda" and dev.index is not None:
                    torch.cuda.set_device(dev)
                rows = run(dev.type, quick)
                if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                    raise TypeError(f"run() must return a list of dicts, got {type(rows).__name__}")
                entry["rows"] = rows
            except Exception as e:  # one broken benchmark must not hide the others
                if type(e).__name__ == "BenchSkipped":
                    entry["skipped"] = str(e) or "skipped"
                else:
                    entry["error"] = f"{type(e).__name__}: {e}"
                    entry["traceback"] = traceback.format_exc()
            finally:
                entry["seconds"] = time.perf_counter() - t0
    finally:
        sys.path.remove(str(bench_dir))
    return {
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "quick": quick,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "fastkd": fastkd.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "bench_dir": str(bench_dir),
        "families": families,
    }


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def format_rows(rows: list[dict]) -> str:
    columns: list[str] = []
    for r in rows:
        for k in r:
            if k not in columns:
                columns.append(k)
    cells = [[_cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def format_report(report: dict) -> str:
    out = [
        f"device {report['device']} ({report['device_name']}), torch {report['torch']}, "
        f"triton {report['triton']}, {'quick' if report['quick'] else 'full'} sweep"
    ]
    if not report["families"]:
        out.append(f"no bench/{PREFIX}<family>.py files found in {report['bench_dir']}")
    for family, entry in report["families"].items():
        out.append("")
        if "rows" in entry:
            out.append(f"== {family} ({len(entry['rows'])} rows, {entry['seconds']:.1f} s)")
            if entry["rows"]:
                out.append(format_rows(entry["rows"]))
        elif "skipped" in entry:
            out.append(f"== {family}: skipped: {entry['skipped']}")
        else:
            out.append(f"== {family}: ERROR: {entry['error']}")
    return "\n".join(out)


def add_arguments(p) -> None:
    p.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)"
    )
    sweep = p.add_mutually_exclusive_group()
    sweep.add_argument(
        "--quick",
        dest="quick",
        action="store_true",
        default=None,
        help="small shapes (the default on the CPU)",
    )
    sweep.add_argument(
        "--full", dest="quick", action="store_false", help="the full sweep (the default on a GPU)"
    )
    p.add_argument(
        "--only",
        action="append",
        metavar="FAMILY",
        help="run only this family (repeatable), e.g. --only kd_loss",
    )
    p.add_argument(
        "--dir",
        default=None,
        help=f"folder of bench_<family>.py files (default: ${ENV_DIR} or the checkout's bench/)",
    )
    p.add_argument(
        "--out", default=None, help="JSON output file (default: ./fastkd-bench/bench_<device>.json)"
    )


def main(args) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("fastkd bench: error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    quick = args.quick if args.quick is not None else dev.type != "cuda"
    try:
        report = run_benchmarks(device, quick, Path(args.dir) if args.dir else None, args.only)
    except ValueError as e:
        print(f"fastkd bench: error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    out = Path(args.out) if args.out else Path("fastkd-bench") / f"bench_{dev.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\nwrote {out}")
    failed = [f for f, e in report["families"].items() if "error" in e]
    if failed:
        print(f"fastkd bench: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    if not report["families"]:
        return 1
    return 0
