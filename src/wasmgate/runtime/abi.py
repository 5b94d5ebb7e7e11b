"""Proxy-Wasm ABI constants (spec v0.1.0-v0.2.1 plus the Higress 0_2_100 additions).

Values are the wire values of the spec and proxy-wasm-cpp-host; see
`shared/spec/proxy-wasm-abi.md` section 11.
"""

from __future__ import annotations

from enum import IntEnum

ABI_EXPORTS = {
    "proxy_abi_version_0_1_0": "0_1_0",
    "proxy_abi_version_0_2_0": "0_2_0",
    "proxy_abi_version_0_2_1": "0_2_1",
    "proxy_abi_version_0_2_100": "0_2_100",
}


class Status(IntEnum):
    OK = 0
    NOT_FOUND = 1
    BAD_ARGUMENT = 2
    SERIALIZATION_FAILURE = 3
    PARSE_FAILURE = 4
    BAD_EXPRESSION = 5
    INVALID_MEMORY_ACCESS = 6
    EMPTY = 7
    CAS_MISMATCH = 8
    RESULT_MISMATCH = 9
    INTERNAL_FAILURE = 10
    BROKEN_CONNECTION = 11
    UNIMPLEMENTED = 12


class LogLevel(IntEnum):
    TRACE = 0
    DEBUG = 1
    INFO = 2
    WARN = 3
    ERROR = 4
    CRITICAL = 5

    @classmethod
    def parse(cls, value: str | int | LogLevel) -> LogLevel:
        """Accept 2, "info", "INFO", "warning"; raise ValueError naming the bad value."""
        if isinstance(value, int):
            return cls(value)
        name = value.strip().upper()
        name = {"WARNING": "WARN", "ERR": "ERROR", "CRIT": "CRITICAL"}.get(name, name)
        try:
            return cls[name]
        except KeyError:
            raise ValueError(f"unknown log level {value!r}") from None


class Action(IntEnum):
    """What a stream callback returned (raw value; Envoy's filter statuses past PAUSE)."""

    CONTINUE = 0
    PAUSE = 1
    CONTINUE_AND_END_STREAM = 2
    STOP_ALL_ITERATION_AND_BUFFER = 3
    STOP_ALL_ITERATION_AND_WATERMARK = 4


class BufferType(IntEnum):
    HTTP_REQUEST_BODY = 0
    HTTP_RESPONSE_BODY = 1
    DOWNSTREAM_DATA = 2
    UPSTREAM_DATA = 3
    HTTP_CALL_RESPONSE_BODY = 4
    GRPC_RECEIVE_BUFFER = 5
    VM_CONFIGURATION = 6
    PLUGIN_CONFIGURATION = 7
    CALL_DATA = 8
    REDIS_CALL_RESPONSE = 9


class MapType(IntEnum):
    HTTP_REQUEST_HEADERS = 0
    HTTP_REQUEST_TRAILERS = 1
    HTTP_RESPONSE_HEADERS = 2
    HTTP_RESPONSE_TRAILERS = 3
    GRPC_RECEIVE_INITIAL_METADATA = 4
    GRPC_RECEIVE_TRAILING_METADATA = 5
    HTTP_CALL_RESPONSE_HEADERS = 6
    HTTP_CALL_RESPONSE_TRAILERS = 7


class StreamType(IntEnum):
    HTTP_REQUEST = 0
    HTTP_RESPONSE = 1
    DOWNSTREAM = 2
    UPSTREAM = 3


class MetricType(IntEnum):
    COUNTER = 0
    GAUGE = 1
    HISTOGRAM = 2


class PeerType(IntEnum):
    UNKNOWN = 0
    LOCAL = 1
    REMOTE = 2


class FailState(IntEnum):
    """proxy-wasm-cpp-host's FailState: why a plugin stopped working."""

    OK = 0
    UNABLE_TO_CREATE_VM = 1
    UNABLE_TO_CLONE_VM = 2
    MISSING_FUNCTION = 3
    UNABLE_TO_INITIALIZE_CODE = 4
    START_FAILED = 5
    CONFIGURE_FAILED = 6
    RUNTIME_ERROR = 7


# Callout tokens: low two bits encode the kind (proxy-wasm-cpp-host wasm.h, Higress for redis).
TOKEN_KIND_HTTP = 0
TOKEN_KIND_GRPC_CALL = 1
TOKEN_KIND_GRPC_STREAM = 2
TOKEN_KIND_REDIS = 3

MAX_PAIRS = 1024
MAX_PAIRS_BYTES = 1 << 20
MAX_RANDOM_BYTES = 64 * 1024
MAX_BACKTRACE_FRAMES = 20
