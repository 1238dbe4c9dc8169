"""The packed int4 groupwise format: the one on-disk layout every pipeline writes.

Format version 1 (``FORMAT_VERSION``, recorded in each checkpoint's ``quantkit.json``)
-------------------------------------------------------------------------------------
For a linear with weight ``W [N, K]`` (N output channels, K input channels) quantized to
``b <= 4`` bits, symmetric, with groups of ``g`` consecutive input channels:

``qweight``  uint8 ``[N, K // 2]``
    Two codes per byte. Byte ``j`` of row ``n`` holds input channel ``2j`` in its **low**
    nibble and ``2j + 1`` in its **high** nibble. Each nibble stores the signed code
    ``q in [-8, 7]`` offset by 8 (``u = q + 8 in [0, 15]``), so a nibble never needs sign
    extension: ``q = u - 8``.
``scales``   ``scale_dtype`` (default bfloat16) ``[N, K // g]``
    Scale of group ``k // g`` of row ``n``; the weight is ``W[n, k] ≈ q[n, k] * scales[n, k // g]``.
    Symmetric: there are no zero points.

Int8 layers (the classification head, the embedding) need no packing: ``qweight`` int8
``[N, K]`` and ``scales [N, 1]`` (one per output channel / vocabulary row).

Rows are C-contiguous and independent, so a checkpoint can be sliced by output channel. Fast
kernels may repack at load time into a SIMD-friendly layout; that layout never reaches disk.
"""

from __future__ import annotations

import torch

FORMAT_VERSION = 1

_OFFSET = 8  # stored nibble = code + 8


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack int codes ``q [N, K]`` in [-8, 7] (K even) into uint8 ``[N, K // 2]``."""
    if q.shape[-1] % 2:
        raise ValueError(f"cannot pack an odd number of input channels ({q.shape[-1]})")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ValueError("int4 codes must lie in [-8, 7]")
    u = (q.to(torch.int16) + _OFFSET).to(torch.uint8)
    return (u[..., 0::2] | (u[..., 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 ``[N, K // 2]`` -> int8 codes ``[N, K]``."""
    low = (packed & 0x0F).to(torch.int8) - _OFFSET
    high = (packed >> 4).to(torch.int8) - _OFFSET
    return torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
