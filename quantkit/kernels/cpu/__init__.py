"""Fast CPU backend: int8 dynamic activations x int4 groupwise / int8 per-channel weights.

The C++ kernel (``quantkit_cpu.cpp``, one translation unit) is built on first use with
:func:`torch.utils.cpp_extension.load` into ``$QUANTKIT_CACHE_DIR/ext/<name>`` (default
``~/.cache/quantkit``); the name hashes the source, the torch version and the flags, and torch's
file baton serialises concurrent builds (``python -c "from quantkit.kernels import cpu; cpu.build()"``
builds it ahead of time, e.g. from ``make``). It is compiled without ``-march`` flags (but with
``-fopenmp``, which ``at::parallel_for`` needs to actually run in parallel): the SIMD code
sits in ``#pragma GCC target`` regions and the ISA is chosen at run time from cpuid
(AVX-512 VNNI when present, otherwise AVX2+FMA; below AVX2 the reference kernel runs).

Ops (``torch.ops.quantkit``, registered in C++, with fake impls here for torch.compile)
---------------------------------------------------------------------------------------
``int4_linear_packed(x, w, s, n, group_size, bias=None, isa=-1)`` and
``int8_linear_packed(x, w, s, n, bias=None, isa=-1)`` take ``x [..., K]`` (float32/bfloat16) and
the *repacked* tensors below, and return ``[..., n]`` in ``x.dtype``. ``isa`` caps the SIMD level
(1 = AVX2, 2 = AVX-512 VNNI, -1 = best available); tests use it to cover the AVX2 path.

Repacked int4 layout (load time only; the on-disk format stays :mod:`quantkit.packing`)
-------------------------------------------------------------------------------------
Output channels are split into tiles of 16 (N padded with zero weights to ``Np = 16 * T``).
Let ``u[n, k] = q[n, k] + 8`` in ``0..15``. ``w`` is uint8 ``[T, K/8, 16, 4]`` (``Np * K / 2``
bytes, tile-major, each tile a contiguous stream)::

    w[t, b, r, j] = u[16t + r, 8b + j]  |  u[16t + r, 8b + 4 + j] << 4

so one 64-byte load covers 16 rows x 8 input channels; ``& 0xF`` yields the 16x4 bytes of channels
``8b..8b+3`` and ``>> 4`` those of ``8b+4..8b+7``, each row's 4 bytes in one 32-bit lane, which
is exactly the operand shape of ``vpdpbusd`` (and of AVX2 ``vpmaddubsw`` + ``vpmaddwd`` on the
two 8-row halves). ``s`` is ``[T, K/g, 16]``: the 16 scales of a tile's group side by side, in
bfloat16 when every scale is exactly representable there (the default checkpoint dtype, half the
bytes) else float32.

Repacked int8 layout (the classifier head)
------------------------------------------
``w`` is uint8 ``[T, K/4, 16, 4]`` with ``w[t, b, r, j] = W[16t + r, 4b + j] + 128`` (two's
complement flipped: ``0..255``); ``s`` is float32 ``[Np]`` (zero for padding rows).

Arithmetic
----------
Activations are quantized per token exactly like the reference: ``scale = max(amax / 127, 1e-10)``
in float32, ``a = clamp(round_half_even(x / scale), -128, 127)`` with a true IEEE division, so the
codes are bit-identical to :func:`quantkit.primitives.quantize` (``quantize_activations_int8``
exposes them for the tests). ``vpdpbusd`` multiplies unsigned by signed bytes, so:

* int4: unsigned weight nibbles ``u = q + 8`` times signed codes ``a``. For each group
  ``sum_k u a = sum_k q a + 8 * sum_k a``; the int32 accumulator of a group starts at
  ``-8 * sum_k a`` (per token and group, computed while quantizing), so it ends at the exact
  ``sum_k q a``. Each group result is converted to float32 and fused-multiply-added with the
  16 weight scales; the token scale and the float32 bias are applied once at the end.
* int8: unsigned ``w + 128`` times signed ``a``; the accumulator starts at ``-128 * sum_k a`` and
  holds the exact ``sum_k w a`` (|sum| < 2**31 for K < 65536) after the whole row; output is
  ``acc * w_scale * a_scale + bias``. The AVX2 path flips back to signed weights and uses
  ``|w| * sign(a, w)`` with ``vpmaddubsw`` so no int16 sum can saturate.

Only the float summation order differs from the reference (integer parts are exact), so results
agree to float32 rounding (~1e-6 relative to the sum of |terms|).

Blocking: decode (M < 8) runs 4 tiles x 1 token (two accumulator chains per tile, software
prefetch 2 KiB ahead in each tile stream) or 2 tiles x 2..4 tokens per micro-kernel, so several
independent chains hide the VNNI latency while the weights stream once from DRAM;
prefill runs 1 tile x 8 tokens (int8: 2 tiles x 8 tokens) over blocks of tiles sized to stay in
L2 while every token chunk passes over them. Threads (``at::parallel_for``, i.e.
``torch.get_num_threads()``) split the output tiles.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import mmap
import platform
import sys
import threading
from functools import cache as _memoize
from pathlib import Path

import torch

from quantkit.kernels import reference
from quantkit.settings import cache_dir

log = logging.getLogger(__name__)

_SRC = Path(__file__).with_name("quantkit_cpu.cpp")
_CFLAGS = ["-O3", "-fno-math-errno", "-fopenmp"]  # -fopenmp: at::parallel_for is OpenMP inline code
_CACHE_PREFIX = "quantkit.cpu."
_MAX_INT8_K = 1 << 16  # keeps the int32 accumulation of the int8 head exact

_lock = threading.Lock()
_state: dict = {}  # "reason": str | None once loading was attempted
_warned: set[str] = set()


def _ext_name() -> str:
    h = hashlib.sha256()
    h.update(_SRC.read_bytes())
    h.update(torch.__version__.encode())
    h.update(" ".join(_CFLAGS).encode())
    return f"quantkit_cpu_{h.hexdigest()[:12]}"


def _first_lines(text: str, n: int = 4) -> str:
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    errs = [ln for ln in lines if "error" in ln.lower()]
    return " | ".join((errs or lines)[:n])[:500] or "unknown error"


def _load() -> str | None:
    """Build (or reuse) and load the extension; return None or the reason it cannot run."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"CPU architecture {platform.machine()} is not x86-64"
    if not _SRC.exists():
        return f"kernel source {_SRC.name} is missing"
    if not _op_exists():
        try:
            from torch.utils import cpp_extension

            name = _ext_name()
            build_dir = cache_dir() / "ext" / name
            build_dir.mkdir(parents=True, exist_ok=True)
            cpp_extension.load(
                name=name,
                sources=[str(_SRC)],
                extra_cflags=_CFLAGS,
                extra_ldflags=["-fopenmp"],
                build_directory=str(build_dir),
                is_python_module=False,
                verbose=False,
            )
        except Exception as exc:  # noqa: BLE001 - any build failure means "use the reference"
            msg = str(exc)
            if isinstance(exc, (FileNotFoundError, OSError)) or "not found" in msg.lower():
                return f"no working C++ toolchain ({_first_lines(msg, 2)})"
            return f"build failed: {_first_lines(msg)}"
    try:
        isa = int(torch.ops.quantkit.cpu_isa())
    except Exception as exc:  # noqa: BLE001
        return f"extension loaded but unusable: {_first_lines(str(exc))}"
    if isa < 1:
        return "CPU lacks AVX2/FMA"
    _register_fakes()
    return None


