"""Option errors in the user's terms: which option of which solver, transform or op was wrong, and
the options there are, instead of pydantic's report on its internal class names."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

from .errors import CompquantError


class OptionError(CompquantError, ValueError):
    """An option that a solver, transform or online op does not have, or a value it refuses."""


def describe_validation_error(error: ValidationError, subject: str, model: type[BaseModel]) -> str:
    """One line per problem of ``error``, joined: ``subject: unknown option 'x' (its options: a, b)``
    or ``subject: option a=-1: Input should be ...``."""
    problems = []
    for item in error.errors():
        name = ".".join(str(part) for part in item["loc"]) or "options"
        if item["type"] == "extra_forbidden":
            owner = _model_at(model, item["loc"][:-1])
            known = ", ".join(sorted(owner.model_fields)) if owner is not None else "see the documentation"
            problems.append(f"unknown option {name!r} (the options there: {known})")
        elif item["loc"]:
            problems.append(f"option {name}={_shown(item.get('input'))}: {_message(item)}")
        else:
            problems.append(_message(item))
    return f"{subject}: " + "; ".join(problems)


def checked_options(plugin: Any, values: dict[str, Any] | None, subject: str) -> BaseModel:
    """``plugin.options(values)`` (a solver's or a transform's), or an `OptionError` naming
    ``subject`` (``solver 'gptq'``) and the option."""
    try:
        return plugin.options(values)
    except ValidationError as error:
        raise OptionError(describe_validation_error(error, subject, plugin.Options)) from None


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The nested pydantic model at ``loc`` (``("grid",)`` in a QuantConfig is GridConfig), or None."""
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        annotation = field.annotation if field is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _message(item: dict[str, Any]) -> str:
    return item["msg"].removeprefix("Value error, ")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
