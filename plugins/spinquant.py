"""SpinQuant (Liu et al., 2024): learn the residual rotation R1 and the per-block head rotations R2
on calibration data (docs/transforms.md, "SpinQuant").

The model is prepared as for QuaRot (untied head, norms folded, fixed online Hadamard R4 in front of
the MLP output projection). R1 and R2 start from random Hadamards and are trained by Cayley SGD on the
ordinary causal-LM loss of the rotated network whose linears are fake-quantized by RTN on the run's
grid (straight-through gradients); every weight stays frozen. The learned rotations are then folded
into the weights exactly as QuaRot's are, so the function is preserved whatever was learned. QuaRot's
online R3 on queries and keys is an option here too (``r3``); it changes neither training nor weights.

Learned rotations are saved, keyed by a fingerprint of the model, the calibration data, the grid and
the options, in ``$COMPQUANT_CACHE_DIR`` (default ``~/.cache/compquant``) or at ``rotations``; a second
run with the same inputs loads them instead of training again.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path

import torch
from pydantic import Field
from torch import Tensor, nn

from ..core.adapter import ArchitectureAdapter
from ..core.plugin_manager import hookimpl
from ..core.progress import progress
from ..core.quantizer import Grid
from ..core.transform import Transform, TransformContext, TransformOptions
from .cayley import CayleySGD
from .hadamard import random_hadamard
from .quarot import attention_head_dim, prepare_for_rotation, rotate_heads, rotate_mlp_output, rotate_query_key, rotate_residual

log = logging.getLogger(__name__)


class SpinQuantOptions(TransformOptions):
    steps: int = Field(100, ge=0, description="optimizer steps (paper: 100)")
    lr: float = Field(1.5, gt=0, description="Cayley SGD learning rate, cosine-decayed (paper: 1.5)")
    momentum: float = Field(0.0, ge=0, lt=1, description="Cayley SGD momentum (paper: 0)")
    batch_size: int = Field(8, ge=1, description="calibration sequences per step (paper: 8 GPUs x 1)")
    rotations: Path | None = Field(None, description="file to load learned rotations from, or to save them to")
    reuse: bool = Field(True, description="load previously learned rotations for identical inputs")
    r3: bool = Field(False, description="online Hadamard on post-RoPE queries and keys (for KV-cache quantization)")


class SpinQuant(Transform):
    Options = SpinQuantOptions
    needs_calibration = True

    def attaches_online_ops(self, options: SpinQuantOptions) -> bool:
        return True  # R4 always; R3 with r3

    def apply(self, model: nn.Module, adapter: ArchitectureAdapter, options: SpinQuantOptions, context: TransformContext) -> None:
        if context.calibration is None:
            raise ValueError("SpinQuant learns its rotations from calibration data; run it through `quantize`")
        grid = context.grid or Grid(bits=4, group_size=-1)
        prepare_for_rotation(model, adapter)
        rotate_mlp_output(model, adapter)
        path = options.rotations or _cache_path(model, context, grid, options)
        if options.reuse and path.is_file():
            log.info("loading learned rotations from %s", path)
            r1, r2 = _load(path)
        else:
            r1, r2 = learn_rotations(model, adapter, context.calibration, grid, options, context.seed)
            _save(path, r1, r2)
            log.info("saved learned rotations to %s", path)
        rotate_residual(model, adapter, r1)
        rotate_heads(model, adapter, list(r2))
        if options.r3:
            rotate_query_key(model, adapter)


def learn_rotations(
    model: nn.Module, adapter: ArchitectureAdapter, calibration: Tensor, grid: Grid, options: SpinQuantOptions, seed: int
) -> tuple[Tensor, Tensor]:
    """Train (R1, stacked R2) from random Hadamards; the model's own weights are not changed."""
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    hidden = model.get_submodule(adapter.embedding).weight.shape[1]
    blocks = adapter.block_list(model)
    r1 = nn.Parameter(random_hadamard(hidden, generator).float().to(device))
    r2 = [nn.Parameter(random_hadamard(attention_head_dim(model), generator).float().to(device)) for _ in blocks]
    optimizer = CayleySGD([r1, *r2], lr=options.lr, momentum=options.momentum)
    frozen = {name: p.detach() for name, p in model.named_parameters()}
    order = torch.randperm(calibration.shape[0], generator=generator)
    was_training = model.training
    model.eval()
    for step in progress(range(options.steps), desc="spinquant", total=options.steps):
        for group in optimizer.param_groups:
            group["lr"] = options.lr * 0.5 * (1 + math.cos(math.pi * step / max(options.steps, 1)))
        start = (step * options.batch_size) % calibration.shape[0]
        batch = calibration[order[start : start + options.batch_size]].to(device)
        weights = _rotated_weights(model, adapter, frozen, r1, r2, grid)
        output = torch.func.functional_call(model, weights, (batch,), {"labels": batch, "use_cache": False})
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
        log.debug("spinquant step %d: loss %.4f", step, output.loss.item())
        if step % 10 == 0 or step == options.steps - 1:
            log.info("spinquant step %d/%d: loss %.4f", step + 1, options.steps, output.loss.item())
    model.train(was_training)
    return r1.detach().double().cpu(), torch.stack([r.detach() for r in r2]).double().cpu()


