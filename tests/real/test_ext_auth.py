"""gpustack-ext-auth through `wasmgate run`, asking a real authorization server.

Everything runs on 127.0.0.1: a model upstream that records what reaches it, an authorization
server that answers by the request's credential, and the gateway started as a user would.

How the plugin calls out (gpustack/gpustack-higress-plugin, extensions/gpustack-ext-auth):
`authz.endpoint {service_name, service_port}` becomes wasm-go's `FQDNCluster`, so the
`proxy_http_call` names the cluster ``outbound|<service_port>||<service_name>`` with
``:authority`` = ``service_host`` or ``service_name``. As in Envoy, the Gateway has a cluster of
exactly that name (its endpoint is the auth server's real port; 80 is only part of the name). A
``service_name`` that is a reachable address also works: ``outbound|PORT||127.0.0.1`` resolves to
that host and port (used by the failure tests).

The contract shown here (README and main.go of the plugin):
- only routes whose ``route_name`` matches ``route_match_regexes`` are touched;
- the call carries the client headers matching ``allowed_headers``, ``headers_to_add``,
  ``Authorization`` (always, when the plugin did not resolve the caller itself), the
  ``x-original-*`` / ``x-forwarded-*`` request description and ``x-gpustack-downstream-conn``
  (the client's ``source.address``); a client ``x-mse-consumer`` never reaches it;
- a 200 copies the response headers matching ``allowed_upstream_headers`` onto the request,
  stamps ``x-mse-consumer`` from the response, then removes ``headers_to_remove``;
- any other verdict is sent to the client with the auth server's status, body and the headers
  matching ``allowed_client_headers``; a 5xx (Envoy: 503 when it cannot connect, 504 on timeout)
  becomes ``status_on_error`` unless ``failure_mode_allow`` lets the request through;
- with ``local_auth`` a known key is verified at the gateway (sha256 digest): the call asserts
  ``x-gpustack-access-key`` instead of forwarding the credential, a wrong secret is refused
  without a call, and ``failure_mode_allow_authenticated`` admits only such callers when the
  server fails.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from ..conftest import missing
from ..e2e.conftest import Gateway, free_port
from .higress import HigressDownloadError, higress_plugin
from .test_higress_gateway import wasm_plugin

Start = Callable[..., Gateway]
Headers = list[tuple[str, str]]

AUTH_SERVICE = "auth.gpustack.svc"
AUTH_CLUSTER = f"outbound|80||{AUTH_SERVICE}"
ROUTE = "default/ai-route-route-1"  # matches ROUTE_REGEX, like GPUStack's model routes
OTHER_ROUTE = "console"  # does not
ROUTE_REGEX = "^default/ai-route-route-"
GATEWAY_TOKEN = "gw-derived-token"

GOOD = "Bearer gpustack_good_key"
BAD = "Bearer gpustack_bad_key"
FORBIDDEN = "Bearer gpustack_other_model"
BOOM = "Bearer boom"
SLOW = "Bearer slow"
CONSUMER = "goodkey.gpustack-7"

# local_auth: a generated key `gpustack_<access>_<secret>` and its digest as GPUStack stores it
ACCESS_KEY, SECRET, SALT, USER_ID = "3192253c1f4a9b7e", "s3cr3t-secret", "a1b2c3d4" * 4, 7
LOCAL_KEY = f"Bearer gpustack_{ACCESS_KEY}_{SECRET}"
DIGEST = f"sha256${SALT}${hashlib.sha256((SALT + SECRET).encode()).hexdigest()}"
LOCAL_CONSUMER = f"{ACCESS_KEY}.gpustack-{USER_ID}"


@pytest.fixture(scope="module", autouse=True)
def plugin_downloaded() -> None:
    try:
        higress_plugin("gpustack-ext-auth")
    except HigressDownloadError as exc:
        missing(f"the gpustack-higress-plugins wheel could not be downloaded: {exc}")


# -- the servers ---------------------------------------------------------------------------------
class Recorded:
    def __init__(self, method: str, path: str, headers: Headers) -> None:
        self.method, self.path, self.headers = method, path, headers

    def values(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name]

    def one(self, name: str) -> str | None:
        values = self.values(name)
        assert len(values) <= 1, (name, values)
        return values[0] if values else None


class Server:
    """A ThreadingHTTPServer on 127.0.0.1 that records every request it is sent."""

    def __init__(self, answer: Callable[[Recorded], tuple[int, Headers, bytes]]) -> None:
        self.requests: list[Recorded] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                if length:
                    self.rfile.read(length)
                seen = Recorded(self.command, self.path,
                                [(k.lower(), v) for k, v in self.headers.items()])
                server.requests.append(seen)
                status, headers, body = answer(seen)
                try:
                    self.send_response(status)
                    for name, value in headers:
                        self.send_header(name, value)
                    self.send_header("content-length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the gateway gave up waiting (the timeout test)

            do_POST = do_GET

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.httpd.server_address[1])
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class AuthServer(Server):
    """GPUStack's /token-auth stand-in: the verdict depends on the credential it is sent."""

    def __init__(self) -> None:
        self.release = threading.Event()  # the SLOW credential waits for it
        super().__init__(self.verdict)

    def verdict(self, seen: Recorded) -> tuple[int, Headers, bytes]:
        credential = seen.one("authorization")
        if seen.one("x-gpustack-access-key") == ACCESS_KEY:  # an identity asserted by the gateway
            return 200, [("x-mse-consumer", LOCAL_CONSUMER), ("x-auth-user", "local")], b""
        if credential == GOOD:
            return 200, [("x-mse-consumer", CONSUMER), ("x-auth-user", "alice"),
                         ("x-auth-secret", "not-for-the-model"), ("cookie", "dummy=dummy")], b""
        if credential == SLOW:
            self.release.wait(30)
            return 200, [("x-mse-consumer", "late")], b""
        if credential == BOOM:
            return 500, [("content-type", "text/plain")], b"database is down"
        if credential == FORBIDDEN:
            return 403, [("content-type", "application/json"),
                         ("x-auth-reason", "model not allowed for this key")], \
                b'{"error": "forbidden model"}'
        return 401, [("content-type", "application/json"),
                     ("www-authenticate", 'Bearer realm="gpustack"'),
                     ("x-auth-reason", "invalid api key"), ("x-internal-trace", "t-1")], \
            b'{"error": "invalid api key"}'


