"""pytest-benchmark: SharedLinear's torch reference against a dense linear on small CPU shapes.

    python -m pytest bench/test_bench_shared_linear.py --benchmark-enable
(no timing assertions; compare the rows of the table, measured in the same run)
"""

import pytest
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


def test_cuda_variant_records_in_the_interpreter():
    """The CUDA sweep's code path (v1, v2_fused, v2_dequant, the tile sweep) on a tiny CPU case in
    the Triton interpreter: every record is error-free and correct. Not a timing."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("the GPU run times these for real")
    recs = b.run("cpu", shapes=[(3, 21, 45)], configs=[(4, False), (6, True)], iters=1,
                 variants=True, sweep=True)
    names = {r["impl"] for r in recs}
    assert {"dense_linear", "fastkd_shared", "shared_v1", "shared_v2_fused",
            "shared_v2_dequant"} <= names
    assert any(n.startswith("shared_v2_fused[") for n in names)
    for r in recs:
        assert "error" not in r, r
        if r["impl"] != "dense_linear":
            assert r["rel_err_vs_fp32_dequant"] < 5e-3, r
    assert {r["variant"] for r in recs if r["impl"] == "fastkd_shared"} == {"v2_fused"}
