"""What every section of a config shares: a frozen dataclass whose choices are checked when built.

A section names its key in a config file (``_key``), checks its Literal-typed fields against their
choices when built (`literal_choices`) and its own combinations in ``_check``, copies itself with
`replace` and turns into plain JSON data with `to_dict`. pydantic (when a file is loaded) reads
``__pydantic_config__``: strict, unknown keys refused. The sections themselves are `advisor.config`.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Any, Literal


# How pydantic checks a section of a loaded file; Provenance relaxes `strict` (it is a record).
STRICT = {"extra": "forbid", "strict": True}


_S = typing.TypeVar("_S", bound="Section")


class Section:
    """What every part of a config shares: choices checked when built, `replace`, plain data.

    A subclass names its key in a config file (``_key``) and adds its own checks in ``_check``.
    """

    _key = ""
    __pydantic_config__ = STRICT

    def __post_init__(self) -> None:
        for name, choices in literal_choices(type(self)).items():
            value = getattr(self, name)
            if value is not None and value not in choices:
                valid = ", ".join(repr(c) for c in choices)
                raise ValueError(f"`{self._key}{name}: {value!r}` is not valid; use one of {valid}")
        self._check()

    def _check(self) -> None:
        """Checks across fields (raise ValueError naming the keys in backticks)."""

    def replace(self: _S, **changes: Any) -> _S:
        """A copy with `changes` (checked like a new one)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self, *, exclude_none: bool = True) -> dict[str, Any]:
        """JSON-ready plain data, as a config file holds it (None fields left out by default)."""
        return {
            f.name: plain(value, exclude_none)
            for f in dataclasses.fields(self)
            if (value := getattr(self, f.name)) is not None or not exclude_none
        }


def plain(value: Any, exclude_none: bool) -> Any:
    if isinstance(value, Section):
        return value.to_dict(exclude_none=exclude_none)
    if isinstance(value, dict):
        return {k: plain(v, exclude_none) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v, exclude_none) for v in value]
    return value


@functools.cache
def literal_choices(cls: type) -> dict[str, tuple[Any, ...]]:
    """The allowed values of each field of `cls` typed as a Literal (or an optional one)."""
    choices = {}
    for name, hint in typing.get_type_hints(cls).items():
        options = typing.get_args(hint) if typing.get_origin(hint) is typing.Union else (hint,)
        literals = [arg for arg in options if typing.get_origin(arg) is Literal]
        if literals:
            choices[name] = tuple(value for arg in literals for value in typing.get_args(arg))
    return choices


def at_least_one(key: str, components: list[str] | None) -> None:
    if components is not None and len(components) < 1:
        raise ValueError(f"`{key}` must name at least one component")
