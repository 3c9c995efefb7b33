"""pytest-benchmark: masked linear forward+backward on a small CPU shape (reference path), against
dense F.linear and F.linear on a precomputed W o M in the same run.

    python -m pytest bench/test_bench_masked_linear.py --benchmark-enable
"""

import pytest
import torch
import torch.nn.functional as Fn

from fastkd.functional import masked_linear
from fastkd.prune import magnitude_mask

M, K, N = 256, 1024, 1024


def _inputs():
    torch.manual_seed(0)
    x = torch.randn(M, K, requires_grad=True)
    w = torch.randn(N, K, requires_grad=True)
    mask = magnitude_mask(w, 0.75, (64, 64))
    return x, w, mask


@pytest.mark.parametrize("impl", ["fastkd", "dense", "dense_premasked"])
def test_masked_linear_fwd_bwd_cpu(benchmark, impl):
    x, w, mask = _inputs()
    wm = (w.detach() * mask).requires_grad_(True)
    fns = {
        "fastkd": lambda: masked_linear(x, w, mask),
        "dense": lambda: Fn.linear(x, w),
        "dense_premasked": lambda: Fn.linear(x, wm),
    }

    def step():
        x.grad = None
        w.grad = None
        wm.grad = None
        fns[impl]().sum().backward()

    benchmark(step)
    assert x.grad is not None and torch.isfinite(x.grad).all()
    if impl == "fastkd":
        assert (w.grad[~mask] == 0).all()
