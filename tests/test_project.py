"""Project-level promises: a silent import, imports running one way, and CI running exactly the README's
test command."""

import ast
import os
import re
import subprocess
import sys

from conftest import ROOT


def test_importing_the_core_prints_nothing_and_writes_nothing(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", "import unet_model_core"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert list(tmp_path.iterdir()) == []


def imported_modules(path):
    """The top-level names of the modules a Python file imports."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_imports_run_one_way_from_the_package_to_the_core():
    project = {"unet_nuclei", "Train", "Predict_mask"}
    assert not imported_modules(ROOT / "unet_model_core.py") & project
    for module in (ROOT / "unet_nuclei").glob("*.py"):
        assert not imported_modules(module) & {"Train", "Predict_mask"}, module.name


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci_lines = [
        c for c in (ROOT / ".ci" / "run").read_text().splitlines() if c and not c.startswith(("#", "set ", "cd "))
    ]
    assert len(ci_lines) == 1
    assert ci_lines[0] in readme


def test_nothing_generated_is_tracked_by_git():
    result = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        return  # not a git checkout (for example an unpacked archive): nothing to check
    tracked = result.stdout.splitlines()
    banned = re.compile(r"(^|/)(runs|dataset|predictions|\.ipynb_checkpoints)/|\.(keras|h5)$")
    shipped = re.compile(r"^models/[^/]+/model\.keras$")  # the shipped pretrained models, and only them
    assert not [path for path in tracked if banned.search(path) and not shipped.match(path)]
