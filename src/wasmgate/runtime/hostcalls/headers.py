"""Header maps of every type: get/set pairs, get/add/replace/remove one value, size.

Keys are lower-cased as Envoy's header maps do. Stream maps follow Envoy's availability
(readable/writable slots, see contexts.py); call-response and gRPC metadata maps live on the
root context while their callback runs.
"""

from __future__ import annotations

from operator import attrgetter
from typing import TYPE_CHECKING

from ..abi import MapType, Status
from ..contexts import HeaderSlot, HttpContextState, Phase
from ..crossings import StatusError
from ..serde import deserialize_pairs, serialize_pairs
from . import hostcall
from ._util import OK

if TYPE_CHECKING:
    from ..vm import WasmVM


_STREAM_MAPS = ("request_headers", "request_trailers", "response_headers", "response_trailers")
_ROOT_MAPS = {4: "grpc_initial", 5: "grpc_trailing", 6: "call_headers", 7: "call_trailers"}
_STREAM_SLOT = tuple(attrgetter(name) for name in _STREAM_MAPS)


def _slot(vm: WasmVM, map_type: int) -> HeaderSlot:
    if map_type < 4:  # a stream's map (the common case)
        ctx = vm.context()
        if not isinstance(ctx, HttpContextState):
            raise StatusError(Status.BAD_ARGUMENT, "no HTTP stream in this context")
        slot: HeaderSlot = _STREAM_SLOT[map_type](ctx)
        if slot.pairs is None:
            _allow_new_trailers(ctx, MapType(map_type), slot)
        return slot
    if map_type > 7:
        raise StatusError(Status.BAD_ARGUMENT, f"map type {map_type}")
    return getattr(vm.plugin.root, _ROOT_MAPS[map_type])  # type: ignore[no-any-return]


def _allow_new_trailers(ctx: HttpContextState, kind: MapType, slot: HeaderSlot) -> None:
    """Trailers may be added from the last body callback when the stream has none."""
    if slot.pairs is not None:
        return
    last_request_chunk = ctx.phase == Phase.REQUEST_BODY and ctx.request_body.end_of_stream
    last_response_chunk = ctx.phase == Phase.RESPONSE_BODY and ctx.response_body.end_of_stream
    if (kind == MapType.HTTP_REQUEST_TRAILERS and last_request_chunk) or (
            kind == MapType.HTTP_RESPONSE_TRAILERS and last_response_chunk):
        slot.open([])


def _readable(vm: WasmVM, map_type: int) -> list[tuple[bytes, bytes]] | None:
    slot = _slot(vm, map_type)
    return slot.pairs if slot.readable and slot.pairs is not None else None


def _writable(vm: WasmVM, map_type: int) -> list[tuple[bytes, bytes]]:
    slot = _slot(vm, map_type)
    if not slot.writable or slot.pairs is None:
        raise StatusError(Status.BAD_ARGUMENT, f"map {map_type} is not writable now")
    slot.written = True  # (one store: the embedder validates changed maps when it sends them)
    return slot.pairs


def _key(vm: WasmVM, ptr: int, size: int) -> bytes:
    return vm.memory.read(ptr, size).lower()


@hostcall("proxy_get_header_map_pairs", "iii")
def proxy_get_header_map_pairs(vm: WasmVM, map_type: int, ret_ptr: int, ret_len: int) -> int:
    """An unavailable map (or no stream at all) is empty, not an error (CH/Envoy)."""
    if map_type > MapType.HTTP_CALL_RESPONSE_TRAILERS:
        return Status.BAD_ARGUMENT
    try:
        pairs = _readable(vm, map_type)
    except StatusError:
        pairs = None
    return vm.return_bytes(serialize_pairs(pairs or []), ret_ptr, ret_len)


@hostcall("proxy_set_header_map_pairs", "iii")
def proxy_set_header_map_pairs(vm: WasmVM, map_type: int, ptr: int, size: int) -> int:
    pairs = _writable(vm, map_type)
    new = deserialize_pairs(vm.memory.read(ptr, size)) or []
    pairs[:] = [(k.lower(), v) for k, v in new]
    return OK


@hostcall("proxy_get_header_map_value", "iiiii")
def proxy_get_header_map_value(vm: WasmVM, map_type: int, key_ptr: int, key_len: int,
                               ret_ptr: int, ret_len: int) -> int:
    key = _key(vm, key_ptr, key_len)
    pairs = _readable(vm, map_type)
    if pairs is None:
        ctx = vm.contexts.get(vm.current_context_id)
        in_log = isinstance(ctx, HttpContextState) and ctx.phase in (Phase.LOG, Phase.DONE)
        return Status.NOT_FOUND if in_log else Status.BAD_ARGUMENT
    for k, v in pairs:
        if k == key:
            return vm.return_bytes(v, ret_ptr, ret_len)
    if vm.module.abi == "0_1_0":
        return vm.return_bytes(b"", ret_ptr, ret_len)
    return Status.NOT_FOUND


@hostcall("proxy_add_header_map_value", "iiiii")
def proxy_add_header_map_value(vm: WasmVM, map_type: int, key_ptr: int, key_len: int,
                               value_ptr: int, value_len: int) -> int:
    key, value = _key(vm, key_ptr, key_len), vm.memory.read(value_ptr, value_len)
    _writable(vm, map_type).append((key, value))
    return OK


@hostcall("proxy_replace_header_map_value", "iiiii")
def proxy_replace_header_map_value(vm: WasmVM, map_type: int, key_ptr: int, key_len: int,
                                   value_ptr: int, value_len: int) -> int:
    key, value = _key(vm, key_ptr, key_len), vm.memory.read(value_ptr, value_len)
    pairs = _writable(vm, map_type)
    index = next((i for i, (k, _) in enumerate(pairs) if k == key), None)
    pairs[:] = [(k, v) for k, v in pairs if k != key]
    pairs.insert(len(pairs) if index is None else index, (key, value))
    return OK


@hostcall("proxy_remove_header_map_value", "iii")
def proxy_remove_header_map_value(vm: WasmVM, map_type: int, key_ptr: int, key_len: int) -> int:
    key = _key(vm, key_ptr, key_len)
    pairs = _writable(vm, map_type)
    pairs[:] = [(k, v) for k, v in pairs if k != key]
    return OK


@hostcall("proxy_get_header_map_size", "ii")
def proxy_get_header_map_size(vm: WasmVM, map_type: int, ret_size: int) -> int:
    pairs = _readable(vm, map_type) or []
    vm.memory.write_u32(ret_size, sum(len(k) + len(v) for k, v in pairs))
    return OK
