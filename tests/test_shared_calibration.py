"""Calibrated weight sharing: share_weights_(..., calibration=...) picks indices for output error.

The codebook is k-means over the weights either way; with calibration inputs the indices are
chosen GPTQ-style (fastkd.sharing.calibrated_assign). Tests: held-out output error against plain
nearest-centroid rounding, the damp -> infinity limit, pruned zeros, every calibration form, the
train/eval flags, layers the calibration never reaches, GPT-2's Conv1D, bad inputs.
"""

import warnings
from collections import UserDict

import pytest
import torch
from torch import nn

import fastkd
from fastkd.nn import SharedLinear
from fastkd.sharing import calibrated_assign


def _correlated_inputs(k, n, seed):
    """Inputs with strongly correlated channels of very different scales (as real activations)."""
    g = torch.Generator().manual_seed(100)  # one mixing for every draw: one distribution
    mix = torch.randn(k, k, generator=g) * (torch.rand(k, generator=g) ** 3)[:, None]
    scale = torch.logspace(-1, 1, k)[torch.randperm(k, generator=g)]
    z = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    return (z @ mix + 0.05 * z) * scale


def _linear(n, k, prune=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * 0.1)
        if prune:
            lin.weight.mul_(torch.rand(n, k, generator=g) > prune)
    return lin


def _output_error(shared, lin, x):
    with torch.no_grad():
        return (shared(x) - lin(x)).pow(2).sum().item()


@pytest.mark.parametrize("bits, per_channel", [(3, True), (4, True), (3, False), (4, False)])
def test_calibrated_indices_cut_the_held_out_output_error(bits, per_channel):
    n, k = 37, 53
    lin = _linear(n, k, prune=0.2)
    x_cal, x_test = _correlated_inputs(k, 600, seed=1), _correlated_inputs(k, 600, seed=2)
    plain = SharedLinear.from_linear(lin, bits=bits, per_channel=per_channel)
    calib = SharedLinear.from_linear(lin, bits=bits, per_channel=per_channel,
                                     input_moment=x_cal.double().T @ x_cal.double() / len(x_cal))
    # same codebook: only the indices differ
    torch.testing.assert_close(calib.codebook, plain.codebook, rtol=0, atol=0)
    assert not torch.equal(calib.indices, plain.indices)
    e_plain, e_calib = _output_error(plain, lin, x_test), _output_error(calib, lin, x_test)
    assert e_calib < 0.8 * e_plain, (e_calib, e_plain)
    # the weight error grows: the indices trade it for output error
    w = lin.weight.detach()
    assert (calib.dequantized_weight() - w).norm() > (plain.dequantized_weight() - w).norm()


@pytest.mark.parametrize("per_channel", [True, False])
def test_huge_damping_gives_back_nearest_centroid_rounding(per_channel):
    lin = _linear(29, 41, prune=0.3, seed=3)
    x = _correlated_inputs(41, 300, seed=4)
    plain = SharedLinear.from_linear(lin, bits=4, per_channel=per_channel)
    calib = SharedLinear.from_linear(lin, bits=4, per_channel=per_channel,
                                     input_moment=x.T @ x / len(x), damp=1e12)
    assert torch.equal(calib.indices, plain.indices)


def test_pruned_weights_stay_zero_and_take_index_zero():
    lin = _linear(31, 45, prune=0.5, seed=5)
    x = _correlated_inputs(45, 200, seed=6)
    h = x.T @ x / len(x)
    w = lin.weight.detach()
    cent = torch.linspace(-0.3, 0.3, 15)[None]
    idx = calibrated_assign(w, cent, h, w != 0)
    assert ((idx == -1) == (w == 0)).all()
    assert idx.max() < 15
    shared = SharedLinear.from_linear(lin, bits=4, input_moment=h)
    assert (shared.dequantized_weight()[w == 0] == 0).all()
    assert (shared.dequantized_weight()[w != 0] != 0).all()


def test_dead_input_channels_and_a_singular_moment_are_handled():
    lin = _linear(17, 23, seed=7)
    x = _correlated_inputs(23, 5, seed=8)  # rank 5 < 23
    x[:, 3] = 0.0  # an input that is always zero
    shared = SharedLinear.from_linear(lin, bits=4, per_channel=True, input_moment=x.T @ x / 5)
    assert torch.isfinite(shared.dequantized_weight()).all()
    # on the inputs it saw, the calibrated layer beats plain rounding
    plain = SharedLinear.from_linear(lin, bits=4, per_channel=True)
    assert _output_error(shared, lin, x) < _output_error(plain, lin, x)


class _Net(nn.Module):
    def __init__(self, k=21):
        super().__init__()
        self.a = nn.Linear(k, 33)
        self.b = nn.Linear(33, 19)
        self.unused = nn.Linear(19, 7)
        self.drop = nn.Dropout(0.5)

    def forward(self, x, scale=1.0):
        return self.b(self.drop(torch.relu(self.a(x * scale))))


