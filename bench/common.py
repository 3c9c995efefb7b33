"""Shared helpers for fastkd benchmarks: environment facts, timing, peak memory, JSON output.

Timing on CUDA uses ``triton.testing.do_bench`` (CUDA events, median); on CPU a median of
``time.perf_counter`` over repeats. Every record carries the device and versions so a figure never
travels without its conditions.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time

import torch


def environment() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    import importlib.metadata

    import fastkd

    def version(dist):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": dev,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "fastkd": fastkd.__version__,
        "cuda_extension": fastkd.info()["cuda_extension"],
        # the peers the figures are compared with, and how each was timed
        "peers": {d: version(d) for d in ("liger-kernel", "torchao", "bitsandbytes",
                                          "transformers")},
        "timing": {"do_bench_min_samples": MIN_SAMPLES, "default_rep_ms": 100},
    }


MIN_SAMPLES = 10


def _do_bench(fn, warmup_ms, rep_ms, **kw):
    """triton.testing.do_bench with at least MIN_SAMPLES timed calls: it repeats
    rep_ms / (its estimate of one call) times, so a call over rep_ms / 2 was timed once and its
    20th and 80th percentiles were that one sample. A slow call gets a longer rep instead."""
    from triton.testing import do_bench

    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    estimate_ms = (time.perf_counter() - t0) * 1e3
    rep = max(rep_ms, min(MIN_SAMPLES * estimate_ms, 5000))
    return do_bench(fn, warmup=warmup_ms, rep=rep, **kw)


def time_ms(fn, device: str, warmup_ms: int = 25, rep_ms: int = 100, cpu_reps: int = 5) -> float:
    """Median milliseconds of fn()."""
    if device == "cuda":
        return float(_do_bench(fn, warmup_ms, rep_ms, return_mode="median"))
    fn()
    samples = []
    for _ in range(cpu_reps):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def time_stats(fn, device: str, warmup_ms: int = 25, rep_ms: int = 100, cpu_reps: int = 5,
               grad_to_none=None) -> dict:
    """{"ms": median, "ms_p20": 20th percentile, "ms_p80": 80th percentile} of fn() in milliseconds.

    Same timers as time_ms (do_bench on CUDA, perf_counter repeats on CPU); ``grad_to_none`` lists
    tensors whose .grad is cleared before every call, outside the timed region.
    """
    if device == "cuda":
        med, lo, hi = _do_bench(fn, warmup_ms, rep_ms, quantiles=[0.5, 0.2, 0.8],
                                grad_to_none=grad_to_none)
        return {"ms": float(med), "ms_p20": float(lo), "ms_p80": float(hi)}

    def clear():
        for t in grad_to_none or ():
            t.grad = None

    clear()
    fn()
    samples = []
    for _ in range(max(cpu_reps, 1)):
        clear()
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    samples.sort()
    q = lambda p: samples[min(len(samples) - 1, int(p * (len(samples) - 1) + 0.5))]  # noqa: E731
    return {"ms": statistics.median(samples), "ms_p20": q(0.2), "ms_p80": q(0.8)}


def peak_extra_bytes(fn, device: str):
    """Peak CUDA memory allocated during fn() beyond what was allocated before it (None on CPU)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - base)


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def write_json(records: list, path: str, extra: dict | None = None) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # the command line says which sweep it was (--quick, shapes given by hand)
    payload = {"environment": environment(), "argv": sys.argv[1:], **(extra or {}),
               "results": records}
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:  # then rename: a run killed mid-write leaves the previous file
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)
    return path


def print_table(records: list, columns: list) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in records)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in records:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1e4 else f"{v:.3e}"
    return "-" if v is None else str(v)


def host_us(fn, reps: int = 50) -> float:
    """CUDA: microseconds of CPU wall time to issue one eager fn(), no synchronisation inside
    (what a call costs the host: Python, checks, dispatch, launches)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    spent = (time.perf_counter() - t0) / reps * 1e6
    torch.cuda.synchronize()
    return spent


def graph_stats(fn, rep_ms: int = 100, calls: int = 10, cold: bool = True) -> dict:
    """CUDA: the GPU time of one fn() replayed from CUDA graphs of `calls` of them, without Python
    or launch overhead (which an eager do_bench includes once it exceeds the work). Raises if fn
    cannot be captured.

    graph_ms (p20 / p80 too): back-to-back calls on the same buffers, so whatever of them fits in
    L2 stays there (a decode step's weights often do): a cache-warm figure. graph_cold_ms (with
    cold): each call after a write over twice the L2, as the next layer's work would leave it;
    measured as (flush + fn) - (flush alone), both replayed from graphs."""
    from triton.testing import do_bench

    def replay_ms(body) -> tuple:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                body()
        torch.cuda.synchronize()
        out = do_bench(graph.replay, warmup=max(10, rep_ms // 4), rep=rep_ms,
                       quantiles=[0.5, 0.2, 0.8])
        del graph
        return tuple(float(v) / calls for v in out)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compiles, autotunes) outside the capture
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    med, lo, hi = replay_ms(fn)
    rec = {"graph_ms": med, "graph_ms_p20": lo, "graph_ms_p80": hi}
    if cold:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        l2 = int(getattr(props, "L2_cache_size", 0) or 64 << 20)
        scratch = torch.empty(2 * l2 // 4, dtype=torch.int32, device="cuda")

        def flushed():
            scratch.zero_()
            fn()

        flush_ms = replay_ms(scratch.zero_)[0]
        rec["graph_cold_ms"] = max(replay_ms(flushed)[0] - flush_ms, 0.0)
        rec["graph_flush_ms"] = flush_ms
        del scratch
    return rec