def model_answer(seen: Recorded) -> tuple[int, Headers, bytes]:
    return 200, [("content-type", "application/json")], b'{"model": "answered"}'


@pytest.fixture
def auth() -> Iterator[AuthServer]:
    server = AuthServer()
    yield server
    server.release.set()
    server.stop()


@pytest.fixture
def model() -> Iterator[Server]:
    server = Server(model_answer)
    yield server
    server.stop()


# -- the gateway ---------------------------------------------------------------------------------
def gateway_doc(model: Server, auth_port: int) -> str:
    return f"""apiVersion: wasmgate.io/v1alpha1
kind: Gateway
metadata: {{name: ext-auth}}
spec:
  clusters:
  - name: model
    endpoints: ["127.0.0.1:{model.port}"]
  - name: "{AUTH_CLUSTER}"
    endpoints: ["127.0.0.1:{auth_port}"]
  routes:
  - name: {ROUTE}
    match: {{prefix: /v1/}}
    cluster: model
  - name: {OTHER_ROUTE}
    cluster: model
"""


def ext_auth(*, service_name: str = AUTH_SERVICE, service_port: int = 80,
             timeout_ms: int = 5000, **top: Any) -> dict[str, Any]:
    """The plugin's documented config (README "Example"), without local_auth unless given."""
    return {
        "route_match_regexes": [ROUTE_REGEX],
        "authz": {
            "endpoint": {"path": "/token-auth", "request_method": "GET",
                         "service_name": service_name, "service_port": service_port},
            "timeout": timeout_ms,
            "authorization_request": {
                "allowed_headers": [{"exact": "X-Forwarded-For"},
                                    {"exact": "x-higress-llm-model"}, {"exact": "x-api-key"},
                                    {"exact": "cookie"}, {"prefix": "x-client-"}],
                "headers_to_add": {"X-GPUStack-Auth-Token": GATEWAY_TOKEN},
            },
            "authorization_response": {
                "allowed_upstream_headers": [{"exact": "x-auth-user"}, {"exact": "cookie"}],
                "allowed_client_headers": [{"exact": "www-authenticate"},
                                           {"exact": "x-auth-reason"}],
            },
        },
        "upstream_request": {"headers_to_remove": ["cookie"]},
        "status_on_error": 403,
        **top,
    }


