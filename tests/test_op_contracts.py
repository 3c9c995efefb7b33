"""Op-contract gaps an audit found: each op's fake matches its real output, compiled and exported
programs are not specialised on the row count, and an op that is not differentiated through says
so instead of giving a gradient eager and none compiled."""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import fastkd
import fastkd.functional as F
from fastkd.nn import SharedLinear


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_teacher_topk_compiles_once_for_every_row_count():
    """Its chunk loop ran at trace time: dynamic=True recompiled per batch size and failed
    after 8 of them."""
    def step(s, t, y):
        ids, lps = fastkd.teacher_topk(t, 4, temperature=2.0)
        return F.kd_loss_topk(s, ids, lps, y, temperature=2.0)

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter, fullgraph=True, dynamic=True)
    frames = []
    for n in range(3, 12):
        s, t, y = torch.randn(2, n, 13), torch.randn(2, n, 13), torch.randint(0, 13, (2, n))
        torch.testing.assert_close(compiled(s, t, y), step(s, t, y))
        frames.append(counter.frame_count)
    assert frames == frames[:1] * len(frames), frames  # nothing compiled after the first size


def test_teacher_topk_exported_with_dynamic_rows_runs_at_other_shapes():
    """Exported with dynamic (b, l), the program guarded on the example's b * l."""
    from torch.export import Dim

    class Store(torch.nn.Module):
        def forward(self, t):
            return fastkd.teacher_topk(t, 3, temperature=1.5)

    b, length = Dim("b", min=2, max=64), Dim("l", min=2, max=64)
    ep = torch.export.export(Store(), (torch.randn(3, 5, 17),),
                             dynamic_shapes=({0: b, 1: length},))
    t = torch.randn(4, 9, 17)
    for got, want in zip(ep.module()(t), fastkd.teacher_topk(t, 3, temperature=1.5)):
        torch.testing.assert_close(got, want)


def test_teacher_topk_op_passes_opcheck():
    rows = torch.randn(2, 5, 17)[:, :-1]  # a sliced batch: the op reads the view
    torch.library.opcheck(torch.ops.fastkd.teacher_topk.default, (rows, 4, 2.0))
    torch.library.opcheck(torch.ops.fastkd.teacher_topk.default, (torch.randn(7, 11), 11, 0.5))


def test_fused_linear_kd_op_fake_matches_a_transposed_hidden():
    """The hidden-state gradient kept a transposed input's strides, the fake said contiguous:
    opcheck failed and inductor asserted on the strides."""
    n, h, v = 6, 5, 9
    sh = torch.randn(h, n).t()  # (n, h), strides (1, n)
    sw, th, tw = torch.randn(v, h), torch.randn(n, h), torch.randn(v, h)
    args = (sh, sw, None, th, tw, None, None, None, 2.0, 0.5, -100, "torch", "kl", 0.5, 4,
            True, True, False)
    torch.library.opcheck(torch.ops.fastkd.fused_linear_kd_forward.default, args)
    real = torch.ops.fastkd.fused_linear_kd_forward(*args)
    assert real[1].is_contiguous()


@pytest.mark.parametrize("op, args", [
    ("quantize_per_token", lambda: (torch.randn(3, 8, requires_grad=True), "torch")),
    ("fused_linear_kd_forward", lambda: (
        torch.randn(4, 5, requires_grad=True), torch.randn(7, 5), None, torch.randn(4, 5),
        torch.randn(7, 5), None, None, None, 1.0, 0.5, -100, "torch", "kl", 0.5, 0, False,
        False, False)),
])
def test_ops_not_differentiated_through_refuse_a_backward(op, args):
    """No autograd kernel: eager differentiated the Python implementation's aten ops (a
    meaningless gradient), compiled gave none, silently."""
    out = getattr(torch.ops.fastkd, op)(*args())
    out = out[1] if op == "quantize_per_token" else out[0]  # the float output
    with pytest.raises(RuntimeError, match="no derivative|not differentiated through"):
        out.sum().backward()


def test_fused_linear_kd_strict_export_saves(tmp_path):
    """An unconditional autocast-off region left a node strict export could not save."""
    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.sw = torch.nn.Parameter(torch.randn(11, 6))
            self.register_buffer("tw", torch.randn(11, 6))

        def forward(self, sh, th, y):
            return F.fused_linear_kd_loss(sh, self.sw, th, self.tw, y, temperature=2.0)

    args = (torch.randn(5, 6), torch.randn(5, 6), torch.randint(0, 11, (5,)))
    ep = torch.export.export(Head(), args, strict=True)
    path = tmp_path / "head.pt2"
    torch.export.save(ep, path)
    torch.testing.assert_close(torch.export.load(path).module()(*args), Head.forward(ep.module(), *args))


def test_shared_linear_bits_passed_into_a_compiled_function():
    """``bits`` as an int argument of a compiled function is a SymInt to Dynamo; torch 2.11
    could not trace the checks formatting it."""
    layer = SharedLinear.from_linear(torch.nn.Linear(24, 10), bits=3)
    idx, cb = layer.indices, layer.codebook.detach()

    def f(x, bits):
        return F.shared_linear(x, idx, cb, in_features=24, bits=bits, backend="torch")

    x = torch.randn(5, 24)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=True)
    torch.testing.assert_close(compiled(x, 3), f(x, 3))
