"""fastkd's MoE experts (Int8Experts, MaskedExperts, SharedExperts) under torch.compile.

Eager routing groups tokens by expert with sizes read on the host, which a graph cannot hold:
Dynamo broke the graph there and ``fullgraph=True`` failed. Under compile the modules now run as
one ``fastkd::stacked_experts`` op (backward: the experts' forward recomputed and differentiated).
Checked here against eager, forward and every gradient, alone and inside a transformers model.
"""

import copy

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import fastkd
from fastkd import _ops
from fastkd.nn import Int8Experts, MaskedExperts, SharedExperts

from _util import HAS_CUDA
from test_int8_experts import _model, _routing, _ToyExperts


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Every test compiles new modules through the same forward: without a reset, Dynamo's
    per-code recompile limit (8) is reached within this file."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


KINDS = {
    "int8_w8a8": lambda e: Int8Experts.from_experts(e, mode="w8a8"),
    "int8_w8a16": lambda e: Int8Experts.from_experts(e, mode="w8a16"),
    "masked": lambda e: MaskedExperts.from_experts(e, sparsity=0.5),
    "shared": lambda e: SharedExperts.from_experts(e, bits=3),
}


def _inputs(n_tokens=11, n_experts=5, hidden=24, seed=3):
    x = torch.randn(n_tokens, hidden, generator=torch.Generator().manual_seed(seed))
    idx, w = _routing(n_tokens, n_experts, seed=seed)
    return x.requires_grad_(), idx, w.requires_grad_()


def _grads(module, x, idx, w):
    """Output and the gradients of a loss on it: inputs, routing weights, every parameter."""
    for t in (x, w, *module.parameters()):
        t.grad = None
    out = module(x, idx, w)
    (out.square() * torch.linspace(-1, 2, out.shape[-1], device=out.device, dtype=out.dtype)).sum().backward()
    grads = {"x": x.grad, "w": w.grad}
    inner = getattr(module, "_orig_mod", module)  # a compiled module's names carry a prefix
    grads.update({n: p.grad for n, p in inner.named_parameters()})
    return out.detach(), grads


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_fullgraph_compile_matches_eager_forward_and_backward(kind, transposed):
    experts = KINDS[kind](_ToyExperts(bias=True, transposed=transposed))
    x, idx, w = _inputs()
    want, want_grads = _grads(experts, x, idx, w)
    counter = CompileCounterWithBackend("aot_eager")
    got, got_grads = _grads(torch.compile(experts, backend=counter, fullgraph=True), x, idx, w)
    assert counter.frame_count == 1
    torch.testing.assert_close(got, want)
    assert want_grads.keys() == got_grads.keys()
    for name, g in want_grads.items():
        if g is None:  # int8 codes, masks: no gradient either way
            assert got_grads[name] is None, name
        else:
            torch.testing.assert_close(got_grads[name], g, msg=name)
    # what trains did get a gradient (the test would pass on all-None otherwise)
    assert want_grads["x"] is not None and want_grads["w"] is not None


def test_inductor_compile_with_dynamic_token_counts():
    experts = KINDS["masked"](_ToyExperts(bias=True))
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(experts, backend=counter, fullgraph=True, dynamic=True)
    for n in (9, 17, 4):
        x, idx, w = _inputs(n_tokens=n, seed=n)
        torch.testing.assert_close(compiled(x, idx, w), experts(x, idx, w))
    assert counter.frame_count == 1  # one graph for every token count


@pytest.mark.parametrize("kind", ["int8_w8a8", "masked"])
def test_opcheck(kind):
    experts = KINDS[kind](_ToyExperts(bias=True))
    x, idx, w = _inputs(n_tokens=6)
    state = _ops.experts_state(experts)
    args = (x, idx, w, state, experts._live_token, None)
    torch.library.opcheck(torch.ops.fastkd.stacked_experts.default, args)
    torch.library.opcheck(torch.ops.fastkd.stacked_experts.default,
                          (x.detach(), idx, w.detach(), state, experts._live_token, None))
    grad = torch.randn(6, 24)
    needs = [True, True] + [t.is_floating_point() for t in state]
    torch.library.opcheck(torch.ops.fastkd.stacked_experts_backward.default,
                          (grad, x.detach(), idx, w.detach(), state, experts._live_token, None,
                           needs))


