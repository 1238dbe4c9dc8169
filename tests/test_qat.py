"""QAT by module swap: the fake-quantized forward is the packed model's forward; STE gradients."""

import pytest
import torch

from quantkit.modules import Int4Linear, Int8Embedding, Int8Linear
from quantkit.primitives import quantize_dequantize
from quantkit.scheme import Scheme
from quantkit.training.loops import train
from quantkit.training.lora import add_lora, lora_parameters
from quantkit.training.qat import QATEmbedding, QATLinear, convert_qat, prepare_qat
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


@pytest.mark.parametrize("scheme", [Scheme(), Scheme(scale_dtype="float32", act_bits=None), Scheme(weight_clip="mse")])
def test_fake_quantized_forward_equals_packed_model(tiny, ids, backend, scheme):
    prepare_qat(tiny, scheme)
    with torch.no_grad():
        for p in tiny.parameters():  # move off the initial weights, as training would
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())).to(p.dtype) * 0.01)
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


def test_one_qat_step_reduces_the_loss(tiny, tmp_path):
    tiny.float()
    prepare_qat(tiny, Scheme())
    batch = _batch()
    before = sft_loss(tiny, batch).item()
    train("qat", dict(tiny.named_parameters()), 1, 1e-3, lambda step: sft_loss(tiny, batch), tmp_path / "p", 10)
    assert sft_loss(tiny, batch).item() < before - 0.01
