"""What a transform is: a change to the full-precision model that keeps its function and makes it
easier to quantize (rotations, scalings). Plugins subclass `Transform` and register an instance."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from torch import Tensor, nn

    from .adapter import ArchitectureAdapter
    from .quantizer import Grid


@dataclass(frozen=True)
class TransformContext:
    """What a transform may use besides the model: the run's calibration inputs (None when only
    evaluating), the weight grid that will follow (None when only evaluating), and the run's seed."""

    calibration: Tensor | None = None
    grid: Grid | None = None
    seed: int = 0


class TransformOptions(BaseModel):
    """Base for a transform's own options; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Transform(ABC):
    """Runs once on the full-precision model, before calibration, in place.

    Weight edits go straight into the model; operations that must run at inference time (an online
    Hadamard in front of a linear, say) are attached with `compquant.core.online.attach_input_op`,
    so the calibration loop, the evaluation and the saved model all see them.
    """

    Options: ClassVar[type[TransformOptions]] = TransformOptions
    #: Whether `apply` learns from calibration data (and so needs it).
    needs_calibration: ClassVar[bool] = False

    def options(self, values: dict[str, Any] | None = None) -> TransformOptions:
        return self.Options(**(values or {}))

    def attaches_online_ops(self, options: TransformOptions) -> bool:
        """Whether `apply` with ``options`` attaches online operations (which most export formats
        cannot store), so that the format is checked before the work."""
        return False

    @abstractmethod
    def apply(
        self,
        model: nn.Module,
        adapter: ArchitectureAdapter,
        options: TransformOptions,
        context: TransformContext,
    ) -> None:
        """Transform ``model`` in place without changing its function."""
