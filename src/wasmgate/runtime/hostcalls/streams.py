"""Stream control: continue/close, local responses, and the 0.1.0 forms.

Envoy applies these after the VM call returns (deferred), so a plugin that continues a stream
from inside a callback never re-enters itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..abi import Status, StreamType
from ..contexts import HttpContextState, LocalResponse
from ..crossings import StatusError
from ..serde import deserialize_pairs, fields_suspect
from . import hostcall
from ._util import OK, http_state, signed32

if TYPE_CHECKING:
    from ..vm import WasmVM


def _resume(vm: WasmVM, ctx: HttpContextState, direction: str) -> None:
    def apply() -> None:
        handle = ctx.handle
        if handle is not None and not ctx.deleted:
            handle.resume(direction)  # type: ignore[attr-defined]

    if direction == "request":
        ctx.continue_request = True
    else:
        ctx.continue_response = True
    vm.defer(apply)


@hostcall("proxy_continue_stream", "i")
def proxy_continue_stream(vm: WasmVM, stream_type: int) -> int:
    if stream_type > StreamType.UPSTREAM:
        return Status.BAD_ARGUMENT
    if stream_type in (StreamType.DOWNSTREAM, StreamType.UPSTREAM):
        return Status.UNIMPLEMENTED
    ctx = http_state(vm)
    _resume(vm, ctx, "request" if stream_type == StreamType.HTTP_REQUEST else "response")
    return OK


@hostcall("proxy_close_stream", "i")
def proxy_close_stream(vm: WasmVM, stream_type: int) -> int:
    if stream_type > StreamType.UPSTREAM:
        return Status.BAD_ARGUMENT
    ctx = http_state(vm)
    ctx.closed = True  # the embedder resets the stream, details `wasm_close_stream`
    return OK


@hostcall("proxy_continue_request", "")
def proxy_continue_request_v010(vm: WasmVM) -> int:
    _resume(vm, http_state(vm), "request")
    return OK


@hostcall("proxy_continue_request", "", "")
def proxy_continue_request_void(vm: WasmVM) -> None:
    _resume(vm, http_state(vm), "request")


@hostcall("proxy_continue_response", "")
def proxy_continue_response_v010(vm: WasmVM) -> int:
    _resume(vm, http_state(vm), "response")
    return OK


@hostcall("proxy_continue_response", "", "")
def proxy_continue_response_void(vm: WasmVM) -> None:
    _resume(vm, http_state(vm), "response")


@hostcall("proxy_clear_route_cache", "")
def proxy_clear_route_cache(vm: WasmVM) -> int:
    return OK  # routes are resolved per request after the chain; nothing is cached


@hostcall("proxy_clear_route_cache", "", "")
def proxy_clear_route_cache_void(vm: WasmVM) -> None:
    return None


@hostcall("proxy_send_local_response", "iiiiiiii")
def proxy_send_local_response(vm: WasmVM, status: int, details_ptr: int, details_len: int,
                              body_ptr: int, body_len: int, headers_ptr: int,
                              headers_len: int, grpc_status: int) -> int:
    details = vm.memory.read(details_ptr, details_len).decode("utf-8", "replace")
    body = vm.memory.read(body_ptr, body_len)
    headers = deserialize_pairs(vm.memory.read(headers_ptr, headers_len)) or []
    ctx = vm.context()
    if not isinstance(ctx, HttpContextState):
        raise StatusError(Status.NOT_FOUND, "send_local_response outside a stream")
    grpc = signed32(grpc_status)
    if fields_suspect(headers):
        ctx.suspect_headers = True
    ctx.local_response = LocalResponse(
        status=status, body=body, headers=[(k.lower(), v) for k, v in headers],
        details="_".join(details.split()) if details else "",
        grpc_status=grpc if 0 <= grpc <= 16 else None)
    handle = ctx.handle
    if handle is not None:  # a reply sent from a call-out callback must wake its stream
        vm.defer(handle.notify_local_reply)  # type: ignore[attr-defined]
    return OK
