"""sparsify_ on an already sparsified model prunes further (gradual magnitude pruning).

It used to skip MaskedLinear layers, so the usual schedule (sparsify_ 30 %, fine-tune, 50 %, ...)
stayed at the first step's sparsity without a word.
"""

import pytest
import torch
from torch import nn

import fastkd
from fastkd.nn import MaskedLinear


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 12))


def _density(model):
    return [m.density for m in model if isinstance(m, MaskedLinear)]


def test_a_schedule_reaches_each_sparsity_and_keeps_the_same_parameters():
    model = _model()
    fastkd.sparsify_(model, sparsity=0.3)
    layers = [m for m in model if isinstance(m, MaskedLinear)]
    params = [id(p) for p in model.parameters()]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(32, 24)
    for target in (0.5, 0.75, 0.9):
        old_masks = [m.mask.clone() for m in layers]
        for _ in range(3):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
        fastkd.sparsify_(model, sparsity=target)
        assert [id(p) for p in model.parameters()] == params  # the optimizer's tensors
        assert [m for m in model if isinstance(m, MaskedLinear)] == layers
        for m, old in zip(layers, old_masks):
            assert m.density == pytest.approx(1 - target, abs=1 / m.mask.numel())
            assert not (m.mask & ~old).any()  # nothing comes back
            assert (m.weight[~m.mask] == 0).all()
            # what is kept is the largest of what was kept
            w = m.weight.detach().abs()
            assert w[m.mask].min() >= w[old & ~m.mask].max()


def test_a_lower_sparsity_keeps_the_mask_and_patterns_compose():
    model = fastkd.sparsify_(_model(1), sparsity=0.6)
    masks = [m.mask.clone() for m in model if isinstance(m, MaskedLinear)]
    fastkd.sparsify_(model, sparsity=0.2)
    assert all(torch.equal(m.mask, old) for m, old in
               zip([m for m in model if isinstance(m, MaskedLinear)], masks))
    # unstructured 30 % then 2:4 on top: every group of 4 keeps at most 2
    model = fastkd.sparsify_(_model(2), sparsity=0.3)
    fastkd.sparsify_(model, pattern="2:4", sparsity=None)
    for m in model:
        if isinstance(m, MaskedLinear):
            assert (m.mask.reshape(m.out_features, -1, 4).sum(-1) <= 2).all()


def test_filters_and_outputs_after_further_pruning():
    model = fastkd.sparsify_(_model(3), sparsity=0.4)
    fastkd.sparsify_(model, sparsity=0.8, filter_fn=lambda m, n: n == "2")
    d0, d2 = _density(model)
    assert d0 == pytest.approx(0.6, abs=1e-3) and d2 == pytest.approx(0.2, abs=1e-3)
    x = torch.randn(5, 24)
    ref = nn.functional.linear(
        torch.relu(nn.functional.linear(x, model[0].weight * model[0].mask, model[0].bias)),
        model[2].weight * model[2].mask, model[2].bias)
    torch.testing.assert_close(model(x), ref)


def test_sparsity_none_is_only_for_nm_patterns():
    # it used to leave plain linears unpruned (an all-True mask) without a word
    for pattern in ("unstructured", (2, 4)):
        model = _model(4)
        with pytest.raises(ValueError, match="needs a sparsity"):
            fastkd.sparsify_(model, sparsity=None, pattern=pattern)
        assert not any(isinstance(m, MaskedLinear) for m in model)
    model = fastkd.sparsify_(_model(4), sparsity=None, pattern="2:4")
    assert _density(model) == [0.5, 0.5]
