"""The manual keeps up with the code: every config key and built-in solver, learner and transform
option is in the config reference, every relative link resolves, and the README stays a front page."""
import re
from pathlib import Path

import pytest

import compquant
from compquant.core.config import CalibrationConfig, GridConfig, QuantConfig
from compquant.core.plugin_manager import default_registry

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CONFIG = (ROOT / "docs" / "config.md").read_text()


def options():
    for model in (QuantConfig, GridConfig, CalibrationConfig):
        yield from ((model.__name__, name) for name in model.model_fields)
    for kind in ("solver", "learner", "transform"):
        for name, entry in default_registry().table(kind).items():
            yield from ((name, option) for option in entry.obj.Options.model_fields)


@pytest.mark.parametrize("owner, option", sorted(set(options())))
def test_every_config_key_and_builtin_option_is_in_the_reference(owner, option):
    assert f"`{option}`" in CONFIG, f"{owner}.{option} is not in docs/config.md"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_relative_links_resolve(page):
    text = page.read_text()
    for target in re.findall(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)", text):
        assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"


def test_readme_is_a_front_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 11_000
    assert "python -m pytest" in readme and "docs/" in readme


def test_no_page_or_docstring_points_outside_the_project():
    sources = [*PAGES, *(path for path in ROOT.rglob("*.py")
                         if not any(part.startswith(".") or part == "build" for part in path.relative_to(ROOT).parts))]
    outside = [str(path.relative_to(ROOT)) for path in sources
               if path.name != "test_docs.py" and "algorithms.md" in path.read_text()]
    assert not outside, f"these cite ../shared/docs/algorithms.md, which is not part of the project: {outside}"
    assert compquant.__doc__
