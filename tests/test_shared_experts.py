"""SharedExperts: share_weights_ takes the experts of transformers' Mixture-of-Experts blocks (3-D
stacked weights, most of such a model's parameters), which it used to leave float with a
warning. Checked against the transformers class's own forward on the looked-up weights, the
codebook gradient against the sum of its weights' gradients, pruned weights, checkpoints."""

import copy
import warnings

import pytest
import torch

import fastkd
from fastkd.nn import MaskedExperts, SharedExperts
from fastkd.nn.int8_experts import is_stacked_experts
from fastkd.reference.shared_linear import unpack_indices

from test_int8_experts import ARCHS, _eager, _model, _reloaded, _routing, _ToyExperts


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("bits,per_channel", [(4, False), (6, True)])
def test_shared_experts_compute_the_class_forward_on_looked_up_weights(arch, bits, per_channel):
    experts = next(m for m in _model(arch, intermediate=37).modules() if is_stacked_experts(m))
    shared = SharedExperts.from_experts(experts, bits=bits, per_channel=per_channel, iters=20)
    x = torch.randn(13, 24, generator=torch.Generator().manual_seed(2))
    idx, w = _routing(13, experts.num_experts)
    looked_up = shared.to_experts()
    assert type(looked_up) is type(experts)
    torch.testing.assert_close(shared(x, idx, w), _eager(looked_up, x, idx, w),
                               rtol=1e-5, atol=1e-6)
    for p in shared.projections:  # 2**bits - 1 shared values (and 0) per matrix or channel
        for e in range(experts.num_experts):
            values = shared.looked_up_weight(p, e)
            rows = values if per_channel else values.reshape(1, -1)
            assert all(len(torch.unique(r)) <= 2 ** bits for r in rows)
    wide = shared.to_experts(torch.float64)  # biases (gpt-oss) follow the dtype asked for
    assert all(t.dtype == torch.float64 for t in wide.parameters())
    torch.testing.assert_close(_eager(wide, x.double(), idx, w.double()).float(),
                               shared(x, idx, w), rtol=1e-5, atol=1e-6)
    ref = _eager(experts, x, idx, w)  # and close to the float experts
    sqnr = 10 * torch.log10(ref.pow(2).sum() / (shared(x, idx, w) - ref).pow(2).sum())
    assert sqnr > (15 if bits == 4 else 25), float(sqnr)


@pytest.mark.parametrize("transposed", [False, True])
def test_a_centroid_gets_the_sum_of_its_weights_gradients(transposed):
    experts = _ToyExperts(transposed=transposed, bias=True)
    shared = SharedExperts.from_experts(experts, bits=3, iters=10)
    looked_up = shared.to_experts()  # float weights = the looked-up ones, trainable
    x = torch.randn(11, 24)
    idx, w = _routing(11, 5)
    shared(x, idx, w).pow(2).sum().backward()
    looked_up(x, idx, w).pow(2).sum().backward()
    for p in shared.projections:
        codebook_grad = getattr(shared, f"{p}_codebook").grad
        weight_grad = getattr(looked_up, p).grad
        for e in range(5):
            g = weight_grad[e].t() if transposed else weight_grad[e]
            index = unpack_indices(getattr(shared, f"{p}_indices")[e], g.shape[1], 3)
            summed = torch.zeros(8).index_add_(0, index.reshape(-1), g.reshape(-1).float())
            torch.testing.assert_close(codebook_grad[e, 1:], summed[1:], rtol=1e-4, atol=1e-5)


def test_share_weights_takes_the_experts_pruned_or_not():
    model = _model("mixtral")
    fastkd.sparsify_(model, 0.5, filter_fn=lambda m, name: "layers.0." in name)
    pruned = model.model.layers[0].mlp.experts
    assert isinstance(pruned, MaskedExperts)
    masks = {p: getattr(pruned, f"{p}_mask").clone() for p in pruned.projections}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "left float" warning any more
        report = fastkd.share_weights_(model, bits=4, iters=10,
                                       filter_fn=lambda m, name: "experts" in name)
    for i, layer in enumerate(model.model.layers):
        shared = layer.mlp.experts
        assert isinstance(shared, SharedExperts)
        name = f"model.layers.{i}.mlp.experts"
        before, after = report["layers"][name]
        assert after < before / 5  # 4-bit indices against fp32 weights
    shared = model.model.layers[0].mlp.experts
    for p, mask in masks.items():  # Deep Compression's order: pruned weights stay exactly zero
        for e in range(shared.num_experts):
            assert bool((shared.looked_up_weight(p, e)[~mask[e]] == 0).all())


def test_checkpoint_dtype_and_calibration(tmp_path):
    model = _model("mixtral")
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(3))
    with pytest.warns(UserWarning, match="calibration never ran"):
        report = fastkd.share_weights_(model, bits=4, iters=10,
                                       calibration=[ids], filter_fn=lambda m, n: "mlp" in n)
    assert "model.layers.0.mlp.experts" in report["uncalibrated"]  # routed inputs: rounding
    fresh, ref = _reloaded(model, ids, tmp_path, SharedExperts)
    half = copy.deepcopy(fresh).to(torch.bfloat16)
    experts = half.model.layers[0].mlp.experts
    assert experts.gate_up_proj_codebook.dtype == torch.float32  # the op needs fp32 codebooks
    with torch.no_grad():
        out = half(ids).logits.float()
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.99


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_shared_experts_bf16_run_the_shared_linear_kernel():
    experts = _ToyExperts(n_experts=8, hidden=1000, inner=1403, bias=True).cuda()
    shared = SharedExperts.from_experts(experts, bits=4, iters=10).to(torch.bfloat16)
    x = torch.randn(300, 1000, device="cuda", dtype=torch.bfloat16)
    idx, w = (t.cuda() for t in _routing(300, 8))
    out = shared(x, idx, w)
    ref = shared.to_experts(torch.float64)(x.double(), idx, w.double())
    rel = ((out.double() - ref).norm() / ref.norm()).item()
    assert out.dtype == torch.bfloat16 and rel < 1e-2, rel


def test_indices_that_are_not_codes_are_refused_on_load():
    shared = SharedExperts.from_experts(_ToyExperts(), bits=3)
    good = shared.state_dict()
    fresh = copy.deepcopy(shared)
    fresh.load_state_dict(good)
    for bad in (good["gate_up_proj_indices"].float(), good["gate_up_proj_indices"] | 0x80):
        with pytest.raises(RuntimeError, match="gate_up_proj_indices"):
            fresh.load_state_dict({**good, "gate_up_proj_indices": bad})
