"""`wasmgate demo`: the gateway on an embedded default, ready to curl.

A built-in echo upstream and the bundled example plugin (plugins/example-as, AssemblyScript):
requests get `x-wasm-example: seen`, responses `x-wasm-greeting`, and `/deny...` is refused
by the plugin with a local 403.
"""

from __future__ import annotations

import json
import tempfile
from importlib.resources import files
from pathlib import Path

from .app import GatewayApp
from .echo import start_echo

DEMO_CONFIG = """apiVersion: wasmgate.io/v1alpha1
kind: Gateway
metadata: {{name: demo}}
spec:
  listen: {listen}
  admin: {admin}
  clusters:
  - name: echo
    endpoints: ["127.0.0.1:{echo_port}"]
  routes:
  - name: all
    cluster: echo
---
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {{name: example, namespace: default}}
spec:
  url: file://{wasm}
  pluginName: example
  pluginConfig: {config}
"""


def bundled_example() -> Path:
    return Path(str(files("wasmgate") / "data" / "example.wasm"))


async def run_demo(listen: str, admin: str) -> None:
    echo = await start_echo()
    echo_port = echo.sockets[0].getsockname()[1]
    workdir = Path(tempfile.mkdtemp(prefix="wasmgate-demo-"))
    config = workdir / "demo.yaml"
    config.write_text(DEMO_CONFIG.format(listen=listen, admin=admin, echo_port=echo_port,
                                         wasm=bundled_example(),
                                         config=json.dumps({"greeting": "hello from wasm"})))
    app = GatewayApp([config], access_log=True)
    await app.start()
    base = f"http://{listen}"
    admin_base = f"http://{app.gateway.spec.admin.host}:{app.admin.port}"  # type: ignore
    print(f"""
wasmgate demo: the example plugin (AssemblyScript) in front of a built-in echo upstream.
config: {config}   (edit it: the gateway reloads on save)

  curl -i {base}/hello          # upstream echo; x-wasm-example added on the way in,
                                #   x-wasm-greeting on the way out
  curl -i {base}/deny/secret    # refused by the plugin: 403 from inside the VM
  curl -s {admin_base}/plugins
  curl -s {admin_base}/stats/prometheus | head -30
  curl -s -X POST '{admin_base}/logging?default.example=trace'   # then curl again: ABI trace

Ctrl-C to stop.
""", flush=True)
    try:
        await app.serve_forever()
    finally:
        echo.close()
