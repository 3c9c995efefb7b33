"""student_from_teacher: a copy of the teacher with a subset of its blocks."""

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
