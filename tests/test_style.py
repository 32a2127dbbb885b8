"""The code keeps the form ruff gives it (DESIGN: "`ruff` (lint and format) keeps the form"): `ruff check`
with the rules of pyproject.toml, and `ruff format --check`, both on the whole repository, notebook included."""

import importlib.util
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("ruff") is None,
    reason="ruff is not installed; pip install -r requirements-dev.txt installs it",
)


def ruff(*args: str) -> subprocess.CompletedProcess:
    # --no-cache: a test run leaves no .ruff_cache in the checkout.
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args, "--no-cache", "."], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_ruff_check_finds_nothing():
    result = ruff("check", "--output-format", "concise")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_code_is_formatted_as_ruff_format_leaves_it():
    result = ruff("format", "--check")
    assert result.returncode == 0, "run `ruff format .`; it would change:\n" + result.stdout + result.stderr
