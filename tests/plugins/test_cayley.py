import pytest
import torch

from compquant.plugins.cayley import CayleySGD
from compquant.plugins.hadamard import random_orthogonal


def test_cayley_sgd_stays_orthogonal_over_hundreds_of_steps():
    generator = torch.Generator().manual_seed(0)
    x = torch.nn.Parameter(random_orthogonal(48, generator).float())
    target = torch.randn(48, 48, generator=generator)
    optimizer = CayleySGD([x], lr=1.5, momentum=0.9)
    for _ in range(400):
        optimizer.zero_grad()
        ((x @ target).tanh().sum() + (x - target).pow(2).sum()).backward()
        optimizer.step()
        assert (x.T @ x - torch.eye(48)).abs().max() < 1e-5


def test_cayley_sgd_finds_a_rotation():
    """Procrustes: min ‖RA − B‖² over orthogonal R with B = QA has its minimum 0 at R = Q; from a
    rotation well away from Q (within its basin), Cayley SGD walks to it."""
    generator = torch.Generator().manual_seed(1)
    a = torch.randn(16, 200, generator=generator, dtype=torch.float64) / 200**0.5
    q = random_orthogonal(16, generator)
    q[:, 0] *= torch.linalg.det(q).sign()  # reachable from the identity: same connected component
    skew = torch.randn(16, 16, generator=generator, dtype=torch.float64)
    r = torch.nn.Parameter(q @ torch.linalg.matrix_exp(0.2 * (skew - skew.T)))
    optimizer = CayleySGD([r], lr=0.1)
    losses = []
    for _ in range(300):
        optimizer.zero_grad()
        loss = (r @ a - q @ a).pow(2).sum()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 1e-6 * losses[0]
    torch.testing.assert_close(r.detach(), q, atol=1e-4, rtol=0)


def test_cayley_sgd_refuses_non_square_parameters():
    x = torch.nn.Parameter(torch.ones(3, 2))
    x.grad = torch.ones(3, 2)
    with pytest.raises(ValueError, match="square orthogonal"):
        CayleySGD([x]).step()
