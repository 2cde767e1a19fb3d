"""MkDocs hook: fills the generated parts of the documentation at build time, from the code.

A page asks for a part with a marker comment on a line of its own:

* ``<!-- rnp:cli -->``: every ``rnp`` subcommand with its options and help, read from the
  argparse parser of ``rnp.cli.main`` (for ``rnp defend``, also the options that only another
  method than RNP takes);
* ``<!-- rnp:config -->``: one table per config dataclass (field, type, default, description);
  the descriptions are the fields' docstrings, which are also the options' ``--help``;
* ``<!-- rnp:docstrings attacks|defenses|detectors -->``: the module docstring of every
  registered attack, defense or poisoned-sample detector (paper, defaults, deviations);
* ``<!-- rnp:bench FOLDER -->``: the report of the committed cell records under
  ``benchmarks/results/FOLDER/cells``, written by the benchmark report code (no model needed).

Nothing is written to the source tree; a marker the hook does not know fails the build. The
``rnp`` package must be importable (installed, or ``PYTHONPATH=src``).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
import sys
import typing
from pathlib import Path

from rnp.attacks import ATTACKS
from rnp.bench.report import markdown as bench_markdown
from rnp.cli.main import build_parser
from rnp.cli.options import field_descriptions
from rnp.defenses import DEFENSES, RNPConfig
from rnp.detection import SAMPLE_DETECTORS, BackdoorVerdict, Exposure, RecoveredTrigger, TriggerComparison
from rnp.defenses.trigger_reverse import TriggerReverseConfig
from rnp.training import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^<!-- rnp:(\w+)(?: ([\w.-]+))? -->$", re.MULTILINE)


def on_page_markdown(markdown: str, **_) -> str:
    """Replaces every marker of the page with the part it names."""
    return MARKER.sub(lambda match: _part(match.group(1), match.group(2)), markdown)


def _part(name: str, argument: str | None) -> str:
    if name == "cli":
        return cli_reference()
    if name == "config":
        return config_reference()
    if name == "docstrings" and argument in REGISTRIES:
        return module_docstrings(REGISTRIES[argument]())
    if name == "bench" and argument:
        return bench_report(ROOT / "benchmarks" / "results" / argument)
    raise ValueError(f"docs/hooks.py: unknown marker rnp:{name} {argument or ''}")


def _cell(text: str) -> str:
    """Text that stays inside one Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|").replace("<", "&lt;")


# -- the command line ----------------------------------------------------------------------------


def cli_reference() -> str:
    """Every subcommand: its help line, usage and one table row per option, by option group."""
    parser = build_parser()
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    summaries = {choice.dest: choice.help for choice in subcommands._choices_actions}
    parts = []
    for name, sub in subcommands.choices.items():
        parts += [f"## rnp {name}", "", _cell(summaries.get(name, "")), "",
                  "```text", sub.format_usage().strip(), "```", ""]
        if name == "defend":
            parts += [("The settings below are RNP's (`--method rnp`, the default). "
                       "`rnp defend --method NAME` takes the settings of defense NAME instead, "
                       "one option per field of its config class: see "
                       "[Configuration](configuration.md)."), ""]
            parts += _method_only_options()
        parts += _option_tables(sub)
    return "\n".join(parts)


def _defend_options(method: str) -> dict[str, argparse.Action]:
    """The options of ``rnp defend --method METHOD`` that are not fields of its config class."""
    parser = build_parser(method)
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    config_group = f"{DEFENSES[method].config_class.__name__} settings"
    return {action.option_strings[0]: action
            for group in subcommands.choices["defend"]._action_groups if group.title != config_group
            for action in group._group_actions if action.option_strings and action.help != argparse.SUPPRESS}


def _method_only_options() -> list[str]:
    """A table of the options that only another defense's ``rnp defend`` takes (beyond its
    config fields), such as Neural Cleanse's ``--budget``; empty when there are none."""
    shown = _defend_options("rnp")
    rows = []
    for method in sorted(DEFENSES):
        formatter = build_parser(method)._get_formatter()
        for flag, action in _defend_options(method).items():
            if flag not in shown:
                value = " {" + ",".join(map(str, action.choices)) + "}" if action.choices else ""
                default = f"`{_cell(action.default)}`" if action.default not in (None, False) else ""
                rows.append(f"| `--method {method}` | `{flag}{value}` | {default} | "
                            f"{_cell(formatter._expand_help(action))} |")
    if not rows:
        return []
    return ["**Options of another method only**", "", "| method | option | default | help |",
            "|---|---|---|---|", *rows, ""]


