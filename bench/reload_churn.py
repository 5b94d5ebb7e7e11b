"""Memory under configuration churn: does a hot reload leave anything behind?

Istio users report proxies that grow with every WasmPlugin change (istio #26894, #45573;
envoy #27336): each change builds a new VM and the old one must really go. This starts
`wasmgate run` as a user would, in front of a small upstream, and rewrites the plugin's
`pluginConfig` N times. After each reload has taken effect (the response shows the new
config) it sends a few requests, then samples the gateway's resident memory (VmRSS). The
growth per reload after a warm-up is the leak figure; a flat line is the goal.

    python bench/reload_churn.py [--reloads 200] [--plugin example|transformer]
                                 [--every 20] [--json PATH]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "real"))
WASMGATE = Path(sys.executable).with_name("wasmgate")

PLUGINS = {
    # (WasmPlugin spec lines, response header showing the config, its value for `n`)
    "example": ("""\
  url: file://{wasm}
  pluginName: example
  pluginConfig: {{greeting: "g{n}"}}
""", "x-wasm-greeting", '{{"greeting":"g{n}"}}'),
    "transformer": ("""\
  url: file://{wasm}
  pluginConfig:
    respRules: [{{operate: add, headers: [{{key: x-generation, value: "g{n}"}}]}}]
""", "x-generation", "g{n}"),
}


def wasm_of(plugin: str) -> Path:
    if plugin == "example":
        return ROOT / "plugins" / "example-as" / "example.wasm"
    from higress import higress_plugin

    return Path(higress_plugin(plugin))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Upstream(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = b"ok\n"
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def config(upstream: int, listen: int, plugin: str, wasm: Path, n: int) -> str:
    spec = PLUGINS[plugin][0].format(wasm=wasm, n=n)
    return f"""\
apiVersion: wasmgate.io/v1alpha1
kind: Gateway
metadata: {{name: churn}}
spec:
  listen: 127.0.0.1:{listen}
  clusters: [{{name: up, endpoints: ["127.0.0.1:{upstream}"]}}]
  routes: [{{name: all, cluster: up}}]
---
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {{name: churn}}
spec:
{spec}"""


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def get(port: int) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/")
    response = conn.getresponse()
    response.read()
    conn.close()
    return response


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reloads", type=int, default=200)
    parser.add_argument("--plugin", choices=sorted(PLUGINS), default="example")
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--requests", type=int, default=5, help="per reload")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    upstream = server.server_address[1]
    listen, admin = free_port(), free_port()
    wasm = wasm_of(args.plugin)
    header, value = PLUGINS[args.plugin][1], PLUGINS[args.plugin][2]
    work = Path(tempfile.mkdtemp(prefix="wasmgate-churn-"))
    path = work / "config.yaml"
    path.write_text(config(upstream, listen, args.plugin, wasm, 0))
    log = (work / "gateway.log").open("w")
    process = subprocess.Popen(
        [str(WASMGATE), "run", "-c", str(path), "--admin", f"127.0.0.1:{admin}"],
        stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    samples: list[tuple[int, int]] = []
    waits: list[float] = []
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if get(listen).getheader(header) == value.format(n=0):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or process.poll() is not None:
                raise SystemExit(f"gateway did not start; see {work / 'gateway.log'}")
            time.sleep(0.1)
        samples.append((0, rss_kib(process.pid)))
        for n in range(1, args.reloads + 1):
            path.write_text(config(upstream, listen, args.plugin, wasm, n))
            started = time.monotonic()
            while get(listen).getheader(header) != value.format(n=n):
                if time.monotonic() - started > 30:
                    raise SystemExit(f"reload {n} never took effect; see {work}")
                time.sleep(0.02)
            waits.append(time.monotonic() - started)
            for _ in range(args.requests):
                response = get(listen)
                if response.status != 200:
                    raise SystemExit(f"reload {n}: status {response.status}")
            if n % args.every == 0 or n == args.reloads:
                time.sleep(0.3)  # the old VM's drain and release
                samples.append((n, rss_kib(process.pid)))
                print(f"reload {n:4d}: VmRSS {samples[-1][1] / 1024:7.1f} MiB", flush=True)
    finally:
        process.terminate()
        process.wait(15)
        server.shutdown()
    warm = [s for s in samples if s[0] >= args.every]  # the first reloads warm caches
    growth = ((warm[-1][1] - warm[0][1]) / (warm[-1][0] - warm[0][0])
              if len(warm) > 1 else 0.0)
    result = {"plugin": args.plugin, "reloads": args.reloads, "samples_kib": samples,
              "growth_kib_per_reload_after_warmup": round(growth, 1),
              "reload_seconds_median": round(statistics.median(waits), 3)}
    print(json.dumps({k: v for k, v in result.items() if k != "samples_kib"}))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
