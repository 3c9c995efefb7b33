"""Every benchmark in bench/ runs its quick sweep on the CPU (about 5 s in all): a benchmark that
an API change broke would otherwise be found only on a GPU lease, whose minutes are few (the
figures themselves are not checked here; bench/gpu_check.sh measures them on a GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_every_benchmark_runs_its_quick_sweep_on_the_cpu(tmp_path):
    families = sorted(p.stem[len("bench_"):] for p in BENCH.glob("bench_*.py"))
    assert len(families) >= 7
    out = tmp_path / "bench.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, "-m", "fastkd", "bench", "--device", "cpu", "--quick", "--dir",
         str(BENCH), "--out", str(out)],
        capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())["families"]
    assert sorted(report) == families
    for family, entry in report.items():
        assert "error" not in entry, f"{family}: {entry.get('error')}\n{entry.get('traceback')}"
        assert "skipped" not in entry, f"{family}: {entry['skipped']}"
        assert entry["rows"], family
        for row in entry["rows"]:  # every timed point is a positive, finite time
            times = [v for k, v in row.items() if k == "ms" and v is not None]
            assert all(0 < t < float("inf") for t in times), (family, row)