def _option_tables(parser: argparse.ArgumentParser) -> list[str]:
    formatter = parser._get_formatter()
    lines = []
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if a.help != argparse.SUPPRESS]
        if not actions:
            continue
        lines += [f"**{group.title}**", "", "| option | default | help |", "|---|---|---|"]
        for action in actions:
            flags = ", ".join(action.option_strings) or action.dest
            value = "" if action.nargs == 0 else f" {formatter._format_args(action, action.dest.upper())}"
            if action.choices and not isinstance(action, argparse._SubParsersAction):
                value = " {" + ",".join(map(str, action.choices)) + "}"
            shown = action.default not in (None, False, [], argparse.SUPPRESS) and action.nargs != 0
            default = f"`{_cell(action.default)}`" if shown else ""
            text = formatter._expand_help(action) if action.help else ""
            lines.append(f"| `{flags}{value}` | {default} | {_cell(text)} |")
        lines.append("")
    return lines


# -- configuration -------------------------------------------------------------------------------


def config_classes() -> dict[str, type]:
    """Every config dataclass the command line exposes, by the place it is used."""
    classes = {"rnp train": TrainConfig, "rnp inspect (--trigger-*)": TriggerReverseConfig}
    for name, defense in sorted(DEFENSES.items()):
        classes[f"rnp defend --method {name}"] = defense.config_class
    return classes


def config_reference() -> str:
    """One table per config class: field, type, default and its docstring."""
    parts = []
    for used_by, config_cls in config_classes().items():
        descriptions = field_descriptions(config_cls)
        hints = typing.get_type_hints(config_cls)
        parts += [f"## {config_cls.__name__}", "",
                  f"`{config_cls.__module__}.{config_cls.__name__}`, used by `{used_by}`"
                  + (" (and `rnp inspect` / `rnp scan-data` take its unlearning fields)"
                     if config_cls is RNPConfig else "") + ".", "",
                  "| field | type | default | description |", "|---|---|---|---|"]
        for field in dataclasses.fields(config_cls):
            kind = getattr(hints[field.name], "__name__", None) or str(hints[field.name])
            if typing.get_origin(hints[field.name]) is not None:
                kind = str(hints[field.name])
            parts.append(f"| `{field.name}` | `{_cell(kind)}` | `{_cell(repr(field.default))}` | "
                         f"{_cell(descriptions.get(field.name, ''))} |")
        parts.append("")
    return "\n".join(parts)


# -- attacks, defenses, detectors ----------------------------------------------------------------


REGISTRIES = {
    "attacks": lambda: ATTACKS,
    "defenses": lambda: DEFENSES,
    "detectors": lambda: {"backdoored model and its kind, repeated": BackdoorVerdict,
                          "target label and backdoored model": Exposure,
                          "trigger reverse-engineering": RecoveredTrigger,
                          "trigger recovery on both models": TriggerComparison, **SAMPLE_DETECTORS},
}


def module_docstrings(registry: dict[str, type]) -> str:
    """The module docstring of each registered class, once per module, under the names it
    serves (several detectors share one module)."""
    names_by_module: dict[str, list[str]] = {}
    for name, cls in registry.items():
        names_by_module.setdefault(cls.__module__, []).append(name)
    parts = []
    for module, names in sorted(names_by_module.items(), key=lambda item: item[1][0]):
        heading = ", ".join(f"`{n}`" if " " not in n else n for n in names)
        text = inspect.getdoc(sys.modules[module]) or ""
        parts += [f"### {heading}", "", f"Module `{module}`.", "", _markdown(text), ""]
    return "\n".join(parts)


def _markdown(docstring: str) -> str:
    """A reST-flavoured docstring as Markdown: ``code`` as `code`, roles dropped, and a blank
    line before a list so that Markdown sees it."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", docstring).replace("``", "`")
    text = re.sub(r"\n(?=(?:\* |- |\d+\. ))", "\n\n", text)
    return text.replace("::\n", ":\n")


# -- benchmark records ---------------------------------------------------------------------------


def bench_report(folder: Path) -> str:
    """The report of the records committed under ``folder/cells``, as ``rnp bench`` writes it."""
    paths = sorted((folder / "cells").glob("*.json"))
    if not paths:
        return f"No cell record is committed under `{folder.relative_to(ROOT)}` yet."
    records = [json.loads(path.read_text()) for path in paths]
    text = bench_markdown(records, title=folder.name)
    return "\n".join(line for line in text.splitlines() if not line.startswith("# "))
