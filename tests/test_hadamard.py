"""The Hadamard constructions and the fast transform (including non powers of two)."""

from __future__ import annotations

import math

import pytest
import torch

from quantkit import kernels
from quantkit.algorithms.hadamard import factor, hadamard_matrix, hadamard_transform, random_hadamard
from quantkit.errors import QuantkitError
from quantkit.kernels import cpu

# base orders from Paley I (12, 20, 44), Paley II (28, 36), Sylvester products, and real model sizes
SIZES = [1, 2, 8, 12, 20, 28, 36, 40, 44, 64, 576, 1536, 3072]


@pytest.mark.parametrize("n", SIZES)
def test_matrix_is_hadamard(n):
    h = hadamard_matrix(n)
    assert torch.equal(h.abs(), torch.ones(n, n, dtype=h.dtype))
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=h.dtype))


@pytest.mark.parametrize("n", SIZES)
def test_fast_transform_matches_dense_and_inverts(n):
    x = torch.randn(3, 5, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    y = hadamard_transform(x)
    torch.testing.assert_close(y, x @ hadamard_matrix(n).T / math.sqrt(n), rtol=0, atol=1e-12)
    # its own inverse up to scale: H (H x) = n x, i.e. T(T(x)) = x when H is symmetric (Sylvester);
    # in general the inverse is x H / sqrt(n)
    torch.testing.assert_close(hadamard_transform(y, inverse=True), x, rtol=0, atol=1e-12)
    if factor(n)[0] == 1:
        torch.testing.assert_close(hadamard_transform(y), x, rtol=0, atol=1e-12)


def test_transform_keeps_dtype_and_float32_accuracy():
    x = torch.randn(4, 1536)
    y = hadamard_transform(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, (x.double() @ hadamard_matrix(1536).T / math.sqrt(1536)).float(),
                               rtol=1e-5, atol=1e-5)


def test_random_hadamard_is_orthogonal():
    r = random_hadamard(576, torch.Generator().manual_seed(0))
    torch.testing.assert_close(r @ r.T, torch.eye(576, dtype=r.dtype), rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [172, 11008, 7, 0])
def test_unsupported_size_is_a_clear_error(n):
    with pytest.raises(QuantkitError, match=f"size {n}"):
        hadamard_matrix(n)


@pytest.mark.skipif(cpu.unavailable_reason() is not None, reason="fast CPU kernel unavailable")
@pytest.mark.parametrize("n", [1, 8, 12, 36, 40, 576, 1536, 3072, 8192])
def test_fast_cpu_transform_matches_the_reference(n):
    # the butterflies are the reference's float32 adds in the reference's order, so powers of two are
    # bit-identical; the dense base factor (m > 1) may sum in another order than torch's matmul
    exact = factor(n)[0] == 1
    for dtype, shape in ((torch.float32, (1, n)), (torch.bfloat16, (2, 3, n)), (torch.float32, (300, n))):
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(n)).to(dtype)
        got, want = kernels.hadamard(x), hadamard_transform(x)
        assert got.dtype == dtype and got.shape == x.shape
        if exact:
            assert torch.equal(got, want)
        else:  # float32 noise of an m-term sum; in bf16, at most one ulp where it straddles a rounding
            tol = 2.0**-7 if dtype == torch.bfloat16 else 1e-6
            torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=1e-6)


def test_kernel_entry_point_keeps_autograd_and_clear_errors():
    x = torch.randn(4, 12, requires_grad=True)
    y = kernels.hadamard(x)  # training through R4 (rotation learning) takes the differentiable reference
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    with pytest.raises(QuantkitError, match="size 7"):
        kernels.hadamard(torch.randn(1, 7))
