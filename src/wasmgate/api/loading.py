"""Loading WasmPlugins and the Gateway from YAML/JSON files, collecting precise errors.

Files and directories (recursively; ``*.yaml``, ``*.yml``, ``*.json``; sorted; entries starting
with ``.`` skipped, so Kubernetes ConfigMap mounts with ``..data`` links load once). Each YAML
document is dispatched by apiVersion/kind; a ``v1`` ``List`` (``kubectl get -o yaml``) is
unpacked. A bad document is reported and skipped; the others still load. YAML is read as
Kubernetes reads it: timestamps stay strings and duplicate keys are errors.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from .errors import ConfigError, ConfigErrors, Loc, format_loc, validation_errors
from .gateway import GATEWAY_API_VERSION, Gateway
from .resources import ISTIO_API_VERSION, WasmPlugin

SUFFIXES = (".yaml", ".yml", ".json")
_KINDS: dict[str, tuple[str, type[BaseModel]]] = {
    "WasmPlugin": (ISTIO_API_VERSION, WasmPlugin),
    "Gateway": (GATEWAY_API_VERSION, Gateway),
}


@dataclass
class LoadResult:
    plugins: list[WasmPlugin] = field(default_factory=list)
    gateways: list[Gateway] = field(default_factory=list)
    """At most one: a second Gateway is an error."""
    errors: list[ConfigError] = field(default_factory=list)

    @property
    def gateway(self) -> Gateway | None:
        return self.gateways[0] if self.gateways else None

    @property
    def ok(self) -> bool:
        return not self.errors

    def raise_for_errors(self) -> None:
        if self.errors:
            raise ConfigErrors(self.errors)


# -- YAML as Kubernetes reads it ----------------------------------------------------------------


class _KubeLoader(yaml.SafeLoader):
    """SafeLoader without the timestamp resolver, rejecting duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, list | dict) or key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate or unhashable key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_KubeLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _yaml_documents(text: str) -> Iterator[tuple[Any, yaml.Node | None]]:
    """(data, node) per document; data is the ConstructorError when a document cannot be built
    (duplicate keys, ...), and the next documents still load. A syntax error is raised."""
    loader = _KubeLoader(text)
    try:
        while loader.check_node():
            node = loader.get_node()
            try:
                yield loader.construct_document(node), node
            except yaml.constructor.ConstructorError as exc:
                loader.constructed_objects, loader.recursive_objects = {}, {}
                loader.state_generators, loader.deep_construct = [], False
                yield exc, node
    finally:
        loader.dispose()