def start(start_gateway: Start, model: Server, auth_port: int,
          config: dict[str, Any]) -> Gateway:
    return start_gateway(gateway_doc(model, auth_port) + wasm_plugin("gpustack-ext-auth", config))


def ask(gateway: Gateway, credential: str | None, path: str = "/v1/chat/completions",
        **headers: str) -> tuple[int, dict[str, str], bytes]:
    sent = {k.replace("_", "-"): v for k, v in headers.items()}
    if credential is not None:
        sent["authorization"] = credential
    return gateway.get(path, headers=sent)


def crashes(gateway: Gateway) -> int:
    [plugin] = gateway.admin_json("/plugins")["plugins"]
    return int(plugin["crashes"])


# -- allow ---------------------------------------------------------------------------------------
def test_allowed_request_reaches_the_model_with_the_auth_servers_headers(
        start_gateway: Start, model: Server, auth: AuthServer) -> None:
    gateway = start(start_gateway, model, auth.port, ext_auth())
    status, _, body = ask(gateway, GOOD, x_higress_llm_model="qwen3", x_client_app="cli",
                          cookie="session=user-cookie", x_mse_consumer="forged",
                          x_not_allowed="private")
    assert (status, body) == (200, b'{"model": "answered"}')

    [call] = auth.requests  # the authorization call, as the auth server received it
    assert (call.method, call.path) == ("GET", "/token-auth")
    assert call.one("host") == AUTH_SERVICE  # :authority = service_name
    assert call.one("authorization") == GOOD  # forwarded: the plugin did not resolve the caller
    assert call.one("x-higress-llm-model") == "qwen3"  # allowed_headers: exact
    assert call.one("x-client-app") == "cli"  # allowed_headers: prefix
    assert call.one("cookie") == "session=user-cookie"
    assert call.one("x-forwarded-for") == "127.0.0.1"  # set by the gateway, then allowed
    assert call.one("x-gpustack-auth-token") == GATEWAY_TOKEN  # headers_to_add
    assert call.one("x-not-allowed") is None  # not in allowed_headers
    assert call.one("x-mse-consumer") is None  # a client's consumer never reaches the server
    assert call.one("x-original-method") == call.one("x-forwarded-method") == "GET"
    assert call.one("x-original-uri") == call.one("x-forwarded-uri") == "/v1/chat/completions"
    assert call.one("x-forwarded-proto") == "http"
    assert call.one("x-forwarded-host") == f"127.0.0.1:{gateway.port}"
    conn = call.one("x-gpustack-downstream-conn")  # source.address: the client's socket
    assert conn is not None and conn.startswith("127.0.0.1:") and int(conn.split(":")[1]) > 0

    [upstream] = model.requests
    assert upstream.path == "/v1/chat/completions"
    assert upstream.values("x-mse-consumer") == [CONSUMER]  # the server's, not the forged one
    assert upstream.values("x-auth-user") == ["alice"]  # allowed_upstream_headers
    assert upstream.values("x-auth-secret") == []  # returned but not allowed upstream
    assert upstream.values("cookie") == []  # client's and server's cookie: headers_to_remove
    assert upstream.values("authorization") == [GOOD]  # the model request keeps its credential
    assert upstream.values("x-higress-llm-model") == ["qwen3"]
    assert upstream.values("x-not-allowed") == ["private"]  # other headers untouched
    assert upstream.values("x-gpustack-auth-token") == []  # only on the authorization call
    assert crashes(gateway) == 0


