"""The one set of quantization primitives: symmetric, per group along the last dimension.

Used by RTN, GPTQ, QAT fake-quant and the reference kernel, so that they all agree bit for bit.

Conventions
-----------
* ``bits`` b gives the integer range ``[-2**(b-1), 2**(b-1) - 1]`` (int4: -8..7, int8: -128..127).
* The scale of a group is ``amax / qmax`` (int4: ``max|w| / 7``): the largest magnitude maps to
  ``±qmax`` exactly, nothing clips, and every value's rounding error is at most ``scale / 2``.
* **Clip search** (``WeightClip.MSE`` / ``LP24``, int4 weights only): the scale of each group is
  ``r · amax / qmax`` for the clip ratio ``r`` on a fixed grid (1.0 down to ``CLIP_MIN_RATIO``)
  whose round trip has the smallest ``sum |x - q|^p``. Clipping the few largest weights buys a
  finer step for all the others; ratio 1.0 (amax) is a candidate and only a strictly smaller
  error replaces it, so the search never does worse than amax on the group it measures.
* ``group_size=None`` means one group spanning the whole last dimension: per-channel for a
  weight ``[out, in]``, per-token for activations ``[..., hidden]``.
* Scales are computed in float32, then stored in ``scale_dtype``; quantization always divides by
  the *stored* scale, so dequantize(quantize(x)) is what a kernel reading the stored scale sees.
"""

from __future__ import annotations

import torch

from quantkit.scheme import WeightClip

# Smallest scale: keeps all-zero groups finite (they quantize to 0 and dequantize to 0).
MIN_SCALE = 1e-10


def qrange(bits: int) -> tuple[int, int]:
    """Signed integer range of ``bits``-bit symmetric quantization."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _grouped(x: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """View ``x [..., K]`` as ``[..., K // group_size, group_size]``."""
    k = x.shape[-1]
    gs = k if group_size is None else group_size
    if k % gs:
        raise ValueError(f"last dimension {k} is not a multiple of group size {gs}")
    return x.reshape(*x.shape[:-1], k // gs, gs)


#: clip ratios the search tries (largest first): CLIP_STEPS evenly spaced from 1.0 to CLIP_MIN_RATIO
CLIP_STEPS = 41
CLIP_MIN_RATIO = 0.6


def clip_ratios() -> list[float]:
    return [1.0 - i * (1.0 - CLIP_MIN_RATIO) / (CLIP_STEPS - 1) for i in range(CLIP_STEPS)]


def choose_scales(
    x: torch.Tensor, bits: int, group_size: int | None = None, scale_dtype: torch.dtype = torch.float32,
    clip: WeightClip = WeightClip.AMAX,
) -> torch.Tensor:
    """Symmetric scales of ``x [..., K]``, shape ``[..., K // group_size]``: amax, or searched (``clip``)."""
    xg = _grouped(x.detach().float(), group_size)  # [..., G, gs]
    amax = xg.abs().amax(dim=-1)  # [..., G]
    qmin, qmax = qrange(bits)
    best = (amax / qmax).clamp(min=MIN_SCALE).to(scale_dtype)
    norm = WeightClip(clip).norm
    if norm is None:
        return best

    def group_error(scales: torch.Tensor) -> torch.Tensor:  # [..., G]; the round trip of quantize/dequantize
        s = scales.float().unsqueeze(-1)
        return ((torch.round(xg / s).clamp(qmin, qmax) * s - xg).abs() ** norm).sum(dim=-1)

    best_err = group_error(best)
    for ratio in clip_ratios()[1:]:
        cand = (amax * ratio / qmax).clamp(min=MIN_SCALE).to(scale_dtype)  # the stored (rounded) scale
        err = group_error(cand)
        better = err < best_err  # strict: ties keep the larger scale
        best = torch.where(better, cand, best)
        best_err = torch.where(better, err, best_err)
    return best


def quantize(x: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int | None = None) -> torch.Tensor:
    """Round ``x [..., K]`` to int8 codes with ``scales [..., K // group_size]``."""
    qmin, qmax = qrange(bits)
    xg = _grouped(x.float(), group_size)
    q = torch.round(xg / scales.float().unsqueeze(-1)).clamp(qmin, qmax)
    return q.reshape(x.shape).to(torch.int8)


def dequantize(
    q: torch.Tensor, scales: torch.Tensor, group_size: int | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Integer codes ``q [..., K]`` times their group's scale, in ``dtype`` (math in float32)."""
    x = _grouped(q.float(), group_size) * scales.float().unsqueeze(-1)
    return x.reshape(q.shape).to(dtype)


def quantize_dequantize(
    x: torch.Tensor, bits: int, group_size: int | None = None, scale_dtype: torch.dtype = torch.float32,
    clip: WeightClip = WeightClip.AMAX,
) -> torch.Tensor:
    """What ``x`` looks like after a round trip through ``bits``-bit codes, in float32."""
    scales = choose_scales(x, bits, group_size, scale_dtype, clip)
    return dequantize(quantize(x, scales, bits, group_size), scales, group_size)


class _StraightThrough(torch.autograd.Function):
    """Forward: the quantized value. Backward: the incoming gradient, unchanged."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:  # noqa: ARG004
        return xq

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ARG004
        return grad, None


def fake_quantize(
    x: torch.Tensor, bits: int, group_size: int | None = None, scale_dtype: torch.dtype = torch.float32,
    clip: WeightClip = WeightClip.AMAX,
) -> torch.Tensor:
    """Quantize-dequantize in the forward pass, identity gradient (straight-through estimator).

    The forward value equals ``quantize_dequantize(x)`` cast to ``x.dtype``, exactly.
    """
    xq = quantize_dequantize(x.detach(), bits, group_size, scale_dtype, clip).to(x.dtype)
    return _StraightThrough.apply(x, xq)


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` in the forward, identity gradient."""
    return x + (torch.round(x) - x).detach()


def fake_quantize_learned(
    x: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int | None = None,
    scale_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Fake quantization with trainable ``scales [..., K // group_size]`` (LSQ-style gradients).

    The forward value is ``dequantize(quantize(x, s), s)`` for the *stored* scale
    ``s = scales.to(scale_dtype)``, in float32, exactly what :func:`quantize` and
    :func:`dequantize` compute from a checkpoint holding ``s``. Gradients: straight through both
    roundings (of ``x / s`` and of the scale to its dtype); ``x`` gets the incoming gradient where
    its code is inside the range and none where it clips, each scale ``sum (q - x / s) · grad``
    over its group's unclipped values plus ``qmin`` / ``qmax`` times the gradient of clipped ones.
    """
    qmin, qmax = qrange(bits)
    s = scales.float().clamp(min=MIN_SCALE)
    s = (s + (s.to(scale_dtype).float() - s).detach()).unsqueeze(-1)  # [..., G, 1], the stored value
    q = _round_ste(_grouped(x.float(), group_size) / s).clamp(qmin, qmax)  # [..., G, gs]
    return (q * s).reshape(x.shape)
