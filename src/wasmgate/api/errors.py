"""Configuration errors: where (file, document, object, field path) and why."""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, get_args

from pydantic import BaseModel, ValidationError

from ._common import PathError

Loc = tuple[str | int, ...]
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class ConfigError:
    """One problem in the configuration; the other documents still load."""

    file: str
    document_index: int | None
    """0-based index of the YAML document in ``file`` (shown 1-based); None for file errors."""
    kind: str | None
    name: str | None
    """``namespace/name`` for namespaced kinds, ``name`` otherwise; None when unknown."""
    path: str
    """Dotted field path, e.g. ``spec.vmConfig.env[1].value``; "" for the whole document."""
    reason: str
    line: int | None = None
    """1-based line of the offending node (or the closest enclosing one), when known."""

    def __str__(self) -> str:
        parts = [self.file]
        if self.document_index is not None:
            what = " ".join(p for p in (self.kind, self.name) if p)
            parts.append(f"document {self.document_index + 1}" + (f" ({what})" if what else ""))
        if self.path:
            parts.append(self.path)
        text = ": ".join(parts) + ": " + self.reason
        return text + (f" (line {self.line})" if self.line else "")


class ConfigErrors(Exception):
    """Raised by :meth:`LoadResult.raise_for_errors`; ``str()`` lists every error."""

    def __init__(self, errors: Sequence[ConfigError]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(str(e) for e in self.errors))


def format_loc(loc: Loc) -> str:
    """``('spec', 'vmConfig', 'env', 1, 'value')`` -> ``spec.vmConfig.env[1].value``.

    Map keys that are not identifiers are quoted: ``matchLabels["app.kubernetes.io/name"]``.
    """
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _IDENTIFIER.match(part):
            out += f".{part}" if out else part
        else:
            out += f'["{part}"]'
    return out


def validation_errors(exc: ValidationError, model: type[BaseModel]) -> list[tuple[Loc, str]]:
    """Each pydantic error as (precise location, reason).

    A :class:`PathError` raised by a model validator extends the location with its subpath;
    pydantic's ``[key]`` marker for map keys is dropped; unknown fields get a did-you-mean.
    """
    found: list[tuple[Loc, str]] = []
    for error in exc.errors():
        loc: Loc = tuple(p for p in error["loc"] if p != "[key]")
        reason = error["msg"]
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, ValueError):
            reason = str(cause)
            if isinstance(cause, PathError):
                loc += cause.subpath
        elif error["type"] == "extra_forbidden":
            reason = _unknown_field(model, loc)
        found.append((loc, reason))
    return found


def _unknown_field(model: type[BaseModel], loc: Loc) -> str:
    known = _fields_at(model, loc[:-1])
    close = difflib.get_close_matches(str(loc[-1]), known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    listed = f" (known: {', '.join(known)})" if known and not close else ""
    return f"unknown field{hint}{listed}"


def _fields_at(model: type[BaseModel], loc: Loc) -> list[str]:
    annotation: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        current = _model_in(annotation)
        if current is None:
            return []
        field = next((f for n, f in current.model_fields.items() if (f.alias or n) == part), None)
        if field is None:
            return []
        annotation = field.annotation
    current = _model_in(annotation)
    return [f.alias or n for n, f in current.model_fields.items()] if current else []


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None
