"""Shipping and compiling compressed models with sizes that vary: ``torch.export`` of every
compressed layer with dynamic batch and sequence dimensions (and a save/load round trip of the
exported program), and ``torch.compile(dynamic=True)`` of the public functions without a
recompile per size.

A shape or scalar that our Python turns into a constant (``lead.numel()``, ``math.isfinite`` on a
symbolic float) makes export fail with "specialized to a constant" and makes a compiled step
recompile for every new batch size, until torch.compile gives up and runs it eagerly.
"""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounter
from torch.export import Dim

import fastkd
import fastkd.functional as F

K, HID, OUT = 37, 45, 29


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(K, HID), nn.GELU(), nn.Linear(HID, OUT))


def _compressed(kind: str) -> nn.Module:
    torch.manual_seed(0)
    m = _mlp()
    if kind == "masked":
        fastkd.sparsify_(m, 0.5)
    elif kind in ("w8a8", "w8a16"):
        fastkd.quantize_(m, mode=kind)
    elif kind == "shared":
        fastkd.share_weights_(m, bits=4)
    elif kind == "pruned+w8a8":
        fastkd.sparsify_(m, 0.5)
        fastkd.quantize_(m, mode="w8a8")
    return m.eval()


KINDS = ("masked", "w8a8", "w8a16", "shared", "pruned+w8a8")


@pytest.mark.parametrize("kind", KINDS)
def test_export_with_dynamic_batch_and_sequence(kind):
    model = _compressed(kind)
    example = torch.randn(3, 5, K)
    batch, seq = Dim("batch", min=1, max=64), Dim("seq", min=1, max=512)
    ep = torch.export.export(model, (example,), dynamic_shapes=({0: batch, 1: seq},))
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    loaded = torch.export.load(buf).module()
    for shape in ((3, 5, K), (7, 11, K), (1, 1, K)):
        x = torch.randn(shape)
        with torch.no_grad():
            expected = model(x)
        # the exported graph runs the same fastkd ops on the same buffers: bit-identical
        assert torch.equal(ep.module()(x), expected), shape
        assert torch.equal(loaded(x), expected), shape


def _v(r, v=37):
    return torch.randn(r, v, requires_grad=True)


def _t(r, v=37):
    return torch.randint(0, v, (r,))


_W = torch.randn(OUT, K)
_WQ, _WS = F.quantize_weight(_W)
_MASK = torch.rand(OUT, K) > 0.5
_B = torch.randn(OUT)

# name: (function of tensors, inputs for row count r)
DYNAMIC_CASES = {
    "kd_loss": (lambda s, t, y: F.kd_loss(s, t, y, temperature=2.0),
                lambda r: (_v(r), torch.randn(r, 37), _t(r))),
    "kd_loss no target": (lambda s, t: F.kd_loss(s, t), lambda r: (_v(r), torch.randn(r, 37))),
    "kd_loss none 3d": (
        lambda s, t, y: F.kd_loss(s, t, y, reduction="none"),
        lambda r: (torch.randn(2, r, 37, requires_grad=True), torch.randn(2, r, 37),
                   torch.randint(0, 37, (2, r))),
    ),
    "kd_loss jsd": (lambda s, t, y: F.kd_loss(s, t, y, divergence="jsd", beta=0.3),
                    lambda r: (_v(r), torch.randn(r, 37), _t(r))),
    "kd_loss_topk": (
        lambda s, i, lp, y: F.kd_loss_topk(s, i, lp, y),
        # k = 4 differs from every row count, so duck sizing does not tie k to r
        lambda r: (_v(r), *fastkd.teacher_topk(torch.randn(r, 37), 4), _t(r)),
    ),
    # the chunk loop is inside the op, so nothing is unrolled per row count
    "fused_linear_kd": (
        lambda h, th, y: F.fused_linear_kd_loss(h, _W, th, _W, y, temperature=2.0, chunk_rows=4),
        lambda r: (torch.randn(r, K, requires_grad=True), torch.randn(r, K), _t(r, OUT)),
    ),
    "fused_linear_kd none": (
        lambda h, th: F.fused_linear_kd_loss(h, _W, th, _W, reduction="none", student_bias=_B),
        lambda r: (torch.randn(r, K, requires_grad=True), torch.randn(r, K)),
    ),
    "int8 w8a8": (lambda x: F.int8_linear(x, _WQ, _WS, _B, mode="w8a8"),
                  lambda r: (torch.randn(2, r, K),)),
    "int8 w8a16": (lambda x: F.int8_linear(x, _WQ, _WS, _B, mode="w8a16"),
                   lambda r: (torch.randn(2, r, K, requires_grad=True),)),
    "quantize_per_token": (lambda x: F.quantize_per_token(x), lambda r: (torch.randn(2, r, K),)),
    "masked_linear": (lambda x: F.masked_linear(x, _W, _MASK, _B),
                      lambda r: (torch.randn(2, r, K, requires_grad=True),)),
}


