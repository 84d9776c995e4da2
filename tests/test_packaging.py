"""The wheel installs one import namespace, `compquant`, and a `compquant` console script."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # builds and installs a wheel
def test_wheel_holds_only_the_compquant_namespace(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
        check=True,
    )
    (wheel,) = tmp_path.glob("compquant-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert top_level == {"compquant", next(n for n in top_level if n.endswith(".dist-info"))}
    for package in ("core", "plugins", "models", "evaluation"):
        assert f"compquant/{package}/__init__.py" in names
    assert not any(name.startswith("compquant/tests/") or name.startswith("compquant/bench/") for name in names)
    task_configs = {f"compquant/evaluation/tasks/{path.name}" for path in (ROOT / "evaluation" / "tasks").glob("*.yaml")}
    assert task_configs and task_configs <= set(names)  # the lm-eval tasks of `compquant eval --tasks`
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "compquant = compquant.cli:main" in entry_points

    # installed from the wheel alone (no source tree on the path), the API imports and nothing generic does
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--target", str(site),
                    str(wheel)], check=True)
    probe = ("import importlib.util, compquant; "
             "assert compquant.__file__.startswith(%r), compquant.__file__; "
             "assert callable(compquant.quantize) and callable(compquant.quantize_layer); "
             "assert importlib.util.find_spec('core') is None and importlib.util.find_spec('models') is None")
    subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(site)!r}); " + probe % str(site)],
                   check=True, cwd=tmp_path)
