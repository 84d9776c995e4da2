"""Hadamard matrices of the sizes real models need, built by known constructions.

A size n is written as ``K · 2^m`` with the 2^m part from Sylvester doubling and K from a Paley
construction on a prime q (docs/transforms.md, "Hadamard matrices"):

* Paley I, q ≡ 3 (mod 4): order q + 1;
* Paley II, q ≡ 1 (mod 4): order 2(q + 1).

The largest power of two that leaves a constructible K is used (576 = 36·16 with Paley II on 17,
1536 = 12·128 with Paley I on 11, 11008 = 5504·2 with Paley I on 5503). A size with no such
factorization raises `HadamardSizeError`; callers may fall back to a seeded random orthogonal matrix.
"""
from __future__ import annotations

import functools
import math

import torch
from pydantic import Field, ValidationInfo, field_validator
from torch import Tensor

from ..core.online import OnlineOp, OnlineOpOptions
from ..core.plugin_manager import hookimpl


class HadamardSizeError(ValueError):
    """No Sylvester × Paley construction exists for this size."""


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    return all(q % d for d in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> Tensor:
    """Q_ij = χ(j − i) with χ the quadratic character mod the prime q."""
    squares = torch.zeros(q, dtype=torch.int64)
    squares[[(x * x) % q for x in range(1, q)]] = 1
    chi = torch.where(squares.bool(), 1, -1)
    chi[0] = 0
    index = (torch.arange(q).unsqueeze(0) - torch.arange(q).unsqueeze(1)) % q
    return chi[index]


def _paley_one(q: int) -> Tensor:
    """Order q + 1 for a prime q ≡ 3 (mod 4): H = I + S, S = [[0, 1ᵀ], [−1, Q]]."""
    s = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)
    return torch.eye(q + 1, dtype=torch.int64) + s


def _paley_two(q: int) -> Tensor:
    """Order 2(q + 1) for a prime q ≡ 1 (mod 4): C = [[0, 1ᵀ], [1, Q]] with every 0 replaced by
    [[1, 1], [1, −1]] and every ±1 by ±[[1, −1], [−1, −1]]."""
    c = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    zero_block = torch.tensor([[1, 1], [1, -1]])
    sign_block = torch.tensor([[1, -1], [-1, -1]])
    blocks = torch.where((c == 0).unsqueeze(-1).unsqueeze(-1), zero_block, c.unsqueeze(-1).unsqueeze(-1) * sign_block)
    return blocks.permute(0, 2, 1, 3).reshape(2 * (q + 1), 2 * (q + 1))


def _base(k: int) -> Tensor | None:
    """An integer Hadamard matrix of order k from Paley I or II, or None."""
    if k in (1, 2):
        return torch.tensor([[1]]) if k == 1 else torch.tensor([[1, 1], [1, -1]])
    if _is_prime(k - 1) and (k - 1) % 4 == 3:
        return _paley_one(k - 1)
    if k % 2 == 0 and _is_prime(k // 2 - 1) and (k // 2 - 1) % 4 == 1:
        return _paley_two(k // 2 - 1)
    return None


@functools.lru_cache(maxsize=32)
def hadamard_factors(n: int) -> tuple[Tensor, int]:
    """(H_K as an integer ±1 matrix, 2^m) with n = K · 2^m, K as small as a construction allows."""
    if n < 1:
        raise HadamardSizeError(f"a Hadamard matrix needs a positive size, got {n}")
    power = 1 << ((n & -n).bit_length() - 1)  # largest power of two dividing n
    while power >= 1:
        base = _base(n // power)
        if base is not None:
            return base, power
        power //= 2
    raise HadamardSizeError(
        f"no Hadamard matrix of size {n} can be built from Sylvester doubling and Paley I/II on a prime; "
        "use a power of two, a size K·2^m with K = q+1 (prime q ≡ 3 mod 4) or 2(q+1) (prime q ≡ 1 mod 4), "
        "or a seeded random orthogonal matrix instead"
    )


def sylvester(power: int) -> Tensor:
    h = torch.ones(1, 1, dtype=torch.int64)
    while h.shape[0] < power:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard(n: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """The orthonormal Hadamard matrix H_K ⊗ H_{2^m} / √n."""
    base, power = hadamard_factors(n)
    return torch.kron(base.to(dtype), sylvester(power).to(dtype)) / math.sqrt(n)


def random_hadamard(n: int, generator: torch.Generator, dtype: torch.dtype = torch.float64) -> Tensor:
    """A randomized Hadamard rotation H · diag(s) with random signs s (QuIP#/QuaRot)."""
    signs = torch.randint(0, 2, (n,), generator=generator).to(dtype) * 2 - 1
    return hadamard(n, dtype) * signs


def random_orthogonal(n: int, generator: torch.Generator, dtype: torch.dtype = torch.float64) -> Tensor:
    """A seeded Haar-random orthogonal matrix (QR with the sign fix)."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).to(dtype)


class OnlineHadamardOptions(OnlineOpOptions):
    n: int = Field(description="size of the Hadamard matrix: the width of the tensors it turns")

    @field_validator("n")
    @classmethod
    def _fits_its_site(cls, n: int, info: ValidationInfo) -> int:
        width = (info.context or {}).get("width")
        if width is not None and n != width:
            raise ValueError(f"a Hadamard of size {n} cannot turn tensors of width {width}")
        hadamard_factors(n)  # a size with no construction is refused here, before anything is built
        return n


class OnlineHadamard(OnlineOp):
    """``x ↦ x · H_nᵀ`` (= x·H for symmetric H) on the last dimension, through the Kronecker factors
    (K×K and 2^m×2^m matmuls), so no n×n matrix is stored. Attached in front of a linear whose weight
    took ``W · Hᵀ`` offline."""

    Options = OnlineHadamardOptions

    def __init__(self, n: int) -> None:
        super().__init__()
        base, power = hadamard_factors(n)
        self.n = n
        self.register_buffer("base", base.to(torch.float32) / math.sqrt(base.shape[0]), persistent=False)
        self.register_buffer("power", sylvester(power).to(torch.float32) / math.sqrt(power), persistent=False)

    def options(self) -> OnlineHadamardOptions:
        return OnlineHadamardOptions(n=self.n)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        blocks = x.reshape(*shape[:-1], self.base.shape[0], self.power.shape[0])
        base, power = self.base.to(x.dtype), self.power.to(x.dtype)
        return (base @ blocks @ power.T).reshape(shape)

    def extra_repr(self) -> str:
        return f"n={self.n}, factors={self.base.shape[0]}x{self.power.shape[0]}"


@hookimpl
def compquant_register_online_ops(register) -> None:
    register("hadamard", OnlineHadamard)