def test_second_derivative_through_the_op_raises():
    experts = KINDS["masked"](_ToyExperts(bias=True))
    x, idx, w = _inputs(n_tokens=6)
    out = torch.ops.fastkd.stacked_experts(x, idx, w, _ops.experts_state(experts),
                                           experts._live_token, None)
    (gx,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="no second derivative"):
        gx.sum().backward()


def test_a_copy_runs_its_own_weights_under_compile():
    experts = KINDS["masked"](_ToyExperts(bias=True))
    twin = copy.deepcopy(experts)
    with torch.no_grad():
        twin.down_proj_bias.add_(1.0)
    assert twin._live_key != experts._live_key
    x, idx, w = _inputs()
    compiled = torch.compile(twin, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, idx, w), twin(x, idx, w))
    assert not torch.allclose(twin(x, idx, w), experts(x, idx, w))


def test_a_graph_whose_module_is_gone_raises_clearly():
    experts = KINDS["int8_w8a16"](_ToyExperts())
    x, idx, w = _inputs()
    key, state = experts._live_token, _ops.experts_state(experts)
    del experts
    import gc

    gc.collect()
    with pytest.raises(RuntimeError, match="no longer exists"):
        torch.ops.fastkd.stacked_experts(x.detach(), idx, w.detach(), state, key, None)


def test_jit_trace_is_refused():
    """A trace would replay one batch's routing on every other batch."""
    experts = KINDS["int8_w8a8"](_ToyExperts())
    x, idx, w = _inputs()
    with pytest.raises(RuntimeError, match="torch.jit.trace"):
        torch.jit.trace(experts, (x.detach(), idx, w.detach()), check_trace=False)


def test_compile_under_autocast_matches_eager_autocast():
    experts = KINDS["shared"](_ToyExperts(bias=True))
    x, idx, w = _inputs()
    compiled = torch.compile(experts, backend="aot_eager", fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, want_grads = _grads(experts, x, idx, w)
        got, got_grads = _grads(compiled, x, idx, w)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want)
    for name, g in want_grads.items():
        if g is not None:
            torch.testing.assert_close(got_grads[name], g, msg=name)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_a_compressed_transformers_moe_model_compiles_whole(arch):
    model = _model(arch, intermediate=37)
    fastkd.quantize_(model, mode="w8a16", filter_fn=lambda m, name: "experts" in name)
    assert any(isinstance(m, Int8Experts) for m in model.modules())
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
        got = torch.compile(model, backend="aot_eager", fullgraph=True)(ids).logits
    torch.testing.assert_close(got, want)


def test_a_pruned_moe_model_trains_under_compile_as_in_eager():
    model = _model("qwen3_moe", intermediate=37).train()
    fastkd.sparsify_(model, sparsity=0.5, filter_fn=lambda m, name: "experts" in name)
    experts = [m for m in model.modules() if isinstance(m, MaskedExperts)]
    assert experts
    twin = copy.deepcopy(model)
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(1))
    model(ids, labels=ids).loss.backward()
    torch.compile(twin, backend="aot_eager", fullgraph=True)(ids, labels=ids).loss.backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        if p.grad is None:
            assert q.grad is None, name
        else:
            torch.testing.assert_close(q.grad, p.grad, msg=name, atol=1e-5, rtol=1e-4)
    # pruned expert weights got exactly zero gradient in the compiled step too
    for m in (m for m in twin.modules() if isinstance(m, MaskedExperts)):
        for p in m.projections:
            assert not getattr(m, p).grad[~getattr(m, f"{p}_mask")].any()


