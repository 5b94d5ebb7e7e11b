"""Authentication and transport security: htpasswd basic auth and TLS with a test CA against real
registries; bearer tokens and 5xx on a mocked registry; the SSRF guard on token realms."""

from __future__ import annotations

import base64
import functools
import json
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qs

import httpx
import pytest

from wasmgate.fetch import oci
from wasmgate.fetch.credentials import Credentials, check_realm
from wasmgate.fetch.errors import (
    AuthError,
    FetchError,
    RegistryError,
    RegistryUnreachable,
    SsrfBlocked,
)
from wasmgate.fetch.images import build_image, push
from wasmgate.fetch.oci import pull, resolve_digest

from .conftest import PASSWORD, USER, Registry, make_wasm

pytestmark = pytest.mark.usefixtures("no_docker_config")
GOOD = Credentials(USER, PASSWORD)


# -- htpasswd basic auth (real registry) ------------------------------------------------------

@pytest.fixture(scope="module")
def auth_image(auth_registry: Registry) -> tuple[str, str, bytes]:
    wasm = make_wasm("auth")
    image = build_image(wasm, "oci")
    ref = auth_registry.ref("private/plugin")
    push(image, ref, GOOD)
    return ref, image.digest, wasm


def test_basic_auth_pull(auth_image: tuple[str, str, bytes]) -> None:
    ref, digest, wasm = auth_image
    pulled = pull(ref, credentials=GOOD)
    assert (pulled.wasm, pulled.manifest_digest) == (wasm, digest)
    assert resolve_digest(ref, credentials=GOOD) == digest


def test_basic_auth_without_credentials(auth_image: tuple[str, str, bytes]) -> None:
    with pytest.raises(AuthError, match="no credentials"):
        pull(auth_image[0])


def test_basic_auth_wrong_password_never_shows_it(auth_image: tuple[str, str, bytes]) -> None:
    wrong = "wr0ng-Secret-value"
    with pytest.raises(AuthError) as caught:
        pull(auth_image[0], credentials=Credentials(USER, wrong))
    message = str(caught.value)
    assert USER in message and "authentication failed" in message
    assert wrong not in message and PASSWORD not in message
    assert base64.b64encode(f"{USER}:{wrong}".encode()).decode() not in message


def test_push_needs_credentials(auth_registry: Registry) -> None:
    image = build_image(make_wasm("push-auth"), "cncf")
    with pytest.raises(AuthError):
        push(image, auth_registry.ref("private/other"))
    with pytest.raises(AuthError) as caught:
        push(image, auth_registry.ref("private/other"), Credentials(USER, "nope-nope"))
    assert "nope-nope" not in str(caught.value)


