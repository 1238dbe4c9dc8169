"""A whole quantized model gives the same logits on the reference and the fast CPU kernel."""

import pytest
import torch

from quantkit import kernels
from quantkit.modules import quantize_
from quantkit.scheme import Scheme


def _fast_available() -> bool:
    return kernels._fast_cpu() is not None


@pytest.mark.skipif(not _fast_available(), reason="fast CPU kernel unavailable on this machine")
def test_tiny_model_logits_agree_across_kernel_paths(tiny, monkeypatch):
    quantize_(tiny, Scheme())
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        monkeypatch.setenv("QUANTKIT_KERNEL", "reference")
        ref = tiny(ids).logits.float()
        monkeypatch.setenv("QUANTKIT_KERNEL", "cpu")
        fast = tiny(ids).logits.float()
    # Both paths compute the same integer products; they differ only in float32 summation order
    # and bf16 rounding of each layer's output, which flips a few activation codes downstream.
    # Logits of this model reach |8|: a bf16 ulp there is 0.03, so allow a few ulps.
    assert (fast - ref).abs().max() < 0.15
    assert (fast.argmax(-1) == ref.argmax(-1)).float().mean() > 0.95


def test_fallback_is_the_reference_when_asked(tiny, monkeypatch):
    monkeypatch.setenv("QUANTKIT_KERNEL", "reference")
    x = torch.randn(3, 64)
    assert kernels.backend_for(x) is kernels.Backend.REFERENCE


needs_fast = pytest.mark.skipif(not _fast_available(), reason="fast CPU kernel unavailable on this machine")


def _int4(n, k, seed=0):
    from quantkit.packing import pack_int4
    from quantkit.primitives import choose_scales, quantize

    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    scales = choose_scales(w, 4, 32, torch.bfloat16)
    return pack_int4(quantize(w, scales, 4, 32)), scales


@needs_fast
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("m", [1, 2, 7, 64, 513])
def test_1b_sized_shapes_threads_and_strided_inputs(threads, m):
    from quantkit.kernels import cpu, reference

    qweight, scales = _int4(1000, 2048)  # N not a multiple of the 16-channel tile; K of Llama 3.2 1B
    base = torch.randn(m, 2 * 2048, generator=torch.Generator().manual_seed(m))
    x = base[:, ::2]  # strided, non-contiguous activations
    assert not x.is_contiguous()
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = cpu.linear_int4(x, qweight, scales, 32, 8, None, {})
    finally:
        torch.set_num_threads(saved)
    ref = reference.linear_int4(x.contiguous(), qweight, scales, 32, 8)
    # integer group sums are exact on both paths; float32 accumulation order differs across
    # 64 groups of a 2048-long row: relative noise ~1e-6 of the row's magnitude
    scale = ref.abs().amax(dim=-1, keepdim=True)
    assert ((out - ref).abs() <= 1e-5 * scale + 1e-6).all()


@needs_fast
def test_bad_shapes_reaching_the_op_raise_instead_of_reading_out_of_bounds():
    from quantkit.kernels import cpu

    qweight, scales = _int4(32, 64)
    w, s = cpu.repack_int4(qweight, scales)
    x = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match="wrong size"):
        torch.ops.quantkit.int4_linear_packed(x, w[: w.numel() // 2], s, 32, 32, None)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        torch.ops.quantkit.int4_linear_packed(x.double(), w, s, 32, 32, None)
    with pytest.raises(RuntimeError):
        torch.ops.quantkit.int4_linear_packed(torch.randn(2, 96), w, s, 32, 32, None)
