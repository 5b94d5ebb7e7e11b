#!/usr/bin/env bash
# Build the AssemblyScript demo plugin -> example.wasm (next to this script).
set -euo pipefail
cd "$(dirname "$0")"
# (Re)install the pinned toolchain when node_modules is missing or stale.
if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --no-audit --no-fund
fi
mkdir -p build
npx --no-install asc assembly/index.ts -b build/example.wasm --use abort=abort_proc_exit --optimize
cp build/example.wasm example.wasm
echo "example-as: built example.wasm ($(stat -c %s example.wasm) bytes)" >&2
cp example.wasm ../../src/wasmgate/data/example.wasm  # the copy bundled for `wasmgate demo`
