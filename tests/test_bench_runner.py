"""``python -m fastkd bench``: discovery of bench/bench_<family>.py modules and their reports."""

from __future__ import annotations

import json
import textwrap

import pytest

from fastkd.__main__ import main as cli_main
from fastkd.bench_runner import discover, format_rows, run_benchmarks

MATMUL = """
import time

import torch

from _bench_helpers import median_ms


def run(device, quick):
    sizes = [16, 33] if quick else [256, 1024]
    rows = []
    for n in sizes:
        a = torch.randn(n, n, device=device)
        ms = median_ms(lambda: a @ a)
        rows.append({"n": n, "device": device, "quick": quick, "ms": ms,
                     "gflops": 2 * n**3 / (ms * 1e-3) / 1e9})
    return rows
"""

HELPERS = """
import statistics
import time


def median_ms(fn, repeats=5):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3
"""


@pytest.fixture()
def bench_dir(tmp_path):
    d = tmp_path / "bench"
    d.mkdir()
    (d / "bench_matmul.py").write_text(MATMUL)
    (d / "_bench_helpers.py").write_text(HELPERS)
    (d / "bench_gpu_only.py").write_text(
        "DEVICES = ('cuda',)\ndef run(device, quick):\n    raise AssertionError('must not run')\n"
    )
    (d / "bench_needs_lib.py").write_text(
        textwrap.dedent("""
        class BenchSkipped(Exception):
            pass

        def run(device, quick):
            raise BenchSkipped("somelib is not installed")
    """)
    )
    (d / "bench_broken.py").write_text("def run(device, quick):\n    return {'not': 'a list'}\n")
    (d / "bench_norun.py").write_text("X = 1\n")
    (d / "test_pytest_benchmark.py").write_text("raise RuntimeError('must not be imported')\n")
    return d


def test_discovery_follows_the_naming_convention(bench_dir):
    assert list(discover(bench_dir)) == ["broken", "gpu_only", "matmul", "needs_lib", "norun"]
    assert discover(bench_dir / "missing") == {}


def test_runner_reports_rows_skips_and_errors(bench_dir):
    report = run_benchmarks("cpu", quick=True, bench_dir=bench_dir, log=lambda *a: None)
    fams = report["families"]
    rows = fams["matmul"]["rows"]
    assert [r["n"] for r in rows] == [16, 33]  # quick sizes on the CPU
    assert all(r["device"] == "cpu" and r["quick"] is True and r["ms"] > 0 for r in rows)
    assert "cuda" in fams["gpu_only"]["skipped"]
    assert fams["needs_lib"]["skipped"] == "somelib is not installed"
    assert "list of dicts" in fams["broken"]["error"]
    assert "run(device, quick)" in fams["norun"]["skipped"]
    assert report["device"] == "cpu" and report["quick"] is True and report["torch"]


def test_cli_writes_json_and_fails_on_a_broken_benchmark(bench_dir, tmp_path, capsys):
    out = tmp_path / "res.json"
    rc = cli_main(["bench", "--dir", str(bench_dir), "--device", "cpu", "--out", str(out)])
    assert rc == 1  # bench_broken returned the wrong type
    captured = capsys.readouterr()
    assert "broken" in captured.err
    assert "== matmul (2 rows" in captured.out and "gflops" in captured.out
    data = json.loads(out.read_text())
    assert data["quick"] is True  # the CPU default
    assert len(data["families"]["matmul"]["rows"]) == 2

    rc = cli_main(
        ["bench", "--dir", str(bench_dir), "--device", "cpu", "--only", "matmul", "--out", str(out)]
    )
    assert rc == 0
    assert list(json.loads(out.read_text())["families"]) == ["matmul"]

    assert cli_main(["bench", "--dir", str(bench_dir), "--only", "nope", "--out", str(out)]) == 2
    assert "no benchmark named nope" in capsys.readouterr().err


def test_cli_with_no_benchmarks(tmp_path, capsys):
    rc = cli_main(
        ["bench", "--dir", str(tmp_path), "--device", "cpu", "--out", str(tmp_path / "r.json")]
    )
    assert rc == 1
    assert "no bench/bench_<family>.py files" in capsys.readouterr().out


def test_format_rows_uses_every_key_as_a_column():
    text = format_rows([{"a": 1, "b": 0.123456}, {"a": 22, "c": "x"}])
    header, rule, r1, r2 = text.splitlines()
    assert header.split() == ["a", "b", "c"]
    assert r1.split() == ["1", "0.1235"] and r2.split() == ["22", "x"]


def test_gpu_check_script_names_only_benchmarks_that_exist():
    # A lease is 15 minutes: a benchmark name or flag the script gets wrong would cost a whole
    # GPU session, and nothing else runs this script off a GPU.
    import re
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = root / "bench" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    names = re.search(r"BENCHES=\$\{GPU_CHECK_BENCHES:-([\w ]+)\}", text).group(1).split()
    assert {"kd_loss", "int8_linear", "kd_topk", "int8_experts"} <= set(names)
    assert "for name in $BENCHES; do" in text
    for name in names:
        bench = root / "bench" / f"bench_{name}.py"
        assert bench.exists(), bench
        source = bench.read_text()
        # the script calls each with --quick and --out
        assert '"--quick"' in source and '"--out"' in source, bench
    for other in re.findall(r"bench/(\w+\.py)", text):
        assert (root / "bench" / other).exists(), other