def _op_exists() -> bool:
    """True when the ops are already registered (e.g. the library was loaded by ``make``)."""
    try:
        return hasattr(torch.ops.quantkit, "int4_linear_packed")
    except RuntimeError:  # a half-registered library: treat as absent and (re)load it
        return False


def _register_fakes() -> None:
    if _state.get("fakes"):
        return
    lib = "quantkit::"

    def _int4_fake(x, w, s, n, group_size, bias=None, isa=-1, lora_a=None, lora_bt=None, lora_scale=1.0):  # noqa: ARG001
        return x.new_empty((*x.shape[:-1], n))

    def _int8_fake(x, w, s, n, bias=None, isa=-1):  # noqa: ARG001
        return x.new_empty((*x.shape[:-1], n))

    def _hadamard_fake(x, base):  # noqa: ARG001
        return torch.empty_like(x)

    for op, fn in (("int4_linear_packed", _int4_fake), ("int8_linear_packed", _int8_fake),
                   ("hadamard_transform", _hadamard_fake)):
        try:
            torch.library.register_fake(lib + op, fn)
        except RuntimeError as exc:  # already registered (module reloaded)
            if "already" not in str(exc):
                raise
    _state["fakes"] = True


def unavailable_reason() -> str | None:
    """None when the fast kernel can run here, else a short reason. Never raises."""
    with _lock:
        if "reason" not in _state:
            try:
                _state["reason"] = _load()
            except Exception as exc:  # noqa: BLE001
                _state["reason"] = f"unexpected error: {_first_lines(str(exc))}"
        return _state["reason"]


