"""The configuration reference keeps up with the code: docs/config.md names every config key and
every option of the built-in solvers, learners and transforms."""
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import BaseModel

from compquant import QuantConfig
from compquant.core.plugin_manager import build_registry, create_plugin_manager

REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def config_keys(model: type[BaseModel]) -> Iterator[str]:
    for name, field in model.model_fields.items():
        yield name
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from config_keys(field.annotation)


def built_in_options() -> Iterator[tuple[str, str, str]]:
    registry = build_registry(create_plugin_manager(load_entry_points=False))
    for kind in ("solver", "learner", "transform"):
        for name, entry in registry.table(kind).items():
            yield from ((kind, name, option) for option in entry.obj.Options.model_fields)


@pytest.mark.parametrize("key", sorted(set(config_keys(QuantConfig))))
def test_every_config_key_is_in_the_reference(key):
    assert f"`{key}`" in REFERENCE.read_text(), f"config key {key!r} is missing from docs/config.md"


@pytest.mark.parametrize("kind, name, option", sorted(set(built_in_options())))
def test_every_built_in_option_is_in_the_reference(kind, name, option):
    assert f"`{option}`" in REFERENCE.read_text(), f"{kind} {name!r}'s option {option!r} is missing from docs/config.md"
