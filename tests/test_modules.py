import logging

import pytest
import torch

from quantkit import kernels
from quantkit.modules import Int4Linear, Int8Embedding, Int8Linear, Kind, plan_for, quantize_
from quantkit.primitives import choose_scales, quantize
from quantkit.scheme import Scheme


def _int_math_linear(x, codes, wscales, group):
    """Independent oracle: int8 activations x int codes, integer sums per group, then scales."""
    x2 = x.float().reshape(-1, x.shape[-1])
    xs = x2.abs().amax(-1, keepdim=True).clamp(min=1e-10) / 127  # per token
    xq = torch.round(x2 / xs).clamp(-128, 127)
    n, k = codes.shape
    out = torch.zeros(x2.shape[0], n, dtype=torch.float64)
    for g in range(k // group):
        sl = slice(g * group, (g + 1) * group)
        isum = xq[:, sl].double() @ codes[:, sl].double().T  # exact integer sums
        out += isum * wscales[:, g].double()
    return (out * xs.double()).reshape(*x.shape[:-1], n)


@pytest.fixture(params=["reference", "auto"])
def backend(request, monkeypatch):
    monkeypatch.setenv("QUANTKIT_KERNEL", request.param)
    return request.param


def test_int4_linear_equals_integer_math(backend):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(48, 96, generator=gen)
    scales = choose_scales(w, 4, 32, torch.bfloat16)
    codes = quantize(w, scales, 4, 32)
    mod = Int4Linear.from_codes(codes, scales, group_size=32, act_bits=8)
    x = torch.randn(2, 5, 96, generator=gen)
    got = mod(x)
    assert got.shape == (2, 5, 48) and got.dtype == x.dtype
    want = _int_math_linear(x, codes, scales.float(), 32)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_int8_linear_equals_integer_math(backend):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(40, 64, generator=gen)
    scales = choose_scales(w, 8, None, torch.bfloat16)
    codes = quantize(w, scales, 8)
    mod = Int8Linear.from_codes(codes, scales, act_bits=8)
    x = torch.randn(7, 64, generator=gen)
    torch.testing.assert_close(mod(x).double(), _int_math_linear(x, codes, scales.float(), 64), rtol=1e-4, atol=1e-4)


def test_weight_only_int4_linear_is_float_matmul_with_dequantized_weight():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(16, 64, generator=gen)
    scales = choose_scales(w, 4, 32)
    codes = quantize(w, scales, 4, 32)
    mod = Int4Linear.from_codes(codes, scales, group_size=32, act_bits=None)
    x = torch.randn(3, 64, generator=gen)
    deq = (codes.float().reshape(16, 2, 32) * scales.unsqueeze(-1)).reshape(16, 64)
    torch.testing.assert_close(mod(x), x @ deq.T)


def test_int8_embedding_rows():
    w = torch.randn(10, 8)
    scales = choose_scales(w, 8, None)
    emb = Int8Embedding.from_codes(quantize(w, scales, 8), scales, torch.float32)
    ids = torch.tensor([[3, 3, 9]])
    got = emb(ids)
    assert got.shape == (1, 3, 8)
    torch.testing.assert_close(got, w[ids], atol=float(scales.max()) / 2, rtol=0)


def test_quantize_swaps_every_block_linear_unties_and_quantizes_head_and_embedding(tiny, ids):
    emb_before = tiny.get_input_embeddings().weight.detach().clone()
    assert tiny.lm_head.weight is tiny.get_input_embeddings().weight  # tied to start with
    plan = quantize_(tiny, Scheme())
    kinds = [type(m) for m in tiny.modules()]
    assert kinds.count(Int4Linear) == 2 * 7 and kinds.count(Int8Linear) == 1 and kinds.count(Int8Embedding) == 1
    assert not any(type(m) is torch.nn.Linear for m in tiny.modules())
    assert plan.modules["lm_head"] is Kind.INT8_LINEAR and plan.modules["model.embed_tokens"] is Kind.INT8_EMBEDDING
    assert plan.unquantized == {} and tiny.config.tie_word_embeddings is False
    # head and embedding were quantized from the same (untied) matrix, separately
    head, emb = tiny.lm_head, tiny.model.embed_tokens
    assert head.qweight.data_ptr() != emb.qweight.data_ptr()
    torch.testing.assert_close(emb.qweight.float() * emb.scales.float(), emb_before.float(),
                               atol=float(emb.scales.float().max()) / 2 + 1e-3, rtol=0)
    assert torch.isfinite(tiny(ids).logits).all()


def test_layers_not_divisible_by_group_stay_float_with_a_warning(caplog):
    from quantkit.model import tiny_llama

    model = tiny_llama(intermediate_size=80)  # down_proj has 80 inputs: not a multiple of 32
    with caplog.at_level(logging.WARNING):
        plan = quantize_(model, Scheme())
    assert sorted(plan.unquantized) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert "model.layers.0.mlp.down_proj" in caplog.text
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert type(model.model.layers[0].mlp.up_proj) is Int4Linear


def test_plan_respects_scheme_fields(tiny):
    plan = plan_for(tiny, Scheme(group_size=64, head_bits=None, embedding_bits=None))
    assert set(plan.unquantized) == {"lm_head", "model.embed_tokens"}
    assert all(k is Kind.INT4_LINEAR for k in plan.modules.values())


def test_unknown_backend_is_a_clear_error(monkeypatch):
    from quantkit.errors import QuantkitError

    monkeypatch.setenv("QUANTKIT_KERNEL", "gpu9000")
    with pytest.raises(QuantkitError, match="QUANTKIT_KERNEL"):
        kernels.requested_backend()
