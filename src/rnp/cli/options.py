"""Command-line options generated from config dataclasses, so every field can be overridden.

A field ``unlearn_lr`` becomes ``--unlearn-lr``; tuples take several values; booleans, optional
ones too (``bool | None``), get ``--name`` / ``--no-name``. Only options the user actually gives
are passed on, so the dataclass (or a preset) keeps authority over the defaults.

A field's description is its attribute docstring (the string literal under the field), read
once by :func:`field_descriptions`: the same text is the option's ``--help`` and the
configuration tables of the documentation.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import itertools
import math
import textwrap
import typing


def add_config_options(parser: argparse.ArgumentParser, config_cls, *, prefix: str = "",
                       skip: tuple[str, ...] = ()) -> None:
    """Adds one option per field of ``config_cls``, its help the field's description followed
    by its default."""
    hints = typing.get_type_hints(config_cls)
    descriptions = field_descriptions(config_cls)
    group = parser.add_argument_group(f"{config_cls.__name__} settings")
    for field in dataclasses.fields(config_cls):
        if field.name in skip:
            continue
        flag = "--" + prefix + field.name.replace("_", "-")
        kind = hints[field.name]
        description = descriptions.get(field.name, "").replace("%", "%%")
        help_text = f"{description} (default: {field.default})".lstrip()
        dest = f"{prefix.replace('-', '_')}{field.name}"
        if kind is bool or kind == bool | None:
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_text)
        elif typing.get_origin(kind) is tuple:
            element = typing.get_args(kind)[0]
            group.add_argument(flag, dest=dest, type=element, nargs="+", default=argparse.SUPPRESS,
                               help=help_text)
        else:
            group.add_argument(flag, dest=dest, type=kind, default=argparse.SUPPRESS, help=help_text)


@functools.cache
def field_descriptions(config_cls: type) -> dict[str, str]:
    """Each field's attribute docstring on one line, a subclass's own text before an inherited
    one; a field without a docstring is left out (the tests require one for every field).

    Without the source (an install that ships only bytecode) there is no text to read, and the
    help shows the defaults alone rather than failing.
    """
    descriptions: dict[str, str] = {}
    for klass in reversed(config_cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        body = ast.parse(textwrap.dedent(source)).body[0].body
        for statement, following in itertools.pairwise(body):
            if (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
                    and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                    and isinstance(following.value.value, str)):
                descriptions[statement.target.id] = " ".join(following.value.value.split())
    return descriptions


def config_overrides(args: argparse.Namespace, config_cls, *, prefix: str = "") -> dict:
    """The fields of ``config_cls`` that were given on the command line."""
    given = vars(args)
    names = {f.name for f in dataclasses.fields(config_cls)}
    key = prefix.replace("-", "_")
    return {name: given[key + name] for name in names if key + name in given}


def count(text: str) -> int:
    """A number of images, 0 or more (``--holdout``)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a count of images (0 or more), got {text!r}")
    return value


def threads(text: str) -> int:
    """``--threads``: a whole number of threads, 1 or more."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number of threads (1 or more), got {text!r}")
    return value


def finite_float(text: str) -> float:
    """A number that is not NaN or infinite (thresholds, rates): argparse's ``float`` takes
    "nan", which compares false with everything and so would silently disable a threshold."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def clean_size(text: str) -> int | float:
    """``--clean-size``: a whole count (``500``) or a fraction (``0.01``); the API checks the range."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count or a fraction, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a count or a fraction, got {text!r}")
    return int(value) if value >= 1 and value == int(value) else value
