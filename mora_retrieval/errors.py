"""User-facing errors: each carries one line that names the file and what was expected.

The CLI prints ``str(error)`` on one line and exits with status 1 for any ``MoraError``;
anything else is a bug and keeps its traceback. :func:`check_field_kinds` turns a config value of
the wrong kind (``"x"`` where a number belongs) into such an error before any code compares it.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from typing import Any, Callable


class MoraError(Exception):
    """Base class for errors caused by user input (files, options, data)."""


class BackboneError(MoraError):
    """A backbone could not be created or its weights could not be loaded."""


class AdapterError(MoraError):
    """An adapter does not fit the model, or an adapter folder is missing/corrupt."""


class DataError(MoraError):
    """A dataset root, annotation file or image is missing or malformed."""


class IndexFolderError(MoraError):
    """A retrieval index folder is missing, damaged or built with another model."""


class DeviceError(MoraError):
    """The requested device or precision does not exist on this machine."""


class TrainingError(MoraError):
    """Training cannot continue (non-finite loss, incompatible checkpoint, ...)."""


def check_field_kinds(config: Any, error: type[MoraError], what: str) -> None:
    """Raise ``error`` (one line) for the first field of the dataclass ``config`` whose value does not fit its
    annotation (int, float, str, bool, ``X | None`` and sequences of them; a float takes an int, a tuple a
    list, a str a path). Fields of other types (nested configs, ``Any``) are left to their own checks."""
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        fits, value = kind_check(hints[field.name]), getattr(config, field.name)
        if fits is not None and not fits(value):
            raise error(f"{what}: {field.name} must be {field.type}, got {value!r}")


def kind_check(hint: Any) -> Callable[[Any], bool] | None:
    """A predicate for the values the type ``hint`` admits, or None where it is not a kind checked here
    (the one rule of :func:`check_field_kinds` and of the settings layers)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        parts = [kind_check(arg) for arg in args]
        return None if None in parts else lambda value: any(fits(value) for fits in parts)
    if origin in (tuple, list):
        item = kind_check(args[0]) if args else None
        return lambda value: isinstance(value, (tuple, list)) and (item is None or all(map(item, value)))
    simple = {type(None): (type(None),), bool: (bool,), int: (int,), float: (int, float), str: (str, os.PathLike),
              list: (list, tuple), tuple: (list, tuple)}
    if hint not in simple:
        return None
    return lambda value: isinstance(value, simple[hint]) and (hint is bool or not isinstance(value, bool))
