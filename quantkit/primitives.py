"""The one set of quantization primitives: symmetric, per group along the last dimension.

Used by RTN, GPTQ, QAT fake-quant and the reference kernel, so that they all agree bit for bit.

Conventions
-----------
* ``bits`` b gives the integer range ``[-2**(b-1), 2**(b-1) - 1]`` (int4: -8..7, int8: -128..127).
* The scale of a group is ``amax / qmax`` (int4: ``max|w| / 7``): the largest magnitude maps to
  ``±qmax`` exactly, nothing clips, and every value's rounding error is at most ``scale / 2``.
* ``group_size=None`` means one group spanning the whole last dimension: per-channel for a
  weight ``[out, in]``, per-token for activations ``[..., hidden]``.
* Scales are computed in float32, then stored in ``scale_dtype``; quantization always divides by
  the *stored* scale, so dequantize(quantize(x)) is what a kernel reading the stored scale sees.
"""

from __future__ import annotations

import torch

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


def choose_scales(
    x: torch.Tensor, bits: int, group_size: int | None = None, scale_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Symmetric scales of ``x [..., K]``, shape ``[..., K // group_size]``."""
    amax = _grouped(x.detach().float(), group_size).abs().amax(dim=-1)
    return (amax / qrange(bits)[1]).clamp(min=MIN_SCALE).to(scale_dtype)


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
    x: torch.Tensor, bits: int, group_size: int | None = None, scale_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """What ``x`` looks like after a round trip through ``bits``-bit codes, in float32."""
    scales = choose_scales(x, bits, group_size, scale_dtype)
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
    x: torch.Tensor, bits: int, group_size: int | None = None, scale_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Quantize-dequantize in the forward pass, identity gradient (straight-through estimator).

    The forward value equals ``quantize_dequantize(x)`` cast to ``x.dtype``, exactly.
    """
    xq = quantize_dequantize(x.detach(), bits, group_size, scale_dtype).to(x.dtype)
    return _StraightThrough.apply(x, xq)