def _batches():
    return [_correlated_inputs(21, 40, seed=s) for s in range(3)]


@pytest.mark.parametrize("form", ["callable", "tensors", "tuples", "nested", "dicts", "mappings"])
def test_every_calibration_form_gives_the_same_model(form):
    torch.manual_seed(0)
    ref_net = _Net().train()
    batches = _batches()
    forms = {
        "callable": lambda m: [m(b) for b in batches],
        "tensors": batches,
        # a training loader's (inputs, target) batches: the target is not passed to the model
        "tuples": [(b, torch.zeros(len(b))) for b in batches],
        "nested": [((b, 1.0), torch.zeros(len(b))) for b in batches],
        "dicts": [{"x": b, "scale": 1.0, "labels": torch.zeros(len(b))} for b in batches],
        # a tokenizer's BatchEncoding is a UserDict, not a dict
        "mappings": [UserDict({"x": b, "scale": 1.0}) for b in batches],
    }
    net = _Net()
    net.load_state_dict(ref_net.state_dict())
    net.train()
    with pytest.warns(UserWarning, match="never ran 1 layer.*unused"):
        report = fastkd.share_weights_(net, bits=3, per_channel=True, calibration=forms[form])
    assert report["uncalibrated"] == ["unused"]
    assert net.training and net.drop.training  # flags restored (calibration ran in eval mode)
    assert all(isinstance(getattr(net, n), SharedLinear) for n in ("a", "b", "unused"))
    # the same as building each layer from the moments of its float inputs
    xs = torch.cat(batches)
    with torch.no_grad():
        h_a = xs.double().T @ xs.double() / len(xs)
        hid = torch.relu(ref_net.a(xs)).double()
        h_b = hid.T @ hid / len(hid)
    for name, h in (("a", h_a), ("b", h_b)):
        want = SharedLinear.from_linear(getattr(ref_net, name), bits=3, per_channel=True,
                                        input_moment=h)
        assert torch.equal(getattr(net, name).indices, want.indices), name
    plain = SharedLinear.from_linear(ref_net.unused, bits=3, per_channel=True)
    assert torch.equal(net.unused.indices, plain.indices)


def test_calibration_helps_a_small_network_end_to_end():
    torch.manual_seed(1)
    ref_net = _Net().eval()
    plain, calib = _Net().eval(), _Net().eval()
    plain.load_state_dict(ref_net.state_dict())
    calib.load_state_dict(ref_net.state_dict())
    fastkd.share_weights_(plain, bits=3, per_channel=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fastkd.share_weights_(calib, bits=3, per_channel=True, calibration=_batches())
    x = _correlated_inputs(21, 500, seed=9)  # held out
    with torch.no_grad():
        y = ref_net(x)
        e_plain = (plain(x) - y).pow(2).mean()
        e_calib = (calib(x) - y).pow(2).mean()
    assert e_calib < 0.8 * e_plain, (e_calib, e_plain)


def test_gpt2_conv1d_layers_are_calibrated():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=24, vocab_size=53, n_positions=16,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(2)
    ref = transformers.GPT2LMHeadModel(cfg).eval()
    plain = transformers.GPT2LMHeadModel(cfg).eval()
    calib = transformers.GPT2LMHeadModel(cfg).eval()
    plain.load_state_dict(ref.state_dict())
    calib.load_state_dict(ref.state_dict())
    keep_head = lambda m, n: n != "lm_head"  # noqa: E731 (tied to the embedding)
    ids = torch.randint(0, 53, (6, 16), generator=torch.Generator().manual_seed(3))
    fastkd.share_weights_(plain, bits=3, per_channel=True, filter_fn=keep_head)
    report = fastkd.share_weights_(calib, bits=3, per_channel=True, filter_fn=keep_head,
                                   calibration=[ids[:3]])
    assert report["uncalibrated"] == []
    assert len(report["layers"]) == 4  # c_attn, c_proj, c_fc, mlp.c_proj
    with torch.no_grad():
        y = ref(ids[3:]).logits
        e_plain = (plain(ids[3:]).logits - y).pow(2).mean()
        e_calib = (calib(ids[3:]).logits - y).pow(2).mean()
    assert torch.isfinite(e_calib) and e_calib < e_plain, (e_calib, e_plain)


def test_bad_calibration_inputs():
    net = _Net()
    x = _batches()[0]
    with pytest.raises(TypeError, match="bare tensor"):
        fastkd.share_weights_(net, calibration=x)
    with pytest.raises(TypeError, match="callable"):
        fastkd.share_weights_(net, calibration=5)
    for damp in (0.0, -1.0, float("inf"), float("nan"), True):
        with pytest.raises(ValueError, match="damp"):
            fastkd.share_weights_(_Net(), calibration=lambda m: 1 / 0, damp=damp)
    bad = x.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="not finite"):
        fastkd.share_weights_(_Net(), calibration=[bad])
    lin = _linear(5, 7)
    with pytest.raises(ValueError, match="moment must be"):
        SharedLinear.from_linear(lin, input_moment=torch.eye(6))
    with pytest.raises(ValueError, match="cent must be"):
        calibrated_assign(lin.weight, torch.zeros(3, 4), torch.eye(7), lin.weight != 0)
    # nothing was replaced by the failed calls
    assert all(type(getattr(net, n)) is nn.Linear for n in ("a", "b", "unused"))