# -- deny ----------------------------------------------------------------------------------------
def test_denied_request_gets_the_auth_servers_status_and_the_model_sees_nothing(
        start_gateway: Start, model: Server, auth: AuthServer) -> None:
    gateway = start(start_gateway, model, auth.port, ext_auth())

    status, headers, body = ask(gateway, BAD)
    assert status == 401
    assert json.loads(body) == {"error": "invalid api key"}  # the auth server's body
    assert headers["www-authenticate"] == 'Bearer realm="gpustack"'  # allowed_client_headers
    assert headers["x-auth-reason"] == "invalid api key"
    assert "x-internal-trace" not in headers  # returned but not in allowed_client_headers

    status, headers, body = ask(gateway, FORBIDDEN)
    assert status == 403
    assert json.loads(body) == {"error": "forbidden model"}
    assert headers["x-auth-reason"] == "model not allowed for this key"

    status, _, body = ask(gateway, None)  # no credential at all: the server says 401
    assert status == 401

    assert [r.one("authorization") for r in auth.requests] == [BAD, FORBIDDEN, None]
    assert model.requests == []  # no denied request reached the model
    gateway.wait_logged(" 401 - gpustack-ext-auth.unauthorized ")  # its details, access log
    assert crashes(gateway) == 0


# -- the auth server failing ---------------------------------------------------------------------
def test_auth_server_5xx_gives_status_on_error(start_gateway: Start, model: Server,
                                               auth: AuthServer) -> None:
    gateway = start(start_gateway, model, auth.port, ext_auth(status_on_error=503))
    status, _, body = ask(gateway, BOOM)
    assert status == 503  # status_on_error, not the server's 500
    assert body == b"database is down"  # the server's body is relayed
    assert len(auth.requests) == 1 and model.requests == []


def test_unreachable_auth_server_gives_status_on_error(start_gateway: Start,
                                                       model: Server) -> None:
    dead = free_port()  # nothing listens: Envoy answers the call itself with a 503
    gateway = start(start_gateway, model, dead,
                    ext_auth(service_name="127.0.0.1", service_port=dead))
    status, _, body = ask(gateway, GOOD)
    assert status == 403  # status_on_error (default 403)
    assert b"upstream connect error or disconnect/reset before headers" in body
    assert model.requests == []
    assert crashes(gateway) == 0


def test_auth_server_timeout_gives_status_on_error(start_gateway: Start, model: Server,
                                                   auth: AuthServer) -> None:
    gateway = start(start_gateway, model, auth.port, ext_auth(timeout_ms=300))
    status, _, body = ask(gateway, SLOW)  # the server holds its answer until released below
    auth.release.set()
    assert status == 403  # Envoy: 504 "upstream request timeout" -> status_on_error
    assert body == b"upstream request timeout"
    assert model.requests == []


def test_failure_mode_allow_lets_requests_through_when_the_server_fails(
        start_gateway: Start, model: Server, auth: AuthServer) -> None:
    gateway = start(start_gateway, model, auth.port, ext_auth(failure_mode_allow=True))
    status, _, _ = ask(gateway, BOOM, cookie="session=user-cookie", x_mse_consumer="forged")
    assert status == 200  # allowed without a verdict
    status, _, _ = ask(gateway, BAD)
    assert status == 401  # a real verdict is never waived
    [upstream] = model.requests
    assert upstream.values("authorization") == [BOOM]
    assert upstream.values("cookie") == []  # still finished like any allowed request
    assert upstream.values("x-mse-consumer") == []  # nobody was named
    assert "authorization service failed (500); allowing an unresolved caller" in gateway.logs()

    dead = free_port()
    gateway = start(start_gateway, model, dead, ext_auth(
        service_name="127.0.0.1", service_port=dead, failure_mode_allow=True))
    assert ask(gateway, GOOD)[0] == 200  # connection refused (503) is a failure too
    assert len(model.requests) == 2


