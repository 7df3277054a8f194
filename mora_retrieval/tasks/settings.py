"""The settings layer every training recipe shares: defaults, then ``--config FILE``, then the command line.

Settings are nested dicts (a recipe's ``to_dict()``, see :class:`SettingsRecord`). A config file
(JSON or TOML) holds any subset of their keys; command-line overrides are a nested dict in which
``None`` means "not given". A key the defaults do not have is a one-line error naming the file,
so a typo never passes silently.
"""

from __future__ import annotations

import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any, ClassVar

from ..errors import MoraError, check_field_kinds, kind_check
from ..fileio import read_json
from ..runs import CONFIG_FILE, TASK_NAMES, FinishedRun


class SettingsRecord:
    """``to_dict`` / ``from_dict`` of a recipe's settings dataclass (the run record, the layers' base).

    ``NESTED``: the fields read back with their config class's ``from_dict``; ``TASK`` (if set) is
    written as the ``task`` key; the fields in ``NOT_RECORDED`` are left out.
    """

    TASK: ClassVar[str | None] = None
    NOT_RECORDED: ClassVar[tuple[str, ...]] = ("run_dir",)
    NESTED: ClassVar[dict[str, Any]] = {}

    def __post_init__(self) -> None:
        check_field_kinds(self, MoraError, "settings")
        for name, config_class in self.NESTED.items():
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, config_class.from_dict(value))
            elif value is not None and not isinstance(value, config_class):
                raise TypeError(f"{name} must be given as {config_class.__name__} or a dict, not {value!r}")

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {} if self.TASK is None else {"task": self.TASK}
        for field in fields(self):
            if field.name not in self.NOT_RECORDED:
                value = getattr(self, field.name)
                data[field.name] = value.to_dict() if hasattr(value, "to_dict") else value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], run_dir: str | None = None):
        """Inverse of :meth:`to_dict` (keys that are no field are ignored); ``run_dir`` is given here."""
        known = {field.name for field in fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        if run_dir is not None:
            values["run_dir"] = run_dir
        return cls(**values)

    @classmethod
    def from_run(cls, run: FinishedRun, record: dict[str, Any] | None = None, run_dir: str | None = None):
        """:meth:`from_dict` of what a finished run recorded (default: its whole record); a record that does
        not fit these settings (a hand-edited ``config.json``, say) is a one-line ``run.error``."""
        try:
            return cls.from_dict(run.record if record is None else record, run_dir)
        except (MoraError, AttributeError, KeyError, TypeError, ValueError) as exc:
            what = TASK_NAMES.get(run.task or "", run.task)
            raise run.error(f"{run.path / CONFIG_FILE}: not a valid {what} run config ({exc})") from None


def read_config_file(path: str | Path | None) -> dict[str, Any]:
    """A JSON or TOML file of settings, as a dict; no file (``None``): no settings."""
    if path is None:
        return {}
    path = Path(path)
    if path.suffix == ".toml":
        if not path.is_file():
            raise MoraError(f"{path}: config file not found")
        try:
            return tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise MoraError(f"{path}: not valid TOML ({exc})") from None
    data = read_json(path, "config file")
    if not isinstance(data, dict):
        raise MoraError(f"{path}: expected a JSON object of settings")
    return data


def method_of(config: dict[str, Any], overrides: dict[str, Any] | None) -> str:
    """The adapter method: the command line's, else the config file's, else ``mora`` (the defaults depend on it)."""
    for layer in (overrides or {}, config):
        method = (layer.get("adapter") or {}).get("method")
        if method is not None:
            return method
    return "mora"


def layered(defaults: dict[str, Any], config: dict[str, Any], overrides: dict[str, Any] | None,
            source: str) -> dict[str, Any]:
    """``defaults`` updated by ``config`` (read from ``source``), then by the given (non-None) ``overrides``."""
    merged = _deep_update(defaults, config, source)
    return _deep_update(merged, _drop_none(overrides or {}), "command line")


def _deep_update(base: dict[str, Any], update: dict[str, Any], source: str, where: str = "") -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if key not in base:
            known = ", ".join(sorted(base))
            raise MoraError(f"{source}: unknown setting '{where}{key}' (known: {known})")
        if isinstance(value, dict) and isinstance(base[key], dict):
            out[key] = _deep_update(base[key], value, source, f"{where}{key}.")
        elif isinstance(base[key], dict) and value is not None:
            raise MoraError(f"{source}: setting '{where}{key}' is a group of settings, not {value!r}")
        else:
            _check_kind(base[key], value, source, f"{where}{key}")
            out[key] = value
    return out


def _check_kind(default: Any, value: Any, source: str, key: str) -> None:
    """A layer's value has its default's kind (:func:`~mora_retrieval.errors.kind_check`); None, and any value
    where the default is None, pass."""
    fits = None if default is None else kind_check(type(default))
    if value is not None and fits is not None and not fits(value):
        raise MoraError(f"{source}: setting '{key}' takes {type(default).__name__} values (like {default!r}), "
                        f"not {value!r}")


def differences(saved: dict[str, Any], ours: dict[str, Any], keys: tuple[str, ...]) -> list[tuple[str, Any, Any]]:
    """``(dotted.path, saved value, our value)`` for every setting under ``keys`` that differs."""
    out: list[tuple[str, Any, Any]] = []

    def walk(a: Any, b: Any, where: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in list(a) + [k for k in b if k not in a]:
                walk(a.get(key), b.get(key), f"{where}.{key}")
        elif a != b:
            out.append((where, a, b))

    for key in keys:
        walk(saved.get(key), ours.get(key), key)
    return out


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in d.items():
        value = _drop_none(value) if isinstance(value, dict) else value
        if value is not None and value != {}:
            out[key] = value
    return out
