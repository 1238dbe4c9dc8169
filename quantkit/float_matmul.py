"""Scoring a bf16 model on a CPU without bf16 dot products: its linears as float32 matmuls.

torch's CPU bf16 matmul multiplies in float32 and rounds the product to bf16. On a CPU with no
bf16 dot-product instructions (x86 without AVX512-BF16 or AMX-BF16, e.g. AVX2 only) it gets there
by a slow path: on an AVX2 AMD EPYC, one thread, ``[2048, 576] @ [576, 1536]`` took 400 ms in bf16
against 52 ms as float32 (the inputs widened, the product rounded back), and a whole forward pass
of SmolLM2-135M over 2048 tokens spent 94% of its time in ``aten::mm``. Widening bf16 to float32 is
exact and both paths sum in float32, so the outputs differ only where the summation order tips a
rounding: 99.99% of that product's outputs were bit-identical.

:func:`use_float32_matmuls_` swaps each bf16 ``nn.Linear`` for :class:`Float32MatmulLinear`, which
holds the same parameters (``state_dict`` is unchanged) and computes ``linear(x.float(),
w.float()).to(x.dtype)``. Used for scoring (``quantkit eval``, ``compare report``), where every
call multiplies a long window; not for the speed benchmark, which measures torch's own bf16 path.
Quantized checkpoints need none of this: their linears run on quantkit's own kernels.
"""

from __future__ import annotations

import enum
import platform
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}  # x86 flags (Linux /proc/cpuinfo names) for bf16 dot products


class Bf16Matmul(str, enum.Enum):
    """How a bf16 float model's linears are computed when it is scored."""

    AUTO = "auto"  # FLOAT32 on an x86 CPU without bf16 dot products, else NATIVE
    NATIVE = "native"  # torch's bf16 matmul
    FLOAT32 = "float32"  # widened to float32, rounded back to bf16 (Float32MatmulLinear)


class Float32MatmulLinear(nn.Linear):
    """An ``nn.Linear`` with bf16 parameters whose product is computed in float32.

    ``x [..., in]`` (bf16) -> ``[..., out]`` (bf16): ``linear(x.float(), W.float(), b.float())``
    rounded to ``x.dtype``. The float32 copy of ``W`` lives for one call only, so memory stays
    that of the bf16 model plus one layer.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight.float(), bias).to(x.dtype)


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (Linux); None where they cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return None


def has_native_bf16(flags: set[str] | None = None, machine: str | None = None) -> bool:
    """Whether torch's CPU bf16 matmul runs on bf16 dot-product instructions.

    Only x86 is judged (by its flags); elsewhere, or when the flags cannot be read, torch's own
    choice is left alone (True).
    """
    if (machine or platform.machine()).lower() not in ("x86_64", "amd64"):
        return True
    flags = cpu_flags() if flags is None else flags
    return flags is None or bool(_BF16_FLAGS & flags)


def _bf16_linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, module) of every plain ``nn.Linear`` with a bf16 weight on the CPU."""
    found = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if (type(child) is nn.Linear and child.weight.dtype == torch.bfloat16
                    and child.weight.device.type == "cpu"):
                found.append((parent, name, child))
    return found


def resolve_bf16(mode: Bf16Matmul) -> Bf16Matmul:
    """NATIVE or FLOAT32: what ``mode`` means for a model with bf16 linears on this machine."""
    mode = Bf16Matmul(mode)
    if mode is Bf16Matmul.AUTO:
        return Bf16Matmul.NATIVE if has_native_bf16() else Bf16Matmul.FLOAT32
    return mode


def resolve(mode: Bf16Matmul, model: nn.Module) -> Bf16Matmul:
    """NATIVE or FLOAT32: what ``mode`` means for ``model`` on this machine."""
    if not _bf16_linears(model):  # nothing to swap: a float32 model, or a quantized checkpoint
        return Bf16Matmul.NATIVE
    return resolve_bf16(mode)


def use_float32_matmuls_(model: nn.Module) -> int:
    """Swap every bf16 ``nn.Linear`` of ``model`` for a :class:`Float32MatmulLinear` (in place).

    The new modules hold the same ``Parameter`` objects, so weights (and tied weights) are shared,
    not copied. Returns how many were swapped.
    """
    found = _bf16_linears(model)
    for parent, name, old in found:
        with torch.device("meta"):
            new = Float32MatmulLinear(old.in_features, old.out_features, bias=old.bias is not None)
        new.weight = old.weight
        new.bias = old.bias
        new.train(old.training)
        setattr(parent, name, new)
    return len(found)


def apply(mode: Bf16Matmul, model: nn.Module) -> Bf16Matmul:
    """Resolve ``mode`` for ``model`` and swap its linears if it resolves to FLOAT32."""
    chosen = resolve(mode, model)
    if chosen is Bf16Matmul.FLOAT32:
        use_float32_matmuls_(model)
    return chosen
