"""The package's imports run one way, bottom up: `core` → `plugins`, `models` → `evaluation` → the
modules at the package root. Every import is read from the source (inside functions too), so a
circle cannot hide behind a local import."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "plugins", "models", "evaluation")
#: What each layer may import besides itself.
ALLOWED = {
    "core": set(),
    "plugins": {"core"},
    "models": {"core"},
    "evaluation": {"core", "plugins", "models"},
    "root": {"core", "plugins", "models", "evaluation"},
}


def layer_of(module: str) -> str:
    """``compquant.core.x`` → core; ``compquant`` and ``compquant.cli`` → root."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in PACKAGES else "root"


def module_name(path: Path) -> str:
    relative = path.relative_to(ROOT).with_suffix("")
    parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
    return ".".join(("compquant", *parts))


def package_modules() -> list[Path]:
    files = [path for package in PACKAGES for path in (ROOT / package).rglob("*.py")]
    return files + sorted(ROOT.glob("*.py"))


def imported(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every compquant import in the file."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "compquant"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "compquant":
                found.append((node.lineno, target))
    return found


@pytest.mark.parametrize("path", package_modules(), ids=lambda path: str(path.relative_to(ROOT)))
def test_no_module_imports_a_layer_above_or_beside_its_own(path):
    layer = layer_of(module_name(path))
    wrong = [f"{path.relative_to(ROOT)}:{line} imports {target} ({layer_of(target)})"
             for line, target in imported(path) if layer_of(target) not in ALLOWED[layer] | {layer}]
    assert not wrong, f"the {layer} layer may import only {sorted(ALLOWED[layer]) or 'itself'}: " + "; ".join(wrong)


def test_the_reader_sees_local_and_relative_imports(tmp_path):
    assert layer_of("compquant.evaluation.datasets") == "evaluation" and layer_of("compquant.cli") == "root"
    pipeline = imported(ROOT / "core" / "pipeline.py")
    assert (next(line for line, target in pipeline if target == "compquant.core.calibration") > 0)
    cli = dict((target, line) for line, target in imported(ROOT / "cli.py"))
    assert "compquant.models.loading" in cli  # imported inside a function
