"""Reference kernels in pure torch: the oracle every fast kernel is tested against.

They spell out the scheme's arithmetic with the shared primitives and nothing else:
activations are quantized per token (symmetric, ``act_bits``), weights are dequantized from the
portable packed format (see :mod:`quantkit.packing`), and the product is taken in float32.
They run on any device and are slow (the weight is dequantized on every call).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from quantkit.packing import unpack_int4
from quantkit.primitives import dequantize, quantize_dequantize


def _quantize_activations(x: torch.Tensor, act_bits: int | None) -> torch.Tensor:
    """Per-token dynamic fake-quant of ``x [..., K]`` in float32 (identity when weight-only)."""
    xf = x.float()
    return xf if act_bits is None else quantize_dequantize(xf, act_bits, group_size=None)


class SidePath(NamedTuple):
    """An unmerged LoRA adapter added to a packed linear's output: ``scale * (x @ a.T) @ b.T``.

    ``a [r, K]`` and ``b [N, r]`` (bf16 in QLoRA checkpoints) see the *unquantized* input, and the
    sum is taken in float32 before the output is rounded once to ``x.dtype``.
    """

    a: torch.Tensor
    b: torch.Tensor
    scale: float

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """``scale * (x @ a.T) @ b.T`` in float32, ``[..., K] -> [..., N]`` (differentiable)."""
        return self.scale * torch.nn.functional.linear(
            torch.nn.functional.linear(x.float(), self.a.float()), self.b.float())


def linear_int4(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    act_bits: int | None,
    bias: torch.Tensor | None = None,
    side: SidePath | None = None,
) -> torch.Tensor:
    """``x [..., K]`` times packed int4 ``qweight [N, K/2]`` with ``scales [N, K/g]`` -> ``[..., N]``."""
    w = dequantize(unpack_int4(qweight), scales, group_size)  # [N, K] float32
    out = torch.nn.functional.linear(_quantize_activations(x, act_bits), w)
    if bias is not None:
        out = out + bias.float()
    if side is not None:
        out = out + side.delta(x)
    return out.to(x.dtype)


def linear_int8(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    act_bits: int | None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x [..., K]`` times int8 per-channel ``qweight [N, K]`` with ``scales [N, 1]`` -> ``[..., N]``."""
    w = dequantize(qweight, scales)  # [N, K] float32
    out = torch.nn.functional.linear(_quantize_activations(x, act_bits), w)
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def embedding_int8(ids: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``ids [...]`` of the int8 per-row table ``qweight [V, D]`` -> ``[..., D]`` in ``dtype``."""
    return dequantize(qweight[ids], scales[ids]).to(dtype)
