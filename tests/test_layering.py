"""The package's layering, checked by import-linter against the contracts in ``pyproject.toml``
(``[tool.importlinter]``): subpackages import only the layers below them, and no modules import
each other in a cycle. The same check runs as ``lint-imports`` from the repository root."""

from __future__ import annotations

from pathlib import Path

import pytest

importlinter_cli = pytest.importorskip("importlinter.cli", reason="import-linter is a dev dependency")

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_the_import_contracts_are_kept(capsys):
    status = importlinter_cli.lint_imports(config_filename=str(PYPROJECT), no_cache=True, no_logo=True)
    assert status == 0, capsys.readouterr().out
