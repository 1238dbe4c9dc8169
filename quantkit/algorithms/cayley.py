"""Cayley SGD on the (square) Stiefel manifold: gradient steps that keep ``R`` orthogonal.

For an orthogonal ``R [n, n]`` (or a batch ``[b, n, n]``) with Euclidean gradient ``G`` (plus
momentum ``M ← β M + G``), the skew-symmetric generator ``A = M Rᵀ - R Mᵀ`` gives the
Riemannian descent direction ``-A R``. The step is the Cayley transform

    R ← (I + α/2 A)⁻¹ (I - α/2 A) R,

which is orthogonal for any step size α because ``(I + α/2 A)⁻¹ (I - α/2 A)`` is (A skew), and
to first order equals ``R - α A R``. The step size is capped at ``1 / ‖A‖`` (per matrix) so a
large gradient cannot jump far around the manifold. Computed in float64 and solved exactly
(``torch.linalg.solve``): the matrices are at most a few thousand wide.
"""

from __future__ import annotations

import torch


class CayleySGD(torch.optim.Optimizer):
    """SGD with momentum for orthogonal matrix parameters (each ``[n, n]`` or ``[b, n, n]``)."""

    def __init__(self, params, lr: float = 1.5, momentum: float = 0.9):
        if lr <= 0 or not 0 <= momentum < 1:
            raise ValueError(f"need lr > 0 and 0 <= momentum < 1, got lr={lr}, momentum={momentum}")
        super().__init__(params, {"lr": lr, "momentum": momentum})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 (torch.optim signature)
        loss = None if closure is None else closure()
        for group in self.param_groups:
            for r in group["params"]:
                if r.grad is None:
                    continue
                state = self.state[r]
                g = r.grad.double()
                m = state["momentum"] = g if "momentum" not in state else group["momentum"] * state["momentum"] + g
                rd = r.double()
                a = m @ rd.transpose(-1, -2)
                a = a - a.transpose(-1, -2)  # skew: [.., n, n]
                norm = torch.linalg.matrix_norm(a).clamp(min=1e-12)[..., None, None]
                alpha = torch.clamp(1.0 / norm, max=group["lr"])
                eye = torch.eye(r.shape[-1], dtype=torch.float64, device=r.device)
                rhs = (eye - alpha / 2 * a) @ rd
                r.copy_(torch.linalg.solve(eye + alpha / 2 * a, rhs).to(r.dtype))
        return loss
