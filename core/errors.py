"""Errors that compquant raises for bad input. Each message says what was wrong and how to fix it."""
from __future__ import annotations


class CompquantError(Exception):
    """Base class for every error compquant raises on purpose."""


class UnknownPluginError(CompquantError, KeyError):
    """A solver, transform or adapter name that no registered plugin provides."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class PluginConflictError(CompquantError):
    """Two plugins registered the same name for the same kind."""


class UnknownHookError(CompquantError):
    """A plugin implements a hook that compquant does not specify (most likely a misspelt name)."""


class DataNotFoundError(CompquantError, FileNotFoundError):
    """A dataset could be found neither in the local data directory nor through the hub loader."""


class OutputPathError(CompquantError):
    """The output location would overwrite the input model or an existing folder."""


class ModelLoadError(CompquantError):
    """A model specification that names no loadable model."""


class FunctionChangedError(CompquantError):
    """A transform that should keep the model's function changed its outputs beyond rounding."""


class NonFiniteError(CompquantError, ArithmeticError):
    """NaN or Inf in a model's weights, in a tensor about to be written, or in a reported metric."""


class FileFormatError(CompquantError, ValueError):
    """A file that is not what its name or place says (malformed JSON or YAML, binary where text belongs)."""
