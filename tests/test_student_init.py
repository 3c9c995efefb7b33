"""student_from_teacher: a copy of the teacher with a subset of its blocks."""

import warnings

import pytest
import torch
from torch import nn

from fastkd.student import student_from_teacher


def test_sequential_keeps_listed_blocks():
    torch.manual_seed(0)
    teacher = nn.Sequential(*[nn.Sequential(nn.Linear(9, 9), nn.Tanh()) for _ in range(5)])
    student = student_from_teacher(teacher, [0, 2, -1])
    assert len(student) == 3 and len(teacher) == 5
    x = torch.randn(3, 9)
    torch.testing.assert_close(student(x), teacher[4](teacher[2](teacher[0](x))))
    # a copy, not a view: training the student leaves the teacher alone
    with torch.no_grad():
        student[0][0].weight.add_(1.0)
    assert not torch.equal(student[0][0].weight, teacher[0][0].weight)


@pytest.mark.parametrize(
    "keep, exc",
    [([], ValueError), ([0, 0], ValueError), ([2, 1], ValueError), ([7], ValueError),
     ([1.0], TypeError), ("01", TypeError)],
)
def test_bad_keep_layers(keep, exc):
    teacher = nn.Sequential(*[nn.Linear(3, 3) for _ in range(4)])
    with pytest.raises(exc):
        student_from_teacher(teacher, keep)


def test_ambiguous_stack_asks_for_path():
    class TwoStacks(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])
            self.b = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])

    with pytest.raises(ValueError, match="stack="):
        student_from_teacher(TwoStacks(), [0])
    s = student_from_teacher(TwoStacks(), [0, 2], stack="b")
    assert len(s.b) == 2 and len(s.a) == 3
    with pytest.raises(ValueError):
        student_from_teacher(TwoStacks(), [0], stack="c")
    with pytest.raises(TypeError):
        student_from_teacher("x", [0])


def test_a_sequential_pipeline_around_one_model_asks_for_its_stack():
    # a SentenceTransformer is nn.Sequential(Transformer, Pooling, Normalize): keeping its
    # entries [0, 1] dropped the normalisation and kept every transformer layer, silently
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.ModuleList([nn.Linear(4, 4) for _ in range(4)])

        def forward(self, x):
            for block in self.layer:
                x = block(x)
            return x

    pipeline = nn.Sequential(Encoder(), nn.Tanh(), nn.LayerNorm(4))
    with pytest.raises(ValueError, match=r"pipeline.*stack='0.layer'"):
        student_from_teacher(pipeline, [0, 1])
    student = student_from_teacher(pipeline, [0, 2], stack="0.layer")
    assert len(student[0].layer) == 2 and len(student) == 3
    # a stack whose blocks each hold a ModuleList (experts) is still a stack of blocks
    moe = nn.Sequential(*[Encoder() for _ in range(3)])
    assert len(student_from_teacher(moe, [0, 2])) == 2
    mlp = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))  # no inner stack
    assert len(student_from_teacher(mlp, [0, 1])) == 2


transformers = pytest.importorskip("transformers")


def test_bert_every_other_layer(tmp_path):
    cfg = transformers.BertConfig(
        hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=23,
        vocab_size=41, max_position_embeddings=12,
    )
    torch.manual_seed(0)
    teacher = transformers.BertModel(cfg).eval()
    student = student_from_teacher(teacher, range(0, 4, 2)).eval()
    assert student.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 4
    assert len(student.encoder.layer) == 2 and len(teacher.encoder.layer) == 4
    for s_layer, t_idx in zip(student.encoder.layer, (0, 2)):
        t_sd = teacher.encoder.layer[t_idx].state_dict()
        for k, v in s_layer.state_dict().items():
            assert torch.equal(v, t_sd[k])
    # the same function as running the teacher's embeddings + kept layers + pooler
    ids = torch.randint(0, 41, (2, 7))
    ref = student(ids).last_hidden_state
    manual = teacher
    manual.encoder.layer = nn.ModuleList([teacher.encoder.layer[0], teacher.encoder.layer[2]])
    torch.testing.assert_close(manual(ids).last_hidden_state, ref)
    # the updated config round-trips through save_pretrained / from_pretrained
    student.save_pretrained(tmp_path)
    again = transformers.BertModel.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(again(ids).last_hidden_state, ref)


