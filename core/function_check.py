"""A run-time proof that a transform kept the model's function.

Transforms promise to leave the model's outputs unchanged (up to rounding), and a broken promise is
silent: the model still runs, only worse. So after each transform the model's logits on one short
probe input are compared with the logits from before any transform ran, and the run stops with the
transform's name when they moved more than a tolerance. Only the logits from before are kept, never
a second copy of the model; each comparison costs one forward pass of at most `PROBE_TOKENS` tokens.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .adapter import ArchitectureAdapter
from .errors import FunctionChangedError

log = logging.getLogger(__name__)

#: Tokens of the probe window: enough positions for attention to matter, few enough that the kept
#: logits stay small (128 × a 49k vocabulary is 25 MB in float32).
PROBE_TOKENS = 128
PROBE_SEED = 0


def default_tolerance(dtype: torch.dtype) -> float:
    """The relative logits change that rounding alone can cause in ``dtype``: a transform's edits
    are computed in float64 and stored in the model's dtype."""
    return 1e-3 if dtype in (torch.float32, torch.float64) else 5e-2


@dataclass
class FunctionCheck:
    """The model's logits on ``probe`` before any transform, to compare after each one."""

    adapter: ArchitectureAdapter
    probe: Tensor
    before: Tensor
    tolerance: float

    @classmethod
    def start(
        cls, model: nn.Module, adapter: ArchitectureAdapter, calibration: Tensor | None, tolerance: float | None = None
    ) -> FunctionCheck | None:
        """Record the logits before the transforms; None (with a log line) when no probe input can
        be made for this model."""
        probe = probe_input(model, calibration)
        if probe is None:
            log.warning("cannot make a probe input for a %s, so the transforms' function check is skipped",
                        type(model).__name__)
            return None
        dtype = next(model.parameters()).dtype
        return cls(adapter, probe, model_logits(model, adapter, probe), tolerance or default_tolerance(dtype))

    def verify(self, model: nn.Module, transform: str) -> float:
        """The relative change of the logits since `start`; raises when it exceeds the tolerance."""
        after = model_logits(model, self.adapter, self.probe)
        change = relative_change(self.before, after)
        log.info("transform %s: logits moved by %.2e relative (tolerance %.0e)", transform, change, self.tolerance)
        if not change <= self.tolerance:  # NaN fails too
            raise FunctionChangedError(
                f"transform {transform!r} changed the model's function: its logits on one calibration window moved by "
                f"{change:.2e} relative to the model before the transforms (tolerance {self.tolerance:.0e}). The "
                "transform does not support this model as it is, or has a bug; nothing was quantized. Report it, raise "
                "transform_tolerance (--transform-tolerance) if the change is rounding, or set transform_check: false "
                "(--no-transform-check) to go on regardless"
            )
        return change


def probe_input(model: nn.Module, calibration: Tensor | None) -> Tensor | None:
    """The first calibration sample (at most `PROBE_TOKENS` tokens of it), or without calibration a
    seeded random input: token ids for a language model, an image for a timm model."""
    generator = torch.Generator().manual_seed(PROBE_SEED)
    if calibration is not None:
        sample = calibration[:1]
        return sample[:, :PROBE_TOKENS] if sample.dim() == 2 else sample
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab:
        return torch.randint(0, vocab, (1, PROBE_TOKENS), generator=generator)
    input_size = getattr(model, "pretrained_cfg", {}).get("input_size")
    if input_size:
        return torch.randn(1, *input_size, generator=generator)
    return None


def model_logits(model: nn.Module, adapter: ArchitectureAdapter, probe: Tensor) -> Tensor:
    """The model's output logits on ``probe``, in float32, on the CPU."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        output = adapter.run(model, probe.to(device))
    logits = getattr(output, "logits", output)
    return logits.detach().float().cpu()


def relative_change(before: Tensor, after: Tensor) -> float:
    """‖after − before‖ / ‖before‖ (Frobenius)."""
    return float((after - before).norm() / before.norm().clamp_min(torch.finfo(before.dtype).tiny))
