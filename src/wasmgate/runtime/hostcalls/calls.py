"""Outbound calls: http_call, gRPC call/stream, and Higress redis_init/redis_call.

Each becomes a request object handed to the embedder (`Host`); the reply comes back later
through `Plugin.deliver_*`. An upstream the embedder does not know is BAD_ARGUMENT with a log
line naming it; any other embedder failure is INTERNAL_FAILURE.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..abi import (
    TOKEN_KIND_GRPC_CALL,
    TOKEN_KIND_GRPC_STREAM,
    TOKEN_KIND_HTTP,
    TOKEN_KIND_REDIS,
    LogLevel,
    Status,
)
from ..host import (
    GrpcCallRequest,
    HttpCallRequest,
    RedisCallRequest,
    RedisInitRequest,
    UnknownUpstream,
)
from ..serde import deserialize_pairs
from . import hostcall
from ._util import OK, read_str

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..vm import WasmVM

log = logging.getLogger("wasmgate.runtime.calls")


def _pairs(vm: WasmVM, ptr: int, size: int) -> list[tuple[bytes, bytes]]:
    return deserialize_pairs(vm.memory.read(ptr, size)) or []


def _send(vm: WasmVM, what: str, target: str, send: Callable[[], None]) -> int:
    try:
        send()
    except UnknownUpstream:
        vm.plugin.emit_log(LogLevel.WARN, f"{what}: unknown upstream {target!r}")
        return Status.BAD_ARGUMENT
    except Exception as exc:
        log.warning("%s to %r failed: %s", what, target, exc)
        return Status.INTERNAL_FAILURE
    return OK


@hostcall("proxy_http_call", "iiiiiiiiii")
def proxy_http_call(vm: WasmVM, up_ptr: int, up_len: int, hdr_ptr: int, hdr_len: int,
                    body_ptr: int, body_len: int, trl_ptr: int, trl_len: int, timeout_ms: int,
                    ret_token: int) -> int:
    upstream = read_str(vm, up_ptr, up_len)
    headers = _pairs(vm, hdr_ptr, hdr_len)
    body = vm.memory.read(body_ptr, body_len)
    trailers = _pairs(vm, trl_ptr, trl_len)
    vm.memory.check(ret_token, 4)
    headers = [(k.lower(), v) for k, v in headers]
    names = {k for k, _ in headers}
    if timeout_ms >= 1 << 31 or not {b":path", b":method", b":authority"} <= names:
        return Status.BAD_ARGUMENT  # negative timeout or missing pseudo-headers (Envoy)
    if body and b"content-length" not in names:
        headers.append((b"content-length", str(len(body)).encode()))
    token = vm.new_token(TOKEN_KIND_HTTP)
    request = HttpCallRequest(token, upstream, headers, body, trailers, timeout_ms,
                              vm.context().id)
    status = _send(vm, "http_call", upstream, lambda: vm.plugin.host.http_call(vm.plugin, request))
    if status == OK:
        vm.memory.write_u32(ret_token, token)
    return status


def _grpc(vm: WasmVM, svc: tuple[int, int], service: tuple[int, int], method: tuple[int, int],
          metadata: tuple[int, int], message: bytes | None, timeout_ms: int, ret_token: int,
          streaming: bool) -> int:
    raw_service = vm.memory.read(*svc)
    request = GrpcCallRequest(
        token=vm.new_token(TOKEN_KIND_GRPC_STREAM if streaming else TOKEN_KIND_GRPC_CALL),
        service=raw_service, service_name=read_str(vm, *service), method=read_str(vm, *method),
        initial_metadata=_pairs(vm, *metadata), message=message, timeout_ms=timeout_ms,
        context_id=vm.context().id, streaming=streaming)
    vm.memory.check(ret_token, 4)
    target = raw_service.decode("utf-8", "replace")
    status = _send(vm, "grpc_call", target, lambda: vm.plugin.host.grpc_call(vm.plugin, request))
    if status == Status.BAD_ARGUMENT:
        return Status.PARSE_FAILURE  # Envoy: unknown service -> PARSE_FAILURE
    if status == OK:
        vm.grpc_tokens.add(request.token)
        vm.memory.write_u32(ret_token, request.token)
    return status


@hostcall("proxy_grpc_call", "iiiiiiiiiiii")
def proxy_grpc_call(vm: WasmVM, svc_ptr: int, svc_len: int, service_ptr: int, service_len: int,
                    method_ptr: int, method_len: int, md_ptr: int, md_len: int, msg_ptr: int,
                    msg_len: int, timeout_ms: int, ret_token: int) -> int:
    message = vm.memory.read(msg_ptr, msg_len)
    return _grpc(vm, (svc_ptr, svc_len), (service_ptr, service_len), (method_ptr, method_len),
                 (md_ptr, md_len), message, timeout_ms, ret_token, streaming=False)


@hostcall("proxy_grpc_stream", "iiiiiiiii")
def proxy_grpc_stream(vm: WasmVM, svc_ptr: int, svc_len: int, service_ptr: int,
                      service_len: int, method_ptr: int, method_len: int, md_ptr: int,
                      md_len: int, ret_token: int) -> int:
    return _grpc(vm, (svc_ptr, svc_len), (service_ptr, service_len), (method_ptr, method_len),
                 (md_ptr, md_len), None, 0, ret_token, streaming=True)


def _grpc_token_ok(vm: WasmVM, token: int, need_stream: bool = False) -> int | None:
    if token not in vm.grpc_tokens:
        return Status.NOT_FOUND
    if need_stream and token & 3 != TOKEN_KIND_GRPC_STREAM:
        return Status.BAD_ARGUMENT
    return None


@hostcall("proxy_grpc_send", "iiii")
def proxy_grpc_send(vm: WasmVM, token: int, msg_ptr: int, msg_len: int, end_stream: int) -> int:
    bad = _grpc_token_ok(vm, token, need_stream=True)
    if bad is not None:
        return bad
    message = vm.memory.read(msg_ptr, msg_len)
    vm.plugin.host.grpc_send(vm.plugin, token, message, bool(end_stream))
    return OK


@hostcall("proxy_grpc_cancel", "i")
def proxy_grpc_cancel(vm: WasmVM, token: int) -> int:
    bad = _grpc_token_ok(vm, token)
    if bad is not None:
        return bad
    vm.grpc_tokens.discard(token)
    vm.plugin.host.grpc_cancel(vm.plugin, token)
    return OK


@hostcall("proxy_grpc_close", "i")
def proxy_grpc_close(vm: WasmVM, token: int) -> int:
    bad = _grpc_token_ok(vm, token)
    if bad is not None:
        return bad
    vm.plugin.host.grpc_close(vm.plugin, token)
    return OK


@hostcall("proxy_redis_init", "iiiiiii")
def proxy_redis_init(vm: WasmVM, cluster_ptr: int, cluster_len: int, user_ptr: int,
                     user_len: int, pass_ptr: int, pass_len: int, timeout_ms: int) -> int:
    request = RedisInitRequest(read_str(vm, cluster_ptr, cluster_len),
                               read_str(vm, user_ptr, user_len), read_str(vm, pass_ptr, pass_len),
                               timeout_ms)
    return _send(vm, "redis_init", request.cluster,
                 lambda: vm.plugin.host.redis_init(vm.plugin, request))


@hostcall("proxy_redis_call", "iiiii")
def proxy_redis_call(vm: WasmVM, cluster_ptr: int, cluster_len: int, query_ptr: int,
                     query_len: int, ret_token: int) -> int:
    cluster = read_str(vm, cluster_ptr, cluster_len)
    query = vm.memory.read(query_ptr, query_len)
    vm.memory.check(ret_token, 4)
    request = RedisCallRequest(vm.new_token(TOKEN_KIND_REDIS), cluster, query, vm.context().id)
    status = _send(vm, "redis_call", cluster,
                   lambda: vm.plugin.host.redis_call(vm.plugin, request))
    if status == OK:
        vm.memory.write_u32(ret_token, request.token)
    return status