def test_basic_auth_from_pull_secrets(auth_registry: Registry, auth_image: tuple[str, str, bytes],
                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ref, digest, _ = auth_image
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    config = json.dumps({"auths": {auth_registry.host: {"auth": token}}})
    assert pull(ref, credentials=config).manifest_digest == digest  # JSON text
    secret_dir = tmp_path / "secret"  # as kubernetes mounts kubernetes.io/dockerconfigjson
    secret_dir.mkdir()
    (secret_dir / ".dockerconfigjson").write_text(config)
    assert pull(ref, credentials=str(secret_dir)).manifest_digest == digest
    assert pull(ref, credentials=str(secret_dir / ".dockerconfigjson")).manifest_digest == digest
    docker_dir = tmp_path / "docker"  # no secret: $DOCKER_CONFIG/config.json
    docker_dir.mkdir()
    (docker_dir / "config.json").write_text(json.dumps(
        {"auths": {f"http://{auth_registry.host}": {"username": USER, "password": PASSWORD}}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(docker_dir))
    assert pull(ref).manifest_digest == digest
    # an entry for another registry is anonymous here
    other = json.dumps({"auths": {"elsewhere.example": {"auth": token}}})
    with pytest.raises(AuthError):
        pull(ref, credentials=other)


# -- TLS with a test CA (real registry) -------------------------------------------------------

@pytest.fixture(scope="module")
def tls_image(tls_registry: Registry) -> tuple[str, str, bytes]:
    wasm = make_wasm("tls")
    image = build_image(wasm, "artifact")
    ref = tls_registry.ref("secure/plugin")
    push(image, ref, ca_file=tls_registry.ca_file)
    return ref, image.digest, wasm


def test_tls_with_ca_file(tls_registry: Registry, tls_image: tuple[str, str, bytes]) -> None:
    ref, digest, wasm = tls_image
    pulled = pull(ref, ca_file=tls_registry.ca_file)
    assert (pulled.wasm, pulled.manifest_digest) == (wasm, digest)
    assert pulled.format == "artifact"


def test_tls_untrusted_is_refused_not_downgraded(tls_image: tuple[str, str, bytes],
                                                 test_ca: dict[str, Path]) -> None:
    ref = tls_image[0]
    with pytest.raises(RegistryUnreachable, match="certificate"):
        pull(ref)
    with pytest.raises(RegistryUnreachable, match="certificate"):
        pull(ref, ca_file=test_ca["other_ca"])


def test_tls_insecure_skips_verification(tls_registry: Registry,
                                         tls_image: tuple[str, str, bytes],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    ref, digest, _ = tls_image
    assert pull(ref, insecure=True).manifest_digest == digest
    monkeypatch.setenv("WASM_INSECURE_REGISTRIES", tls_registry.host)
    assert pull(ref).manifest_digest == digest


# -- bearer tokens, 5xx (mocked registry) -----------------------------------------------------

Handler = Callable[[httpx.Request], httpx.Response]
REG = "registry.example.com"
REALM = "https://auth.example.com/token"


@pytest.fixture
def mock_http(monkeypatch: pytest.MonkeyPatch) -> Callable[[Handler], list[httpx.Request]]:
    """Route every httpx.Client made by the fetcher to ``handler``; returns the request log."""
    def install(handler: Handler) -> list[httpx.Request]:
        log: list[httpx.Request] = []

        def record(request: httpx.Request) -> httpx.Response:
            log.append(request)
            return handler(request)

        client = functools.partial(httpx.Client, transport=httpx.MockTransport(record))
        monkeypatch.setattr(oci.httpx, "Client", client)
        monkeypatch.setattr(oci.cr, "resolve_host", lambda host: ["93.184.216.34"])
        return log

    return install


def bearer_registry(wasm: bytes, token: str = "tok-123", realm: str = REALM,
                    accept: Callable[[httpx.Request], bool] = lambda r: True) -> Handler:
    image = build_image(wasm, "cncf")
    challenge = (f'Bearer realm="{realm}",service="registry.example.com",'
                 'scope="repository:org/plugin:pull"')

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.example.com" or request.url.path == "/token":
            if not accept(request):
                return httpx.Response(401, json={"details": "bad credentials"})
            return httpx.Response(200, json={"access_token": token})
        if request.headers.get("authorization") != f"Bearer {token}":
            return httpx.Response(401, headers={"WWW-Authenticate": challenge})
        path = request.url.path
        if path.endswith("/manifests/v1"):
            return httpx.Response(200, content=image.manifest,
                                  headers={"Content-Type": image.media_type})
        digest = path.rsplit("/", 1)[-1]
        if digest in image.blobs:
            return httpx.Response(200, content=image.blobs[digest])
        return httpx.Response(404, json={"errors": [{"code": "BLOB_UNKNOWN", "message": "?"}]})

    return handler


def test_bearer_anonymous_token(mock_http: Callable[[Handler], list[httpx.Request]]) -> None:
    wasm = make_wasm("bearer")
    log = mock_http(bearer_registry(wasm))
    assert pull(f"{REG}/org/plugin:v1").wasm == wasm
    token_requests = [r for r in log if r.url.host == "auth.example.com"]
    assert len(token_requests) == 1  # the token is reused for the blob
    query = parse_qs(token_requests[0].url.query.decode())
    assert query == {"service": ["registry.example.com"], "scope": ["repository:org/plugin:pull"]}
    assert "authorization" not in token_requests[0].headers


def test_bearer_with_basic_credentials(mock_http: Callable[[Handler], list[httpx.Request]]) -> None:
    expected = "Basic " + base64.b64encode(b"alice:pw-alice").decode()
    wasm = make_wasm("bearer-basic")
    log = mock_http(bearer_registry(
        wasm, accept=lambda r: r.headers.get("authorization") == expected))
    assert pull(f"{REG}/org/plugin:v1", credentials=Credentials("alice", "pw-alice")).wasm == wasm
    with pytest.raises(AuthError) as caught:
        pull(f"{REG}/org/plugin:v1", credentials=Credentials("alice", "pw-wrong"))
    assert "pw-wrong" not in str(caught.value) and "alice" in str(caught.value)
    assert all(r.url.scheme == "https" for r in log)  # a public registry: never plain HTTP


def test_identity_and_registry_tokens(mock_http: Callable[[Handler], list[httpx.Request]]) -> None:
    wasm = make_wasm("tokens")

    def refresh_ok(request: httpx.Request) -> bool:
        form = parse_qs(request.content.decode())
        return request.method == "POST" and form.get("refresh_token") == ["refresh-me"]

    mock_http(bearer_registry(wasm, accept=refresh_ok))
    assert pull(f"{REG}/org/plugin:v1",
                credentials=Credentials(identity_token="refresh-me")).wasm == wasm
    log = mock_http(bearer_registry(wasm, token="direct"))
    assert pull(f"{REG}/org/plugin:v1", credentials=Credentials(registry_token="direct")).wasm \
        == wasm
    assert not [r for r in log if r.url.host == "auth.example.com"]


def test_bearer_realm_guard_blocks_before_any_request(
        mock_http: Callable[[Handler], list[httpx.Request]]) -> None:
    realm = "http://169.254.169.254/latest/meta-data/iam"
    log = mock_http(bearer_registry(make_wasm("ssrf"), realm=realm))
    with pytest.raises(SsrfBlocked, match=r"169\.254\.169\.254"):
        pull(f"{REG}/org/plugin:v1", credentials=Credentials("alice", "pw"))
    assert not [r for r in log if r.url.host == "169.254.169.254"]


def test_server_errors(mock_http: Callable[[Handler], list[httpx.Request]]) -> None:
    mock_http(lambda request: httpx.Response(
        500, json={"errors": [{"code": "UNKNOWN", "message": "storage on fire"}]}))
    with pytest.raises(RegistryError, match="storage on fire") as caught:
        pull(f"{REG}/org/plugin:v1")
    assert caught.value.status == 500
    mock_http(lambda request: httpx.Response(200, content=b"<html>captive portal</html>"))
    with pytest.raises(RegistryError, match="not a JSON object"):
        pull(f"{REG}/org/plugin:v1")
    mock_http(lambda request: httpx.Response(403))
    with pytest.raises(AuthError, match="denied"):
        pull(f"{REG}/org/plugin:v1")


# -- the SSRF guard (no network) ---------------------------------------------------------------

def no_dns(host: str) -> list[str]:
    return []


@pytest.mark.parametrize("realm", [
    "http://127.0.0.1:5001/token", "https://localhost/token", "https://[::1]/token",
    "http://10.1.2.3/token", "http://172.16.0.9/token", "http://192.168.1.1/token",
    "http://169.254.169.254/latest/meta-data", "http://metadata.google.internal/computeMetadata",
    "http://[fe80::1]/token", "http://[::ffff:127.0.0.1]/token", "http://0.0.0.0/token",
    "file:///etc/passwd", "ftp://auth.example.com/token", "https:///no-host",
])
def test_ssrf_guard_refuses_internal_realms_for_public_registries(realm: str) -> None:
    with pytest.raises(SsrfBlocked):
        check_realm(realm, "registry.example.com", resolve=no_dns)


def test_ssrf_guard_allows_public_realms() -> None:
    check_realm("https://auth.docker.io/token", "index.docker.io", resolve=no_dns)
    check_realm("https://ghcr.io/token", "ghcr.io", resolve=lambda h: ["140.82.112.33"])


def test_ssrf_guard_checks_resolved_addresses() -> None:
    with pytest.raises(SsrfBlocked, match=r"resolves to the internal address 169\.254\.169\.254"):
        check_realm("https://evil.example/token", "registry.example.com",
                    resolve=lambda host: ["93.184.216.34", "169.254.169.254"])


@pytest.mark.parametrize("registry", ["127.0.0.1:5000", "localhost:5000", "10.0.0.5", "[::1]:5000"])
def test_ssrf_guard_lets_a_local_registry_use_a_local_realm(registry: str) -> None:
    check_realm("http://127.0.0.1:5001/token", registry, resolve=no_dns)
    check_realm("http://10.0.0.6/token", registry, resolve=no_dns)
    with pytest.raises(SsrfBlocked):  # metadata endpoints never
        check_realm("http://169.254.169.254/token", registry, resolve=no_dns)
    with pytest.raises(SsrfBlocked):
        check_realm("http://metadata.google.internal/token", registry, resolve=no_dns)


def test_errors_are_fetch_errors() -> None:
    for cls in (AuthError, RegistryError, RegistryUnreachable, SsrfBlocked):
        assert issubclass(cls, FetchError)
