"""MaskedExperts: sparsify_ takes the experts of transformers' Mixture-of-Experts blocks (3-D
stacked weights, most of such a model's parameters), which it used to leave dense with a
warning. Checked against the transformers class's own forward on W o M, for every pattern, with
gradients, optimizers, gradual and global pruning, checkpoints, fold / decompress and quantize_."""

import copy
import warnings

import pytest
import torch

import fastkd
from fastkd.nn import Int8Experts, MaskedExperts, MaskedLinear
from fastkd.nn.int8_experts import is_stacked_experts

from test_int8_experts import ARCHS, _eager, _model, _reloaded, _routing, _ToyExperts


def _experts(model):
    return next(m for m in model.modules() if is_stacked_experts(m))


def _expert_matrices(masked, p):
    """Each expert's (out, in) mask of projection p."""
    m = getattr(masked, f"{p}_mask")
    return [m[e].t() if masked.is_transposed else m[e] for e in range(m.shape[0])]


@pytest.mark.parametrize("arch", ARCHS)
def test_masked_experts_compute_the_class_forward_on_masked_weights(arch):
    experts = _experts(_model(arch, intermediate=37))  # odd expert width
    reference = copy.deepcopy(experts)
    masked = MaskedExperts.from_experts(experts, sparsity=0.6)
    assert masked.gate_up_proj is experts.gate_up_proj  # the same Parameter, pruned in place
    assert abs(masked.density - 0.4) < 0.01
    with torch.no_grad():
        for p in masked.projections:
            getattr(reference, p).mul_(getattr(masked, f"{p}_mask"))
    x = torch.randn(13, 24, generator=torch.Generator().manual_seed(2))
    idx, w = _routing(13, experts.num_experts)
    torch.testing.assert_close(masked(x, idx, w), _eager(reference, x, idx, w),
                               rtol=1e-5, atol=1e-6)
    folded = masked.to_experts()
    assert type(folded) is type(experts)
    torch.testing.assert_close(_eager(folded, x, idx, w), _eager(reference, x, idx, w))


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.5), ("2:4", None),
                                              ((4, 4), 0.5)])
