"""Command-line options generated from configuration dataclasses, and back.

Every default is defined once, in a dataclass field. This module turns the
fields of a frozen dataclass into argparse options (``add_options``), reads
parsed options back into an instance (``read_options``), and turns an
instance into the argument list that reproduces it (``option_args``), which
the harness and the benchmarks use to start child processes.

A field's metadata may say:

- ``help``: the option's help text (the default is appended);
- ``flag``: the option's name without dashes (default: the field name with
  ``-`` for ``_``, and a ``_s`` suffix dropped, so ``duration_s`` is ``--duration``);
- ``cli``: False to leave the field out of the command line;
- ``parse`` / ``format``: how a string option becomes the field's value and back
  (e.g. ``--bandwidth 100mbit`` for a field in bits per second);
- ``choices``: the allowed values;
- ``metavar``: the value's name in ``--help`` (default: the flag's last word, upper case);
- ``const``: the value of the option given alone, without one (argparse's
  ``nargs="?"``), e.g. ``--hivemind`` for this interpreter, ``--hivemind PYTHON`` for another.

A tuple field is a fixed number of values (``--betas 0.9 0.99``), or, with a
``parse``, one string its parse splits (``--codecs none,int8`` with a ``parse``
that splits at commas and a ``format`` that joins them).

Nested dataclass fields are flattened with their name as a prefix
(``outer.lr`` is ``--outer-lr``), or with none when the field's metadata says
``flatten`` (``security.token_file`` is ``--token-file``).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass
from typing import Any

from collectives.errors import ConfigError


@dataclass(frozen=True)
class Option:
    """One command-line option of a (possibly nested) dataclass field."""

    path: tuple[str, ...]  # field names from the outer dataclass down
    flag: str  # without the leading dashes
    kind: type  # int, float, str, bool or tuple
    optional: bool  # the field admits None
    default: Any
    help: str
    choices: tuple | None
    parse: Callable[[str], Any] | None
    format: Callable[[Any], str] | None
    arity: int = 1  # values per occurrence (2 for a pair of floats)
    metavar: str | None = None
    const: tuple = ()  # (the value of the flag given alone,); (): a value must follow it

    @property
    def dest(self) -> str:
        """The argparse destination of this option."""
        return self.flag.replace("-", "_")


def _flag(f: dataclasses.Field) -> str:
    name = f.metadata.get("flag")
    if name:
        return name
    base = f.name[:-2] if f.name.endswith("_s") else f.name
    return base.replace("_", "-")


def _default(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def _unwrap(hint: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return hint, False


def options_of(cls: type, prefix: str = "", path: tuple[str, ...] = (), defaults: Any = None) -> list[Option]:
    """The options of a dataclass's fields (nested dataclasses flattened), in field order."""
    hints = typing.get_type_hints(cls)
    out: list[Option] = []
    for f in dataclasses.fields(cls):
        if not f.init or f.metadata.get("cli", True) is False:
            continue
        hint, optional = _unwrap(hints[f.name])
        default = getattr(defaults, f.name) if defaults is not None else _default(f)
        flag = prefix + _flag(f)
        if dataclasses.is_dataclass(hint):
            # flatten: the nested fields keep their own flags (``security.token_file`` is ``--token-file``).
            inner = prefix if f.metadata.get("flatten") else flag + "-"
            out += options_of(hint, inner, path + (f.name,), default if default is not MISSING else None)
            continue
        origin = typing.get_origin(hint)
        parse = f.metadata.get("parse")
        arity = 1
        if origin is tuple and parse is None:  # a fixed number of values, e.g. Adam's betas
            element, *more = typing.get_args(hint)
            if Ellipsis in more:
                raise TypeError(f"{cls.__name__}.{f.name}: a tuple of any length needs metadata parse (and format)")
            kind, arity, parse = tuple, len(typing.get_args(hint)), element
        elif hint in (int, float, str, bool):
            kind = hint
        elif parse is not None:
            kind = str
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no command-line form for {hint!r}; give it metadata cli=False")
        out.append(
            Option(
                path=path + (f.name,),
                flag=flag,
                kind=kind,
                optional=optional,
                default=default,
                help=f.metadata.get("help", ""),
                choices=tuple(f.metadata["choices"]) if "choices" in f.metadata else None,
                parse=parse,
                format=f.metadata.get("format"),
                arity=arity,
                metavar=f.metadata.get("metavar"),
                const=(f.metadata["const"],) if "const" in f.metadata else (),
            )
        )
    return out


