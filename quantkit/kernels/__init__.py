"""The one kernel entry point every quantized module calls.

``linear_int4`` / ``linear_int8`` / ``embedding_int8`` take the portable tensors of
:mod:`quantkit.packing` and dispatch to a backend:

* ``reference`` — pure torch (:mod:`quantkit.kernels.reference`), any device; the oracle.
* ``cpu`` — the fast C++ kernel (:mod:`quantkit.kernels.cpu`), used for CPU tensors when it
  builds and the CPU has the features it needs; otherwise the reference runs, with one warning.

``QUANTKIT_KERNEL=auto|reference|cpu`` chooses (default ``auto``: the fast one when available).
A backend may keep a repacked copy of a weight in the ``cache`` dict that each module owns; the
key includes the tensors' data pointers and versions, so loading new weights invalidates it.
"""

from __future__ import annotations

import enum
import logging
import os
from functools import cache as _memoize
from types import ModuleType

import torch

from quantkit.algorithms.hadamard import hadamard_transform
from quantkit.errors import QuantkitError
from quantkit.kernels import reference
from quantkit.kernels.reference import SidePath

__all__ = ["Backend", "SidePath", "backend_for", "embedding_int8", "hadamard", "linear_int4", "linear_int8",
           "requested_backend"]

log = logging.getLogger(__name__)


class Backend(str, enum.Enum):
    AUTO = "auto"
    REFERENCE = "reference"
    CPU = "cpu"


def requested_backend() -> Backend:
    value = os.environ.get("QUANTKIT_KERNEL", Backend.AUTO.value)
    try:
        return Backend(value)
    except ValueError:
        raise QuantkitError(
            f"QUANTKIT_KERNEL={value!r} is not one of {[b.value for b in Backend]}"
        ) from None


@_memoize
def _fast_cpu() -> ModuleType | None:
    """The fast CPU backend module, or None (warned once) when it cannot run here."""
    try:
        from quantkit.kernels import cpu
    except ImportError as exc:  # the backend is optional: the reference always works
        log.warning("fast CPU kernel unavailable (%s); using the pure-torch reference kernel", exc)
        return None
    reason = cpu.unavailable_reason()
    if reason is not None:
        log.warning("fast CPU kernel unavailable (%s); using the pure-torch reference kernel", reason)
        return None
    return cpu


def backend_for(x: torch.Tensor) -> Backend:
    """The backend that will run an op on ``x`` (never AUTO)."""
    wanted = requested_backend()
    if wanted is Backend.REFERENCE or x.device.type != "cpu":
        return Backend.REFERENCE
    if _fast_cpu() is not None:
        return Backend.CPU
    if wanted is Backend.CPU:
        raise QuantkitError("QUANTKIT_KERNEL=cpu but the fast CPU kernel is unavailable (see the warning above)")
    return Backend.REFERENCE


def linear_int4(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    act_bits: int | None,
    bias: torch.Tensor | None = None,
    cache: dict | None = None,
    side: SidePath | None = None,
) -> torch.Tensor:
    """``x [..., K]`` @ packed int4 ``qweight [N, K/2]`` (groups of ``group_size``) -> ``[..., N]``,
    plus an optional unmerged LoRA ``side`` path (see :class:`SidePath`)."""
    if backend_for(x) is Backend.CPU:
        return _fast_cpu().linear_int4(x, qweight, scales, group_size, act_bits, bias, cache, side)
    return reference.linear_int4(x, qweight, scales, group_size, act_bits, bias, side)


def linear_int8(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    act_bits: int | None,
    bias: torch.Tensor | None = None,
    cache: dict | None = None,
) -> torch.Tensor:
    """``x [..., K]`` @ int8 per-channel ``qweight [N, K]`` -> ``[..., N]``."""
    if backend_for(x) is Backend.CPU:
        return _fast_cpu().linear_int8(x, qweight, scales, act_bits, bias, cache)
    return reference.linear_int8(x, qweight, scales, act_bits, bias)


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """``x Hᵀ / sqrt(K)`` over the last dimension: the online transform before a linear (SpinQuant's R4).

    The reference is :func:`quantkit.algorithms.hadamard.hadamard_transform` (torch ops, one pass
    per butterfly level); the fast CPU backend does the same arithmetic per row in one op call.
    """
    if backend_for(x) is Backend.CPU and not (torch.is_grad_enabled() and x.requires_grad):
        return _fast_cpu().hadamard(x)
    return hadamard_transform(x)


def embedding_int8(ids: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Gather-and-dequantize rows of an int8 per-row table (memory-bound; torch is fast enough)."""
    return reference.embedding_int8(ids, qweight, scales, dtype)
