"""Settings dataclasses read from files and flags: one strict way in.

``from_mapping`` builds a dataclass from a dict (a JSON file, a model file's stored config) and
refuses a key the class does not have, naming the key and the file. A class that dropped a
setting lists it in ``legacy`` so that files written before still load (the value is ignored).

``setting(default, help)`` declares a field with its command-line help; ``flag_fields`` gives the
fields that have one, which is how ``hafloc train`` builds its flags from ``TrainConfig``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Collection, Mapping, TypeVar, Union

from hafloc.errors import HaflocError, InputError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")


def from_mapping(
    cls: type[T],
    data: Mapping[str, Any],
    *,
    source: str | Path | None = None,
    what: str = "setting",
    legacy: Collection[str] = (),
) -> T:
    """``cls(**data)`` for a dataclass, refusing unknown keys (``legacy`` ones are dropped).

    Raises InputError(source, ...) when ``source`` (the file) is given, else HaflocError; also when
    a value is refused by the class itself (TypeError/ValueError of its ``__init__``).
    """
    if not isinstance(data, Mapping):
        _fail(source, f"{what}s must be a JSON object, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(k for k in data if k not in known and k not in legacy)
    if unknown:
        more = f" (and {', '.join(map(repr, unknown[1:]))})" if len(unknown) > 1 else ""
        _fail(source, f"unknown {what} {unknown[0]!r}{more}; known: {', '.join(sorted(known))}")
    try:
        return cls(**{k: v for k, v in data.items() if k in known})
    except (TypeError, ValueError) as err:
        _fail(source, f"bad {what}s ({err})")


def _fail(source: str | Path | None, message: str) -> typing.NoReturn:
    if source is not None:
        raise InputError(source, message)
    raise HaflocError(message)


def setting(
    default: Any = dataclasses.MISSING, help: str = "", parse: Callable[[str], Any] | None = None, **kwargs: Any
) -> Any:
    """A dataclass field with its command-line help (``help=""``: file-only, no flag); ``parse``:
    the flag's argparse type when the annotation is not int/float/str (its ``__name__`` is what
    argparse's "invalid ... value" message shows)."""
    metadata = dict(kwargs.pop("metadata", {}) or {})
    if help:
        metadata["help"] = help
    if parse is not None:
        metadata["parse"] = parse
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def flag_fields(cls: type) -> list[tuple[dataclasses.Field, Callable[[str], Any]]]:
    """(field, argparse type) of each field of dataclass ``cls`` declared with a help text.

    The type is the field's annotation without ``None`` (int, float, str); anything else (tuples,
    e.g. an image size) is read as a string and parsed by the class itself.
    """
    hints = typing.get_type_hints(cls)
    out: list[tuple[dataclasses.Field, Callable[[str], Any]]] = []
    for f in dataclasses.fields(cls):
        if not f.metadata.get("help"):
            continue
        if f.metadata.get("parse"):
            out.append((f, f.metadata["parse"]))
            continue
        t = hints[f.name]
        if typing.get_origin(t) in (Union, types.UnionType):
            args = [a for a in typing.get_args(t) if a is not type(None)]
            t = args[0] if len(args) == 1 else str
        out.append((f, t if t in (int, float, str) else str))
    return out


def on_off(text: str) -> bool:
    """``on`` / ``off`` (any case) as a bool."""
    v = text.strip().lower()
    if v not in ("on", "off"):
        raise ValueError(text)
    return v == "on"


on_off.__name__ = "on/off"  # argparse: "invalid on/off value"


def comma_list(text: str) -> tuple[str, ...]:
    """``"low, High"`` -> ``("low", "high")``."""
    return tuple(v.strip().lower() for v in text.split(",") if v.strip())


comma_list.__name__ = "comma-separated"


def flag_help(f: dataclasses.Field) -> str:
    """The field's help, with its default appended unless it is None (the help says what None means)."""
    text = f.metadata["help"]
    default = f.default if f.default is not dataclasses.MISSING else None
    if default is None or "(default" in text:
        return text
    if isinstance(default, tuple):
        shown = "x".join(map(str, default))
    else:
        shown = str(default)
    return f"{text} (default {shown})"
