"""wasmgate: a Proxy-Wasm plugin host in Python."""
