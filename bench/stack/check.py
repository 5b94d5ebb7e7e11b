"""Correctness check for a proxy under test (loopback only, bounded).

Serves a test upstream on --upstream-port (chunked, close-delimited, HEAD, large,
XFF echo, stale keep-alive) in a thread, and talks to the proxy on --proxy-port.
The proxy must already be running and pointed at the test upstream.

    python check.py --proxy-port 18090 --upstream-port 18082
Exit status 0 when every check passes.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import socket
import sys
import threading
import time

BIG = bytes(range(256)) * (4 * 1024 * 1024 // 256)  # 4 MiB


class TestUpstream(asyncio.Protocol):
    """Minimal HTTP/1.1 server: request head only (bodies read by content-length)."""

    def connection_made(self, t):
        self.t = t
        self.buf = b""
        self.served = 0

    def data_received(self, data):
        self.buf += data
        while True:
            head, sep, rest = self.buf.partition(b"\r\n\r\n")
            if not sep:
                return
            lines = head.split(b"\r\n")
            method, path, _ = lines[0].split(b" ", 2)
            hdrs = {}
            for ln in lines[1:]:
                k, _, v = ln.partition(b":")
                hdrs[k.strip().lower()] = v.strip()
            clen = int(hdrs.get(b"content-length", b"0"))
            if b"chunked" in hdrs.get(b"transfer-encoding", b""):
                end = rest.find(b"0\r\n\r\n")
                if end < 0:
                    return
                raw = rest[: end]
                body = b""
                while raw:
                    size, _, raw = raw.partition(b"\r\n")
                    n = int(size, 16)
                    body += raw[:n]
                    raw = raw[n + 2:]
                self.buf = rest[end + 5:]
            else:
                if len(rest) < clen:
                    return
                body, self.buf = rest[:clen], rest[clen:]
            self.served += 1
            self.respond(method, path, hdrs, body)

    def respond(self, method, path, hdrs, body):
        w = self.t.write
        if path == b"/chunked":
            w(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nx-up: 1\r\n\r\n")
            for part in (b"hello ", b"chunked ", b"world"):
                w(b"%x\r\n%b\r\n" % (len(part), part))
            w(b"0\r\n\r\n")
        elif path == b"/close":
            w(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nclose-delimited body")
            self.t.close()
        elif path == b"/big":
            w(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(BIG))
            if method != b"HEAD":
                w(BIG)
        elif path == b"/xff":
            v = hdrs.get(b"x-forwarded-for", b"")
            w(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%b" % (len(v), v))
        elif path == b"/echo":
            w(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body))
        elif path == b"/once":  # answers, then drops the keep-alive connection silently
            w(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nonce")
            asyncio.get_running_loop().call_later(0.05, self.t.close)
        elif path == b"/204":
            w(b"HTTP/1.1 204 No Content\r\n\r\n")
        else:
            b = b"cl:" + path
            w(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(b))
            if method != b"HEAD":
                w(b)


def run_upstream(port: int, ready: threading.Event):
    async def main():
        loop = asyncio.get_running_loop()
        await loop.create_server(TestUpstream, "127.0.0.1", port, reuse_address=True)
        ready.set()
        await asyncio.sleep(120)  # bounded lifetime
    asyncio.run(main())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--proxy-port", type=int, required=True)
    ap.add_argument("--upstream-port", type=int, default=18082)
    ap.add_argument("--serve-only", action="store_true")
    a = ap.parse_args()
    ready = threading.Event()
    th = threading.Thread(target=run_upstream, args=(a.upstream_port, ready), daemon=True)
    th.start()
    ready.wait(5)
    if a.serve_only:
        th.join()
        return 0
    # wait for the proxy
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", a.proxy_port), 0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    fails = []

    def check(name, cond, detail=""):
        print(f"  {'ok  ' if cond else 'FAIL'} {name} {detail if not cond else ''}")
        if not cond:
            fails.append(name)

    c = http.client.HTTPConnection("127.0.0.1", a.proxy_port, timeout=10)

    def get(path, method="GET", body=None, headers=None, chunked=False):
        c.request(method, path, body=body, headers=headers or {}, encode_chunked=chunked)
        r = c.getresponse()
        return r, r.read()

    r, b = get("/plain?q=1")
    check("content-length body", r.status == 200 and b == b"cl:/plain?q=1", (r.status, b))
    r, b = get("/chunked")
    check("chunked upstream", b == b"hello chunked world" and r.getheader("x-up") == "1",
          (r.status, b, r.getheaders()))
    r, b = get("/xff")
    check("x-forwarded-for set", b == b"127.0.0.1", b)
    r, b = get("/xff", headers={"X-Forwarded-For": "10.9.9.9"})
    check("x-forwarded-for appended", b == b"10.9.9.9, 127.0.0.1", b)
    r, b = get("/plain", method="HEAD")
    check("HEAD", r.status == 200 and b == b"" and r.getheader("content-length") == "9",
          (r.status, r.getheaders()))
    r, b = get("/204")
    check("204", r.status == 204 and b == b"", r.status)
    r, b = get("/after-head")
    check("keep-alive after HEAD/204", b == b"cl:/after-head", b)
    r, b = get("/echo", method="POST", body=b"x" * 100000)
    check("POST body (content-length)", b == b"x" * 100000, len(b))
    r, b = get("/echo", method="POST", body=iter([b"ab", b"cd"]),
               headers={"Transfer-Encoding": "chunked"}, chunked=True)
    check("POST body (chunked)", b == b"abcd", b)
    r, b = get("/big")
    check("4 MiB body", b == BIG, len(b))
    r, b = get("/close")
    check("close-delimited upstream", b == b"close-delimited body", (r.status, b))
    r, b = get("/once")
    time.sleep(0.2)  # upstream drops that idle connection; next request must retry
    r, b = get("/after-stale")
    check("stale pooled connection retried", r.status == 200 and b == b"cl:/after-stale",
          (r.status, b))
    c.close()
    # pipelining: two requests in one write
    s = socket.create_connection(("127.0.0.1", a.proxy_port), 5)
    s.sendall(b"GET /p1 HTTP/1.1\r\nHost: x\r\n\r\nGET /p2 HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    deadline = time.time() + 5
    while data.count(b"cl:/p") < 2 and time.time() < deadline:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    i1, i2 = data.find(b"cl:/p1"), data.find(b"cl:/p2")
    check("pipelined requests in order", 0 <= i1 < i2, data[:300])
    # slow reader on a big body (back-pressure): read slowly, must still be complete
    s = socket.create_connection(("127.0.0.1", a.proxy_port), 10)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    s.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    data = b""
    deadline = time.time() + 10
    while time.time() < deadline:
        chunk = s.recv(16384)
        if not chunk:
            break
        data += chunk
        if len(data) < 1_000_000:
            time.sleep(0.001)
    s.close()
    check("slow reader gets whole 4 MiB", data.endswith(BIG), len(data))
    print(f"{len(fails)} failed" if fails else "all checks passed")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
