"""The fast CPU kernel (quantkit.kernels.cpu) against the pure-torch reference."""

from __future__ import annotations

import itertools
import logging
import platform
import shutil

import pytest
import torch

from quantkit.kernels import cpu, reference
from quantkit.packing import pack_int4, unpack_int4
from quantkit.primitives import choose_scales, quantize

NS = (8, 96, 1000)
KS = (32, 64, 576, 1536)
MS = (1, 2, 7, 16, 64, 300)


def _cpu_has_avx2() -> bool:
    try:
        with open("/proc/cpuinfo") as fh:
            return any(line.startswith("flags") and " avx2 " in line + " " for line in fh)
    except OSError:
        return False


REASON = cpu.unavailable_reason()
needs_fast = pytest.mark.skipif(REASON is not None, reason=f"fast CPU kernel unavailable: {REASON}")


def make_int4(n, k, g=32, scale_dtype=torch.bfloat16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    scales = choose_scales(w, 4, g, scale_dtype)
    return pack_int4(quantize(w, scales, 4, g)), scales


def make_int8(n, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    scales = choose_scales(w, 8, None, torch.float32)
    return quantize(w, scales, 8, None), scales


def _bound(x, w_deq):
    """|x_q| @ |W|^T: the scale of the float32 rounding noise of a length-K dot product."""
    xq = reference._quantize_activations(x.reshape(-1, x.shape[-1]), 8)
    return (xq.abs() @ w_deq.abs().t()).reshape(*x.shape[:-1], w_deq.shape[0])


def assert_close_to_reference(out, ref, bound, dtype):
    assert out.dtype == ref.dtype == dtype
    assert out.shape == ref.shape
    diff = (out.float() - ref.float()).abs()
    tol = 2e-6 * bound + 1e-6  # float32 summation-order noise only: the integer parts are exact
    if dtype == torch.bfloat16:
        tol = tol + ref.float().abs() * 2.0**-7  # results straddling a rounding boundary: one bf16 ulp
    bad = diff > tol
    assert not bad.any(), f"{int(bad.sum())} mismatches, max diff {diff.max().item():.3g}"


def test_available_on_this_machine():
    if platform.machine() not in ("x86_64", "AMD64") or not _cpu_has_avx2() or shutil.which("c++") is None:
        pytest.skip("needs x86-64 with AVX2 and a C++ compiler")
    assert REASON is None
    assert cpu.isa() in (1, 2)


@needs_fast
@pytest.mark.parametrize("n,k,m", list(itertools.product(NS, KS, MS)))
def test_int4_matches_reference(n, k, m):
    combos = [  # every x dtype x bias x scale dtype pairing appears across the four
        (torch.float32, False, torch.bfloat16),
        (torch.float32, True, torch.float32),
        (torch.bfloat16, True, torch.bfloat16),
        (torch.bfloat16, False, torch.float32),
    ]
    for i, (dtype, with_bias, scale_dtype) in enumerate(combos):
        qweight, scales = make_int4(n, k, scale_dtype=scale_dtype, seed=i)
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(100 + i)).to(dtype)
        bias = torch.randn(n).to(dtype) if with_bias else None
        out = cpu.linear_int4(x, qweight, scales, 32, 8, bias, {})
        ref = reference.linear_int4(x, qweight, scales, 32, 8, bias)
        w_deq = unpack_int4(qweight).float().reshape(n, -1, 32).mul(scales.float()[..., None]).reshape(n, k)
        assert_close_to_reference(out, ref, _bound(x, w_deq), dtype)


@needs_fast
@pytest.mark.parametrize("n,k,m", [(n, k, m) for n, k, m in itertools.product(NS, KS, MS) if m in (1, 7, 64, 300)])
def test_int8_head_matches_reference(n, k, m):
    for i, (dtype, with_bias) in enumerate(itertools.product((torch.float32, torch.bfloat16), (False, True))):
        qweight, scales = make_int8(n, k, seed=i)
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(7 + i)).to(dtype)
        bias = torch.randn(n) if with_bias else None
        out = cpu.linear_int8(x, qweight, scales, 8, bias, {})
        ref = reference.linear_int8(x, qweight, scales, 8, bias)
        assert_close_to_reference(out, ref, _bound(x, qweight.float() * scales), dtype)