def test_export_runs_in_the_process_with_dynamic_token_counts():
    experts = KINDS["int8_w8a16"](_ToyExperts(bias=True))
    x, idx, w = (t.detach() for t in _inputs(n_tokens=7))
    tokens = torch.export.Dim("tokens")
    program = torch.export.export(experts, (x, idx, w),
                                  dynamic_shapes=({0: tokens}, {0: tokens}, {0: tokens}))
    assert any(n.target == torch.ops.fastkd.stacked_experts.default
               for n in program.graph.nodes)
    x, idx, w = (t.detach() for t in _inputs(n_tokens=12, seed=5))
    torch.testing.assert_close(program.module()(x, idx, w), experts(x, idx, w))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_gpu_inductor_matches_eager_bf16(kind):
    experts = KINDS[kind](_ToyExperts(n_experts=8, hidden=1000, inner=1403, bias=True)).cuda()
    experts = experts.to(torch.bfloat16)
    x = torch.randn(300, 1000, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    idx, w = (t.cuda() for t in _routing(300, 8))
    w = w.to(torch.bfloat16).requires_grad_()
    want, want_grads = _grads(experts, x, idx, w)
    got, got_grads = _grads(torch.compile(experts, fullgraph=True), x, idx, w)
    torch.testing.assert_close(got, want)
    for name, g in want_grads.items():
        if g is not None:
            torch.testing.assert_close(got_grads[name], g, msg=name)


# ------------------------------------------------------------------------------------------
# What the op's backward (a re-run of the experts' forward) cannot reproduce runs eagerly
# instead: a graph break (fullgraph=True raises), with eager's results.


def _eager_and_compiled(make, x, idx, w):
    """Outputs and gradients of two equal modules from ``make()``: eager, compiled (no
    fullgraph: the eager loop is traced around)."""
    a, b = make(), make()
    b.load_state_dict(a.state_dict())
    return _grads(a, x, idx, w), _grads(torch.compile(b, backend="aot_eager"), x, idx, w)


def test_dropout_in_training_runs_eagerly():
    """The re-run drew other dropout masks: gradients of another function than the output."""
    def make():
        source = _ToyExperts(bias=True)
        source.act_fn = torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.SiLU())
        return KINDS["masked"](source).train()

    assert make()._eager_reason() and make().eval()._eager_reason() is None
    x, idx, w = _inputs()
    c = torch.linspace(-1, 2, 24)
    for module in (make(), torch.compile(make(), backend="aot_eager")):
        w.grad = None
        out = module(x, idx, w)
        (out * c).sum().backward()
        # d sum(out * c) / d w[t, s] is c . h[t, s], so w . grad sums back to the output
        torch.testing.assert_close((w.detach() * w.grad).sum(-1), (out.detach() * c).sum(-1))


def test_hooks_on_the_experts_children_see_what_eager_shows_them():
    seen = []
    x, idx, w = _inputs()
    for compiled in (False, True):
        experts = KINDS["int8_w8a16"](_ToyExperts(bias=True))
        experts.act_fn.register_forward_hook(lambda m, i, o: seen.append(o))
        assert experts._eager_reason()
        module = torch.compile(experts, backend="aot_eager") if compiled else experts
        seen.clear()
        out = module(x, idx, w)
        n_forward = len(seen)
        (out.sum() + sum(h.square().sum() for h in seen)).backward()
        assert all(h.requires_grad for h in seen[:n_forward])  # an auxiliary loss trains
        assert len(seen) == n_forward  # and the hook did not run again in backward


def test_a_data_parallel_replica_runs_eagerly():
    experts = KINDS["masked"](_ToyExperts(bias=True))
    replica = experts._replicate_for_data_parallel()
    assert experts._eager_reason() is None and "replica" in replica._eager_reason()
    x, idx, w = (t.detach() for t in _inputs())
    with pytest.raises(Exception, match="DataParallel replica"):  # fullgraph names why
        torch.compile(replica, backend="aot_eager", fullgraph=True)(x, idx, w)