# -- routes the plugin does not own --------------------------------------------------------------
def test_route_not_matching_route_match_regexes_is_not_touched(
        start_gateway: Start, model: Server, auth: AuthServer) -> None:
    gateway = start(start_gateway, model, auth.port, ext_auth())
    status, _, _ = ask(gateway, BAD, path="/console/api", cookie="session=c",
                       x_mse_consumer="client-said")
    assert status == 200  # a bad credential, but not a route of the plugin
    assert auth.requests == []  # no authorization call
    [upstream] = model.requests
    assert upstream.values("cookie") == ["session=c"]  # no headers_to_remove
    assert upstream.values("x-mse-consumer") == ["client-said"]  # not even the consumer strip

    assert ask(gateway, BAD)[0] == 401  # the owned route, same gateway: authorized
    assert len(auth.requests) == 1


def test_empty_route_match_regexes_matches_nothing(start_gateway: Start, model: Server,
                                                   auth: AuthServer) -> None:
    gateway = start(start_gateway, model, auth.port, ext_auth(route_match_regexes=[]))
    assert ask(gateway, BAD)[0] == 200
    assert auth.requests == [] and len(model.requests) == 1


# -- local_auth ----------------------------------------------------------------------------------
LOCAL_AUTH = {"enabled": True,
              "keys": {ACCESS_KEY: {"exp": None, "digest": DIGEST, "user_id": USER_ID}}}


def test_local_auth_asserts_the_identity_and_refuses_a_wrong_secret(
        start_gateway: Start, model: Server, auth: AuthServer) -> None:
    gateway = start(start_gateway, model, auth.port, ext_auth(local_auth=LOCAL_AUTH))
    status, _, _ = ask(gateway, LOCAL_KEY, x_api_key="also-a-credential")
    assert status == 200
    [call] = auth.requests
    assert call.one("x-gpustack-access-key") == ACCESS_KEY  # identity asserted...
    assert call.one("authorization") is None  # ...and every credential header stripped
    assert call.one("x-api-key") is None
    assert call.one("x-gpustack-auth-token") == GATEWAY_TOKEN
    [upstream] = model.requests
    assert upstream.values("x-mse-consumer") == [LOCAL_CONSUMER]
    assert upstream.values("x-auth-user") == ["local"]

    status, _, body = ask(gateway, f"Bearer gpustack_{ACCESS_KEY}_wrong-secret")
    assert status == 401  # known key, wrong secret: refused at the gateway
    assert json.loads(body)["error"]["code"] == 401
    assert len(auth.requests) == 1 and len(model.requests) == 1  # no call, nothing upstream
    gateway.wait_logged("gpustack-ext-auth.local_secret_mismatch")  # (the access log)


def test_failure_mode_allow_authenticated_admits_only_locally_verified_callers(
        start_gateway: Start, model: Server) -> None:
    dead = free_port()
    gateway = start(start_gateway, model, dead, ext_auth(
        service_name="127.0.0.1", service_port=dead, local_auth=LOCAL_AUTH,
        failure_mode_allow_authenticated=True))
    assert ask(gateway, LOCAL_KEY)[0] == 200  # verified here: survives the outage
    [upstream] = model.requests
    assert upstream.values("x-mse-consumer") == [LOCAL_CONSUMER]  # rebuilt locally
    assert ask(gateway, GOOD)[0] == 403  # unknown to local_auth: status_on_error
    assert len(model.requests) == 1
