"""Outbound calls belong to the VM that made them: a FAIL_RELOAD restart, or a plugin that
fails to start, never lets one of its calls reach another VM or stay open (Envoy cancels a
destroyed context's calls). Real `wasmgate run`, a real HTTP upstream and a real gRPC server.

A restarted plugin's fresh VM issues tokens from 1 again, so an http_call answer meant for the
crashed VM would otherwise arrive in the new one under a token the new VM has just issued.
"""

from __future__ import annotations

import contextlib
import http.client
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest

from .conftest import Gateway
from .test_gateway import conformance, gateway_doc
from .test_redis import wait_for_log

Start = Callable[..., Gateway]
SERVICE = "test.Lifecycle"


class HeldUpstream:
    """An HTTP upstream whose answers the test releases: the 1st /fast answers at once, the 1st
    /slow when `release_old` is set, every later call when `release_new` is set. Each body
    names the path and the call's number (`slow-1`, `fast-2`, ...)."""

    def __init__(self) -> None:
        self.release_old = threading.Event()
        self.release_new = threading.Event()
        self.answered_old = threading.Event()
        self.counts: dict[str, int] = {}
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                name = self.path.strip("/")
                with owner.lock:
                    owner.counts[name] = number = owner.counts.get(name, 0) + 1
                if number > 1:
                    owner.release_new.wait(20)
                elif name == "slow":
                    owner.release_old.wait(20)
                body = f"{name}-{number}".encode()
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                self.wfile.flush()
                if name == "slow" and number == 1:
                    owner.answered_old.set()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release_old.set()
        self.release_new.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def held_upstream() -> Iterator[HeldUpstream]:
    upstream = HeldUpstream()
    yield upstream
    upstream.close()


