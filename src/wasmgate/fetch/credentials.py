"""Registry credentials from docker config JSON, as Istio's agent reads an ``imagePullSecret``.

``imagePullSecret`` may be a file path, a directory holding ``.dockerconfigjson`` (how kubernetes
mounts a ``kubernetes.io/dockerconfigjson`` Secret; ``.dockercfg`` and ``config.json`` are read
too) or the JSON text itself. Without one we fall back to ``$DOCKER_CONFIG/config.json``, then
``~/.docker/config.json``, as the default keychain does. A registry with no entry, or an empty
entry, is anonymous; a secret that is the literal ``null`` is an error (as in Istio).

Entries: ``auth`` (base64 ``user:password``), ``username``/``password``, ``identitytoken`` (an
OAuth2 refresh token for the registry's token service) and ``registrytoken`` (a bearer token
sent to the registry as is). Docker Hub's key is ``https://index.docker.io/v1/``. Credential
helpers (``credsStore``, ``credHelpers``) are not run.

Secrets never leave through ``repr``/``str`` or error messages.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import os
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .errors import AuthError, SsrfBlocked

DOCKER_HUB_KEY = "https://index.docker.io/v1/"
DOCKER_HUB_HOSTS = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
SECRET_FILES = (".dockerconfigjson", ".dockercfg", "config.json")


@dataclass(frozen=True, repr=False)
class Credentials:
    """What to authenticate with at one registry; all empty = anonymous."""

    username: str = ""
    password: str = ""
    identity_token: str = ""
    registry_token: str = ""

    @property
    def anonymous(self) -> bool:
        return not (self.username or self.password or self.identity_token or self.registry_token)

    @property
    def has_basic(self) -> bool:
        return bool(self.username or self.password)

    def basic_header(self) -> str:
        """The ``Authorization`` value for HTTP Basic with these credentials."""
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")

    def __repr__(self) -> str:
        if self.anonymous:
            return "Credentials(anonymous)"
        parts = [f"username={self.username!r}"] if self.username else []
        for name in ("password", "identity_token", "registry_token"):
            if getattr(self, name):
                parts.append(f"{name}=***")
        return f"Credentials({', '.join(parts)})"

    __str__ = __repr__


ANONYMOUS = Credentials()


@dataclass(frozen=True, repr=False)
class DockerConfig:
    """The ``auths`` of a docker config, keyed by normalised registry host."""

    auths: dict[str, Credentials] = field(default_factory=dict)
    source: str = "<none>"

    def for_registry(self, host: str) -> Credentials:
        """The credentials for ``host`` (``host[:port]``), anonymous when there is no entry."""
        key = normalize_registry(host)
        return self.auths.get(key, ANONYMOUS)

    def __repr__(self) -> str:
        return f"DockerConfig(source={self.source!r}, registries={sorted(self.auths)!r})"

    __str__ = __repr__


def normalize_registry(key: str) -> str:
    """A config key or registry host as ``host[:port]``; every Docker Hub alias -> docker.io."""
    host = key.strip()
    for prefix in ("https://", "http://"):
        if host.lower().startswith(prefix):
            host = host[len(prefix):]
            break
    host = host.split("/", 1)[0].lower()
    return "docker.io" if host in DOCKER_HUB_HOSTS else host


def parse_docker_config(text: str | bytes, source: str = "<inline>") -> DockerConfig:
    """Parse docker config JSON (``{"auths": {...}}`` or the legacy ``.dockercfg`` shape)."""
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        # json's message gives a position, never the document text.
        raise AuthError(f"pull secret {source} is not valid JSON: {_json_reason(exc)}") from None
    if data is None:
        raise AuthError(f"pull secret {source} is null")
    if not isinstance(data, dict):
        raise AuthError(f"pull secret {source} is not a docker config (a JSON object)")
    auths = data.get("auths")
    if auths is None:
        # Legacy .dockercfg: the hosts are the top-level keys.
        legacy = {k: v for k, v in data.items() if isinstance(v, dict) and _looks_like_entry(v)}
        auths = legacy
    if not isinstance(auths, dict):
        raise AuthError(f"pull secret {source}: 'auths' is not an object")
    parsed: dict[str, Credentials] = {}
    for key, entry in auths.items():
        creds = _parse_entry(entry, source, str(key))
        if not creds.anonymous or normalize_registry(str(key)) not in parsed:
            parsed[normalize_registry(str(key))] = creds
    return DockerConfig(parsed, source)


def load_pull_secret(secret: str | os.PathLike[str] | None) -> DockerConfig:
    """Read an ``imagePullSecret``: JSON text, a file, or a directory with ``.dockerconfigjson``.

    ``None`` or an empty string falls back to the default docker config.
    """
    if secret is None or (isinstance(secret, str) and not secret.strip()):
        return default_docker_config()
    text = secret.strip() if isinstance(secret, str) else ""
    if text[:1] in ("{", "[", '"') or text == "null":
        return parse_docker_config(text, "<inline>")
    path = Path(secret)
    if path.is_dir():
        for name in SECRET_FILES:
            if (path / name).is_file():
                return _read_config(path / name)
        raise AuthError(
            f"pull secret directory {path} holds none of {', '.join(SECRET_FILES)}"
        )
    if path.is_file():
        return _read_config(path)
    raise AuthError(f"pull secret {path} does not exist (and is not docker config JSON)")


def default_docker_config() -> DockerConfig:
    """``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json``, else no credentials."""
    candidates = []
    if os.environ.get("DOCKER_CONFIG"):
        candidates.append(Path(os.environ["DOCKER_CONFIG"]) / "config.json")
    candidates.append(Path.home() / ".docker" / "config.json")
    for candidate in candidates:
        if candidate.is_file():
            return _read_config(candidate)
    return DockerConfig()


def credentials_for(host: str, secret: Any = None) -> Credentials:
    """Credentials for registry ``host`` from whatever the caller holds.

    ``secret`` may be :class:`Credentials` (used as is), a :class:`DockerConfig`, an
    ``imagePullSecret`` (JSON text, file or directory), or None for the default docker config.
    """
    if isinstance(secret, Credentials):
        return secret
    if isinstance(secret, DockerConfig):
        return secret.for_registry(host)
    return load_pull_secret(secret).for_registry(host)


def _read_config(path: Path) -> DockerConfig:
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise AuthError(f"cannot read pull secret {path}: {exc.strerror}") from None
    return parse_docker_config(text, str(path))


def _looks_like_entry(entry: dict[str, Any]) -> bool:
    keys = {"auth", "username", "password", "identitytoken", "registrytoken", "email"}
    return bool(keys & set(entry))


def _parse_entry(entry: Any, source: str, key: str) -> Credentials:
    host = normalize_registry(key)
    if entry is None or entry == {}:
        return ANONYMOUS
    if not isinstance(entry, dict):
        raise AuthError(f"pull secret {source}: the entry for {host} is not an object")
    username = _str(entry.get("username"), source, host)
    password = _str(entry.get("password"), source, host)
    auth = _str(entry.get("auth"), source, host)
    if auth and not (username or password):
        try:
            decoded = base64.b64decode(auth, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise AuthError(f"pull secret {source}: 'auth' for {host} is not base64") from None
        if ":" not in decoded:
            raise AuthError(f"pull secret {source}: 'auth' for {host} is not user:password")
        username, password = decoded.split(":", 1)
    return Credentials(
        username=username,
        password=password,
        identity_token=_str(entry.get("identitytoken"), source, host),
        registry_token=_str(entry.get("registrytoken"), source, host),
    )


def _str(value: Any, source: str, host: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise AuthError(f"pull secret {source}: a field for {host} is not a string")
    return value


def _json_reason(exc: Exception) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at line {exc.lineno} column {exc.colno}"
    return type(exc).__name__


# -- where requests may go: plain-HTTP/insecure registries and the token-realm guard (SSRF) ------

METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata.goog", "metadata",
                            "169.254.169.254", "fd00:ec2::254", "100.100.100.200"})
Resolver = Callable[[str], Iterable[str]]


def host_of(registry: str) -> str:
    host = urlsplit(f"//{registry}").hostname
    return host or registry


def is_insecure_registry(registry: str, env: str | None = None) -> bool:
    """Whether ``WASM_INSECURE_REGISTRIES`` (comma list of host[:port], ``*``) names it."""
    value = os.environ.get("WASM_INSECURE_REGISTRIES", "") if env is None else env
    entries = {e.strip().lower() for e in value.split(",") if e.strip()}
    return "*" in entries or registry.lower() in entries or host_of(registry).lower() in entries


def is_loopback_host(host: str) -> bool:
    host = host.lower().strip("[]")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_private_host(host: str) -> bool:
    """localhost, or an IP literal that is not globally reachable (private, link-local, ...)."""
    if is_loopback_host(host):
        return True
    try:
        return _blocked_ip(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return False


def _blocked_ip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    # not is_global: loopback, private, link-local, CGNAT, documentation, reserved, unspecified
    return not ip.is_global or ip.is_multicast or str(ip) in METADATA_HOSTS


def resolve_host(host: str) -> list[str]:
    try:
        return [str(info[4][0]) for info in socket.getaddrinfo(host, None)]
    except (OSError, UnicodeError):
        return []  # the token request itself will fail and say so


def check_realm(realm: str, registry: str, resolve: Resolver | None = resolve_host) -> None:
    """Refuse a bearer realm aimed at internal addresses (SSRF), unless the registry is local."""
    parts = urlsplit(realm)
    host = (parts.hostname or "").lower()
    if parts.scheme not in ("http", "https") or not host:
        raise SsrfBlocked(f"{registry}: refusing token realm {realm!r}: not an http(s) url")
    if host in METADATA_HOSTS:
        raise SsrfBlocked(f"{registry}: refusing token realm {realm!r}: a metadata address")
    if is_private_host(host_of(registry)):
        return
    if is_private_host(host):
        raise SsrfBlocked(f"{registry}: refusing token realm {realm!r}: an internal address "
                          "(allowed only for a registry that is itself local)")
    for addr in resolve(host) if resolve else ():
        if is_private_host(addr) or addr in METADATA_HOSTS:
            raise SsrfBlocked(f"{registry}: refusing token realm {realm!r}: {host} resolves "
                              f"to the internal address {addr}")


__all__ = [
    "ANONYMOUS",
    "DOCKER_HUB_KEY",
    "METADATA_HOSTS",
    "Credentials",
    "DockerConfig",
    "check_realm",
    "credentials_for",
    "default_docker_config",
    "is_insecure_registry",
    "is_loopback_host",
    "is_private_host",
    "load_pull_secret",
    "normalize_registry",
    "parse_docker_config",
]