def _rotated_weights(
    model: nn.Module, adapter: ArchitectureAdapter, frozen: dict[str, Tensor], r1: Tensor, r2: list[Tensor], grid: Grid
) -> dict[str, Tensor]:
    """Every weight the rotations touch, rotated, and the block linears fake-quantized with a
    straight-through estimator (norm readers that stay in full precision, a router, are only rotated)."""
    weights = {f"{adapter.embedding}.weight": frozen[f"{adapter.embedding}.weight"] @ r1,
               f"{adapter.head}.weight": frozen[f"{adapter.head}.weight"] @ r1}
    value_name, output_name = adapter.value_output
    for index, (block, rotation) in enumerate(zip(adapter.block_list(model), r2)):
        prefix = f"{adapter.blocks}.{index}"
        layout = adapter.for_block(block)
        quantized = layout.linears()
        readers = [name for names in layout.norms.values() for name in names]
        head_dim = rotation.shape[0]
        for name in dict.fromkeys([*readers, *quantized]):
            w = frozen[f"{prefix}.{name}.weight"]
            w = r1.T @ w if name in layout.residual_writers else w @ r1
            if name == value_name:
                w = torch.einsum("dk,hdi->hki", rotation, w.reshape(-1, head_dim, w.shape[1])).reshape(w.shape)
            if name == output_name:
                w = (w.reshape(w.shape[0], -1, head_dim) @ rotation).reshape(w.shape)
            weights[f"{prefix}.{name}.weight"] = _fake_quantize_ste(w, grid) if name in quantized else w
    return weights


def _fake_quantize_ste(w: Tensor, grid: Grid) -> Tensor:
    with torch.no_grad():
        rounded = torch.empty_like(w)
        step = w.shape[1] if grid.group_size == -1 else grid.group_size
        for start in range(0, w.shape[1], step):
            part = w[:, start : start + step]
            rounded[:, start : start + step] = grid.fake_quantize(part, grid.find_params(part))
    return w + (rounded - w).detach()


def _cache_path(model: nn.Module, context: TransformContext, grid: Grid, options: SpinQuantOptions) -> Path:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    digest.update(context.calibration.cpu().numpy().tobytes())
    settings = {"grid": grid.__dict__, "seed": context.seed, **options.model_dump(mode="json", exclude={"rotations", "reuse", "r3"})}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    folder = Path(os.environ.get("COMPQUANT_CACHE_DIR", Path.home() / ".cache" / "compquant")) / "spinquant"
    return folder / f"{digest.hexdigest()[:32]}.safetensors"


def _save(path: Path, r1: Tensor, r2: Tensor) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".partial")
    save_file({"R1": r1.contiguous(), "R2": r2.contiguous()}, str(temporary))
    temporary.replace(path)


def _load(path: Path) -> tuple[Tensor, Tensor]:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    return tensors["R1"], tensors["R2"]


@hookimpl
def compquant_register_transforms(register) -> None:
    register("spinquant", SpinQuant())
