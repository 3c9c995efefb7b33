"""Where the time of a small call goes: host time per call vs device kernel time, per op.

At small shapes (decode-size int8 GEMMs, a few hundred KD rows) a call can be bound by the host:
Python, validation, dispatch and kernel launches. This script times each case three ways, so a
benchmark's ratio can be read correctly:
  host_us    wall time per call with no synchronisation (what the CPU spends issuing it)
  device_us  the median of do_bench (CUDA events; the GPU's view, idle gaps included)
  graph_us   do_bench of a CUDA-graph replay of the same call (launch overhead removed)
and lists the kernels one call launches (torch.profiler).

    python bench/profile_small.py [--out FILE.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def cases():
    import torch.nn.functional as TF

    import fastkd.functional as F

    dev, bf = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    out = {}
    k = n = 4096
    w = torch.randn(n, k, device=dev, dtype=bf, generator=g) / k**0.5
    wq, ws = F.quantize_weight(w)
    for m in (1, 16, 2048):
        x = torch.randn(m, k, device=dev, dtype=bf, generator=g)
        out[f"bf16_linear M={m}"] = lambda x=x: TF.linear(x, w)
        out[f"int8 w8a8 M={m}"] = lambda x=x: F.int8_linear(x, wq, ws, mode="w8a8")
        out[f"int8 w8a16 M={m}"] = lambda x=x: F.int8_linear(x, wq, ws, mode="w8a16")
    for nrows, v in ((256, 128256), (4096, 32000)):
        s = torch.randn(nrows, v, device=dev, dtype=bf, generator=g).requires_grad_()
        t = torch.randn(nrows, v, device=dev, dtype=bf, generator=g)
        y = torch.randint(0, v, (nrows,), device=dev, generator=g)
        out[f"kd_loss fwd N={nrows} V={v}"] = lambda s=s, t=t, y=y: F.kd_loss(s.detach(), t, y)

        def step(s=s, t=t, y=y):
            s.grad = None
            F.kd_loss(s, t, y).backward()

        out[f"kd_loss fwd+bwd N={nrows} V={v}"] = step
    out.update(launch_cases(dev))
    return out


def launch_cases(dev: str) -> dict:
    """What the pieces of a small call cost the host: Triton launches by pointer count (its
    launcher queries the driver once per pointer argument), an autotuned launch, an allocation,
    one tiny aten kernel, and fastkd's Python around the int8 kernels with their launches
    stubbed out. The differences attribute the host time of the calls above."""
    import triton
    import triton.language as tl

    import fastkd.functional as F
    from fastkd.kernels import int8_linear as K

    @triton.jit
    def _nop1(p0, n, B: tl.constexpr):
        tl.store(p0 + tl.arange(0, B), tl.zeros([B], tl.float32), mask=tl.arange(0, B) < n)

    @triton.jit
    def _nop8(p0, p1, p2, p3, p4, p5, p6, p7, n, s0, s1, s2, s3, B: tl.constexpr):
        tl.store(p0 + tl.arange(0, B), tl.zeros([B], tl.float32), mask=tl.arange(0, B) < n)

    _nop8_tuned = triton.autotune([triton.Config({"B": 16})], key=["n"])(_nop8)
    bufs = [torch.zeros(64, device=dev) for _ in range(8)]
    tiny = torch.zeros(1, device=dev)
    out = {
        "launch triton 1 pointer": lambda: _nop1[(1,)](bufs[0], 16, B=16),
        "launch triton 8 pointers": lambda: _nop8[(1,)](*bufs, 16, 1, 2, 3, 4, B=16),
        "launch triton 8 pointers autotuned": lambda: _nop8_tuned[(1,)](*bufs, 16, 1, 2, 3, 4),
        "torch.empty (1, 4096) bf16": lambda: torch.empty(1, 4096, device=dev,
                                                          dtype=torch.bfloat16),
        "aten add_ 1 element": lambda: tiny.add_(1.0),
    }
    g = torch.Generator(device=dev).manual_seed(0)
    wq, ws = F.quantize_weight(torch.randn(4096, 4096, device=dev, generator=g))
    x = torch.randn(1, 4096, device=dev, dtype=torch.bfloat16, generator=g)

    def python_only(mode):
        def call():
            with _stubbed(K, _launch_gemm=lambda *a, **k: None,
                          _quantize_per_token_kernel=_NoLaunch()):
                F.int8_linear(x, wq, ws, mode=mode)
        return call

    out["int8 w8a8 M=1 python only (launches stubbed)"] = python_only("w8a8")
    out["int8 w8a16 M=1 python only (launches stubbed)"] = python_only("w8a16")

    from fastkd.kernels import kd_loss as KD

    s = torch.randn(256, 4096, device=dev, dtype=torch.bfloat16, generator=g).requires_grad_()
    t = torch.randn(256, 4096, device=dev, dtype=torch.bfloat16, generator=g)
    y = torch.randint(0, 4096, (256,), device=dev, generator=g)

    def kd_python_only():
        with _stubbed(KD, _kd_loss_fwd_kernel=_NoLaunch(), _kd_loss_bwd_kernel=_NoLaunch()):
            s.grad = None
            F.kd_loss(s, t, y).backward()

    out["kd_loss fwd+bwd python and aten only (launches stubbed)"] = kd_python_only
    return out


@contextlib.contextmanager
def _stubbed(module, **replacements):
    """Replace attributes of `module` for the duration of the block."""
    real = {name: getattr(module, name) for name in replacements}
    for name, value in replacements.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in real.items():
            setattr(module, name, value)


class _NoLaunch:
    """Stands in for a Triton kernel: `kernel[grid](...)` does nothing."""

    def __getitem__(self, grid):
        return lambda *a, **k: None


def measure(fn) -> dict:
    from triton.testing import do_bench

    import common

    for _ in range(3):
        fn()
    rec = {"host_us": common.host_us(fn),
           "device_us": do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3}
    try:
        stats = common.graph_stats(fn)
        rec["graph_us"] = stats["graph_ms"] * 1e3  # back to back on the same buffers: L2-warm
        rec["graph_cold_us"] = stats["graph_cold_ms"] * 1e3  # after a write over twice the L2
    except Exception as exc:  # noqa: BLE001 - a call that cannot be captured is a finding
        rec["graph_error"] = f"{type(exc).__name__}: {exc}"[:200]
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = [(e.key, e.count, e.device_time_total) for e in prof.key_averages()
               if e.device_time_total > 0]
    rec["kernels"] = [{"name": k[:80], "count": c, "us": t} for k, c, t in kernels]
    return rec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import common

    results = {}
    for name, fn in cases().items():
        try:
            results[name] = measure(fn)
        except Exception as exc:  # noqa: BLE001
            results[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        r = results[name]
        ks = ", ".join(f"{k['name'][:40]} x{k['count']} {k['us']:.0f}us"
                       for k in r.get("kernels", []))
        nan = float("nan")
        print(f"{name:<32} host {r.get('host_us', nan):8.1f} us  device "
              f"{r.get('device_us', nan):8.1f} us  graph {r.get('graph_us', nan):8.1f} us "
              f"(cold {r.get('graph_cold_us', nan):.1f})"
              f"  {r.get('error', r.get('graph_error', ''))}\n    kernels: {ks}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"environment": common.environment(), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
