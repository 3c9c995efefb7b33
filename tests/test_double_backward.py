"""A second derivative through fastkd's ops raises, naming the op; the first derivative taken
with create_graph=True is unchanged. Before, torch's fallback for ops without an autograd
kernel printed one generic warning and the second derivative came out wrong: zeros from the
Triton kernels, the reference's with its saved row statistics held constant (JSD off by half)."""

import pytest
import torch

import fastkd
from fastkd import functional as F
from fastkd.nn import MaskedLinear

from _util import device_for, needs_triton

BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]


def _second_derivative(loss_of, *leaves):
    """d/dx sum(grad^2) for the first leaf: raises where the loss has no second derivative."""
    grads = torch.autograd.grad(loss_of(*leaves), leaves, create_graph=True)
    first = [g.detach().clone() for g in grads]
    return first, lambda: torch.autograd.grad(sum((g ** 2).sum() for g in grads), leaves[0])


def _check(loss_of, *leaves, match):
    first, second = _second_derivative(loss_of, *leaves)
    # the first derivative with create_graph=True is the plain one
    plain = torch.autograd.grad(loss_of(*leaves), leaves)
    for a, b in zip(first, plain):
        torch.testing.assert_close(a, b)
    with pytest.raises(RuntimeError, match=match):
        second()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["kl", "jsd", "reverse_kl"])
def test_kd_loss(backend, divergence):
    dev = device_for(backend)
    g = torch.Generator().manual_seed(0)
    s = torch.randn(5, 13, generator=g).to(dev).requires_grad_()
    t = torch.randn(5, 13, generator=g).to(dev)
    y = torch.tensor([1, -100, 4, 12, 0], device=dev)
    _check(lambda x: F.kd_loss(x, t, y, temperature=2.0, divergence=divergence,
                               backend=backend), s, match="KD loss .*no second derivative")


@pytest.mark.parametrize("backend", BACKENDS)
def test_kd_loss_topk(backend):
    dev = device_for(backend)
    g = torch.Generator().manual_seed(1)
    s = torch.randn(4, 11, generator=g).to(dev).requires_grad_()
    ids, logprobs = fastkd.teacher_topk(torch.randn(4, 11, generator=g).to(dev), 3)
    _check(lambda x: F.kd_loss_topk(x, ids, logprobs, backend=backend), s,
           match="top-k KD loss .*no second derivative")


@pytest.mark.parametrize("chunk_rows", [None, 2])
def test_fused_linear_kd_loss(chunk_rows):
    g = torch.Generator().manual_seed(2)
    h = torch.randn(5, 7, generator=g, requires_grad=True)
    w = torch.randn(13, 7, generator=g, requires_grad=True)
    th, tw = torch.randn(5, 9, generator=g), torch.randn(13, 9, generator=g)
    loss = F.fused_linear_kd_loss(h, w, th, tw, chunk_rows=chunk_rows, backend="torch")
    # its gradients come from the forward's chunk loops, not from a graph: it refuses
    # create_graph=True at once (a later second derivative could not reach it)
    with pytest.raises(RuntimeError, match="fused_linear_kd_loss has no second derivative"):
        torch.autograd.grad(loss, (h, w), create_graph=True)


def test_masked_linear():
    torch.manual_seed(3)
    layer = MaskedLinear.from_linear(torch.nn.Linear(9, 6), sparsity=0.5)
    x = torch.randn(4, 9, requires_grad=True)
    _check(lambda a: layer(a).square().sum(), x, match="masked linear .*no second derivative")
