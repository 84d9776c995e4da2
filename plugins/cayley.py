"""Cayley SGD on the orthogonal group (Li, Fuxin and Todorovic, ICLR 2020), as SpinQuant trains its
rotations with.

For an orthogonal parameter X with (momentum-averaged) Euclidean gradient M, the Riemannian step
direction is the skew-symmetric ``A = M Xᵀ − X Mᵀ``; the update is the Cayley transform
``Y = (I + t/2·A)⁻¹ (I − t/2·A) X``, orthogonal whenever X is, so X stays on the manifold up to
rounding. The step is capped, ``t = min(lr, 1/(‖A‖₁ + 1e-8))``, as in SpinQuant's ``SGDG``. We solve
the Cayley system exactly rather than by SpinQuant's five fixed-point iterations.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


class CayleySGD(torch.optim.Optimizer):
    """SGD with momentum for square orthogonal matrices, staying orthogonal."""

    def __init__(self, params: Iterable[Tensor], lr: float = 1.5, momentum: float = 0.0) -> None:
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        super().__init__(params, {"lr": lr, "momentum": momentum})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch.optim's signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for x in group["params"]:
                if x.grad is None:
                    continue
                if x.dim() != 2 or x.shape[0] != x.shape[1]:
                    raise ValueError(f"CayleySGD optimizes square orthogonal matrices, got shape {tuple(x.shape)}")
                direction = x.grad
                if group["momentum"]:
                    buffer = self.state[x].setdefault("momentum", torch.zeros_like(x))
                    direction = buffer.mul_(group["momentum"]).add_(x.grad)
                skew = direction @ x.T - x @ direction.T
                t = min(group["lr"], 1.0 / (torch.linalg.matrix_norm(skew, ord=1).item() + 1e-8))
                identity = torch.eye(x.shape[0], dtype=x.dtype, device=x.device)
                x.copy_(torch.linalg.solve(identity + t / 2 * skew, (identity - t / 2 * skew) @ x))
        return loss