def test_peft_lora_on_the_experts_weights_trains_as_in_eager():
    """peft parametrizes the experts' weights for the length of a forward, with adapter
    parameters the op did not see: the adapters got no gradient under compile."""
    peft = pytest.importorskip("peft")
    model = _model("qwen3_moe", intermediate=37).train()
    fastkd.sparsify_(model, sparsity=0.5, filter_fn=lambda m, name: "experts" in name)
    try:
        config = peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False,
                                 target_parameters=["mlp.experts.down_proj"])
        wrapped = peft.get_peft_model(model, config)
    except (TypeError, ValueError) as e:  # a peft without target_parameters
        pytest.skip(f"this peft cannot put LoRA on parameters: {e}")
    twin = copy.deepcopy(wrapped)
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(1))
    wrapped(input_ids=ids, labels=ids).loss.backward()
    try:
        torch.compile(twin, backend="aot_eager")(input_ids=ids, labels=ids).loss.backward()
    except AssertionError as e:
        if "Guard failed on the same frame it was created" not in str(e):
            raise
        # torch 2.11's Dynamo, resuming after the graph break, trips on the parametrization
        # cache it guarded itself (fixed in later torch; float experts do not break the graph)
        pytest.skip(f"this torch's Dynamo fails on peft's parametrization: {str(e)[:120]}")
    lora = 0
    for (name, p), q in zip(wrapped.named_parameters(), twin.parameters()):
        if p.requires_grad:
            assert p.grad is not None and q.grad is not None, name
            torch.testing.assert_close(q.grad, p.grad, msg=name)
            lora += "experts" in name
    assert lora  # the experts' adapters were among them


def test_one_graph_serves_every_instance():
    """Compiled layer by layer (regional compilation), each experts module had been a
    recompile (Dynamo specialised on an int key): fullgraph failed past 8 layers."""
    counter = CompileCounterWithBackend("aot_eager")
    fn = torch.compile(lambda m, x, i, w: m(x, i, w), backend=counter, fullgraph=True)
    x, idx, w = (t.detach() for t in _inputs())
    for seed in range(10):
        torch.manual_seed(seed)
        experts = KINDS["int8_w8a16"](_ToyExperts(bias=True))
        torch.testing.assert_close(fn(experts, x, idx, w), experts(x, idx, w))
    assert counter.frame_count == 1


def test_keys_are_not_reused():
    """A graph of a module that is gone raises; it must not bind to a newer module that got
    the dead one's id."""
    keys = set()
    for _ in range(50):
        experts = KINDS["int8_w8a16"](_ToyExperts())
        keys.add(experts._live_key)
        del experts
    assert len(keys) == 50


@pytest.mark.parametrize("what", ["hidden_states", "top_k_weights", "weight"])
def test_inductor_with_non_contiguous_tensors(what):
    """The backward's fake kernel kept an input's strides, the real one returned autograd's."""
    experts = KINDS["masked"](_ToyExperts(bias=True))
    x, idx, w = _inputs()
    if what == "hidden_states":
        x = x.detach().t().contiguous().t().requires_grad_()
    elif what == "top_k_weights":
        w = w.detach().t().contiguous().t().requires_grad_()
    else:
        with torch.no_grad():
            experts.down_proj = torch.nn.Parameter(experts.down_proj.transpose(1, 2)
                                                   .contiguous().transpose(1, 2))
    want, want_grads = _grads(experts, x, idx, w)
    got, got_grads = _grads(torch.compile(experts, backend="inductor", fullgraph=True), x, idx, w)
    torch.testing.assert_close(got, want)
    for name, g in want_grads.items():
        if g is not None:
            torch.testing.assert_close(got_grads[name], g, msg=name)


def test_an_exported_program_run_in_another_process_raises(tmp_path):
    """Its module key must not match a module of the other process (keys start at random)."""
    import subprocess
    import sys
    import textwrap

    experts = KINDS["int8_w8a16"](_ToyExperts(bias=True))
    x, idx, w = (t.detach() for t in _inputs(n_tokens=7))
    torch.export.save(torch.export.export(experts, (x, idx, w)), tmp_path / "p.pt2")
    torch.save((x, idx, w), tmp_path / "inputs.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(__import__("os").path.dirname(__file__))!r})
        import fastkd
        from test_experts_compile import KINDS
        from test_int8_experts import _ToyExperts
        here = [KINDS["int8_w8a16"](_ToyExperts(bias=True)) for _ in range(5)]
        program = torch.export.load({str(tmp_path / "p.pt2")!r})
        x, idx, w = torch.load({str(tmp_path / "inputs.pt")!r})
        try:
            program.module()(x, idx, w)
            print("RAN")
        except RuntimeError as e:
            print("RAISED", e)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300)
    assert "RAISED" in out.stdout and "no longer exists" in out.stdout, out.stdout + out.stderr