def test_llama_decoder_renumbers_cache_layers():
    cfg = transformers.LlamaConfig(
        hidden_size=16, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=23, vocab_size=41, max_position_embeddings=32,
    )
    torch.manual_seed(0)
    teacher = transformers.LlamaForCausalLM(cfg).eval()
    student = student_from_teacher(teacher, [1, 3]).eval()
    assert student.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1]
    layer_types = getattr(student.config, "layer_types", None)
    if layer_types is not None:
        assert len(layer_types) == 2
    ids = torch.randint(0, 41, (1, 6))
    with torch.no_grad():
        full = student(ids).logits
        # incremental decoding through the KV cache gives the same logits as the full pass
        out = student(ids[:, :4], use_cache=True)
        step = student(ids[:, 4:], past_key_values=out.past_key_values, use_cache=True).logits
    torch.testing.assert_close(step, full[:, 4:], rtol=1e-4, atol=1e-5)


_SMALL = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=61, pad_token_id=0)


def _causal_lm(arch, **extra):
    cfg = transformers.AutoConfig.for_model(arch, num_hidden_layers=4, **_SMALL, **extra)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def _reloads_as_itself(student, tmp_path, **inputs):
    """save_pretrained + from_pretrained give the student in memory: same layer kinds, same
    outputs."""
    student.save_pretrained(tmp_path)
    again = type(student).from_pretrained(tmp_path).eval()
    assert ([type(m).__name__ for m in again.modules()]
            == [type(m).__name__ for m in student.modules()])
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs).logits, student(**inputs).logits)


