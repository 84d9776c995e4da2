"""What a quantization run reports: one record per linear, and the run's totals."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .qlinear import QuantizedLinear


@dataclass(frozen=True)
class LayerReport:
    """``relative_error`` is ‖(W − Q)X‖² / ‖WX‖² on the quantized-path calibration inputs, from H;
    None when the solver used no statistics. ``tokens``: how many calibration tokens its statistics
    came from. For a routed linear (an expert's, `compquant.core.routing`) ``routed_tokens`` is how
    many its router sent it, and ``fallback`` what it was quantized from when those were too few
    (``all-tokens``, or the fallback solver, also named in ``solver``)."""

    name: str
    solver: str
    shape: tuple[int, int]
    relative_error: float | None
    seconds: float
    tokens: int | None = None
    routed_tokens: int | None = None
    fallback: str | None = None


@dataclass(frozen=True)
class BlockReport:
    """How a learner trained one block: the mean loss of each epoch, and the time it took."""

    name: str
    learner: str
    losses: list[float]
    seconds: float


@dataclass
class QuantReport:
    solver: str
    calibration_tokens: int = 0
    seconds: float = 0.0
    layers: list[LayerReport] = field(default_factory=list)
    records: dict[str, QuantizedLinear] = field(default_factory=dict, repr=False)
    """Codes and grids of every quantized linear, by path, for the exporters."""
    blocks: list[BlockReport] = field(default_factory=list)
    """One entry per block a learner trained (none without a learner)."""

    def to_dict(self) -> dict[str, Any]:
        return {"solver": self.solver, "calibration_tokens": self.calibration_tokens, "seconds": self.seconds,
                "layers": [asdict(layer) for layer in self.layers], "blocks": [asdict(block) for block in self.blocks]}

    @property
    def mean_relative_error(self) -> float | None:
        errors = [layer.relative_error for layer in self.layers if layer.relative_error is not None]
        return sum(errors) / len(errors) if errors else None
