import pytest
import torch

from compquant.plugins.hadamard import (
    HadamardSizeError,
    OnlineHadamard,
    hadamard,
    hadamard_factors,
    random_hadamard,
    random_orthogonal,
)

# Sizes real models need (SmolLM2 576/1536/64, Llama-2-7B 4096/11008/128, Qwen 896/4864) and the
# Paley orders the literature tabulates.
SIZES = [1, 2, 4, 12, 20, 28, 36, 44, 60, 64, 68, 76, 84, 108, 128, 140, 576, 896, 1536, 4096, 4864]


@pytest.mark.parametrize("n", SIZES)
def test_hadamard_is_orthogonal_with_plus_minus_one_entries(n):
    base, power = hadamard_factors(n)
    assert base.shape[0] * power == n
    assert set(base.unique().tolist()) <= {-1, 1}
    k = base.shape[0]
    assert torch.equal(base.double() @ base.double().T, k * torch.eye(k, dtype=torch.float64))
    if n <= 1536:  # the Kronecker product of orthogonal factors is orthogonal; check it densely where cheap
        h = hadamard(n)
        torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64))
        torch.testing.assert_close(h.abs(), torch.full((n, n), n**-0.5, dtype=torch.float64))


def test_sizes_missing_from_quarots_tables_are_built():
    assert hadamard_factors(29568)[0].shape[0] == 924  # Qwen2-72B (QuaRot #41): Paley II on 461
    assert hadamard_factors(10944)[0].shape[0] == 684  # QuaRot #74: Paley I on 683
    assert hadamard_factors(4864)[0].shape[0] == 76  # Qwen2.5-0.5B: Paley II on 37


def test_llama2_mlp_size_is_built_from_a_large_paley_factor():
    base, power = hadamard_factors(11008)  # 172·64 needs Williamson; Paley I on the prime 5503 works
    assert (base.shape[0], power) == (5504, 2)
    gram = base.double() @ base.double().T  # exact: integers far below 2^53
    assert torch.equal(gram, 5504 * torch.eye(5504, dtype=torch.float64))


@pytest.mark.parametrize("n", [3, 6, 116, 13696])  # 13696 = 214·64: QuaRot issue #44
def test_size_without_construction_is_a_clear_error(n):
    with pytest.raises(HadamardSizeError, match=f"size {n}.*random orthogonal"):
        hadamard_factors(n)


@pytest.mark.parametrize("n", [64, 576, 1536])
def test_online_hadamard_equals_the_dense_matrix(n):
    x = torch.randn(3, 5, n, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(OnlineHadamard(n)(x), x @ hadamard(n, torch.float32).T, rtol=1e-5, atol=1e-5)


def test_random_rotations_are_orthogonal_and_seeded():
    for make in (random_hadamard, random_orthogonal):
        a = make(36, torch.Generator().manual_seed(1))
        b = make(36, torch.Generator().manual_seed(1))
        assert torch.equal(a, b)
        torch.testing.assert_close(a @ a.T, torch.eye(36, dtype=torch.float64))
