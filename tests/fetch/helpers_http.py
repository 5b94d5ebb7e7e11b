"""A real HTTP(S) server on 127.0.0.1 for fetch tests: scripted responses per path, hit counts."""

from __future__ import annotations

import gzip
import io
import shutil
import ssl
import subprocess
import tarfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "plugins" / "example-as" / "example.wasm"
TINY_WASM = b"\0asm\x01\0\0\0"
"""The smallest valid module (empty); differs from EXAMPLE, handy for 'the tag moved'."""


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    delay: float = 0.0
    """Seconds to wait before answering (a slow server)."""
    content_length: bool = True
    """False: no Content-Length, the body runs until the connection closes."""
    headers: dict[str, str] = field(default_factory=dict)


class WasmServer:
    """`add(path, *replies)`: replies are served in order, the last one repeats."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.routes: dict[str, list[Reply]] = {}
        self.hits: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False  # type: ignore[attr-defined]
        if tls is not None:
            self._httpd.socket = tls.wrap_socket(self._httpd.socket, server_side=True)
        self.scheme = "https" if tls else "http"
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.02,),
                                        daemon=True)

    def url(self, path: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"

    def add(self, path: str, *replies: Reply | bytes) -> str:
        self.routes[path] = [r if isinstance(r, Reply) else Reply(body=r) for r in replies]
        return self.url(path)

    def next_reply(self, path: str) -> Reply:
        with self._lock:
            self.hits[path] += 1
            replies = self.routes.get(path)
            if not replies:
                return Reply(404, b"not found")
            return replies.pop(0) if len(replies) > 1 else replies[0]

    def __enter__(self) -> WasmServer:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def _handler(server: WasmServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            reply = server.next_reply(self.path)
            if reply.delay:
                time.sleep(reply.delay)
            try:
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                if reply.content_length:
                    self.send_header("Content-Length", str(len(reply.body)))
                else:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                self.wfile.write(reply.body)
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                pass  # the client gave up (timeout tests)

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


# -- payloads ----------------------------------------------------------------------------------


def example_wasm() -> bytes:
    return EXAMPLE.read_bytes()


def gzipped(data: bytes) -> bytes:
    return gzip.compress(data)


def tarred(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


# -- TLS ---------------------------------------------------------------------------------------


@dataclass
class LocalCA:
    ca_file: Path
    cert_file: Path
    key_file: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context


def make_test_ca(directory: Path) -> LocalCA | None:
    """A CA and a server certificate for 127.0.0.1, made with the openssl CLI (None without)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    d = directory
    ext = d / "server.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                   "extendedKeyUsage=serverAuth\nkeyUsage=digitalSignature\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    steps = [
        [openssl, "req", "-x509", *ec, "-keyout", d / "ca.key", "-out", d / "ca.pem", "-days",
         "2", "-subj", "/CN=wasmgate test CA", "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        [openssl, "req", *ec, "-keyout", d / "server.key", "-out", d / "server.csr", "-subj",
         "/CN=127.0.0.1"],
        [openssl, "x509", "-req", "-in", d / "server.csr", "-CA", d / "ca.pem", "-CAkey",
         d / "ca.key", "-CAcreateserial", "-out", d / "server.pem", "-days", "2", "-extfile",
         ext],
    ]
    for step in steps:
        subprocess.run([str(a) for a in step], check=True, capture_output=True)
    return LocalCA(d / "ca.pem", d / "server.pem", d / "server.key")
