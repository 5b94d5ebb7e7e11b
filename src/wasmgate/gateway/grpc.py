"""Outbound gRPC for plugins (`proxy_grpc_call` / `proxy_grpc_stream`) on `grpc.aio`.

Calls are generic: the plugin's message bytes go on the wire as they are (no serializer) and the
server's messages come back as raw bytes, so no protobuf descriptors are needed.

Callback order follows Envoy's Wasm filter:

* unary call (`grpc_call`): success -> one `proxy_on_grpc_receive` with the response message
  and nothing else (the token is then spent, as in Envoy; the Rust SDK panics on a
  `proxy_on_grpc_close` for a call whose response it has already taken); failure ->
  `proxy_on_grpc_close(status, message)`.
* stream (`grpc_stream`): `proxy_on_grpc_receive_initial_metadata` (when the server sent
  headers), one `proxy_on_grpc_receive` per message, `..._trailing_metadata` (when there are
  trailers), then `proxy_on_grpc_close(status, message)` (status 0 on success).

A deadline that passes closes with DEADLINE_EXCEEDED (4), an unreachable server with
UNAVAILABLE (14), an unknown method with whatever the server answers (UNIMPLEMENTED, 12).
`grpc_cancel` (and `grpc_close` on a unary call, as Envoy does) cancels the RPC and nothing more
is delivered; `grpc_close` on a stream half-closes it (no more sends, replies still arrive).

The `service` argument names the cluster: a bare cluster name (anything `GatewayHost.resolve`
knows: a cluster of the Gateway spec, `outbound|...`, `host:port`), or a serialized
`envoy.config.core.v3.GrpcService` whose `envoy_grpc.cluster_name` is used. Bytes that are not
UTF-8, or a GrpcService without `envoy_grpc` (e.g. `google_grpc`), are an unknown upstream.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import grpc.aio

from ..runtime.host import GrpcCallRequest, Pairs
from ..runtime.plugin import Plugin
from ..runtime.vm import WasmVM

log = logging.getLogger("wasmgate.gateway.grpc")

Deliver = Callable[[Plugin, WasmVM | None, Callable[[], None]], None]
"""(plugin, issuing VM, callback): runs the callback unless that VM is no longer the plugin's."""

UNKNOWN = 2
UNAVAILABLE = 14
_RESERVED = {b"content-type", b"te", b"grpc-timeout", b"grpc-encoding", b"grpc-accept-encoding",
             b"host", b"connection", b"transfer-encoding", b"keep-alive", b"upgrade"}
