"""Measure the two hardware ceilings the kernel figures are judged against, on this GPU, now:
device-to-device copy bandwidth (bytes read + written) and a bf16 matrix-product rate (cuBLAS).

    python bench/ceilings.py --out bench/results/ceilings-<date>-<device>.json
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def run(device: str = "cuda", quick: bool = False) -> list:
    if device != "cuda":
        return []
    n_bytes = (1 << 30) if not quick else (1 << 28)
    src = torch.randn(n_bytes // 4, device="cuda")  # random data, never zeros
    dst = torch.empty_like(src)
    ms = common.time_ms(lambda: dst.copy_(src), "cuda")
    copy = {"op": "ceiling", "impl": "d2d_copy", "bytes_moved": 2 * n_bytes, "ms": ms,
            "gbps": 2 * n_bytes / (ms * 1e-3) / 1e9}
    m = 8192
    a = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    ms = common.time_ms(lambda: a @ b, "cuda")
    mm = {"op": "ceiling", "impl": "bf16_matmul_8192", "flops": 2 * m**3, "ms": ms,
          "tflops": 2 * m**3 / (ms * 1e-3) / 1e12}
    return [copy, mm]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return
    records = run("cuda")
    common.print_table(records, ["impl", "ms", "gbps", "tflops"])
    if args.out:
        print("wrote", common.write_json(records, args.out, {"benchmark": "ceilings"}))


if __name__ == "__main__":
    main()
