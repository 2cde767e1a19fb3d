"""Every config field the command line exposes has one description, and ``--help`` shows it.

The description is the field's attribute docstring; the documentation's configuration tables
read the same text (``docs/hooks.py``), so a field without one would be blank in both.
"""

from __future__ import annotations

import dataclasses

import pytest

from rnp.cli.main import main
from rnp.cli.options import field_descriptions
from rnp.defenses import DEFENSES, RNPConfig
from rnp.defenses.trigger_reverse import TriggerReverseConfig
from rnp.training import TrainConfig

CONFIGS = {"train": TrainConfig, "inspect": TriggerReverseConfig,
           **{f"defend --method {name}": cls.config_class for name, cls in sorted(DEFENSES.items())}}


@pytest.mark.parametrize("config_cls", [RNPConfig, *dict.fromkeys(CONFIGS.values())],
                         ids=lambda cls: cls.__name__)
def test_every_field_has_a_description(config_cls):
    descriptions = field_descriptions(config_cls)
    missing = [f.name for f in dataclasses.fields(config_cls) if not descriptions.get(f.name)]
    assert not missing, f"{config_cls.__name__} fields without a docstring: {missing}"


@pytest.mark.parametrize("command", sorted(CONFIGS))
def test_help_shows_each_description_and_default(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "10000")  # one line per option, so no text is wrapped apart
    assert main([*command.split(), "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    config_cls = CONFIGS[command]
    prefix = "trigger-" if command == "inspect" else ""
    for field in dataclasses.fields(config_cls):
        flag = "--" + prefix + field.name.replace("_", "-")
        description = field_descriptions(config_cls)[field.name]
        assert f"{description} (default: {field.default})" in help_text, (command, flag)
        assert flag in help_text, (command, flag)


def test_a_subclass_describes_its_own_default():
    """NAD overrides the shared fine-tuning fields with its paper's values, and says so."""
    nad = field_descriptions(DEFENSES["nad"].config_class)
    ft = field_descriptions(DEFENSES["ft"].config_class)
    assert "NAD's FT baseline" in ft["epochs"] and "paper 4.1" in nad["epochs"]
    assert nad["momentum"] == ft["momentum"]