@pytest.mark.parametrize("arch,extra", [
    ("smollm3", {}),  # no_rope_layers: which layers use RoPE, one flag per layer
    # dense-MLP layers by index (mlp_only_layers) or by rule (decoder_sparse_step)
    ("qwen3_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                       head_dim=8, mlp_only_layers=[3])),
    ("qwen2_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                       shared_expert_intermediate_size=16, decoder_sparse_step=2)),
    ("deepseek_v3", dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                         first_k_dense_replace=2, kv_lora_rank=8, q_lora_rank=8,
                         qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, n_group=1,
                         topk_group=1)),
    # MoE layers by index (moe_layers, here every second layer)
    ("llama4_text", dict(num_local_experts=4, num_experts_per_tok=1, intermediate_size_mlp=48,
                         head_dim=8, interleave_moe_layer_step=2)),
])
@pytest.mark.parametrize("keep", [[0, 3], [1, 2]])
def test_per_layer_config_follows_the_kept_layers(arch, extra, keep, tmp_path):
    """Only layer_types was subset: SmolLM3's RoPE flags and the MoE configs' dense layers
    stayed the teacher's, so the student saved and loaded again was another model."""
    teacher = _causal_lm(arch, **extra)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left that the config does not describe
        student = student_from_teacher(teacher, keep).eval()
    def ffn(layer):  # Llama 4 calls it feed_forward
        return type(getattr(layer, "mlp", None) or layer.feed_forward).__name__

    assert ([ffn(layer) for layer in student.model.layers]
            == [ffn(teacher.model.layers[i]) for i in keep])
    _reloads_as_itself(student, tmp_path, input_ids=torch.randint(3, 60, (1, 7)))


@pytest.mark.parametrize("arch,stack,depth_attr", [
    ("t5", "decoder.block", "num_decoder_layers"),
    ("t5", "encoder.block", "num_layers"),
    ("bart", "model.decoder.layers", "decoder_layers"),
    ("bart", "model.encoder.layers", "encoder_layers"),
])
def test_encoder_decoder_stack_sets_its_own_sides_depth(arch, stack, depth_attr, tmp_path):
    """A decoder stack rewrote the first depth equal to its own: T5's num_layers and BART's
    encoder_layers, the encoder's (the reloaded T5 had 2 encoder blocks and a random third
    decoder block)."""
    T = transformers
    torch.manual_seed(0)
    if arch == "t5":
        teacher = T.T5ForConditionalGeneration(T.T5Config(
            vocab_size=61, d_model=24, d_ff=37, num_layers=3, num_heads=4, d_kv=6))
    else:
        teacher = T.BartForConditionalGeneration(T.BartConfig(
            vocab_size=61, d_model=24, encoder_layers=3, decoder_layers=3,
            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=32,
            decoder_ffn_dim=32))
    student = student_from_teacher(teacher.eval(), [0, 2], stack=stack).eval()
    assert getattr(student.config, depth_attr) == 2
    other = {"num_decoder_layers": "num_layers", "num_layers": "num_decoder_layers",
             "decoder_layers": "encoder_layers", "encoder_layers": "decoder_layers"}[depth_attr]
    assert getattr(student.config, other) == 3
    ids = torch.randint(3, 60, (1, 7))
    _reloads_as_itself(student, tmp_path, input_ids=ids, decoder_input_ids=ids)


@pytest.mark.parametrize("stack", ["encoder.block", "decoder.block"])
def test_t5_without_its_first_block_keeps_the_position_bias(stack, tmp_path):
    """T5 holds its relative position bias in block 0 alone: a student keeping [1, 2] had no
    position information (its encoder was permutation-invariant) and reloaded with a random
    bias table in its new block 0."""
    T = transformers
    torch.manual_seed(0)
    teacher = T.T5ForConditionalGeneration(T.T5Config(
        vocab_size=61, d_model=24, d_ff=37, num_layers=3, num_heads=4, d_kv=6)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        student = student_from_teacher(teacher, [1, 2], stack=stack).eval()
    side = stack.split(".")[0]
    attn = getattr(student, side).block[0].layer[0].SelfAttention
    source = getattr(teacher, side).block[0].layer[0].SelfAttention
    assert attn.has_relative_attention_bias
    assert torch.equal(attn.relative_attention_bias.weight, source.relative_attention_bias.weight)
    ids = torch.randint(3, 60, (1, 7))
    if side == "encoder":  # positions matter again: reversing the tokens changes the output
        rev = ids.flip(1)
        with torch.no_grad():
            a = student.encoder(input_ids=ids).last_hidden_state
            b = student.encoder(input_ids=rev).last_hidden_state.flip(1)
        assert not torch.allclose(a, b, atol=1e-5)
    _reloads_as_itself(student, tmp_path, input_ids=ids, decoder_input_ids=ids)


def test_a_config_the_kept_layers_do_not_match_gets_a_warning():
    """Jamba places its attention layers by period and offset, which a subset of layers need
    not follow: the student is right in memory, but its config builds another model."""
    teacher = _causal_lm("jamba", attn_layer_period=2, attn_layer_offset=1,
                         expert_layer_period=2, expert_layer_offset=1, num_experts=2,
                         num_experts_per_tok=1, mamba_d_state=4, mamba_d_conv=2,
                         mamba_expand=2, use_mamba_kernels=False)
    with pytest.warns(UserWarning, match="does not describe the layers it kept"):
        student = student_from_teacher(teacher, [1, 2])  # hybrid stack: found by its depth
    assert [type(b).__name__ for b in student.model.layers] == [
        "JambaAttentionDecoderLayer", "JambaMambaDecoderLayer"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        student_from_teacher(teacher, [0, 1])  # the period and offset still hold


@pytest.mark.parametrize("arch", ["distilbert", "gemma3"])
def test_no_false_warning_where_the_config_does_describe_the_student(arch, tmp_path):
    """DistilBERT's Transformer keeps its own n_layers (left at the teacher's depth); Gemma 3's
    rotary embedding derives a full-attention scaling it never uses once only sliding layers
    are kept: both made student_from_teacher warn that the config builds another model."""
    T = transformers
    torch.manual_seed(0)
    if arch == "distilbert":
        teacher = T.DistilBertModel(T.DistilBertConfig(vocab_size=61, dim=24, n_layers=3,
                                                       n_heads=4, hidden_dim=37))
    else:
        teacher = T.Gemma3ForCausalLM(T.Gemma3TextConfig(
            vocab_size=61, hidden_size=24, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=37, head_dim=6, sliding_window_pattern=2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        student = student_from_teacher(teacher.eval(), [0, 2]).eval()
    if arch == "distilbert":
        assert student.transformer.n_layers == 2 == student.config.n_layers
    ids = torch.randint(3, 60, (1, 7))
    student.save_pretrained(tmp_path)
    again = type(student).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids)[0], student(ids)[0])
