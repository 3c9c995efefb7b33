"""SharedLinear benchmarks.

GPU (``python bench/bench_shared_linear.py``): the Triton dequant-in-GEMM kernel against bf16
``F.linear`` on the same shapes, measured in the same run with ``triton.testing.do_bench``; writes JSON
(device, versions, shapes, times, ratio, weight bytes) to bench/results/.
CPU (``pytest bench/bench_shared_linear.py --benchmark-enable``): the torch reference on small shapes.
"""

from __future__ import annotations

import json
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from fastkd import functional as FK
from fastkd.nn import SharedLinear

GPU_SHAPES = [(16, 4096, 4096), (128, 4096, 4096), (1024, 4096, 11008), (4096, 4096, 4096)]


def _layer(n, k, bits, per_channel, device):
    lin = nn.Linear(k, n, bias=False, device=device)
    return lin, SharedLinear.from_linear(lin, bits=bits, per_channel=per_channel, iters=5)


def test_cpu_shared_linear_reference(benchmark):
    lin, sl = _layer(257, 513, 4, False, "cpu")
    x = torch.randn(33, 513)
    benchmark(lambda: FK.shared_linear(x, sl.indices, sl.codebook, in_features=513, bits=4,
                                       backend="torch"))


def test_cpu_dense_linear_baseline(benchmark):
    lin, _ = _layer(257, 513, 4, False, "cpu")
    x = torch.randn(33, 513)
    benchmark(lambda: F.linear(x, lin.weight))


def main():
    import triton
    from triton.testing import do_bench

    assert torch.cuda.is_available(), "the GPU benchmark needs CUDA"
    rows = []
    for m, n, k in GPU_SHAPES:
        for bits, per_channel in ((4, False), (4, True), (6, False)):
            lin, sl = _layer(n, k, bits, per_channel, "cuda")
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            w_bf16 = lin.weight.detach().to(torch.bfloat16)
            y = FK.shared_linear(x, sl.indices, sl.codebook, in_features=k, bits=bits,
                                 backend="triton")
            ref = F.linear(x.float(), sl.dequantized_weight())
            err = ((y.float() - ref).norm() / ref.norm()).item()
            t_shared = do_bench(lambda: FK.shared_linear(
                x, sl.indices, sl.codebook, in_features=k, bits=bits, backend="triton"),
                quantiles=[0.5, 0.2, 0.8])
            t_bf16 = do_bench(lambda: F.linear(x, w_bf16), quantiles=[0.5, 0.2, 0.8])
            rows.append({
                "M": m, "N": n, "K": k, "bits": bits, "per_channel": per_channel,
                "x_dtype": "bfloat16", "shared_ms": t_shared, "bf16_linear_ms": t_bf16,
                "ratio_bf16_over_shared": t_bf16[0] / t_shared[0],
                "weight_bytes_shared": sl.nbytes(), "weight_bytes_bf16": w_bf16.numel() * 2,
                "rel_err_vs_fp32_dequant": err,
            })
            print(rows[-1])
    out = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "triton": triton.__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "rows": rows,
    }
    os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
    path = os.path.join(os.path.dirname(__file__), "results", "shared_linear.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
