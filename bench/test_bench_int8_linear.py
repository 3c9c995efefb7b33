"""pytest-benchmark: Int8Linear's torch reference on small CPU shapes, against a float linear.

    python -m pytest bench/test_bench_int8_linear.py --benchmark-enable
(no timing assertions; compare the rows of each group, measured in the same run)
"""

import pytest
import torch
import torch.nn.functional as TF

import fastkd.functional as F

CPU_SHAPES = [(1, 512, 512), (16, 512, 512), (128, 512, 2048), (1024, 1024, 1024)]


def _cpu_case(m, k, n, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g) / k**0.5
    b = torch.randn(n, generator=g).to(dtype)
    wq, ws = F.quantize_weight(w)
    return x, w.to(dtype), b, wq, ws


@pytest.mark.parametrize("m,k,n", CPU_SHAPES)
@pytest.mark.parametrize("impl", ["float_linear", "w8a8", "w8a16"])
def test_bench_cpu_reference(benchmark, impl, m, k, n):
    x, w, b, wq, ws = _cpu_case(m, k, n)
    benchmark.group = f"int8_linear cpu M={m} K={k} N={n}"
    if impl == "float_linear":
        y = benchmark(TF.linear, x, w, b)
    else:
        y = benchmark(lambda: F.int8_linear(x, wq, ws, b, mode=impl, backend="torch"))
    assert y.shape == (m, n)
    ref = TF.linear(x, w, b)
    assert ((y - ref).abs().max() / ref.abs().max()).item() < 0.05  # int8 error, not garbage


@pytest.mark.parametrize("m,k", [(16, 512), (512, 2048)])
def test_bench_cpu_quantize_per_token(benchmark, m, k):
    x = torch.randn(m, k)
    q, s = benchmark(lambda: F.quantize_per_token(x, backend="torch"))
    assert q.shape == (m, k) and s.shape == (m,)


BF16_SHAPES = [(1, 4096, 4096), (8, 4096, 4096), (64, 2048, 2048), (512, 1024, 1024)]


@pytest.mark.parametrize("m,k,n", BF16_SHAPES)
@pytest.mark.parametrize("impl", ["bf16_linear", "w8a16"])
def test_bench_cpu_bf16_w8a16(benchmark, impl, m, k, n):
    """bf16 activations: W8A16 on the CPU takes aten's int8 weight-only kernel where it was
    timed faster (fastkd/reference/int8_linear.py), against F.linear on the bf16 weight."""
    x, w, b, wq, ws = _cpu_case(m, k, n, torch.bfloat16)
    benchmark.group = f"int8_linear cpu bf16 M={m} K={k} N={n}"
    if impl == "bf16_linear":
        y = benchmark(TF.linear, x, w, b)
    else:
        y = benchmark(lambda: F.int8_linear(x, wq, ws, b, mode="w8a16", backend="torch"))
    ref = TF.linear(x.float(), w.float(), b.float())
    assert y.dtype == torch.bfloat16
    assert ((y.float() - ref).abs().max() / ref.abs().max()).item() < 0.05
