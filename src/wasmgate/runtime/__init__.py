"""Proxy-Wasm runtime: loading, instantiating and running plugins."""