def _line_of(node: yaml.Node | None, loc: Loc) -> int | None:
    """1-based line of the deepest node along ``loc``."""
    if node is None:
        return None
    for part in loc:
        child = None
        if isinstance(node, yaml.MappingNode):
            child = next((v for k, v in node.value if k.value == str(part)), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            child = node.value[part] if part < len(node.value) else None
        if child is None:
            break
        node = child
    return node.start_mark.line + 1


# -- the loader ---------------------------------------------------------------------------------


class _Loading:
    def __init__(self, now: datetime | None) -> None:
        self.result = LoadResult()
        self.now = now or datetime.now(UTC)
        self.origins: dict[tuple[str, str, str], str] = {}

    def file(self, path: Path) -> None:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            self._error(str(path), None, None, (), f"cannot read: {exc}")
            return
        if path.suffix == ".json":
            self._json(text, str(path))
        else:
            self.text(text, str(path))

    def _json(self, text: str, file: str) -> None:
        try:
            data = json.loads(text) if text.strip() else None
        except json.JSONDecodeError as exc:
            self._error(file, 0, None, (), f"invalid JSON: {exc}", exc.lineno)
            return
        self.document(data, None, file, 0, ())

    def text(self, text: str, file: str) -> None:
        count = 0
        try:
            for data, node in _yaml_documents(text):
                if isinstance(data, yaml.YAMLError):
                    self._yaml_error(file, count, data)
                else:
                    self.document(data, node, file, count, ())
                count += 1
        except yaml.YAMLError as exc:
            self._yaml_error(file, count, exc)

    def _yaml_error(self, file: str, index: int, exc: yaml.YAMLError) -> None:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        said = [getattr(exc, "context", None), getattr(exc, "problem", None)]
        reason = "invalid YAML: " + (", ".join(s for s in said if s) or str(exc))
        self._error(file, index, None, (), reason, line)

    def document(self, data: Any, node: yaml.Node | None, file: str, index: int, at: Loc) -> None:
        if data is None:
            return
        if not isinstance(data, dict):
            self._error(file, index, None, at, "a document must be a mapping", _line_of(node, at))
            return
        kind, api_version = data.get("kind"), data.get("apiVersion")
        if kind == "List" and api_version == "v1" and isinstance(data.get("items"), list):
            for i, item in enumerate(data["items"]):
                self.document(item, node, file, index, (*at, "items", i))
            return
        ident = _identity(data)
        if not isinstance(kind, str) or kind not in _KINDS:
            reason = "missing kind" if kind is None else f"unknown kind {kind!r}"
            self._error(file, index, ident, (*at, "kind"), reason, _line_of(node, (*at, "kind")))
            return
        expected, model = _KINDS[kind]
        if isinstance(api_version, str) and api_version.partition("/")[0] != \
                expected.partition("/")[0]:
            # another API's kind of the same name (Istio's networking.istio.io Gateway): not
            # ours, skipped like an unknown kind, and reported under its full name
            where = (*at, "apiVersion")
            reason = f"{api_version} {kind} is not a wasmgate resource (skipped)"
            self._error(file, index, (f"{api_version}/{kind}", ident[1]), where, reason,
                        _line_of(node, where))
            return
        if api_version != expected:
            where = (*at, "apiVersion")
            reason = f"{kind} needs apiVersion {expected}, not {api_version!r}"
            self._error(file, index, ident, where, reason, _line_of(node, where))
            return
        try:
            obj = model.model_validate(data)
        except ValidationError as exc:
            for loc, reason in validation_errors(exc, model):
                full = (*at, *loc)
                self._error(file, index, ident, full, reason, _line_of(node, full))
            return
        self._accept(obj, file, index, at, _line_of(node, at))

    def _accept(self, obj: Any, file: str, index: int, at: Loc, line: int | None) -> None:
        here = f"{file}: document {index + 1}"
        if isinstance(obj, Gateway):
            key = ("Gateway", "", "")
            ident = ("Gateway", obj.name)
        else:
            key = ("WasmPlugin", obj.namespace, obj.name)
            ident = ("WasmPlugin", f"{obj.namespace}/{obj.name}")
        if key in self.origins:
            what = "a second Gateway" if key[0] == "Gateway" else f"duplicate {ident[0]}"
            reason = f"{what}; the first is {self.origins[key]}"
            self._error(file, index, ident, at, reason, line)
            return
        self.origins[key] = f"{here} ({ident[0]} {ident[1]})"
        if isinstance(obj, Gateway):
            self.result.gateways.append(obj)
        else:
            self.result.plugins.append(obj)

    def _error(
        self,
        file: str,
        index: int | None,
        ident: tuple[str | None, str | None] | None,
        loc: Loc,
        reason: str,
        line: int | None = None,
    ) -> None:
        kind, name = ident or (None, None)
        error = ConfigError(file, index, kind, name, format_loc(loc), reason, line)
        self.result.errors.append(error)

    def finish(self) -> LoadResult:
        """Give plugins without creationTimestamp increasing times in load order."""
        step = 0
        for plugin in self.result.plugins:
            if plugin.metadata.creation_timestamp is None:
                plugin.metadata.creation_timestamp = self.now + timedelta(microseconds=step)
                step += 1
        return self.result


def _identity(data: dict[str, Any]) -> tuple[str | None, str | None]:
    kind = data.get("kind") if isinstance(data.get("kind"), str) else None
    meta = data.get("metadata") if isinstance(data.get("metadata"), dict) else {}
    name = meta.get("name") if isinstance(meta.get("name"), str) else None
    if name is not None and kind == "WasmPlugin":
        namespace = meta.get("namespace")
        name = f"{namespace if isinstance(namespace, str) else 'default'}/{name}"
    return kind, name


def config_files(path: Path) -> list[Path]:
    """``path`` itself if a file; else its ``*.yaml|*.yml|*.json`` files, recursively, sorted."""
    if not path.is_dir():
        return [path]
    found = []
    for child in sorted(path.iterdir(), key=lambda p: p.name):
        if child.name.startswith("."):
            continue
        if child.is_dir():
            found.extend(config_files(child))
        elif child.suffix in SUFFIXES:
            found.append(child)
    return found


def load_paths(paths: Iterable[Path | str], *, now: datetime | None = None) -> LoadResult:
    """Load every file and directory given, in order. ``now`` bases assigned creation times."""
    loading = _Loading(now)
    for given in paths:
        path = Path(given)
        if not path.exists():
            loading._error(str(path), None, None, (), "no such file or directory")
            continue
        for file in config_files(path):
            loading.file(file)
    return loading.finish()


def load_text(text: str, file: str = "<string>", *, now: datetime | None = None) -> LoadResult:
    """Load multi-document YAML from a string (``file`` names it in errors)."""
    loading = _Loading(now)
    loading.text(text, file)
    return loading.finish()