def _shown(option: Option, value: Any) -> str:
    if value is None:
        return "none"
    if option.format is not None:
        return option.format(value)
    if isinstance(value, tuple):
        return " ".join(str(v) for v in value)
    return str(value)


def said(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """parse, with its ConfigError's message as argparse's (argparse says only "invalid parse_x value" of a
    ValueError, and loses what the parser said to do)."""

    def read(text: str) -> Any:
        try:
            return parse(text)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    read.__name__ = getattr(parse, "__name__", "value")
    return read


def add_option(group: Any, option: Option, default_text: str | None = None, unset: bool = False) -> None:
    """Add one option to a parser or group; ``unset``: its default is None (the reader fills the real one)."""
    text = option.help
    shown = default_text if default_text is not None else _shown(option, option.default)
    if (option.default is not MISSING or default_text is not None) and "default" not in text:
        text = f"{text} (default: {shown})" if text else f"default: {shown}"
    default = None if unset else option.default
    if option.kind is bool:
        group.add_argument(
            f"--{option.flag}", dest=option.dest, action=argparse.BooleanOptionalAction, default=default, help=text
        )
        return
    kwargs: dict[str, Any] = {"dest": option.dest, "default": default, "help": text}
    if option.const:
        kwargs["nargs"] = "?"
        kwargs["const"] = option.const[0]
    if option.arity > 1:
        kwargs["nargs"] = option.arity
        kwargs["type"] = option.parse
        kwargs["metavar"] = "X"
    elif option.parse is not None:
        kwargs["type"] = said(option.parse)
        kwargs["metavar"] = option.flag.rsplit("-", 1)[-1].upper()
    else:
        kwargs["type"] = _nullable(option.kind) if option.optional else option.kind
    if option.choices is not None:
        kwargs["choices"] = option.choices
    if option.metavar is not None:
        kwargs["metavar"] = option.metavar
    group.add_argument(f"--{option.flag}", **kwargs)


def _nullable(kind: type) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        return None if text.lower() == "none" else kind(text)

    convert.__name__ = kind.__name__
    return convert


def add_options(group: Any, cls: type, prefix: str = "", defaults: Any = None, skip: tuple[str, ...] = ()) -> None:
    """Add an option per field of cls; ``defaults``: an instance whose values become the defaults shown."""
    for option in options_of(cls, prefix, defaults=defaults):
        if option.flag not in skip and option.path[0] not in skip:
            add_option(group, option)


def _build(cls: type, values: dict[tuple[str, ...], Any], base: Any, path: tuple[str, ...] = ()) -> Any:
    kwargs: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        hint, _ = _unwrap(hints[f.name])
        here = path + (f.name,)
        inner_base = getattr(base, f.name) if base is not None else None
        if dataclasses.is_dataclass(hint) and any(p[: len(here)] == here for p in values):
            kwargs[f.name] = _build(hint, values, inner_base if inner_base is not None else hint(), here)
        elif here in values:
            kwargs[f.name] = values[here]
        elif base is not None:
            kwargs[f.name] = getattr(base, f.name)
    return cls(**kwargs)


def read_options(
    cls: type, ns: argparse.Namespace, prefix: str = "", base: Any = None, only_set: bool = False
) -> Any:
    """An instance of cls from parsed options; ``only_set``: options left None keep base's (or cls's) values."""
    values: dict[tuple[str, ...], Any] = {}
    for option in options_of(cls, prefix):
        if not hasattr(ns, option.dest):
            continue
        value = getattr(ns, option.dest)
        if only_set and value is None:
            continue
        if isinstance(value, list):
            value = tuple(value)
        values[option.path] = value
    return _build(cls, values, base)


def option_args(instance: Any, prefix: str = "", skip: tuple[str, ...] = ()) -> list[str]:
    """The command-line arguments that make read_options give back this instance."""
    args: list[str] = []
    for option in options_of(type(instance), prefix):
        if option.flag in skip or option.path[0] in skip:
            continue
        value: Any = instance
        for name in option.path:
            value = getattr(value, name)
        if option.kind is bool:
            args.append(f"--{option.flag}" if value else f"--no-{option.flag}")
        elif value is None:
            if option.optional and option.default is not None and option.default is not MISSING:
                args += [f"--{option.flag}", "none"]
        elif option.arity > 1:
            args += [f"--{option.flag}", *(str(v) for v in value)]
        else:
            args += [f"--{option.flag}", option.format(value) if option.format else str(value)]
    return args

