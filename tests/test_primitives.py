import pytest
import torch

from quantkit.primitives import choose_scales, dequantize, fake_quantize, qrange, quantize, quantize_dequantize


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (8, None), (4, None), (2, 16)])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_roundtrip_error_within_half_a_step(bits, group, scale_dtype):
    x = torch.randn(16, 128, generator=torch.Generator().manual_seed(0)) * 3
    scales = choose_scales(x, bits, group, scale_dtype)
    q = quantize(x, scales, bits, group)
    qmin, qmax = qrange(bits)
    assert q.dtype == torch.int8 and int(q.min()) >= qmin and int(q.max()) <= qmax
    err = (dequantize(q, scales, group) - x).abs()
    step = scales.float().repeat_interleave(group or 128, dim=-1)
    # every value within half a step (bf16-rounded scales may clip the extreme by < 1% of a step)
    assert torch.all(err <= step * 0.5 * (1 + 2**-7) + 1e-6)
    # and the grid is used: the largest magnitude of each group lands on +-qmax
    assert torch.all(q.reshape(16, -1, group or 128).abs().amax(-1) >= qmax - 1)


def test_symmetric_int4_scale_is_amax_over_7():
    x = torch.tensor([[0.0] * 31 + [-3.5]])
    scales = choose_scales(x, 4, 32)
    assert scales.item() == pytest.approx(0.5)
    assert quantize(x, scales, 4, 32)[0, -1].item() == -7


def test_all_zero_group_stays_zero():
    x = torch.zeros(2, 32)
    assert torch.equal(quantize_dequantize(x, 4, 32), x)


def test_group_size_must_divide():
    with pytest.raises(ValueError):
        choose_scales(torch.randn(2, 48), 4, 32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_quantize_forward_equals_quant_dequant_and_passes_gradients(dtype):
    x = (torch.randn(8, 64, generator=torch.Generator().manual_seed(2))).to(dtype).requires_grad_()
    y = fake_quantize(x, 4, 32)
    assert y.dtype == dtype
    assert torch.equal(y.detach(), quantize_dequantize(x.detach(), 4, 32).to(dtype))
    assert not torch.equal(y.detach(), x.detach())  # it did quantize
    weights = torch.randn(8, 64).to(dtype)
    (y * weights).sum().backward()
    assert torch.equal(x.grad, weights)  # straight-through: d y / d x = identity
