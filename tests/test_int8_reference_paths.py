"""The W8A16 reference's internal routes against the exact float64 product, reached directly:
several output-channel chunks (past _CHUNK_ELEMENTS, 4M weights, which no other test reaches)
and aten's _weight_int8pack_mm route (which int8_linear_w8a16 takes only where a timing probe
says it is faster, so the routing tests skip it on slow machines)."""

from __future__ import annotations

import pytest
import torch

from fastkd.reference import int8_linear as ref


def _data(m, k, n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    s = torch.rand(n, generator=g) * 0.02 + 1e-3  # a different scale per output channel
    b = (torch.randn(n, generator=g) * 4).to(dtype)  # large enough that a lost bias shows
    return x, w, s, b


def _exact(x, w, s, b):
    y = x.double() @ (w.double() * s.double()[:, None]).t()
    return y if b is None else y + b.double()


def _assert_close_to_exact(out, exact, rel):
    # within `rel` of each row's largest entry (the products' roundings scale with it)
    scale = exact.abs().amax(dim=1, keepdim=True)
    assert ((out.double() - exact).abs() <= rel * scale).all()


@pytest.mark.parametrize("bias", [False, True])
def test_w8a16_chunked_over_output_channels_matches_the_exact_product(bias, monkeypatch):
    # _CHUNK_ELEMENTS = 64 * 7: chunks of 7 output channels (and a last one of 1) out of 50;
    # each chunk must take its own channels' scales and bias (chunk n0:n1, not the first
    # n1 - n0). fp32 activations take the fp32 route (int8_linear_w8a16 -> _w8a16_chunked),
    # bf16 ones the bf16-GEMM route on bf16 codes, called here directly.
    monkeypatch.setattr(ref, "_CHUNK_ELEMENTS", 64 * 7)
    x, w, s, b = _data(5, 64, 50, torch.float32, seed=1)
    b = b if bias else None
    out = ref.int8_linear_w8a16(x, w, s, b)
    assert out.dtype == torch.float32 and out.shape == (5, 50)
    _assert_close_to_exact(out, _exact(x, w, s, b), 1e-5)
    xb, bb = x.to(torch.bfloat16), None if b is None else b.to(torch.bfloat16)
    out_bf16 = ref._w8a16_bf16_gemm(xb, w, s, bb)
    assert out_bf16.dtype == torch.bfloat16
    _assert_close_to_exact(out_bf16, _exact(xb, w, s, bb), 2 ** -7)


@pytest.mark.skipif(not hasattr(torch.ops.aten, "_weight_int8pack_mm"),
                    reason="this torch has no _weight_int8pack_mm")
@pytest.mark.parametrize("bias", [False, True])
def test_int8pack_route_matches_the_exact_product(bias):
    # The route itself, whatever the speed probe decided: bf16 activations, M <= 16, K % 16 == 0
    # and a 64-byte-aligned contiguous weight (its preconditions); the bias is added to the
    # kernel's bf16 result in fp32. Within a few bf16 roundings of the exact product.
    x, w, s, b = _data(5, 64, 48, torch.bfloat16, seed=2)
    b = b if bias else None
    assert ref._int8pack_applies(x, w)
    out = ref._int8pack(x, w, s, b)
    assert out.dtype == torch.bfloat16 and out.shape == (5, 48)
    _assert_close_to_exact(out, _exact(x, w, s, b), 2 ** -6)