@pytest.mark.parametrize("name", sorted(DYNAMIC_CASES))
def test_compile_dynamic_does_not_recompile_per_size(name):
    fn, make = DYNAMIC_CASES[name]
    counter = CompileCounter()
    compiled = torch.compile(fn, backend=counter, dynamic=True, fullgraph=True)
    for rows in (5, 9, 14):
        torch.manual_seed(rows)
        inputs = make(rows)
        out = compiled(*inputs)
        ref = fn(*inputs)
        for a, b in zip(out if isinstance(out, tuple) else (out,),
                        ref if isinstance(ref, tuple) else (ref,)):
            torch.testing.assert_close(a, b)
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.sum().backward()
    assert counter.frame_count == 1, f"{name}: compiled {counter.frame_count} times for 3 sizes"


def test_compiled_kd_loss_takes_a_temperature_that_changes():
    # A temperature schedule inside a compiled step: each new value is a new float to dynamo.
    # It used to break the graph (math.isfinite on a symbolic float); now each value compiles
    # once, as for any custom op with a float argument, and the results match eager.
    counter = CompileCounter()

    def step(s, t, y, temperature):
        return F.kd_loss(s, t, y, temperature=temperature)

    compiled = torch.compile(step, backend=counter, fullgraph=True)
    s, t, y = _v(6), torch.randn(6, 37), _t(6)
    for temperature in (1.0, 2.0, 4.0, 2.0):
        torch.testing.assert_close(compiled(s, t, y, temperature), step(s, t, y, temperature))
    assert counter.frame_count <= 3
    with pytest.raises(ValueError, match="temperature must be > 0"):
        F.kd_loss(s, t, y, temperature=-1.0)
    with pytest.raises(ValueError, match="finite"):
        F.kd_loss(s, t, y, temperature=float("inf"))


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # our argument checks, traced
@pytest.mark.filterwarnings("ignore:.*torch.jit.*deprecated:FutureWarning")  # torch >= 2.15
@pytest.mark.parametrize("kind", KINDS)
def test_jit_trace_records_the_fastkd_ops(kind, tmp_path):
    # torch.jit.trace (and what is built on it) records dispatcher calls. An inference call that
    # skipped the dispatcher left the trace with the reference's aten ops at best and, on a GPU,
    # an empty output buffer without the Triton launch that fills it.
    model = _compressed(kind)
    example = torch.randn(3, 5, K)
    with torch.no_grad():
        traced = torch.jit.trace(model, example)
    kinds = {n.kind() for n in traced.inlined_graph.nodes()}
    assert any(k.startswith("fastkd::") for k in kinds), kinds
    torch.jit.save(traced, tmp_path / "m.pt")
    loaded = torch.jit.load(tmp_path / "m.pt")
    x = torch.randn(4, 7, K)  # another batch and sequence length than the example's
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(traced(x), expected)
        assert torch.equal(loaded(x), expected)