@needs_fast
@pytest.mark.parametrize("isa", [1, 2])
@pytest.mark.parametrize("n,k,m,g", [(8, 32, 1, 32), (96, 576, 7, 32), (1000, 64, 300, 32), (40, 1536, 16, 64), (24, 256, 3, 128)])
def test_both_isas_and_group_sizes(isa, n, k, m, g):
    if isa > cpu.isa():
        pytest.skip(f"CPU lacks isa level {isa}")
    qweight, scales = make_int4(n, k, g=g)
    x = torch.randn(m, k).to(torch.bfloat16)
    bias = torch.randn(n)
    w, s = cpu.repack_int4(qweight, scales)
    out = torch.ops.quantkit.int4_linear_packed(x, w, s, n, g, bias, isa)
    ref = reference.linear_int4(x, qweight, scales, g, 8, bias)
    w_deq = unpack_int4(qweight).float().reshape(n, -1, g).mul(scales.float()[..., None]).reshape(n, k)
    assert_close_to_reference(out, ref, _bound(x, w_deq), torch.bfloat16)

    q8, s8 = make_int8(n, k)
    w8, ss8 = cpu.repack_int8(q8, s8)
    xf = x.float()
    out8 = torch.ops.quantkit.int8_linear_packed(xf, w8, ss8, n, bias, isa)
    ref8 = reference.linear_int8(xf, q8, s8, 8, bias)
    assert_close_to_reference(out8, ref8, _bound(xf, q8.float() * s8), torch.float32)


@needs_fast
@pytest.mark.parametrize("isa", [1, 2])
@pytest.mark.parametrize("n,k,m,r", [(8, 32, 1, 1), (96, 576, 3, 8), (1000, 64, 7, 16), (40, 1536, 8, 4), (24, 256, 64, 8)])
def test_fused_lora_side_path_matches_reference(isa, n, k, m, r):
    if isa > cpu.isa():
        pytest.skip(f"CPU lacks isa level {isa}")
    qweight, scales = make_int4(n, k)
    gen = torch.Generator().manual_seed(3)
    a = (torch.randn(r, k, generator=gen) / k**0.5).to(torch.bfloat16)  # bf16 adapters, as QLoRA saves them
    b = torch.randn(n, r, generator=gen).to(torch.bfloat16)
    side = reference.SidePath(a, b, 2.0)
    w, s = cpu.repack_int4(qweight, scales)
    w_deq = unpack_int4(qweight).float().reshape(n, -1, 32).mul(scales.float()[..., None]).reshape(n, k)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(m, k, generator=gen).to(dtype)
        bias = torch.randn(n)
        out = torch.ops.quantkit.int4_linear_packed(x, w, s, n, 32, bias, isa, a.float(), b.float().t().contiguous(), 2.0)
        ref = reference.linear_int4(x, qweight, scales, 32, 8, bias, side)
        # rounding noise of the side path: its own dot products over K and r, in float32
        side_bound = 2.0 * (x.float().abs() @ a.float().abs().t()) @ b.float().abs().t()
        assert_close_to_reference(out, ref, _bound(x, w_deq) + side_bound, dtype)
        without = reference.linear_int4(x, qweight, scales, 32, 8, bias)
        assert (ref.float() - without.float()).abs().max() > 1e-2  # the side path is really there
    with pytest.raises(RuntimeError, match="lora_bt"):
        torch.ops.quantkit.int4_linear_packed(x, w, s, n, 32, None, isa, a.float(), b.float().contiguous(), 2.0)


@needs_fast
def test_leading_dims_and_other_dtypes():
    qweight, scales = make_int4(96, 64)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(2, 3, 5, 64).to(dtype)
        out = cpu.linear_int4(x, qweight, scales, 32, 8, None, None)
        ref = reference.linear_int4(x, qweight, scales, 32, 8, None)
        assert out.shape == (2, 3, 5, 96) and out.dtype == dtype
        torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=1e-2)
    q8, s8 = make_int8(50, 64)
    x = torch.randn(4, 1, 64)
    out = cpu.linear_int8(x, q8, s8, 8, None, None)
    assert out.shape == (4, 1, 50)
    torch.testing.assert_close(out, reference.linear_int8(x, q8, s8, 8, None), rtol=1e-4, atol=1e-4)
    assert cpu.linear_int4(torch.randn(0, 64), qweight, scales, 32, 8, None, None).shape == (0, 96)


