"""pytest-benchmark: SharedLinear's torch reference against a dense linear on small CPU shapes.

    python -m pytest bench/test_bench_shared_linear.py --benchmark-enable
(no timing assertions; compare the rows of the table, measured in the same run)
"""

import torch
import torch.nn.functional as F

import bench_shared_linear as b
from fastkd import functional as FK


def test_cpu_shared_linear_reference(benchmark):
    lin, sl = b.make_layer(257, 513, 4, False, "cpu")
    x = torch.randn(33, 513)
    y = benchmark(lambda: FK.shared_linear(x, sl.indices, sl.codebook, in_features=513, bits=4,
                                           backend="torch"))
    torch.testing.assert_close(y, F.linear(x, sl.dequantized_weight()), rtol=1e-4, atol=1e-4)


def test_cpu_dense_linear_baseline(benchmark):
    lin, _ = b.make_layer(257, 513, 4, False, "cpu")
    x = torch.randn(33, 513)
    y = benchmark(lambda: F.linear(x, lin.weight))
    assert y.shape == (33, 257)