def test_a_bad_later_layer_leaves_the_model_untouched():
    net = _Net()
    with torch.no_grad():
        net.a.weight.mul_(1e20)  # a's inputs are fine; its outputs square to inf in b's moment
    with pytest.raises(ValueError, match="'b'.*not finite"):
        fastkd.share_weights_(net, calibration=_batches())
    assert all(type(getattr(net, n)) is nn.Linear for n in ("a", "b", "unused"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_batches_calibrate_a_gpu_model():
    torch.manual_seed(8)
    net = _Net().cuda()
    ref = _Net()
    ref.load_state_dict({k: v.cpu() for k, v in net.state_dict().items()})
    batches = _batches()
    with pytest.warns(UserWarning, match="never ran"):
        fastkd.share_weights_(net, bits=3, per_channel=True, calibration=batches)
    with pytest.warns(UserWarning, match="never ran"):
        fastkd.share_weights_(ref, bits=3, per_channel=True, calibration=batches)
    # float64 on two devices: the same indices up to rounding near a few cluster boundaries
    same = net.a.indices.cpu() == ref.a.indices
    assert same.float().mean() > 0.95


def test_calibration_reads_an_input_passed_by_name():
    """A linear called as lin(input=x) raised IndexError in the calibration hook."""
    from torch import nn

    class ByName(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(5, 5)

        def forward(self, x):
            return self.a(input=x)

    torch.manual_seed(0)
    by_name, by_position = ByName(), nn.Sequential(nn.Linear(5, 5))
    by_position[0].load_state_dict(by_name.a.state_dict())
    batches = [torch.randn(16, 5)]
    fastkd.share_weights_(by_name, bits=2, calibration=batches)
    fastkd.share_weights_(by_position, bits=2, calibration=batches)
    assert torch.equal(by_name.a.indices, by_position[0].indices)


@pytest.mark.parametrize("per_channel", [True, False])
def test_block_size_does_not_change_the_calibrated_indices(per_channel):
    # Columns are rounded in blocks of `block`, each block's error pushed onto the later columns
    # by one rank-`block` update (w[:, b1:] -= err @ u[b0:b1, b1:]). Every other test has
    # K < 128 (one block, where only the in-block updates run): with several blocks, any block
    # size gives the indices of a single block holding every column.
    g = torch.Generator().manual_seed(0)
    w = torch.randn(31, 40, generator=g) * 0.1
    w[w.abs() < 0.01] = 0.0  # a few pruned weights
    x = _correlated_inputs(40, 200, seed=1)
    h = x.T @ x / len(x)
    cent = torch.linspace(-0.3, 0.3, 15)[None]
    if per_channel:
        cent = cent * torch.linspace(0.5, 1.5, 31)[:, None]
    keep = w != 0
    one_block = calibrated_assign(w, cent, h, keep, block=128)
    nearest = calibrated_assign(w, cent, h, keep, damp=1e12)
    assert (one_block != nearest).sum() > 20  # the error feedback matters on these inputs
    for block in (1, 8, 16):
        assert torch.equal(calibrated_assign(w, cent, h, keep, block=block), one_block), block


def test_weighted_kmeans_centroids_are_the_weighted_means_of_their_clusters():
    # kmeans_1d(weight=) sorts each row and must carry every entry's weight along with its
    # value: at convergence each centroid is the weighted mean of the (unsorted) entries
    # assigned to it, a weighted Lloyd fixed point, checked here in float64 on uneven weights.
    from fastkd.sharing import kmeans_1d

    g = torch.Generator().manual_seed(0)
    v = torch.randn(3, 60, generator=g)
    weight = torch.rand(3, 60, generator=g) ** 4 * 10
    weight[:, ::7] = 0.0  # entries that do not count
    cent, assign = kmeans_1d(v, 5, weight=weight, iters=1000)
    v64, w64 = v.double(), weight.double()
    checked = 0
    for r in range(3):
        for j in range(5):
            mine = assign[r] == j
            total = w64[r][mine].sum()
            if total > 0:
                mean = (w64[r][mine] * v64[r][mine]).sum() / total
                assert abs(cent[r, j].item() - mean.item()) <= 1e-5, (r, j)
                checked += 1
    assert checked >= 12
    # unit weights are the unweighted fit
    ones = kmeans_1d(v, 5, weight=torch.ones_like(v), iters=1000)
    unweighted = kmeans_1d(v, 5, iters=1000)
    assert torch.equal(ones[0], unweighted[0]) and torch.equal(ones[1], unweighted[1])
