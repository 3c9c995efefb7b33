"""Bad input gets a clear error naming what is wrong, before anything is changed: cases a sweep
of the public API found answered silently (a wrong result, an unusable model) or with an
internal error."""

import pytest
import torch
from torch import nn

import fastkd
from fastkd import Distiller
from fastkd.functional import kd_loss
from fastkd.nn import AdversarialKDLoss, MaskedLinear, SharedLinear
from fastkd.prune import prune_further, structured_mask
from fastkd.reference.masked_linear import build_tile_map


def _pair():
    torch.manual_seed(0)
    return nn.Linear(6, 5), nn.Linear(6, 5)


def test_distiller_refuses_a_batch_tuple_of_three():
    """(input_ids, attention_mask, labels) from a TensorDataset: the mask was taken for the
    labels (right shape, values in range) and the labels dropped, silently."""
    teacher, student = _pair()
    d = Distiller(teacher, student, progress=False)
    x, y = torch.randn(4, 6), torch.randint(0, 5, (4,))
    with pytest.raises(ValueError, match="got 3 elements"):
        d.fit([(x, torch.ones(4, dtype=torch.long), y)])
    d.fit([(x, y)])  # the two-element form trains


def test_distiller_refuses_a_bare_tensor_loader():
    teacher, student = _pair()
    d = Distiller(teacher, student, progress=False)
    with pytest.raises(TypeError, match="bare tensor"):
        d.fit(torch.randn(4, 6))
    with pytest.raises(TypeError, match="bare tensor"):
        d.evaluate(torch.randn(4, 6))


def test_distiller_refuses_the_meta_device_and_leaves_the_models_alone():
    teacher, student = _pair()
    with pytest.raises(ValueError, match="meta"):
        Distiller(teacher, student, device="meta", progress=False)
    assert teacher.weight.device.type == "cpu" and student.weight.device.type == "cpu"


@pytest.mark.parametrize("step", ["sparsify_", "share_weights_"])
def test_float64_models_are_refused_before_any_swap(step):
    """The swaps made float64 MaskedLinear / SharedLinear layers, in place, whose every forward
    then failed."""
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).double()
    run = {"sparsify_": lambda m: fastkd.sparsify_(m, 0.5),
           "share_weights_": lambda m: fastkd.share_weights_(m, bits=4)}[step]
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        run(model)
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear]
    run(model.float())  # what the message says to do


def test_layers_refuse_float64():
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        MaskedLinear(4, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        SharedLinear(4, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        SharedLinear.from_linear(nn.Linear(4, 3).double())


def test_build_tile_map_checks_its_arguments():
    mask = torch.rand(5, 7) > 0.5
    for tile in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="tile"):
            build_tile_map(mask, tile=tile)
    with pytest.raises(TypeError, match="mask"):
        build_tile_map(None)


def test_adversarial_loss_shapes_and_empty_batches():
    adv = AdversarialKDLoss(4, hidden=8)
    with pytest.raises(ValueError, match=r"\(\.\.\., 4\)"):
        adv.generator_loss(torch.tensor(1.0))
    empty = torch.zeros(0, 4)
    assert adv.generator_loss(empty).item() == 0.0  # as a mask keeping no row; it was nan
    assert adv.discriminator_loss(empty, empty).item() == 0.0


def test_kd_loss_group_must_be_a_process_group():
    s, t = torch.randn(2, 5), torch.randn(2, 5)
    with pytest.raises(TypeError, match="ProcessGroup"):
        kd_loss(s, t, group="tp")


def test_prune_further_mask_must_match_the_weight():
    w = torch.randn(8, 16)
    for mask in (torch.ones(2, 2, dtype=torch.bool), torch.ones(16, dtype=torch.bool)):
        with pytest.raises(ValueError, match="weight's shape"):
            prune_further(w, mask, 0.5)


def test_structured_mask_dim_must_be_an_int():
    with pytest.raises(ValueError, match="dim"):
        structured_mask(torch.randn(4, 6), 0.5, dim=1.0)


@pytest.mark.parametrize("temperature", [1e-5, 2e4, 2e19])
def test_temperatures_fp32_cannot_carry_are_refused(temperature):
    """2e19 gave nan on the torch path and a number on the Triton one; 1e5 a soft term 20x off."""
    s, t = torch.randn(3, 7), torch.randn(3, 7)
    with pytest.raises(ValueError, match="temperature must lie in"):
        kd_loss(s, t, temperature=temperature)
    with pytest.raises(ValueError, match="temperature must lie in"):
        fastkd.nn.KDLoss(temperature=temperature)
    with pytest.raises(ValueError, match="temperature must lie in"):
        fastkd.teacher_topk(t, 3, temperature=temperature)


def test_register_lora_layers_model_must_be_a_module():
    peft = pytest.importorskip("peft")
    with pytest.raises(TypeError, match="nn.Module"):
        fastkd.register_lora_layers(peft.LoraConfig(r=2, target_modules="all-linear"), model=3)
