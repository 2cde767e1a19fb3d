"""The package's layering, checked by import-linter against the contracts in ``pyproject.toml``
(``[tool.importlinter]``): subpackages import only the layers below them, and no modules import
each other in a cycle. The same check runs as ``lint-imports`` from the repository root (CI runs
both). It runs in a child process: import-linter configures logging in a way that disables the
loggers already made, which would silence the package's loggers for the tests after it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("importlinter.cli", reason="import-linter is a dev dependency")

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
CHECK = ("import sys; from importlinter.cli import lint_imports; "
         "sys.exit(lint_imports(config_filename=sys.argv[1], no_cache=True, no_logo=True))")


def test_the_import_contracts_are_kept():
    result = subprocess.run([sys.executable, "-c", CHECK, str(PYPROJECT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
