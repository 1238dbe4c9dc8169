import pytest
import torch

from quantkit.primitives import (CLIP_MIN_RATIO, choose_scales, dequantize, fake_quantize, qrange, quantize,
                                 quantize_dequantize)
from quantkit.scheme import WeightClip


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


def _heavy_tailed(rows: int, k: int, seed: int) -> torch.Tensor:
    """Gaussian weights with a few large outliers (where clipping pays) and a few all-equal groups."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=gen)
    x = x * (1 + 6 * (torch.rand(rows, k, generator=gen) < 0.02))
    x[0, :32] = 0.25  # one group where every value sits on the amax grid point: nothing to gain
    x[1, :32] = 0.0
    return x


def _group_error(x: torch.Tensor, scales: torch.Tensor, norm: float, group: int) -> torch.Tensor:
    err = dequantize(quantize(x, scales, 4, group), scales, group) - x
    return (err.abs() ** norm).reshape(*x.shape[:-1], -1, group).sum(-1)


@pytest.mark.parametrize("clip", [WeightClip.MSE, WeightClip.LP24])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_clip_search_never_loses_to_amax_and_clips_where_it_pays(clip, scale_dtype):
    x = _heavy_tailed(64, 256, 0)
    amax = choose_scales(x, 4, 32, scale_dtype)
    searched = choose_scales(x, 4, 32, scale_dtype, clip)
    assert searched.dtype == scale_dtype and searched.shape == amax.shape
    e_amax, e_search = _group_error(x, amax, clip.norm, 32), _group_error(x, searched, clip.norm, 32)
    assert torch.all(e_search <= e_amax)  # per group, on the error the search minimizes
    assert torch.all(searched <= amax)  # it only ever clips
    assert (searched < amax).float().mean() > 0.5  # and on Gaussian-like groups it does, mostly
    assert e_search.sum() < 0.9 * e_amax.sum()
    assert searched[0, 0] == amax[0, 0]  # equal values: amax is exact, ties keep it
    assert searched[1, 0] == amax[1, 0] and torch.isfinite(searched).all()  # all-zero group: MIN_SCALE
    # the smallest candidate ratio bounds how far it clips
    assert torch.all(searched.float() >= amax.float() * CLIP_MIN_RATIO * (1 - 2**-7))


def test_clip_search_is_deterministic_and_per_group():
    x = _heavy_tailed(16, 128, 1)
    a = choose_scales(x, 4, 32, torch.bfloat16, WeightClip.MSE)
    assert torch.equal(a, choose_scales(x.clone(), 4, 32, torch.bfloat16, WeightClip.MSE))
    # a group's scale depends on that group alone: searching one group gives the same scale
    assert torch.equal(a[:, 2:3], choose_scales(x[:, 64:96], 4, None, torch.bfloat16, WeightClip.MSE))
    # and fake_quantize / quantize_dequantize take the same scales
    torch.testing.assert_close(quantize_dequantize(x, 4, 32, torch.bfloat16, WeightClip.MSE),
                               dequantize(quantize(x, a, 4, 32), a, 32), rtol=0, atol=0)
    assert torch.equal(fake_quantize(x, 4, 32, torch.bfloat16, WeightClip.MSE),
                       quantize_dequantize(x, 4, 32, torch.bfloat16, WeightClip.MSE))

