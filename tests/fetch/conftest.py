"""Real OCI registries for the fetch tests.

Each registry is Debian's ``docker-registry`` (CNCF distribution 2.8) started on a free
127.0.0.1 port with its storage in a temporary directory, in one of three set-ups: anonymous plain
HTTP, htpasswd basic auth (bcrypt, made with ``htpasswd -Bbn``) and TLS with a test CA (made here
with the openssl CLI). Every process is stopped by its fixture's finalizer, also when a test
fails. Without ``docker-registry`` (``scripts/install-test-deps`` installs it) the registry tests
skip and say why.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from ..conftest import missing

REGISTRY_BIN = shutil.which("docker-registry")
SKOPEO = shutil.which("skopeo")
USER, PASSWORD = "wasmuser", "s3cret-Pa55word"


def make_wasm(label: str = "") -> bytes:
    """A valid, unique Wasm module: the header plus a custom section naming ``label``."""
    payload = f"{label}-{uuid.uuid4().hex}".encode()
    name = b"wasmgate-test"
    body = bytes([len(name)]) + name + payload
    return b"\0asm\x01\x00\x00\x00" + b"\x00" + _leb128(len(body)) + body


def _leb128(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Registry:
    """One running ``docker-registry``; ``host`` is ``127.0.0.1:PORT``."""

    workdir: Path
    port: int
    tls: tuple[Path, Path] | None = None
    htpasswd: Path | None = None
    ca_file: Path | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def storage(self) -> Path:
        return self.workdir / "storage"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"

    def ref(self, repo: str, tag: str = "v1") -> str:
        return f"oci://{self.host}/{repo}:{tag}"

    def blob_path(self, digest: str) -> Path:
        hexpart = digest.split(":", 1)[1]
        return self.storage / "docker/registry/v2/blobs/sha256" / hexpart[:2] / hexpart / "data"

    def start(self) -> None:
        config = self.workdir / "config.yml"
        lines = [
            "version: 0.1",
            "log: {level: error, accesslog: {disabled: true}}",
            f"storage: {{filesystem: {{rootdirectory: {self.storage}}}}}",
            "http:",
            f"  addr: {self.host}",
            "  secret: wasmgate-test-secret",
        ]
        if self.tls:
            lines.append(f"  tls: {{certificate: {self.tls[0]}, key: {self.tls[1]}}}")
        if self.htpasswd:
            lines.append(f"auth: {{htpasswd: {{realm: wasmgate-test, path: {self.htpasswd}}}}}")
        config.write_text("\n".join(lines) + "\n")
        log = (self.workdir / "registry.log").open("ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        assert REGISTRY_BIN is not None
        self.proc = subprocess.Popen([REGISTRY_BIN, "serve", str(config)], stdout=log,
                                     stderr=subprocess.STDOUT, env=env)
        log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited: {self.log_text()}")
            try:
                status = httpx.get(f"{self.url}/v2/", verify=False, timeout=1).status_code
                if status in (200, 401):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"docker-registry did not come up: {self.log_text()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def log_text(self) -> str:
        path = self.workdir / "registry.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""


def _need(tool: str | None, name: str) -> None:
    if tool is None:
        missing(f"{name} is not installed")


def _run_registry(workdir: Path, **options: object) -> Iterator[Registry]:
    _need(REGISTRY_BIN, "docker-registry")
    workdir.mkdir(parents=True, exist_ok=True)
    registry = Registry(workdir, free_port(), **options)  # type: ignore[arg-type]
    try:
        registry.start()
        yield registry
    finally:
        registry.stop()


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """Anonymous, plain HTTP."""
    yield from _run_registry(tmp_path_factory.mktemp("registry-plain"))


@pytest.fixture
def own_registry(tmp_path: Path) -> Iterator[Registry]:
    """A plain registry for one test (that may stop it)."""
    yield from _run_registry(tmp_path / "registry")


@pytest.fixture(scope="module")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """htpasswd basic auth (bcrypt) over plain HTTP: user ``USER``, password ``PASSWORD``."""
    htpasswd_bin = shutil.which("htpasswd")
    _need(htpasswd_bin, "htpasswd (apache2-utils)")
    workdir = tmp_path_factory.mktemp("registry-auth")
    line = subprocess.run([str(htpasswd_bin), "-Bbn", USER, PASSWORD], check=True,
                          capture_output=True, text=True).stdout.strip()
    (workdir / "htpasswd").write_text(line + "\n")
    yield from _run_registry(workdir, htpasswd=workdir / "htpasswd")


@pytest.fixture(scope="session")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA and a server certificate for 127.0.0.1/localhost, made with the openssl CLI."""
    openssl = shutil.which("openssl")
    _need(openssl, "openssl")
    d = tmp_path_factory.mktemp("ca")

    def run(*args: str) -> None:
        subprocess.run([str(openssl), *args], check=True, capture_output=True, cwd=d)

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", "/CN=wasmgate test CA", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                               "extendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "ext.cnf")
    # A CA that did not sign the server certificate, for the untrusted case.
    run("req", "-x509", *ec, "-keyout", "other.key", "-out", "other.crt", "-days", "2",
        "-subj", "/CN=some other CA")
    return {"ca": d / "ca.crt", "cert": d / "server.crt", "key": d / "server.key",
            "other_ca": d / "other.crt"}


@pytest.fixture(scope="module")
def tls_registry(tmp_path_factory: pytest.TempPathFactory,
                 test_ca: dict[str, Path]) -> Iterator[Registry]:
    """TLS with the test CA (anonymous); ``ca_file`` is the CA bundle to trust."""
    workdir = tmp_path_factory.mktemp("registry-tls")
    yield from _run_registry(workdir, tls=(test_ca["cert"], test_ca["key"]),
                             ca_file=test_ca["ca"])


@pytest.fixture
def no_docker_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point $DOCKER_CONFIG and $HOME at empty directories: no ambient credentials."""
    empty = tmp_path / "no-docker-config"
    empty.mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(empty))
    monkeypatch.setenv("HOME", str(empty))
    monkeypatch.delenv("WASM_INSECURE_REGISTRIES", raising=False)
    return empty


@pytest.fixture
def skopeo() -> str:
    _need(SKOPEO, "skopeo")
    assert SKOPEO is not None
    return SKOPEO
