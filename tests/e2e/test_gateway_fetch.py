"""The gateway fetching plugins from a real OCI registry and an HTTP server, and staying up
when they fail."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from wasmgate.fetch.images import build_image, push

from ..conftest import EXAMPLE
from ..fetch.conftest import (  # noqa: F401  (fixtures)
    Registry,
    auth_registry,
    own_registry,
    registry,
    test_ca,
)
from .conftest import Gateway
from .test_gateway import gateway_doc

Start = Callable[..., Gateway]


def plugin_doc(url: str, *, fail: str = "FAIL_CLOSE", sha256: str = "", extra: str = "") -> str:
    pin = f"  sha256: '{sha256}'\n" if sha256 else ""
    return (f"---\napiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\n"
            f"metadata: {{name: example}}\nspec:\n  url: {url}\n  pluginName: example\n"
            f"  failStrategy: {fail}\n  pluginConfig: {{greeting: oci}}\n{pin}{extra}")


def plugin_status(gateway: Gateway) -> dict:  # type: ignore[type-arg]
    return gateway.admin_json("/plugins")["plugins"][0]


def wait_for(predicate: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.2)


def start_with_cache(start_gateway: Start, config: str, tmp_path: Path,
                     wait: bool = True) -> Gateway:
    return start_gateway(config, "--cache-dir", str(tmp_path / "cache"), wait=wait)


def test_plugin_from_an_oci_registry(start_gateway: Start, upstream: str,
                                     registry: Registry, tmp_path: Path) -> None:  # noqa: F811
    ref = f"{registry.host}/plugins/example:v1"
    digest = push(build_image(EXAMPLE.read_bytes(), "oci"), ref, insecure=True)
    gateway = start_with_cache(start_gateway, gateway_doc(upstream) + plugin_doc(
        f"oci://{ref}", sha256=digest.split(":")[1]), tmp_path)
    status, headers, _ = gateway.get("/")
    assert (status, headers["x-wasm-greeting"]) == (200, '{"greeting":"oci"}')
    plugin = plugin_status(gateway)
    assert plugin["status"] == "ready"
    assert plugin["sha256"] == hashlib.sha256(EXAMPLE.read_bytes()).hexdigest()
    prometheus = gateway.admin_get("/stats/prometheus")[1].decode()
    assert "wasm_remote_fetch_count{result=\"success\"} 1" in prometheus, prometheus[-800:]


def test_registry_down_then_up(start_gateway: Start, upstream: str,
                               own_registry: Registry, tmp_path: Path) -> None:  # noqa: F811
    ref = f"{own_registry.host}/plugins/late:v1"
    push(build_image(EXAMPLE.read_bytes(), "artifact"), ref, insecure=True)
    own_registry.stop()
    gateway = start_with_cache(start_gateway, gateway_doc(upstream) + plugin_doc(
        f"oci://{ref}", fail="FAIL_OPEN"), tmp_path)
    wait_for(lambda: plugin_status(gateway)["status"] == "failed")
    status, headers, _ = gateway.get("/")
    assert status == 200 and "x-wasm-greeting" not in headers  # allow-all stand-in
    assert plugin_status(gateway)["fetch_attempts"] >= 1
    own_registry.start()
    wait_for(lambda: plugin_status(gateway)["status"] == "ready", timeout=40)
    assert gateway.get("/")[1]["x-wasm-greeting"] == '{"greeting":"oci"}'


def test_digest_mismatch_is_reported_and_denies(start_gateway: Start, upstream: str,
                                                registry: Registry,  # noqa: F811
                                                tmp_path: Path) -> None:
    ref = f"{registry.host}/plugins/pinned:v1"
    digest = push(build_image(EXAMPLE.read_bytes(), "compat"), ref, insecure=True)
    wrong = "0" * 64
    gateway = start_with_cache(start_gateway, gateway_doc(upstream) + plugin_doc(
        f"oci://{ref}", sha256=wrong), tmp_path)
    wait_for(lambda: plugin_status(gateway)["status"] == "failed")
    error = plugin_status(gateway)["error"]
    assert wrong in error and digest.split(":")[1] in error
    assert gateway.get("/")[0] == 403  # FAIL_CLOSE stand-in: deny-all


def test_non_wasm_image_fails_cleanly(start_gateway: Start, upstream: str,
                                      registry: Registry, tmp_path: Path) -> None:  # noqa: F811
    ref = f"{registry.host}/plugins/notwasm:v1"
    push(build_image(b"#!/bin/sh\necho not wasm\n", "cncf", check=False), ref, insecure=True)
    gateway = start_with_cache(start_gateway, gateway_doc(upstream) + plugin_doc(
        f"oci://{ref}", fail="FAIL_OPEN"), tmp_path)
    wait_for(lambda: plugin_status(gateway)["status"] == "failed")
    assert "wasm" in plugin_status(gateway)["error"].lower()
    assert gateway.get("/")[0] == 200


class FlakyWasm(BaseHTTPRequestHandler):
    """Serves example.wasm after answering 500 to the first `failures` requests."""

    failures = 2
    seen = 0

    def do_GET(self) -> None:
        type(self).seen += 1
        if type(self).seen <= self.failures:
            self.send_response(500)
            self.send_header("content-length", "0")
            self.end_headers()
            return
        data = EXAMPLE.read_bytes()
        self.send_response(200)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


def test_http_module_with_5xx_retries(start_gateway: Start, upstream: str,
                                      tmp_path: Path) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FlakyWasm)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/example.wasm"
        gateway = start_with_cache(start_gateway, gateway_doc(upstream) + plugin_doc(url),
                                   tmp_path)
        wait_for(lambda: plugin_status(gateway)["status"] == "ready")
        assert gateway.get("/")[1]["x-wasm-greeting"] == '{"greeting":"oci"}'
        assert FlakyWasm.seen >= 3
        cached = [p.read_bytes() for p in (tmp_path / "cache").rglob("*.wasm")]
        assert EXAMPLE.read_bytes() in cached  # the module landed in the gateway's cache
    finally:
        server.shutdown()
        server.server_close()


def test_pull_secret_for_an_authenticated_registry(start_gateway: Start, upstream: str,
                                                   auth_registry: Registry,  # noqa: F811
                                                   tmp_path: Path) -> None:
    import base64

    from wasmgate.fetch.credentials import Credentials

    from ..fetch.conftest import PASSWORD, USER

    ref = f"{auth_registry.host}/plugins/private:v1"
    push(build_image(EXAMPLE.read_bytes(), "oci"), ref,
         Credentials(username=USER, password=PASSWORD), insecure=True)
    secret_dir = tmp_path / "pull-secret"  # as kubernetes mounts a dockerconfigjson secret
    secret_dir.mkdir()
    auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    (secret_dir / ".dockerconfigjson").write_text(
        json.dumps({"auths": {auth_registry.host: {"auth": auth}}}))
    without = start_with_cache(start_gateway, gateway_doc(upstream) + plugin_doc(
        f"oci://{ref}", fail="FAIL_OPEN"), tmp_path / "a")
    wait_for(lambda: plugin_status(without)["status"] == "failed")
    error = plugin_status(without)["error"]
    assert "401" in error or "auth" in error.lower()
    assert PASSWORD not in without.admin_get("/plugins")[1].decode()
    assert without.get("/")[0] == 200
    with_secret = start_with_cache(start_gateway, gateway_doc(upstream) + plugin_doc(
        f"oci://{ref}", extra=f"  imagePullSecret: {secret_dir}\n"), tmp_path / "b")
    wait_for(lambda: plugin_status(with_secret)["status"] == "ready")
    assert with_secret.get("/")[1]["x-wasm-greeting"] == '{"greeting":"oci"}'
    assert PASSWORD not in with_secret.admin_get("/config_dump")[1].decode()
    assert PASSWORD not in with_secret.logs() and auth not in with_secret.logs()


def test_latest_tag_is_pulled_again_when_the_plugin_changes(start_gateway: Start, upstream: str,
                                                           registry: Registry,  # noqa: F811
                                                           tmp_path: Path) -> None:
    """Unspecified policy on `:latest` means Always: a changed WasmPlugin re-pulls the tag,
    and the new module replaces the old only once it is fetched and configured."""
    from ..conftest import CONFORMANCE

    ref = f"{registry.host}/plugins/moving:latest"
    push(build_image(EXAMPLE.read_bytes(), "oci"), ref, insecure=True)
    gateway = start_with_cache(start_gateway, gateway_doc(upstream) + plugin_doc(f"oci://{ref}"),
                               tmp_path)
    first = plugin_status(gateway)["sha256"]
    assert first == hashlib.sha256(EXAMPLE.read_bytes()).hexdigest()
    push(build_image(CONFORMANCE.read_bytes(), "oci"), ref, insecure=True)  # the tag moves
    config = gateway_doc(upstream) + plugin_doc(f"oci://{ref}").replace(
        "pluginConfig: {greeting: oci}",
        'pluginConfig: {steps: ["request_headers add_header_map_value 0 s:x-v s:2"]}')
    gateway.config_path.write_text(config)  # type: ignore[attr-defined]
    wait_for(lambda: plugin_status(gateway)["sha256"] != first)
    assert plugin_status(gateway)["sha256"] == hashlib.sha256(CONFORMANCE.read_bytes()).hexdigest()
    echo = json.loads(gateway.get("/")[2])
    assert ["x-v", "2"] in echo["headers"]


def test_tls_upstream_cluster(start_gateway: Start, test_ca: dict[str, Path],  # noqa: F811
                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A cluster endpoint written https:// is reached over TLS, verified against the CA."""
    import ssl

    from .conftest import EchoHandler

    server = ThreadingHTTPServer(("127.0.0.1", 0), EchoHandler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(test_ca["cert"], test_ca["key"])
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("WASMGATE_CA_FILE", str(test_ca["ca"]))
    try:
        gateway = start_gateway(gateway_doc(f"https://127.0.0.1:{server.server_address[1]}"))
        status, _, body = gateway.get("/over-tls")
        assert status == 200
        assert json.loads(body)["path"] == "/over-tls"
    finally:
        server.shutdown()
        server.server_close()