@needs_fast
@pytest.mark.parametrize("isa", [1, 2])
def test_activation_codes_are_bit_identical(isa):
    if isa > cpu.isa():
        pytest.skip(f"CPU lacks isa level {isa}")
    x = torch.randn(37, 1000) * torch.logspace(-3, 3, 37)[:, None]
    ties = torch.tensor([[127.0, 2.5, 3.5, -2.5, 0.5, -0.5, 1.5, 126.5] + [0.0] * 17])  # scale = 1: ties to even
    zeros = torch.zeros(1, 25)
    for xx in (x, x.to(torch.bfloat16), ties, zeros):
        codes, sc = torch.ops.quantkit.quantize_activations_int8(xx, isa)
        ref_scales = choose_scales(xx.float(), 8, None, torch.float32)
        assert torch.equal(sc, ref_scales.reshape(-1))
        assert torch.equal(codes, quantize(xx.float(), ref_scales, 8, None))
    codes, _ = torch.ops.quantkit.quantize_activations_int8(ties, isa)
    assert codes[0, :8].tolist() == [127, 2, 4, -2, 0, 0, 2, 126]


def _unrepack_int4(w, s, n, k, g):
    tiles = -(-n // 16)
    b = w.reshape(tiles, k // 8, 16, 4)
    u = torch.stack((b & 0xF, b >> 4), dim=-1)  # [T, K/8, 16, 4(j), 2(h)]
    u = u.permute(0, 2, 1, 4, 3).reshape(tiles * 16, k)[:n]
    q = (u.to(torch.int8) - 8)
    scales = s.reshape(tiles, k // g, 16).transpose(1, 2).reshape(tiles * 16, k // g)[:n]
    return pack_int4(q), scales


def test_repack_round_trip_and_layout():
    n, k, g = 40, 96, 32
    qweight, scales = make_int4(n, k, g=g)
    w, s = cpu.repack_int4(qweight, scales)
    assert w.dtype == torch.uint8 and w.numel() == 48 * k // 2
    assert s.dtype == torch.bfloat16 and s.shape == (3, k // g, 16)
    back_q, back_s = _unrepack_int4(w, s, n, k, g)
    assert torch.equal(back_q, qweight) and torch.equal(back_s, scales)
    # the documented formula for one byte: w[t, b, r, j] = u[16t+r, 8b+j] | u[16t+r, 8b+4+j] << 4
    u = unpack_int4(qweight).to(torch.int16) + 8
    t, bb, r, j = 1, 5, 3, 2
    byte = int(w.reshape(3, k // 8, 16, 4)[t, bb, r, j])
    assert byte == int(u[16 * t + r, 8 * bb + j]) | (int(u[16 * t + r, 8 * bb + 4 + j]) << 4)
    # padding rows are code 0 with scale 0; float32 scales that bf16 cannot hold stay float32
    assert torch.all(w.reshape(3, k // 8, 16, 4)[2, :, 8:] == 0x88)
    _, s32 = cpu.repack_int4(qweight, scales.float() * 1.0001)
    assert s32.dtype == torch.float32

    q8, s8 = make_int8(20, 64)
    w8, ss8 = cpu.repack_int8(q8, s8)
    tiles = w8.reshape(2, 16, 16, 4).permute(0, 2, 1, 3).reshape(32, 64)
    assert torch.equal((tiles[:20] ^ 0x80).view(torch.int8), q8)
    assert torch.equal(ss8[:20], s8.reshape(-1)) and torch.all(ss8[20:] == 0)


@needs_fast
def test_cache_reused_and_invalidated():
    qweight, scales = make_int4(96, 64)
    cache: dict = {}
    x = torch.randn(3, 64)
    cpu.linear_int4(x, qweight, scales, 32, 8, None, cache)
    (key,) = cache
    first = cache[key]
    cpu.linear_int4(x, qweight, scales, 32, 8, None, cache)
    assert cache[key] is first  # repacked once
    qweight[:10] = 0x33  # in-place load of new weights bumps the version
    out = cpu.linear_int4(x, qweight, scales, 32, 8, None, cache)
    assert len(cache) == 1 and key not in cache
    torch.testing.assert_close(out, reference.linear_int4(x, qweight, scales, 32, 8, None), rtol=1e-5, atol=1e-4)


@needs_fast
def test_unsupported_configs_fall_back_to_reference():
    qweight, scales = make_int4(16, 48, g=16)
    x = torch.randn(2, 48)
    for act_bits, g in ((None, 16), (4, 16)):
        assert torch.equal(cpu.linear_int4(x, qweight, scales, g, act_bits, None, {}),
                           reference.linear_int4(x, qweight, scales, g, act_bits, None))
    qw12, sc12 = make_int4(16, 48, g=12)  # group size not a multiple of 8
    assert torch.equal(cpu.linear_int4(x, qw12, sc12, 12, 8, None, {}), reference.linear_int4(x, qw12, sc12, 12, 8, None))
    q8, s8 = make_int8(10, 30)  # K % 4 != 0
    x30 = torch.randn(2, 30)
    assert torch.equal(cpu.linear_int8(x30, q8, s8, 8, None, {}), reference.linear_int8(x30, q8, s8, 8, None))
    xg = torch.randn(2, 48, requires_grad=True)  # autograd requested: the reference handles it
    assert torch.equal(cpu.linear_int4(xg, qweight, scales, 16, 8, None, {}),
                       reference.linear_int4(xg, qweight, scales, 16, 8, None))


def test_fallback_when_kernel_unavailable(monkeypatch, caplog):
    monkeypatch.setitem(cpu._state, "reason", "forced for the test")
    monkeypatch.setattr(cpu, "_warned", set())
    qweight, scales = make_int4(24, 64)
    q8, s8 = make_int8(24, 64)
    x = torch.randn(3, 64).to(torch.bfloat16)
    with caplog.at_level(logging.WARNING):
        out = cpu.linear_int4(x, qweight, scales, 32, 8, None, {})
        out8 = cpu.linear_int8(x, q8, s8, 8, None, {})
        cpu.linear_int4(x, qweight, scales, 32, 8, None, {})
    assert torch.equal(out, reference.linear_int4(x, qweight, scales, 32, 8, None))
    assert torch.equal(out8, reference.linear_int8(x, q8, s8, 8, None))
    assert sum("forced for the test" in r.getMessage() for r in caplog.records) == 1  # warned once
    assert cpu.unavailable_reason() == "forced for the test"


@needs_fast
def test_custom_op_fake_impl_and_torch_compile():
    n, k = 40, 64
    qweight, scales = make_int4(n, k)
    w, s = cpu.repack_int4(qweight, scales)
    bias = torch.randn(n)
    x = torch.randn(2, 3, k)
    op = torch.ops.quantkit.int4_linear_packed
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(op.default, (x, w, s, n, 32, bias), test_utils=checks)
    lora_a, lora_bt = torch.randn(4, k), torch.randn(4, n)  # the fused LoRA side path's operands
    torch.library.opcheck(op.default, (x, w, s, n, 32, bias, -1, lora_a, lora_bt, 0.5), test_utils=checks)
    torch.library.opcheck(torch.ops.quantkit.hadamard_transform.default, (torch.randn(3, 48), cpu._hadamard_base(12)),
                          test_utils=checks)

    def fn(x):
        return torch.relu(op(x, w, s, n, 32, bias)) * 2.0

    try:
        compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
        got = compiled(x)
    except Exception as exc:  # noqa: BLE001 - compile itself may be unsupported in some envs
        if "quantkit" in str(exc):
            raise
        pytest.skip(f"torch.compile unavailable: {type(exc).__name__}: {exc}")
    torch.testing.assert_close(got, fn(x))
    assert got.shape == (2, 3, n)


@needs_fast
def test_read_bandwidth_probe_reads_every_byte():
    # the probe's checksum is the OR of all bytes: a byte it skipped would be missing from it
    saved = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for pos, value in ((0, 0x01), (1_000_003, 0x5A), ((1 << 21) - 1, 0x80)):
                buf = torch.zeros(1 << 21, dtype=torch.uint8)
                buf[pos] = value
                assert torch.ops.quantkit.read_bandwidth_probe(buf) == value
    finally:
        torch.set_num_threads(saved)
    with pytest.raises(RuntimeError, match="multiple of 128"):
        torch.ops.quantkit.read_bandwidth_probe(torch.zeros(100, dtype=torch.uint8))