def test_each_expert_matrix_obeys_the_pattern(transposed, pattern, sparsity):
    experts = _ToyExperts(inner=36, transposed=transposed, bias=True)
    weights = {p: getattr(experts, p).detach().clone() for p in ("gate_up_proj", "down_proj")}
    masked = MaskedExperts.from_experts(experts, sparsity=sparsity, pattern=pattern)
    for p in masked.projections:
        w = weights[p]
        for e, mask in enumerate(_expert_matrices(masked, p)):
            mat = (w[e].t() if transposed else w[e]).abs()
            assert abs(mask.float().mean().item() - 0.5) < 0.02
            if pattern == "2:4":  # two of every four consecutive inputs, the larger ones
                groups, kept = mat.reshape(mat.shape[0], -1, 4), mask.reshape(mask.shape[0], -1, 4)
                assert (kept.sum(-1) == 2).all()
                assert ((groups * kept).amax(-1) >= (groups * ~kept).amax(-1)).all()
            elif pattern == (4, 4):  # whole 4x4 blocks go
                blocks = mask.reshape(mask.shape[0] // 4, 4, -1, 4).float().mean((1, 3))
                assert ((blocks == 0) | (blocks == 1)).all()
            else:  # the largest half stays
                assert mat[mask].min() >= mat[~mask].max()


def test_pruned_expert_weights_get_no_gradient_and_stay_zero():
    experts = _ToyExperts(bias=True)
    masked = MaskedExperts.from_experts(experts, sparsity=0.5)
    opt = torch.optim.AdamW(masked.parameters(), lr=0.1, weight_decay=0.1)
    x = torch.randn(11, 24)
    idx, w = _routing(11, 5)
    for _ in range(3):
        opt.zero_grad()
        masked(x, idx, w).pow(2).sum().backward()
        for p in masked.projections:
            grad, mask = getattr(masked, p).grad, getattr(masked, f"{p}_mask")
            assert bool((grad[~mask] == 0).all()) and grad[mask].abs().sum() > 0
        opt.step()
    for p in masked.projections:
        assert bool((getattr(masked, p)[~getattr(masked, f"{p}_mask")] == 0).all())


def test_sparsify_takes_the_experts_prunes_further_and_ranks_them_globally():
    model = _model("mixtral")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "left float" warning any more
        fastkd.sparsify_(model, 0.5)
    experts = [m for m in model.modules() if isinstance(m, MaskedExperts)]
    assert len(experts) == 2 and all(abs(m.density - 0.5) < 0.01 for m in experts)
    before = [{p: getattr(m, f"{p}_mask").clone() for p in m.projections} for m in experts]
    fastkd.sparsify_(model, 0.75)  # gradual: within the old masks, the same modules
    assert [m for m in model.modules() if isinstance(m, MaskedExperts)] == experts
    for m, old in zip(experts, before):
        assert abs(m.density - 0.25) < 0.01
        assert all(bool((getattr(m, f"{p}_mask") <= old[p]).all()) for p in m.projections)

    model = _model("mixtral")
    fastkd.sparsify_(model, 0.6, scope="global")
    layers = [m for m in model.modules() if isinstance(m, (MaskedExperts, MaskedLinear))]
    kept = sum(int(getattr(m, f"{p}_mask").sum()) for m in layers if isinstance(m, MaskedExperts)
               for p in m.projections)
    kept += sum(int(m.mask.sum()) for m in layers if isinstance(m, MaskedLinear))
    total = sum(getattr(m, f"{p}_mask").numel() for m in layers
                if isinstance(m, MaskedExperts) for p in m.projections)
    total += sum(m.mask.numel() for m in layers if isinstance(m, MaskedLinear))
    assert total - kept == round(total * 0.6)


def test_a_pattern_the_experts_do_not_fit_leaves_the_model_untouched():
    model = _model("mixtral", intermediate=37)  # 2:4 needs inputs in groups of 4; 37 is not
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="divisible by 4"):
        fastkd.sparsify_(model, pattern="2:4")
    assert not any(isinstance(m, (MaskedExperts, MaskedLinear)) for m in model.modules())
    assert all(torch.equal(t, state[k]) for k, t in model.state_dict().items())


def test_checkpoints_fold_decompress_and_quantize(tmp_path):
    model = _model("mixtral")
    fastkd.sparsify_(model, 0.5, filter_fn=lambda m, name: "experts" in name)
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(3))
    _, ref = _reloaded(model, ids, tmp_path, MaskedExperts)

    folded = copy.deepcopy(model)
    fastkd.fold_masks_(folded)  # the transformers class back, its own forward (grouped_mm)
    assert type(folded.model.layers[0].mlp.experts).__name__ == "MixtralExperts"
    with torch.no_grad():
        torch.testing.assert_close(folded(ids).logits, ref, rtol=1e-4, atol=1e-5)

    quantized = copy.deepcopy(model)
    fastkd.quantize_(quantized, mode="w8a16")
    q = quantized.model.layers[0].mlp.experts
    assert isinstance(q, Int8Experts)
    mask = model.model.layers[0].mlp.experts.gate_up_proj_mask
    assert bool((q.gate_up_proj[~mask] == 0).all())  # pruned weights are code 0
    fastkd.decompress_(quantized)  # and back to the class, which runs its own forward
    with torch.no_grad():
        out = quantized(ids).logits
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.999


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_masked_experts_bf16():
    experts = _ToyExperts(n_experts=8, hidden=1000, inner=1404, bias=True).cuda()
    masked = MaskedExperts.from_experts(experts, pattern="2:4", sparsity=None).to(torch.bfloat16)
    x = torch.randn(300, 1000, device="cuda", dtype=torch.bfloat16)
    idx, w = (t.cuda() for t in _routing(300, 8))
    out = masked(x, idx, w)
    ref = masked.to_experts().double()(x.double(), idx, w.double())
    rel = ((out.double() - ref).norm() / ref.norm()).item()
    assert out.dtype == torch.bfloat16 and rel < 1e-2, rel
