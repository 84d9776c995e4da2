"""A slow, obviously-correct float64 reference of the compensation solvers' equations
(docs/methods.md §1–3): column by column, with explicit inverses
of the remaining-columns Hessian, no U factor and no lazy-block algebra. Lazy blocks appear only where
the released code's behaviour depends on them: which value of a frozen column later blocks see, and
which weights a group's grid is taken from."""
from __future__ import annotations

import pytest
import torch

from compquant import Grid


def reference_solve(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    grid: Grid,
    *,
    cross: torch.Tensor | None = None,
    alpha: float = 0.25,
    alpha2: float | None = None,
    fp_cross_input: torch.Tensor | None = None,
    carry: str = "quantized",
    percdamp: float = 0.01,
    blocksize: int = 128,
    act_order: bool = False,
    static_groups: bool = False,
    group_timing: str = "block",
) -> torch.Tensor:
    """Integer codes in original column order. ``cross`` enables GPTAQ's P term, ``alpha2`` with
    ``fp_cross_input`` (X̃Xᵀ) ResComp's R term; ``carry`` is what later blocks see of a frozen column."""
    w, h = weight.double().clone(), hessian.double().clone()
    n = w.shape[1]
    per_row = grid.find_params(w) if grid.group_size == -1 else None
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    if cross is not None:
        cross = cross.double().clone()
        cross[:, dead] = 0
    g = grid.group_size if grid.group_size != -1 else n
    static = [grid.find_params(w[:, s : s + g]) for s in range(0, n, g)] if static_groups and grid.group_size != -1 else None
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(n)
    w, h = w[:, perm], h[perm][:, perm]
    if cross is not None:
        cross = cross[perm][:, perm]
    if fp_cross_input is not None:
        fp_cross_input = fp_cross_input.double()[perm][:, perm]
    original = w.clone()
    h += percdamp * torch.mean(torch.diag(h)) * torch.eye(n, dtype=h.dtype)
    codes = torch.zeros_like(w)
    params = per_row
    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        snapshot = w.clone()
        frozen = []  # (j, w_j before quantization, q_j, P row, R row) of this block
        for j in range(i1, i2):
            if static is not None:
                params = static[int(perm[j]) // g]
            elif grid.group_size != -1 and j % g == 0:
                params = grid.find_params((snapshot if group_timing == "block" else w)[:, j : j + g])
            w_j = w[:, j].clone()
            codes[:, j] = grid.quantize(w_j, params)
            q_j = grid.dequantize(codes[:, j], params)
            inverse = torch.linalg.inv(h[j:, j:])
            w[:, j:] -= torch.outer((w_j - q_j) / inverse[0, 0], inverse[0])  # OBS: optimal given frozen columns
            rest = torch.linalg.inv(h[j + 1 :, j + 1 :]) if j + 1 < n else None
            p = alpha * cross[j, j + 1 :] @ rest if cross is not None and rest is not None else None
            r = alpha2 * fp_cross_input[j, j + 1 :] @ rest if alpha2 is not None and rest is not None else None
            inside = slice(j + 1, i2)
            if p is not None:
                w[:, inside] += torch.outer(w_j, p[: i2 - j - 1])
            if r is not None:
                w[:, inside] += torch.outer(original[:, j] - w_j, r[: i2 - j - 1])
            frozen.append((j, w_j, q_j, p, r))
        low, high = grid.representable_range(params)  # the grid active at the block's last column
        for j, w_j, q_j, p, r in frozen:
            seen = {"quantized": q_j, "compensated": w_j, "clamped": torch.clamp(w_j, low, high)}[carry]
            later = slice(i2 - j - 1, None)
            if p is not None:
                w[:, i2:] += torch.outer(seen, p[later])
            if r is not None:
                w[:, i2:] += torch.outer(original[:, j] - seen, r[later])
    return codes[:, torch.argsort(perm)]


@pytest.fixture
def reference():
    return reference_solve


@pytest.fixture
def asymmetric_layer():
    """Factory: weight, quantized-path inputs X and full-precision inputs X̃ (tokens, columns):
    correlated X̃, and X a perturbed copy, as in a partly quantized network."""

    def make(rows: int = 24, columns: int = 96, tokens: int = 768, seed: int = 0, noise: float = 0.3):
        generator = torch.Generator().manual_seed(seed)
        mixing = torch.randn(columns, columns, generator=generator, dtype=torch.float64) / columns**0.5
        fp_inputs = torch.randn(tokens, columns, generator=generator, dtype=torch.float64) @ mixing
        inputs = fp_inputs + noise * fp_inputs.std() * torch.randn(tokens, columns, generator=generator, dtype=torch.float64)
        weight = torch.randn(rows, columns, generator=generator, dtype=torch.float64)
        return weight, inputs, fp_inputs

    return make


def statistics(inputs: torch.Tensor, fp_inputs: torch.Tensor | None = None):
    tokens = inputs.shape[0]
    hessian = 2 / tokens * inputs.T @ inputs
    cross = None if fp_inputs is None else 2 / tokens * (fp_inputs - inputs).T @ inputs
    return hessian, cross


@pytest.fixture
def layer_statistics():
    return statistics
