"""A slow, obviously-correct float64 reference of the compensation solvers' equations
(docs/methods.md §1–3): column by column, with explicit inverses
of the remaining-columns Hessian, no U factor and no lazy-block algebra. Lazy blocks appear only where
the released code's behaviour depends on them: which value of a frozen column later blocks see, and
which weights a group's grid is taken from.

Below it, the same for the learners (docs/learners.md): a tiny float64 block to train, and each
learner's equations written out (per-group grids, the weight rebuilt from its SVD, Adam by hand)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compquant import BlockTask, Grid


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


# ------------------------------------------------------------------------------ learners' reference
class TinyBlock(nn.Module):
    """A residual MLP block in float64, ``x + down(silu(up(x)))``: the block the learners' references train."""

    def __init__(self, width: int, hidden: int, generator: torch.Generator) -> None:
        super().__init__()
        self.up = nn.Linear(width, hidden, bias=False, dtype=torch.float64)
        self.down = nn.Linear(hidden, width, bias=False, dtype=torch.float64)
        with torch.no_grad():
            self.up.weight.copy_(torch.randn(hidden, width, generator=generator, dtype=torch.float64) / width**0.5)
            self.down.weight.copy_(torch.randn(width, hidden, generator=generator, dtype=torch.float64) / hidden**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.silu(self.up(x)))


@pytest.fixture
def tiny_task():
    """Factory: a `BlockTask` on a `TinyBlock` with ``following`` more blocks to look ahead through;
    the quantized-path inputs are the full-precision ones plus noise. The same arguments give the
    same task."""

    def make(grid: Grid, *, following: int = 0, batches: int = 3, seed: int = 0) -> BlockTask:
        generator = torch.Generator().manual_seed(seed)
        blocks = [TinyBlock(16, 24, generator) for _ in range(1 + following)]
        fp_inputs = [torch.randn(2, 5, 16, generator=generator, dtype=torch.float64) for _ in range(batches)]
        inputs = [x + 0.05 * torch.randn(x.shape, generator=generator, dtype=torch.float64) for x in fp_inputs]
        with torch.no_grad():
            targets = [[blocks[0](x) for x in fp_inputs]]
            for block in blocks[1:]:
                targets.append([block(y) for y in targets[-1]])
        linears = {"up": blocks[0].up, "down": blocks[0].down}
        return BlockTask("tiny", blocks[0], linears, inputs, [{}] * batches, targets[0], blocks[1:], targets[1:],
                         [[{}] * batches for _ in blocks[1:]], grid, seed=7)

    return make


def reference_learning(
    task: BlockTask,
    *,
    epochs: int,
    lr: float,
    sv_lr: float = 0.0,
    band: int | None = None,
    rank: int | None = None,
    penalty: float = 0.0,
    lambda_cl: float = 1.0,
) -> tuple[list[float], dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """LWC (``band`` None), LSI (``band`` 0) or SDE trained on a `TinyBlock` task by their equations
    (docs/learners.md §1-4): asymmetric per-group grids on ``[sigmoid(β)·min(W, 0), sigmoid(γ)·max(W, 0)]``,
    rounding straight through; ``W(E) = U (diag(σ) + E) Vᵀ`` rebuilt from the SVD with E a dense
    matrix masked to its band and leading ``rank`` directions; the look-ahead terms through the
    following blocks; Adam written out, batches in the frame's seeded order. Returns the mean loss
    of each epoch, the learned weights and the learned (lo, hi) of every linear."""
    grid = task.grid
    qmax = 2**grid.bits - 1
    base = {name: linear.weight.detach().clone() for name, linear in task.linears.items()}
    trained: list[tuple[torch.Tensor, float]] = []
    logits, expansion, svd, masks = {}, {}, {}, {}
    for name, w in base.items():
        groups = len(range(0, w.shape[1], grid.group_size))
        logits[name] = [torch.full((w.shape[0], groups), 4.0, dtype=torch.float64, requires_grad=True) for _ in "γβ"]
        trained += [(logit, lr) for logit in logits[name]]
        if band is not None:
            svd[name] = torch.linalg.svd(w, full_matrices=False)
            full = svd[name][1].shape[0]
            size = min(rank or full, full)
            rows, columns = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
            masks[name] = ((rows - columns).abs() <= band).double()
            expansion[name] = torch.zeros(size, size, dtype=torch.float64, requires_grad=True)
            trained.append((expansion[name], sv_lr))

    def weight(name: str) -> torch.Tensor:
        if band is None:
            return base[name]
        u, sigma, vh = svd[name]
        e = expansion[name] * masks[name]
        pad = sigma.shape[0] - e.shape[0]
        return u @ (torch.diag(sigma) + F.pad(e, (0, pad, 0, pad))) @ vh

    def interval(name: str, w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        part = w[:, group * grid.group_size:(group + 1) * grid.group_size]
        upper, lower = (torch.sigmoid(logit[:, group]) for logit in logits[name])
        return torch.clamp(part.min(dim=1).values, max=0) * lower, torch.clamp(part.max(dim=1).values, min=0) * upper

    def quantized(name: str) -> torch.Tensor:
        w = weight(name)
        parts = []
        for group in range(logits[name][0].shape[1]):
            part = w[:, group * grid.group_size:(group + 1) * grid.group_size]
            lo, hi = interval(name, w, group)
            scale = ((hi - lo).clamp(min=1e-5) / qmax)[:, None]
            zero = torch.round(-lo[:, None] / scale).detach()
            x = part / scale
            codes = torch.clamp(torch.round(x).detach() + (x - x.detach()) + zero, 0, qmax)  # straight through
            parts.append(scale * (codes - zero))
        return torch.cat(parts, dim=1)

    def forward(x: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        return x + F.linear(F.silu(F.linear(x, up)), down)

    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p, _ in trained]
    generator = torch.Generator().manual_seed(task.seed)
    losses, step = [], 0
    for _ in range(epochs):
        total = 0.0
        for batch in torch.randperm(len(task.inputs), generator=generator).tolist():
            output = forward(task.inputs[batch], quantized("up"), quantized("down"))
            loss = ((output - task.targets[batch]) ** 2).mean()
            for block, targets in zip(task.following, task.following_targets):
                output = forward(output, block.up.weight, block.down.weight)
                loss = loss + lambda_cl * ((output - targets[batch]) ** 2).mean()
            if penalty:
                loss = loss + penalty * sum((expansion[name] * masks[name]).square().sum() for name in expansion)
            grads = torch.autograd.grad(loss, [p for p, _ in trained])
            step += 1
            with torch.no_grad():
                for (p, rate), (m, v), g in zip(trained, moments, grads):
                    m.mul_(0.9).add_(0.1 * g)
                    v.mul_(0.999).add_(0.001 * g * g)
                    p -= rate * (m / (1 - 0.9**step)) / ((v / (1 - 0.999**step)).sqrt() + 1e-8)
            total += loss.item()
        losses.append(total / len(task.inputs))
    with torch.no_grad():
        weights = {name: weight(name) for name in base}
        ranges = {}
        for name, w in weights.items():
            pairs = [interval(name, w, group) for group in range(logits[name][0].shape[1])]
            ranges[name] = (torch.stack([lo for lo, _ in pairs], dim=1), torch.stack([hi for _, hi in pairs], dim=1))
    return losses, weights, ranges


@pytest.fixture
def learner_reference():
    return reference_learning
