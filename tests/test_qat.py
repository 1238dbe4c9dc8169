"""QAT by module swap: the fake-quantized forward is the packed model's forward; STE gradients."""

import copy

import pytest
import torch

from quantkit.errors import QuantkitError
from quantkit.modules import InputTransform, Int4Linear, Int8Embedding, Int8Linear
from quantkit.primitives import choose_scales, quantize_dequantize
from quantkit.scheme import Scheme, WeightClip
from quantkit.training.loops import train
from quantkit.training.lora import add_lora, lora_parameters
from quantkit.training.qat import (SCALE_LR_RATIO, QATEmbedding, QATLinear, convert_qat, grid_lr_ratios,
                                   prepare_qat, scale_lr_ratios, trainable_parameters)
from quantkit.training.records import Tokenized, collate
from quantkit.training.sft import sft_loss


@pytest.fixture(params=["reference", "auto"])
def backend(request, monkeypatch):
    monkeypatch.setenv("QUANTKIT_KERNEL", request.param)
    return request.param


def test_prepare_qat_swaps_every_quantized_module(tiny):
    plan = prepare_qat(tiny, Scheme())
    assert len(plan.modules) == 2 * 7 + 2
    assert all(isinstance(tiny.get_submodule(n), QATLinear) for n in plan.modules if "layers" in n)
    assert isinstance(tiny.lm_head, QATLinear) and tiny.lm_head.group_size is None and tiny.lm_head.weight_bits == 8
    assert isinstance(tiny.model.embed_tokens, QATEmbedding)
    assert tiny.lm_head.weight is not tiny.model.embed_tokens.weight  # untied first


@pytest.mark.parametrize(("scheme", "learn_scales"), [
    (Scheme(), False), (Scheme(scale_dtype="float32", act_bits=None), False), (Scheme(weight_clip="mse"), False),
    (Scheme(weight_clip="mse"), True), (Scheme(scale_dtype="float32"), True)])
def test_fake_quantized_forward_equals_packed_model(tiny, ids, backend, scheme, learn_scales):
    prepare_qat(tiny, scheme, learn_scales)
    with torch.no_grad():
        for name, p in tiny.named_parameters():  # move off the initial weights (and scales), as training would
            noise = torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())).to(p.dtype)
            p.mul_(1 + 0.2 * noise) if name.endswith("weight_scale") else p.add_(noise * 0.01)
        fake = tiny(ids).logits
        convert_qat(tiny, scheme)
        assert isinstance(tiny.model.layers[0].mlp.down_proj, Int4Linear)
        assert isinstance(tiny.lm_head, Int8Linear) and isinstance(tiny.model.embed_tokens, Int8Embedding)
        packed = tiny(ids).logits
    if backend == "reference":
        assert torch.equal(fake, packed)  # the same ops on the same numbers
    else:  # the fast kernel sums in another order: bf16 activations may round (and then quantize) apart
        assert (packed.float() - fake.float()).abs().max() < 0.1 * fake.float().abs().max()
        assert torch.equal(packed.argmax(-1), fake.argmax(-1)) or (packed.float() - fake.float()).abs().mean() < 1e-2


def test_fake_quantized_forward_with_an_online_hadamard_equals_packed_model(tiny, ids, backend):
    scheme = Scheme(weight_clip="mse")
    prepare_qat(tiny, scheme, learn_scales=True)
    downs = [layer.mlp.down_proj for layer in tiny.model.layers]
    for down in downs:  # SpinQuant's R4, as qlora --qat-rotations sets it
        down.input_transform = InputTransform.HADAMARD
    with torch.no_grad():
        plain = tiny(ids).logits
        downs[0].input_transform = InputTransform.NONE
        assert not torch.equal(tiny(ids).logits, plain)  # the transform is applied
        downs[0].input_transform = InputTransform.HADAMARD
        convert_qat(tiny, scheme)
        packed = tiny(ids).logits
    assert all(layer.mlp.down_proj.input_transform is InputTransform.HADAMARD for layer in tiny.model.layers)
    assert tiny.model.layers[0].self_attn.q_proj.input_transform is InputTransform.NONE
    if backend == "reference":
        assert torch.equal(plain, packed)
    else:
        assert (packed.float() - plain.float()).abs().max() < 0.1 * plain.float().abs().max()


def test_straight_through_gradients():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 8, bias=False)
    qat = QATLinear.from_linear(lin, 4, 32, 8, torch.bfloat16)
    x = torch.randn(3, 64, requires_grad=True)
    qat(x).sum().backward()
    xq = quantize_dequantize(x.detach(), 8, None)  # per token
    wq = quantize_dequantize(lin.weight.detach(), 4, 32, torch.bfloat16)
    # y = xq wq^T with identity derivatives through both roundings:
    torch.testing.assert_close(lin.weight.grad, xq.sum(0).expand(8, 64))  # dL/dW = dL/dwq
    torch.testing.assert_close(x.grad, wq.sum(0).expand(3, 64))  # dL/dx = dL/dxq
    assert lin.weight.grad.abs().sum() > 0


