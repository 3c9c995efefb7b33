"""SharedLinear benchmark: the codebook (weight-shared) linear against a dense linear on the same shapes.

Implementations, measured in the same run (triton.testing.do_bench on CUDA: median, p20, p80; the
L2 is flushed before every call, so the weights come from HBM):
  dense_linear       F.linear with the original dense weight (bf16 on CUDA, fp32 on CPU): the
                     baseline every ratio is against
  fastkd_shared      fastkd.functional.shared_linear, what users get (the Triton v2 kernel on CUDA,
                     the torch reference on CPU); "variant" says which v2 path it took
  shared_v1          CUDA only: the first Triton kernel (scalar byte loads, a global codebook gather
                     per weight), kept to measure v2 against
  shared_v2_fused    CUDA only: the fused v2 kernel (vectorised index bytes, per-program lookup
                     tables, K split for small M); "config" gives its tiles and split
  shared_v2_dequant  CUDA only: the v2 dequantize kernel, then cuBLAS (fp16/bf16)
  int8_w8a16         fastkd.nn.Int8Linear of the same dense layer (backend auto), the other way to
  int8_w8a8          shrink a layer's weight (to 0.5x bf16 where 4-bit sharing reaches ~0.25x);
                     their error is against the dense layer (rel_err_vs_fp32_dense), not the codebook
Each record has speedup_vs_dense (dense ms / impl ms, > 1 is faster), the bytes of weight it reads
and their ratio to a bf16 weight, achieved GB/s (weight + x + y bytes over the time) and TFLOP/s,
and for the shared implementations the relative error against x @ W_dequant.T in fp32. On CUDA also
graph_ms / graph_speedup_vs_dense (a CUDA-graph replay: the device time without Python, dispatch and
launch costs; an eager call that costs the host more than the ~80 us L2 flush shows its host time
in "ms") and host_us (CPU time to issue one eager call). Small-M kernels are judged on graph_ms.

CUDA cases (M, N, K, bits, per_channel): M in {1, 16, 128, 4096} at N = K = 4096 and (1024, 11008,
4096), each for bits in {4 (per layer), 4 (per channel), 6 (per layer)}; --quick: M in {1, 16, 128,
4096} at 4 bits per layer and M = 16 at 4 bits per channel. --sweep adds v2_fused tile candidates
(SWEEP_TILES) at each case. CPU: (33, 257, 513), the reference only, a few seconds.

    python bench/bench_shared_linear.py [--device D] [--quick] [--sweep] [--out FILE.json]
                                        [--iters 5]

CPU pytest-benchmark micro-benchmarks live in bench/test_bench_shared_linear.py.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from fastkd import functional as FK  # noqa: E402
from fastkd.nn import Int8Linear, SharedLinear  # noqa: E402

GPU_SHAPES = [(1, 4096, 4096), (16, 4096, 4096), (128, 4096, 4096), (1024, 11008, 4096),
              (4096, 4096, 4096)]
CONFIGS = [(4, False), (4, True), (6, False)]  # (bits, per_channel)
GPU_QUICK_CASES = [(1, 4096, 4096, 4, False), (16, 4096, 4096, 4, False),
                   (128, 4096, 4096, 4, False), (4096, 4096, 4096, 4, False),
                   (16, 4096, 4096, 4, True)]
CPU_SHAPES = [(33, 257, 513)]
QUICK_CONFIGS = [(4, False)]
VARIANTS = ("v1", "v2_fused", "v2_dequant")
# --sweep: v2_fused (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) candidates by M range, the
# K split following the kernel's own rule (kernels/shared_linear.py fused_config)
SWEEP_TILES = {
    16: [(16, 32, 256, 4, 4), (16, 64, 256, 4, 3), (16, 128, 128, 8, 3), (16, 64, 128, 8, 4)],
    256: [(64, 128, 64, 4, 4), (128, 64, 64, 8, 3), (128, 128, 128, 8, 2)],
    1 << 30: [(128, 256, 64, 8, 3), (128, 128, 128, 8, 3), (64, 128, 64, 4, 4)],
}


def graph_and_host(fn) -> dict:
    """CUDA only: host_us (CPU time to issue one eager call) and the CUDA-graph replay time of one
    call (graph_ms, with p20/p80), or graph_error when fn cannot be captured."""
    rec = {"host_us": common.host_us(fn)}
    try:
        rec.update(common.graph_stats(fn))
    except Exception as exc:  # a call that cannot be captured is a finding, not the end of the run
        rec["graph_error"] = f"{type(exc).__name__}: {exc}"[:200]
    return rec


def make_layer(n, k, bits, per_channel, device, iters=5):
    """A random nn.Linear(k, n) and its SharedLinear (k-means with `iters` iterations)."""
    torch.manual_seed(0)
    lin = nn.Linear(k, n, bias=False, device=device)
    return lin, SharedLinear.from_linear(lin, bits=bits, per_channel=per_channel, iters=iters)


def _cases(on_cuda, quick, shapes, configs):
    if shapes is None and configs is None and on_cuda and quick:
        return list(GPU_QUICK_CASES)
    if shapes is None:
        shapes = GPU_SHAPES if on_cuda else CPU_SHAPES
    if configs is None:
        configs = QUICK_CONFIGS if quick else CONFIGS
    return [(m, n, k, bits, pc) for m, n, k in shapes for bits, pc in configs]


def _sweep_configs(kernels, m, n, k, device, dtype):
    tiles = next(v for bound, v in sorted(SWEEP_TILES.items()) if m <= bound)
    return [kernels.fused_config(m, n, k, device, dtype, tiles=t) for t in tiles]


def _int8_bytes(layer) -> int:
    return sum(t.numel() * t.element_size() for t in (layer.weight, layer.weight_scale))


def _impls(x, sl, lin, w_dense, k, bits, backend, variants, sweep):
    """name -> (fn, weight bytes, extra record fields)."""
    impls = {
        "dense_linear": (lambda: F.linear(x, w_dense), w_dense.numel() * w_dense.element_size(),
                         {"backend": "torch"}),
        "fastkd_shared": (lambda: FK.shared_linear(
            x, sl.indices, sl.codebook, in_features=k, bits=bits, backend=backend),
            sl.nbytes(), {"backend": backend}),
    }
    if not (x.device.type == "cpu" and variants):  # (the interpreter's fp16 check run: no int8)
        for mode in ("w8a16", "w8a8"):
            q = Int8Linear.from_linear(lin, mode=mode)
            impls[f"int8_{mode}"] = (lambda q=q: q(x), _int8_bytes(q), {"backend": q.backend})
    if not variants:
        return impls
    from fastkd.kernels import shared_linear as kernels

    m = x.shape[0]
    impls["fastkd_shared"][2]["variant"] = kernels.resolve_variant("v2", m, x.dtype)
    fused_cfg = kernels.fused_config(m, sl.indices.shape[0], k, x.device, x.dtype,
                                     kernels._lookup_kind(bits, sl.codebook.dim() == 2, x.dtype))

    def call(variant, config=None):
        return lambda: kernels.shared_linear_forward(
            x, sl.indices, sl.codebook, None, k, bits, variant=variant, config=config)

    for v in VARIANTS:
        if v == "v2_dequant" and x.dtype == torch.float32:
            continue
        extra = {"backend": "triton", "variant": v}
        if v == "v2_fused":
            extra["config"] = fused_cfg
        impls[f"shared_{v}"] = (call(v), sl.nbytes(), extra)
    if sweep:
        for cfg in _sweep_configs(kernels, m, sl.indices.shape[0], k, x.device, x.dtype):
            if cfg == fused_cfg:
                continue
            name = "shared_v2_fused[{BLOCK_M}x{BLOCK_N}x{BLOCK_K} w{num_warps} s{num_stages} " \
                   "split{split}]".format(**cfg)
            impls[name] = (call("v2_fused", cfg), sl.nbytes(),
                           {"backend": "triton", "variant": "v2_fused", "config": cfg})
    return impls


def run(device: str = "cuda", quick: bool = False, *, shapes=None, configs=None,
        iters: int = 5, variants=None, sweep: bool = False, after_case=None) -> list:
    """One record per (case, implementation); the `python -m fastkd bench` hook.
    ``after_case(records)``, if given, is called with the records so far after each case (a run
    cut off by its time cap keeps them).

    variants: time the Triton variants (v1, v2_fused, v2_dequant) one by one; default on CUDA only
    (on CPU they would run in the Triton interpreter: a check of this script, not a timing).
    """
    on_cuda = device == "cuda"
    if variants is None:
        variants = on_cuda
    dtype = torch.bfloat16 if on_cuda else (torch.float16 if variants else torch.float32)
    backend = "triton" if (on_cuda or variants) else "torch"
    records = []
    for m, n, k, bits, per_channel in _cases(on_cuda, quick, shapes, configs):
        lin, sl = make_layer(n, k, bits, per_channel, device, iters)
        x = torch.randn(m, k, device=device).to(dtype)
        w_dense = lin.weight.detach().to(dtype)
        ref = F.linear(x.float(), sl.dequantized_weight())
        base_ms = base_graph_ms = None
        dense_ref = F.linear(x.float(), lin.weight.detach().float())
        for name, (fn, weight_bytes, extra) in _impls(x, sl, lin, w_dense, k, bits, backend,
                                                     variants, sweep).items():
            rec = {"op": "shared_linear", "impl": name, "m": m, "n": n, "k": k, "bits": bits,
                   "per_channel": per_channel, "dtype": str(dtype)[6:], "device": device, **extra}
            try:
                with torch.no_grad():
                    y = fn()
                    if name.startswith("int8_"):
                        rec["rel_err_vs_fp32_dense"] = (
                            (y.float() - dense_ref).norm() / dense_ref.norm()).item()
                    elif name != "dense_linear":
                        rec["rel_err_vs_fp32_dequant"] = (
                            (y.float() - ref).norm() / ref.norm()).item()
                    rec["peak_extra_mb"] = (
                        None if (b := common.peak_extra_bytes(fn, device)) is None
                        else b / 2**20)
                    rec.update(common.time_stats(fn, device))
                    if on_cuda:
                        rec.update(graph_and_host(fn))
            except Exception as exc:  # one failing impl must not end the run
                rec["error"] = ("OOM: " if common.is_oom(exc) else "") + \
                    f"{type(exc).__name__}: {exc}"[:200]
                records.append(rec)
                print("!!", name, m, n, k, bits, per_channel, rec["error"], flush=True)
                continue
            if name == "dense_linear":
                base_ms, base_graph_ms = rec["ms"], rec.get("graph_ms")
            sec = rec["ms"] * 1e-3
            rec["weight_bytes"] = weight_bytes
            rec["weight_mem_vs_bf16"] = weight_bytes / (n * k * 2)
            rec["GBps"] = (weight_bytes + x.numel() * x.element_size()
                           + m * n * x.element_size()) / sec / 1e9
            rec["TFLOPs"] = 2.0 * m * n * k / sec / 1e12
            rec["speedup_vs_dense"] = base_ms / rec["ms"] if base_ms else None
            if rec.get("graph_ms") and base_graph_ms:
                rec["graph_speedup_vs_dense"] = base_graph_ms / rec["graph_ms"]
            records.append(rec)
            if on_cuda:  # a killed run still leaves every finished point in the log
                g_ms, g_x = rec.get("graph_ms") or 0, rec.get("graph_speedup_vs_dense") or 0
                print(f"  {name:<44} M={m:<5} N={n:<6} K={k:<5} bits={bits} pc={per_channel!s:<5} "
                      f"{rec['ms']:.4f} ms x{rec['speedup_vs_dense'] or 0:.3f} | graph "
                      f"{g_ms:.4f} ms x{g_x:.3f} (cold {rec.get('graph_cold_ms') or 0:.4f}) | "
                      f"host {rec.get('host_us', 0):.0f} us", flush=True)
        del lin, sl, x, w_dense, ref, dense_ref
        if after_case is not None:
            after_case(records)
        if on_cuda:
            torch.cuda.empty_cache()
    return records


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="fewer shapes and configs, shorter timing")
    p.add_argument("--out", default=None, help="JSON file path (default: print only)")
    p.add_argument("--iters", type=int, default=5, help="k-means iterations building each layer")
    p.add_argument("--sweep", action="store_true", help="also time v2_fused tile candidates")
    args = p.parse_args(argv)
    extra = {"benchmark": "shared_linear", "kmeans_iters": args.iters}

    def save(records):
        if args.out:
            common.write_json(list(records), args.out, {**extra, "complete": False})

    records = run(args.device, args.quick, iters=args.iters, sweep=args.sweep, after_case=save)
    common.print_table(records, ["impl", "variant", "m", "n", "k", "bits", "per_channel", "dtype",
                                 "ms", "ms_p20", "ms_p80", "speedup_vs_dense", "graph_ms",
                                 "graph_speedup_vs_dense", "host_us", "GBps", "TFLOPs",
                                 "weight_mem_vs_bf16", "rel_err_vs_fp32_dequant",
                                 "rel_err_vs_fp32_dense", "error"])
    if args.out:
        print("wrote", common.write_json(records, args.out, {**extra, "complete": True}))


if __name__ == "__main__":
    main()
