"""CPU pytest-benchmark: fused linear KD vs lm-head + kd_loss on the reference path.

Run: python -m pytest bench/test_bench_fused_linear_kd_cpu.py --benchmark-enable
(no timing assertions; compare the two rows of the table, measured in the same run)."""

import pytest
import torch

from fastkd.functional import fused_linear_kd_loss, kd_loss

N, H, V = 512, 256, 8000


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(N, H, generator=g).requires_grad_(),
            (torch.randn(V, H, generator=g) * H**-0.5).requires_grad_(),
            torch.randn(N, H, generator=g), torch.randn(V, H, generator=g) * H**-0.5,
            torch.randint(0, V, (N,), generator=g))


def test_fused(benchmark, data):
    sh, sw, th, tw, y = data
    benchmark(lambda: fused_linear_kd_loss(sh, sw, th, tw, y, backend="torch").backward())


def test_unfused(benchmark, data):
    sh, sw, th, tw, y = data
    benchmark(lambda: kd_loss(sh @ sw.t(), th @ tw.t(), y, backend="torch").backward())