_END = object()


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _fields(data: bytes) -> dict[int, bytes]:
    """Length-delimited fields of a protobuf message (others skipped); ValueError if malformed."""
    out: dict[int, bytes] = {}
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ValueError("field 0")
        if wire == 0:
            _, pos = _varint(data, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            size, pos = _varint(data, pos)
            if pos + size > len(data):
                raise ValueError("truncated field")
            out[number] = data[pos:pos + size]
            pos += size
        else:
            raise ValueError(f"wire type {wire}")
        if pos > len(data):
            raise ValueError("truncated field")
    return out


def cluster_of(service: bytes) -> str | None:
    """The cluster a plugin's `service` argument names; None when it names none we can use."""
    if service[:1] == b"\x0a":  # field 1 (envoy_grpc), length-delimited: a GrpcService proto
        try:
            envoy_grpc = _fields(service).get(1)
            name = _fields(envoy_grpc).get(1) if envoy_grpc is not None else None
            return name.decode() if name else None
        except (ValueError, UnicodeDecodeError):
            return None
    try:
        name = service.decode()
    except UnicodeDecodeError:
        return None
    if not name or not name.isprintable() or any(c.isspace() for c in name):
        return None
    return name


def outgoing_metadata(pairs: Pairs) -> list[tuple[str, str | bytes]]:
    """The plugin's initial metadata as grpcio wants it: no pseudo-headers or reserved names,
    lowercase keys, bytes values only for `-bin` keys."""
    out: list[tuple[str, str | bytes]] = []
    for key, value in pairs:
        key = bytes(key).lower()
        if key.startswith(b":") or key in _RESERVED or not key:
            continue
        name = key.decode("latin-1")
        out.append((name, bytes(value) if name.endswith("-bin")
                    else bytes(value).decode("latin-1")))
    return out


def _pairs(metadata: object) -> list[tuple[bytes, bytes]]:
    out: list[tuple[bytes, bytes]] = []
    for key, value in metadata or ():  # type: ignore[attr-defined]
        out.append((key.encode("latin-1"),
                    value if isinstance(value, bytes) else str(value).encode("latin-1")))
    return out


@dataclass
class _Call:
    plugin: Plugin
    vm: WasmVM | None  # the VM that made it (a restarted plugin's fresh VM reuses tokens)
    token: int
    streaming: bool
    task: asyncio.Task[None] | None = None
    rpc: grpc.aio.Call | None = None
    outbox: asyncio.Queue[object] = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    half_closed: bool = False


class GrpcCalls:
    """Every outbound gRPC call of one gateway process; all methods run on the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, deliver: Deliver) -> None:
        self.loop = loop
        self.deliver = deliver
        self.channels: dict[tuple[str, int, bool], grpc.aio.Channel] = {}
        self.calls: dict[tuple[int, int], _Call] = {}
        """Open calls by (id of the issuing VM, token); the _Call keeps that VM alive."""

    def _channel(self, host: str, port: int, tls: bool) -> grpc.aio.Channel:
        key = (host, port, tls)
        channel = self.channels.get(key)
        if channel is None:
            target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            channel = (grpc.aio.secure_channel(target, grpc.ssl_channel_credentials()) if tls
                       else grpc.aio.insecure_channel(target))
            self.channels[key] = channel
        return channel

    def start(self, plugin: Plugin, vm: WasmVM | None, request: GrpcCallRequest, host: str,
              port: int, tls: bool, timeout: float | None) -> None:
        call = _Call(plugin, vm, request.token, request.streaming)
        self.cancel(vm, request.token)  # never leave an older call under the same key running
        self.calls[(id(vm), request.token)] = call
        path = f"/{request.service_name}/{request.method}"
        metadata = outgoing_metadata(request.initial_metadata)
        try:
            channel = self._channel(host, port, tls)
            if request.streaming:
                multi = channel.stream_stream(path, request_serializer=None,
                                              response_deserializer=None)
                call.rpc = multi(metadata=metadata, timeout=timeout)
                call.task = self.loop.create_task(self._stream(call))
            else:
                unary = channel.unary_unary(path, request_serializer=None,
                                            response_deserializer=None)
                call.rpc = unary(request.message or b"", metadata=metadata, timeout=timeout)
                call.task = self.loop.create_task(self._unary(call))
        except Exception as exc:  # bad target or metadata: close the call
            log.debug("grpc call to %s:%d%s failed to start: %s", host, port, path, exc)
            self.loop.call_soon(self._close, call, UNAVAILABLE, str(exc).encode())
            return

    # -- from the plugin --------------------------------------------------------------------
    def send(self, vm: WasmVM | None, token: int, message: bytes, end_stream: bool) -> None:
        call = self.calls.get((id(vm), token))
        if call is None or call.half_closed or not call.streaming:
            return
        call.outbox.put_nowait(bytes(message))
        if end_stream:
            call.half_closed = True
            call.outbox.put_nowait(_END)

    def cancel(self, vm: WasmVM | None, token: int) -> None:
        call = self.calls.pop((id(vm), token), None)
        if call is None:
            return
        call.cancelled = True
        if call.rpc is not None:
            call.rpc.cancel()
        if call.task is not None:
            call.task.cancel()

    def cancel_all(self, plugin: Plugin) -> int:
        """Cancel every call the plugin still has open (it is being stopped): the servers see
        the streams end, and nothing more is delivered. Returns how many were cancelled."""
        calls = [call for call in self.calls.values() if call.plugin is plugin]
        for call in calls:
            self.cancel(call.vm, call.token)
        return len(calls)

    def close(self, vm: WasmVM | None, token: int) -> None:
        call = self.calls.get((id(vm), token))
        if call is None:
            return
        if not call.streaming:  # Envoy: closing a unary call cancels it
            self.cancel(vm, token)
        elif not call.half_closed:
            call.half_closed = True
            call.outbox.put_nowait(_END)

    # -- into the plugin --------------------------------------------------------------------
    def _emit(self, call: _Call, action: Callable[[], None]) -> None:
        if not call.cancelled:
            self.deliver(call.plugin, call.vm, action)

    def _close(self, call: _Call, status: int, message: bytes) -> None:
        if call.cancelled or self.calls.get((id(call.vm), call.token)) is not call:
            return
        del self.calls[(id(call.vm), call.token)]
        self.deliver(call.plugin, call.vm, lambda: call.plugin.deliver_grpc_close(
            call.token, status, message))

    async def _unary(self, call: _Call) -> None:
        assert call.rpc is not None
        try:
            response = await call.rpc  # type: ignore[misc]
        except grpc.aio.AioRpcError as exc:
            self._close(call, exc.code().value[0], (exc.details() or "").encode())
            return
        except asyncio.CancelledError:
            return
        if call.cancelled or self.calls.pop((id(call.vm), call.token), None) is not call:
            return
        self.deliver(call.plugin, call.vm, lambda: call.plugin.deliver_grpc_message(
            call.token, bytes(response or b"")))
        if call.vm is not None:
            call.vm.grpc_tokens.discard(call.token)  # a call's response spends its token (Envoy)

    async def _writer(self, call: _Call) -> None:
        rpc = call.rpc
        assert isinstance(rpc, grpc.aio.StreamStreamCall)
        try:
            while True:
                item = await call.outbox.get()
                if item is _END:
                    await rpc.done_writing()
                    return
                await rpc.write(item)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
            log.debug("grpc stream %d: write after the call ended: %s", call.token, exc)

    async def _stream(self, call: _Call) -> None:
        rpc = call.rpc
        assert isinstance(rpc, grpc.aio.StreamStreamCall)
        writer = self.loop.create_task(self._writer(call))
        try:
            initial = await rpc.initial_metadata()
            if initial:
                pairs = _pairs(initial)
                self._emit(call, lambda: call.plugin.deliver_grpc_initial_metadata(
                    call.token, pairs))
            while not call.cancelled:
                message = await rpc.read()
                if message is grpc.aio.EOF:
                    break
                self._emit(call, lambda m=message: call.plugin.deliver_grpc_message(  # type: ignore[misc]
                    call.token, bytes(m)))
            code, details = await rpc.code(), await rpc.details()
            trailing = await rpc.trailing_metadata()
        except grpc.aio.AioRpcError as exc:
            code, details, trailing = exc.code(), exc.details(), exc.trailing_metadata()
        except asyncio.CancelledError:
            writer.cancel()
            return
        writer.cancel()
        if trailing:
            pairs = _pairs(trailing)
            self._emit(call, lambda: call.plugin.deliver_grpc_trailing_metadata(
                call.token, pairs))
        self._close(call, code.value[0], (details or "").encode())

    async def aclose(self) -> None:
        for call in list(self.calls.values()):
            self.cancel(call.vm, call.token)
        for channel in self.channels.values():
            await channel.close()
        self.channels.clear()
