"""pytest-benchmark: KD loss forward+backward on small CPU shapes (reference path).

    python -m pytest bench/test_bench_kd_loss.py --benchmark-enable
"""

import pytest
import torch

import bench_kd_loss as b


@pytest.mark.parametrize("impl", ["fastkd", "torch"])
@pytest.mark.parametrize("n,v", [(64, 4096), (64, 32000), (4, 16)])
def test_kd_loss_fwd_bwd_cpu(benchmark, impl, n, v):
    fn = b.fastkd_loss if impl == "fastkd" else b.torch_kd_loss
    s, t, y = b._inputs(n, v, "cpu", torch.float32)
    step = b._fwd_bwd(fn, s, t, y)
    benchmark(step)
    assert s.grad is not None and torch.isfinite(s.grad).all()