def test_learned_scales_start_at_the_scheme_choice_and_get_lsq_gradients():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 3, bias=False)
    qat = QATLinear.from_linear(lin, 4, 32, None, torch.bfloat16, WeightClip.MSE)
    qat.learn_scales()
    start = choose_scales(lin.weight, 4, 32, torch.bfloat16, WeightClip.MSE)  # [3, 2]
    assert torch.equal(qat.scales(), start) and qat.weight_scale.dtype == torch.float32
    with torch.no_grad():
        qat.weight_scale.mul_(0.8)  # some codes now clip
    x = torch.randn(5, 64)
    g = torch.randn(5, 3)  # dL/dy
    (qat(x) * g).sum().backward()
    # By hand: y = x wq^T, wq = s * clamp(round(w / s), -8, 7) with s the stored (bf16) scale.
    s = qat.weight_scale.detach().to(torch.bfloat16).float().repeat_interleave(32, dim=1)  # [3, 64]
    ratio = lin.weight.detach() / s
    inside = (torch.round(ratio) >= -8) & (torch.round(ratio) <= 7)
    dwq = g.T @ x  # dL/dwq [3, 64]
    dscale = torch.where(inside, torch.round(ratio) - ratio, torch.round(ratio).clamp(-8, 7)) * dwq
    torch.testing.assert_close(qat.weight_scale.grad, dscale.reshape(3, 2, 32).sum(-1))
    torch.testing.assert_close(lin.weight.grad, torch.where(inside, dwq, torch.zeros_like(dwq)))
    assert (~inside).any() and inside.any()  # both cases were exercised


def test_one_qat_step_with_learned_scales_moves_them_at_a_tenth_of_the_lr(tiny, tmp_path):
    tiny.float()
    prepare_qat(tiny, Scheme(), learn_scales=True)
    params = dict(tiny.named_parameters())
    ratios = scale_lr_ratios(params)
    assert len(ratios) == 2 * 7 and set(ratios.values()) == {SCALE_LR_RATIO}
    scale = tiny.model.layers[0].mlp.up_proj.weight_scale
    weight = tiny.model.layers[0].mlp.up_proj.weight
    s0, w0, batch = scale.detach().clone(), weight.detach().clone(), _batch()
    before = sft_loss(tiny, batch).item()
    train("qat", params, 1, 1e-3, lambda step: sft_loss(tiny, batch), tmp_path / "p", 10, ratios)
    assert sft_loss(tiny, batch).item() < before - 0.01
    # Adam's first step moves every parameter with a gradient by about lr (times its ratio).
    assert (scale - s0).abs().max().item() == pytest.approx(1e-4, rel=0.05)
    assert (weight - w0).abs().max().item() == pytest.approx(1e-3, rel=0.05)


def test_grid_lr_moves_every_int4_linear_by_the_same_share_of_its_grid_step(tiny, tmp_path):
    tiny.float()
    with torch.no_grad():  # grid steps 30x apart, as a rotated model's v_proj and down_proj
        tiny.model.layers[0].self_attn.v_proj.weight.mul_(0.1)
        tiny.model.layers[1].mlp.down_proj.weight.mul_(3.0)
    prepare_qat(tiny, Scheme(), learn_scales=True)
    linears = {n: m for n, m in tiny.named_modules() if isinstance(m, QATLinear) and m.group_size is not None}
    medians = {n: m.scales().float().median().item() for n, m in linears.items()}
    ratios = grid_lr_ratios(tiny)
    assert set(ratios) == {f"{n}.{p}" for n in linears for p in ("weight", "weight_scale")}
    assert ratios["model.layers.1.mlp.down_proj.weight"] / ratios["model.layers.0.self_attn.v_proj.weight"] \
        == pytest.approx(medians["model.layers.1.mlp.down_proj"] / medians["model.layers.0.self_attn.v_proj"])
    for n in linears:
        assert ratios[f"{n}.weight_scale"] == pytest.approx(SCALE_LR_RATIO * ratios[f"{n}.weight"])
    params = dict(tiny.named_parameters())
    before = {n: m.weight.detach().clone() for n, m in linears.items()}
    batch = _batch()
    train("qat", params, 1, 1e-3, lambda step: sft_loss(tiny, batch), tmp_path / "p", 10, ratios)
    # Adam's first step moves each weight by lr x its ratio: the same share of every linear's grid step.
    shares = [(m.weight - before[n]).abs().max().item() / medians[n] for n, m in linears.items()]
    assert max(shares) == pytest.approx(min(shares), rel=0.05)
    assert max(medians.values()) > 20 * min(medians.values())  # without the ratios the shares differ as much


