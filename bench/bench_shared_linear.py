"""SharedLinear benchmark: the codebook (weight-shared) linear against a dense linear on the same shapes.

Implementations, measured in the same run (triton.testing.do_bench on CUDA: median, p20, p80):
  dense_linear         F.linear with the original dense weight (bf16 on CUDA, fp32 on CPU): the
                       baseline every ratio is against
  fastkd_shared        fastkd.functional.shared_linear (the Triton dequant-in-GEMM kernel on CUDA,
                       the torch reference on CPU)
for bits in {4 (per-tensor codebook), 4 (per-channel), 6}. Each record has speedup_vs_dense
(dense ms / impl ms, > 1 is faster), the bytes of weight it reads and their ratio to a bf16 weight,
achieved GB/s and TFLOP/s, and for fastkd_shared the relative error against x @ W_dequant.T in fp32.

CUDA shapes (M, N, K): (16, 4096, 4096), (128, 4096, 4096), (1024, 4096, 11008), (4096, 4096, 4096);
--quick: the first and last with 4-bit per-tensor only. CPU: (33, 257, 513), a few seconds.

    python bench/bench_shared_linear.py [--device D] [--quick] [--out FILE.json] [--iters 5]

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
from fastkd.nn import SharedLinear  # noqa: E402

GPU_SHAPES = [(16, 4096, 4096), (128, 4096, 4096), (1024, 11008, 4096), (4096, 4096, 4096)]
GPU_QUICK_SHAPES = [(16, 4096, 4096), (4096, 4096, 4096)]
CPU_SHAPES = [(33, 257, 513)]
CONFIGS = [(4, False), (4, True), (6, False)]  # (bits, per_channel)
QUICK_CONFIGS = [(4, False)]


def make_layer(n, k, bits, per_channel, device, iters=5):
    """A random nn.Linear(k, n) and its SharedLinear (k-means with `iters` iterations)."""
    torch.manual_seed(0)
    lin = nn.Linear(k, n, bias=False, device=device)
    return lin, SharedLinear.from_linear(lin, bits=bits, per_channel=per_channel, iters=iters)


def run(device: str = "cuda", quick: bool = False, *, shapes=None, configs=None,
        iters: int = 5) -> list:
    """One record per (shape, bits, per_channel, implementation); the `python -m fastkd bench` hook."""
    on_cuda = device == "cuda"
    if shapes is None:
        shapes = (GPU_QUICK_SHAPES if quick else GPU_SHAPES) if on_cuda else CPU_SHAPES
    if configs is None:
        configs = QUICK_CONFIGS if quick else CONFIGS
    dtype = torch.bfloat16 if on_cuda else torch.float32
    backend = "triton" if on_cuda else "torch"
    records = []
    for m, n, k in shapes:
        for bits, per_channel in configs:
            lin, sl = make_layer(n, k, bits, per_channel, device, iters)
            x = torch.randn(m, k, device=device).to(dtype)
            w_dense = lin.weight.detach().to(dtype)
            ref = F.linear(x.float(), sl.dequantized_weight())
            impls = {
                "dense_linear": (lambda: F.linear(x, w_dense),
                                 w_dense.numel() * w_dense.element_size()),
                "fastkd_shared": (lambda: FK.shared_linear(
                    x, sl.indices, sl.codebook, in_features=k, bits=bits, backend=backend),
                    sl.nbytes()),
            }
            base_ms = None
            for name, (fn, weight_bytes) in impls.items():
                rec = {"op": "shared_linear", "impl": name, "m": m, "n": n, "k": k, "bits": bits,
                       "per_channel": per_channel, "dtype": str(dtype)[6:], "backend":
                       backend if name == "fastkd_shared" else "torch", "device": device}
                try:
                    with torch.no_grad():
                        y = fn()
                        if name == "fastkd_shared":
                            rec["rel_err_vs_fp32_dequant"] = (
                                (y.float() - ref).norm() / ref.norm()).item()
                        rec["peak_extra_mb"] = (
                            None if (b := common.peak_extra_bytes(fn, device)) is None
                            else b / 2**20)
                        rec.update(common.time_stats(fn, device))
                except Exception as exc:  # one failing impl must not end the run
                    rec["error"] = ("OOM: " if common.is_oom(exc) else "") + \
                        f"{type(exc).__name__}: {exc}"[:200]
                    records.append(rec)
                    continue
                if name == "dense_linear":
                    base_ms = rec["ms"]
                sec = rec["ms"] * 1e-3
                rec["weight_bytes"] = weight_bytes
                rec["weight_mem_vs_bf16"] = weight_bytes / (n * k * 2)
                rec["GBps"] = (weight_bytes + x.numel() * x.element_size()
                               + m * n * x.element_size()) / sec / 1e9
                rec["TFLOPs"] = 2.0 * m * n * k / sec / 1e12
                rec["speedup_vs_dense"] = base_ms / rec["ms"] if base_ms else None
                records.append(rec)
            del lin, sl, x, w_dense, ref
            if on_cuda:
                torch.cuda.empty_cache()
    return records


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="fewer shapes and configs, shorter timing")
    p.add_argument("--out", default=None, help="JSON file path (default: print only)")
    p.add_argument("--iters", type=int, default=5, help="k-means iterations building each layer")
    args = p.parse_args(argv)
    records = run(args.device, args.quick, iters=args.iters)
    common.print_table(records, ["impl", "m", "n", "k", "bits", "per_channel", "dtype", "ms",
                                 "ms_p20", "ms_p80", "speedup_vs_dense", "GBps", "TFLOPs",
                                 "weight_mem_vs_bf16", "rel_err_vs_fp32_dequant", "error"])
    if args.out:
        print("wrote", common.write_json(records, args.out, {"benchmark": "shared_linear",
                                                             "kmeans_iters": args.iters}))


if __name__ == "__main__":
    main()