class HoldServer:
    """A gRPC server whose `Hold` stream only the client ends; counts the streams open now."""

    def __init__(self) -> None:
        self.opened = 0
        self.open = 0
        self.lock = threading.Lock()
        self.ended = threading.Event()

        def hold(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
            with self.lock:
                self.opened += 1
                self.open += 1
            context.add_callback(self._end)
            yield from requests

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            SERVICE, {"Hold": grpc.stream_stream_rpc_method_handler(hold)}),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def _end(self) -> None:
        with self.lock:
            self.open -= 1
        self.ended.set()

    def wait_open(self, count: int, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while self.opened < count:
            assert time.monotonic() < deadline, f"{self.opened} stream(s) reached the server"
            time.sleep(0.02)


@pytest.fixture
def hold_server() -> Iterator[HoldServer]:
    server = HoldServer()
    yield server
    server.server.stop(0)


def with_grpc_cluster(upstream: str, port: int) -> str:
    return gateway_doc(upstream).replace(
        "  routes:", f'  - name: grpcsvc\n    endpoints: ["127.0.0.1:{port}"]\n  routes:', 1)


def plugin_status(gateway: Gateway) -> dict:  # type: ignore[type-arg]
    [plugin] = gateway.admin_json("/plugins")["plugins"]
    return plugin  # type: ignore[no-any-return]


def wait_until(check: Callable[[], bool], what: str, gateway: Gateway,
               timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}:\n{gateway.logs()[-4000:]}"
        time.sleep(0.05)


def call(address: str, path: str) -> str:
    return (f"request_headers http_call s:{address} "
            f"m::path={path}&:method=GET&:authority=held s: null 20000")


def test_restarted_vm_never_gets_the_crashed_vms_http_call_answer(
        start_gateway: Start, upstream: str, held_upstream: HeldUpstream) -> None:
    # every request calls /fast (token 4) and /slow (token 8); any answer traps the VM
    steps = [call(held_upstream.address, "/fast"), call(held_upstream.address, "/slow"),
             "http_call_response get_buffer_bytes 4 0 100", "http_call_response trap"]
    gateway = start_gateway(gateway_doc(upstream) + conformance("caller", steps,
                                                                fail="FAIL_RELOAD"))
    # VM 1 calls; its /fast answer crashes it (the request itself may be cut by that crash),
    # /slow stays in flight
    with contextlib.suppress(http.client.HTTPException, OSError):
        gateway.get("/first")
    wait_for_log(gateway, r"get_buffer_bytes status=0 out=fast-1")
    wait_until(lambda: plugin_status(gateway)["crashes"] >= 1, "VM 1 never crashed", gateway)

    # FAIL_RELOAD: the next request gets a fresh VM, which calls again (503 until then: the
    # cut request may count as a second crash, which backs the reload off for a second)
    wait_until(lambda: gateway.get("/second")[0] == 200, "no fresh VM", gateway)
    assert plugin_status(gateway)["reloads"] == 1
    wait_until(lambda: held_upstream.counts.get("slow", 0) == 2,
               "the fresh VM never called", gateway)
    logs = gateway.logs()
    tokens = [int(t) for t in re.findall(r"conf request_headers http_call status=0 out=(\d+)",
                                         logs)]
    assert tokens == [4, 8, 4, 8]  # the fresh VM reuses the crashed VM's tokens

    held_upstream.release_old.set()  # the crashed VM's /slow answer (its token 8) comes back
    assert held_upstream.answered_old.wait(10)
    wait_for_log(gateway, r"out=slow-1|a result for its previous VM dropped")
    time.sleep(0.2)
    assert "out=slow-1" not in gateway.logs(), "the fresh VM got the crashed VM's answer"
    assert len(re.findall(r"enter http_call_response", gateway.logs())) == 1  # VM 1's /fast

    held_upstream.release_new.set()  # the fresh VM gets its own answers
    wait_for_log(gateway, r"get_buffer_bytes status=0 out=(fast|slow)-2")
    assert "out=slow-1" not in gateway.logs()


def test_restart_cancels_the_crashed_vms_grpc_stream_at_the_server(
        start_gateway: Start, upstream: str, hold_server: HoldServer) -> None:
    steps = [f"request_headers grpc_stream s:grpcsvc s:{SERVICE} s:Hold m:",
             "request_headers trap"]
    gateway = start_gateway(with_grpc_cluster(upstream, hold_server.port)
                            + conformance("streamer", steps, fail="FAIL_RELOAD"))
    assert gateway.get("/")[0] == 503  # VM 1 opens a stream, then crashes
    hold_server.wait_open(1)
    time.sleep(0.3)
    assert hold_server.open == 1 and not hold_server.ended.is_set()

    gateway.get("/")  # FAIL_RELOAD builds a fresh VM: VM 1's stream is cancelled first
    assert plugin_status(gateway)["reloads"] == 1
    assert hold_server.ended.wait(10), "the crashed VM's stream stayed open at the server"
    assert "enter grpc_close" not in gateway.logs()  # nothing of VM 1's reached VM 2


def test_a_plugin_that_fails_to_start_leaves_no_stream_open(
        start_gateway: Start, upstream: str, hold_server: HoldServer) -> None:
    steps = [f"configure grpc_stream s:grpcsvc s:{SERVICE} s:Hold m:", "configure return 0"]
    gateway = start_gateway(with_grpc_cluster(upstream, hold_server.port)
                            + conformance("rejects", steps, fail="FAIL_OPEN"))
    assert plugin_status(gateway)["status"] == "failed"
    assert "configuration rejected" in plugin_status(gateway)["error"]
    assert gateway.get("/")[0] == 200  # FAIL_OPEN stands in
    deadline = time.monotonic() + 3  # the gateway cancels the stream (it logs so)...
    while "gRPC call(s) cancelled" not in gateway.logs() and time.monotonic() < deadline:
        time.sleep(0.05)
    deadline = time.monotonic() + 10  # ...and the server sees it end (if it got there at all)
    while hold_server.open and time.monotonic() < deadline:
        time.sleep(0.05)
    assert hold_server.open == 0, "the plugin that failed to start kept its stream open"
    assert "stopped: 1 gRPC call(s) cancelled" in gateway.logs()