def build() -> None:
    """Build/load the extension now; raise RuntimeError with the reason if it cannot run here."""
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"quantkit fast CPU kernel unavailable: {reason}")


def isa() -> int:
    """SIMD level the kernel uses here: 0 none, 1 AVX2, 2 AVX-512 VNNI."""
    return 0 if unavailable_reason() is not None else int(torch.ops.quantkit.cpu_isa())


def _warn_once(what: str) -> None:
    if what not in _warned:
        _warned.add(what)
        log.warning("quantkit cpu kernel: %s; using the pure-torch reference kernel", what)


# ---------------------------------------------------------------------------------------------
# Repacking (load time)
# ---------------------------------------------------------------------------------------------


#: output tiles repacked per step: bounds the temporaries (a few MiB) however large the matrix is,
#: and lets each step's portable rows be evicted before the next step touches more of them
_REPACK_TILES = 32


def repack_int4(qweight: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Portable ``qweight [N, K/2]`` + ``scales [N, K/g]`` -> the tile layout of the module docstring."""
    n, half = qweight.shape
    k = half * 2
    groups = scales.shape[1]
    if k % 8:
        raise ValueError(f"int4 repack needs K % 8 == 0 (got {k})")
    tiles = -(-n // 16)
    sdt = torch.bfloat16 if torch.equal(scales.to(torch.bfloat16).to(scales.dtype), scales) else torch.float32
    w = torch.empty(tiles, k // 8, 16, 4, dtype=torch.uint8)
    s = torch.empty(tiles, groups, 16, dtype=sdt)
    for t0 in range(0, tiles, _REPACK_TILES):
        t1 = min(tiles, t0 + _REPACK_TILES)
        rows = qweight[16 * t0:16 * t1]  # [r, K/2], r <= 16 (t1 - t0)
        r = rows.shape[0]
        u = torch.stack((rows & 0x0F, rows >> 4), dim=-1).reshape(r, k)  # nibble values 0..15
        if r < 16 * (t1 - t0):  # the last tile's padding rows: code 0 (nibble 8)
            u = torch.cat((u, torch.full((16 * (t1 - t0) - r, k), 8, dtype=torch.uint8)), dim=0)
        u = u.reshape(t1 - t0, 16, k // 8, 2, 4).permute(0, 2, 1, 4, 3)  # [t, K/8, 16, 4(j), 2(lo/hi)]
        w[t0:t1] = u[..., 0] | (u[..., 1] << 4)
        flat = torch.zeros(16 * (t1 - t0), groups, dtype=sdt)  # padding rows keep scale 0
        flat[:r] = scales[16 * t0:16 * t1]
        s[t0:t1] = flat.view(t1 - t0, 16, groups).transpose(1, 2)  # [t, groups, 16]
        release_pages(rows)
        release_pages(scales[16 * t0:16 * t1])
    return w.reshape(-1), s


def repack_int8(qweight: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Portable int8 ``qweight [N, K]`` + ``scales [N, 1]`` -> the tile layout of the module docstring."""
    n, k = qweight.shape
    if k % 4:
        raise ValueError(f"int8 repack needs K % 4 == 0 (got {k})")
    tiles = -(-n // 16)
    w = torch.empty(tiles, k // 4, 16, 4, dtype=torch.uint8)
    for t0 in range(0, tiles, _REPACK_TILES):
        t1 = min(tiles, t0 + _REPACK_TILES)
        rows = qweight[16 * t0:16 * t1]  # [r, K]
        u = rows.view(torch.uint8) ^ 0x80  # two's complement flipped: 0..255
        if u.shape[0] < 16 * (t1 - t0):  # padding rows: weight 0 (byte 0x80)
            u = torch.cat((u, torch.full((16 * (t1 - t0) - u.shape[0], k), 0x80, dtype=torch.uint8)), dim=0)
        w[t0:t1] = u.reshape(t1 - t0, 16, k // 4, 4).permute(0, 2, 1, 3)
        release_pages(rows)
    s = torch.zeros(tiles * 16)
    s[:n] = scales.float().reshape(n)
    return w.reshape(-1), s


_MADV_PAGEOUT = 21  # Linux >= 5.4: reclaim these pages now (clean file pages are dropped, never lost)


@_memoize
def _libc():
    return ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def release_pages(t: torch.Tensor) -> None:
    """Ask the kernel to evict ``t``'s pages from memory, without changing its contents.

    Checkpoint tensors are memory-mapped from their safetensors file (``load_file`` maps, it
    does not copy). Once a weight is repacked, its portable pages are read only again by
    ``state_dict`` or a re-repack, so keeping them resident doubles the model's memory. For a
    clean file-backed page ``MADV_PAGEOUT`` drops it and the next access reads the file again;
    for anonymous memory it is at most a swap-out. Either way the data stays valid, so this is
    safe on any tensor; it is only a hint and failures are ignored.
    """
    libc = _libc()
    if libc is None or t.device.type != "cpu" or t.numel() == 0:
        return
    page = mmap.PAGESIZE
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    first, last = -(-start // page) * page, end // page * page  # whole pages only: neighbours untouched
    if last > first:
        libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_PAGEOUT)


def _trim_heap() -> None:
    """Return the repack's freed temporaries to the OS (glibc keeps freed heap memory resident)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _cached(cache: dict | None, kind: str, qweight: torch.Tensor, scales: torch.Tensor, extra, fn):
    key = (_CACHE_PREFIX + kind, qweight.data_ptr(), qweight._version, scales.data_ptr(), scales._version, extra)
    if cache is None:
        return fn()
    hit = cache.get(key)
    if hit is None:
        for old in [k for k in cache if isinstance(k, tuple) and k and k[0] == key[0]]:
            del cache[old]  # a stale repack of older weights
        hit = cache[key] = fn()
        _trim_heap()
    return hit


# ---------------------------------------------------------------------------------------------
# Entry points (same contract as quantkit.kernels.reference)
# ---------------------------------------------------------------------------------------------


def _common_unsupported(x: torch.Tensor, act_bits, *others: torch.Tensor | None) -> str | None:
    if act_bits != 8:
        return f"act_bits={act_bits} (only 8)"
    if x.device.type != "cpu":
        return "non-CPU tensor"
    if not x.dtype.is_floating_point:
        return f"x dtype {x.dtype}"
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *others)):
        return "autograd requested (inference-only kernel)"
    return None


def _side_operands(cache: dict | None, side) -> tuple[torch.Tensor, torch.Tensor]:
    """The adapter as the op takes it: ``a [r, K]`` and ``b.T [r, N]``, contiguous float32 (cached)."""
    a, b = side.a, side.b
    key = (_CACHE_PREFIX + "lora", a.data_ptr(), a._version, b.data_ptr(), b._version)
    hit = cache.get(key) if cache is not None else None
    if hit is None:
        hit = (a.detach().float().contiguous(), b.detach().float().t().contiguous())
        if cache is not None:
            for old in [k for k in cache if isinstance(k, tuple) and k and k[0] == key[0]]:
                del cache[old]  # the adapter changed (a training step): drop the stale copy
            cache[key] = hit
    return hit


def _prep_x(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.bfloat16) else x.float()


def linear_int4(x, qweight, scales, group_size, act_bits, bias=None, cache=None, side=None):
    """Fast ``x [..., K] @ int4 qweight [N, K/2]`` (groups of ``group_size``) -> ``[..., N]`` in ``x.dtype``.

    ``side`` (a LoRA adapter, :class:`quantkit.kernels.reference.SidePath`) is fused into the same
    op call: its ``r`` dot products per token and ``r`` FMAs per output are added before rounding.
    """
    why = unavailable_reason() or _common_unsupported(x, act_bits, bias, *(side[:2] if side else ()))
    if why is None:
        n, half = qweight.shape
        k = half * 2
        if qweight.dtype != torch.uint8 or x.shape[-1] != k:
            why = "unexpected qweight dtype/shape"
        elif group_size % 8 or k % group_size or scales.shape != (n, k // group_size):
            why = f"group_size={group_size} with K={k} (needs a multiple of 8 dividing K)"
        elif side is not None and (side.a.shape[1:] != (k,) or side.b.shape != (n, side.a.shape[0])):
            why = f"LoRA side path shapes a {tuple(side.a.shape)}, b {tuple(side.b.shape)} for a {k} -> {n} layer"
    if why is not None:
        if unavailable_reason() is not None or act_bits == 8:
            _warn_once(why)
        return reference.linear_int4(x, qweight, scales, group_size, act_bits, bias, side)
    w, s = _cached(cache, "int4", qweight, scales, group_size, lambda: repack_int4(qweight, scales))
    a, bt = _side_operands(cache, side) if side is not None else (None, None)
    out = torch.ops.quantkit.int4_linear_packed(_prep_x(x), w, s, qweight.shape[0], group_size, bias, -1, a, bt,
                                                float(side.scale) if side is not None else 1.0)
    return out if out.dtype == x.dtype else out.to(x.dtype)


@_memoize
def _hadamard_base(m: int) -> torch.Tensor:
    """The base factor of ``H = H_m ⊗ H_{2^k}`` as the op takes it: float32 ``[m, m]``, empty for m = 1."""
    from quantkit.algorithms.hadamard import _base_matrix

    return torch.empty(0) if m == 1 else _base_matrix(m).float().contiguous()


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Fast ``x Hᵀ / sqrt(K)`` (same arithmetic as the reference: butterflies, base factor, / sqrt(K))."""
    from quantkit.algorithms.hadamard import _check, hadamard_transform

    m, _ = _check(x.shape[-1])  # unsupported sizes raise the reference's clear error
    if unavailable_reason() is not None or x.dtype not in (torch.float32, torch.bfloat16) or x.device.type != "cpu":
        return hadamard_transform(x)
    return torch.ops.quantkit.hadamard_transform(x, _hadamard_base(m))


def linear_int8(x, qweight, scales, act_bits, bias=None, cache=None):
    """Fast ``x [..., K] @ int8 qweight [N, K]`` with per-channel ``scales [N, 1]`` -> ``[..., N]``."""
    why = unavailable_reason() or _common_unsupported(x, act_bits, bias)
    if why is None:
        n, k = qweight.shape
        if qweight.dtype != torch.int8 or x.shape[-1] != k or scales.numel() != n:
            why = "unexpected int8 qweight dtype/shape"
        elif k % 4 or k >= _MAX_INT8_K:
            why = f"int8 head with K={k} (needs K % 4 == 0 and K < 65536)"
    if why is not None:
        if unavailable_reason() is not None or act_bits == 8:
            _warn_once(why)
        return reference.linear_int8(x, qweight, scales, act_bits, bias)
    w, s = _cached(cache, "int8", qweight, scales, None, lambda: repack_int8(qweight, scales))
    out = torch.ops.quantkit.int8_linear_packed(_prep_x(x), w, s, qweight.shape[0], bias)
    return out if out.dtype == x.dtype else out.to(x.dtype)