def test_embedding_gradient_reaches_only_used_rows():
    emb = torch.nn.Embedding(10, 32)
    qat = QATEmbedding.from_embedding(emb, 8, torch.bfloat16)
    qat(torch.tensor([[1, 3, 3]])).sum().backward()
    used = emb.weight.grad.abs().sum(-1) > 0
    assert used.tolist() == [i in (1, 3) for i in range(10)]
    torch.testing.assert_close(emb.weight.grad[3], torch.full((32,), 2.0))  # two uses, identity STE


def _batch():
    gen = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 256, (20,), generator=gen).tolist() for _ in range(2)]
    return collate([Tokenized(s, 8) for s in seqs], pad_id=1)


def test_frozen_backbone_gets_no_gradient_and_adapters_do(tiny):
    prepare_qat(tiny, Scheme())
    tiny.requires_grad_(False)
    add_lora(tiny, rank=4, alpha=8)
    for m in tiny.modules():  # non-zero B so that A gets a gradient too
        if hasattr(m, "lora_B"):
            torch.nn.init.normal_(m.lora_B, std=0.02)
    sft_loss(tiny, _batch()).backward()
    adapters = set(map(id, lora_parameters(tiny)))
    for name, p in tiny.named_parameters():
        if id(p) in adapters:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None and not p.requires_grad, name


def test_training_leaves_the_norm_gains_the_checkpoint_rounds_to_bf16_frozen(tiny, tmp_path):
    tiny.float()
    prepare_qat(tiny, Scheme(), learn_scales=True)
    add_lora(tiny, rank=4, alpha=8)
    params = trainable_parameters(tiny)
    everything = dict(tiny.named_parameters())
    norms = {n for n in everything if n.endswith("norm.weight")}  # 2 per block and the final one
    assert len(norms) == 2 * 2 + 1 and set(params) == set(everything) - norms
    before = {n: p.detach().clone() for n, p in everything.items()}
    batch = _batch()
    train("qat", params, 1, 1e-2, lambda step: sft_loss(tiny, batch), tmp_path / "p", 10)
    for n, p in everything.items():
        if n in norms:  # untouched, so the released bf16 gains are the ones the int4 weights trained with
            assert not p.requires_grad and torch.equal(p, before[n]), n
        elif not n.endswith("lora_A"):  # A has no gradient while B is zero
            assert not torch.equal(p, before[n]), n


def test_one_qat_step_reduces_the_loss(tiny, tmp_path):
    tiny.float()
    prepare_qat(tiny, Scheme())
    batch = _batch()
    before = sft_loss(tiny, batch).item()
    train("qat", dict(tiny.named_parameters()), 1, 1e-3, lambda step: sft_loss(tiny, batch), tmp_path / "p", 10)
    assert sft_loss(tiny, batch).item() < before - 0.01


def test_a_step_yielded_as_terms_equals_a_step_on_their_sum(tiny, tmp_path):
    # DPO yields its two terms so that their graphs are never held at once; the step must not change
    tiny.float()
    prepare_qat(tiny, Scheme())
    whole, split = tiny, copy.deepcopy(tiny)
    first, second = _batch(), collate([Tokenized(list(range(30, 54)), 0)], pad_id=1)
    summed = train("sum", dict(whole.named_parameters()), 2, 1e-3,
                   lambda step: sft_loss(whole, first) + 2 * sft_loss(whole, second), tmp_path / "a", 10)

    def terms(step: int):
        yield sft_loss(split, first)
        yield 2 * sft_loss(split, second)

    yielded = train("terms", dict(split.named_parameters()), 2, 1e-3, terms, tmp_path / "b", 10)
    assert yielded == pytest.approx(summed, rel=1e-5) and summed[1] < summed[0]
    for (n, p), q in zip(whole.named_parameters(), split.parameters()):
        assert torch.allclose(p, q, atol=1e-6), n


def test_a_nan_term_stops_the_step_before_any_update(tiny, tmp_path):
    prepare_qat(tiny.float(), Scheme())
    before = {n: p.detach().clone() for n, p in tiny.named_parameters()}

    def terms(step: int):
        yield sft_loss(tiny, _batch())  # backpropagated: gradients, but no update yet
        yield torch.tensor(float("nan"), requires_grad=True)

    with pytest.raises(QuantkitError, match="the loss became nan at step 1"):
        train("terms", dict(tiny.named_parameters()), 1, 1e-3, terms, tmp_path / "p", 10)
    assert all(torch.equal(p, before[n]) for n, p in tiny.named_parameters())
