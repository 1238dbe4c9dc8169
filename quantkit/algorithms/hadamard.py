"""Hadamard matrices and a fast Hadamard transform, for the sizes real models have.

A Hadamard matrix ``H`` of order ``n`` has entries ±1 and ``H Hᵀ = n I``; ``H / sqrt(n)`` is
orthogonal. Orders handled here are ``n = m · 2^k`` where ``m`` is 1 or the order of a *base*
matrix built in code:

* Paley construction I, for a prime ``q ≡ 3 (mod 4)``: order ``q + 1`` (12, 20, 24, 32, 44, ...);
* Paley construction II, for a prime ``q ≡ 1 (mod 4)``: order ``2 (q + 1)`` (12, 28, 36, 60, ...);
* Sylvester doubling ``[[H, H], [H, -H]]`` of either (40 = 2·20, ...), which is what the ``2^k``
  factor is.

So SmolLM2's 576 = 36·16 and 1536 = 12·128 and Llama 3.2 3B's 3072 = 12·256 all work.

The transform (:func:`hadamard_transform`) computes ``x Hᵀ / sqrt(n)`` along the last dimension
with ``H = H_m ⊗ H_{2^k}``: Walsh–Hadamard butterflies (``k`` add/subtract passes) over the
power-of-two factor and one small dense matmul with the base factor. It is orthogonal, so its
inverse is its transpose; for ``m = 1`` (Sylvester) it is also symmetric, i.e. its own inverse.
"""

from __future__ import annotations

import math
from functools import cache

import torch

from quantkit.errors import QuantkitError

#: largest base order tried (dense ``m × m`` matmul inside the transform; keep it small)
MAX_BASE_ORDER = 256


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """``Q[i, j] = χ(j - i)`` over GF(q), χ the quadratic character (0, 1 or -1); ``[q, q]``."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def _paley1(q: int) -> torch.Tensor:
    """Order ``q + 1`` for prime ``q ≡ 3 mod 4``: ``I + S`` with S the skew bordered Jacobsthal matrix."""
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0] = 1.0, -1.0
    s[1:, 1:] = _jacobsthal(q)  # skew-symmetric when q ≡ 3 mod 4
    return torch.eye(q + 1, dtype=torch.float64) + s


def _paley2(q: int) -> torch.Tensor:
    """Order ``2 (q + 1)`` for prime ``q ≡ 1 mod 4``: C ⊗ [[1, -1], [-1, -1]] + I ⊗ [[1, 1], [1, -1]]."""
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:], c[1:, 0] = 1.0, 1.0
    c[1:, 1:] = _jacobsthal(q)  # symmetric when q ≡ 1 mod 4; C has zero diagonal
    a = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)


@cache
def _base_orders() -> dict[int, tuple[str, int]]:
    """Base orders ``m`` (not a power of two) -> (construction, q), up to MAX_BASE_ORDER."""
    orders: dict[int, tuple[str, int]] = {}
    for q in range(3, MAX_BASE_ORDER):
        if not _is_prime(q):
            continue
        if q % 4 == 3 and q + 1 <= MAX_BASE_ORDER:
            orders.setdefault(q + 1, ("paley1", q))
        if q % 4 == 1 and 2 * (q + 1) <= MAX_BASE_ORDER:
            orders.setdefault(2 * (q + 1), ("paley2", q))
    return {m: c for m, c in sorted(orders.items()) if m & (m - 1)}  # powers of two: Sylvester does them


def factor(n: int) -> tuple[int, int] | None:
    """``(m, p)`` with ``n = m · p``, ``p`` a power of two as large as possible, ``m`` 1 or a base order."""
    if n <= 0:
        return None
    p = n & -n  # largest power of two dividing n
    while p >= 1:
        m = n // p
        if m == 1 or m in _base_orders():
            return m, p
        p //= 2
    return None


def supported(n: int) -> bool:
    return factor(n) is not None


def _check(n: int) -> tuple[int, int]:
    f = factor(n)
    if f is None:
        raise QuantkitError(
            f"no Hadamard matrix construction for size {n}: quantkit builds orders m·2^k with m = 1 or a "
            f"Paley order up to {MAX_BASE_ORDER} (q+1 for a prime q ≡ 3 mod 4, 2(q+1) for a prime q ≡ 1 mod 4)")
    return f


@cache
def _base_matrix(m: int) -> torch.Tensor:
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    construction, q = _base_orders()[m]
    return _paley1(q) if construction == "paley1" else _paley2(q)


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The ±1 Hadamard matrix ``H_m ⊗ H_{2^k}`` of order ``n`` (dense; for tests and folding)."""
    m, p = _check(n)
    h = _base_matrix(m)
    syl = torch.ones(1, 1, dtype=torch.float64)
    while syl.shape[0] < p:
        syl = torch.cat([torch.cat([syl, syl], 1), torch.cat([syl, -syl], 1)], 0)
    return torch.kron(h, syl).to(dtype)


def hadamard_transform(x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """``x Hᵀ / sqrt(n)`` over the last dimension ``n`` of ``x [..., n]``, in ``x``'s dtype (math in ≥ float32).

    ``inverse=True`` computes ``x H / sqrt(n)``, the inverse (only the base factor is not symmetric).
    """
    n = x.shape[-1]
    m, p = _check(n)
    work_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(work_dtype).reshape(-1, m, p)  # index i = a·p + b  ->  [rows, a, b]
    h = 1
    while h < p:  # Walsh–Hadamard butterflies over the power-of-two factor b
        y = y.reshape(-1, m, p // (2 * h), 2, h)
        y = torch.cat([y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]], dim=-1)
        h *= 2
    y = y.reshape(-1, m, p)
    if m > 1:  # the small dense base factor acts on index a
        base = _base_matrix(m).to(work_dtype)
        y = torch.matmul(base.T if inverse else base, y)
    return (y / math.sqrt(n)).reshape(x.shape).to(x.dtype)


def random_hadamard(n: int, generator: torch.Generator, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """An orthogonal ``[n, n]``: the normalized Hadamard matrix with random signs on its rows."""
    signs = torch.randint(0, 2, (n,), generator=generator).to(torch.float64) * 2 - 1
    return (signs[:, None] * hadamard_matrix(n) / math.sqrt(n)).to(dtype)
