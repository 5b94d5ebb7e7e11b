#!/usr/bin/env bash
# Build the conformance plugin (wasi-libc reactor) -> conformance.wasm.
# Note: do NOT pass --sysroot; Debian's wasi-libc lives in /usr/{include,lib}/wasm32-wasi.
set -euo pipefail
cd "$(dirname "$0")"
clang --target=wasm32-wasi -mexec-model=reactor -O2 -Wall -Wextra -Werror \
  -Wl,--strip-all -o conformance.wasm conformance.c
echo "conformance: built conformance.wasm ($(stat -c %s conformance.wasm) bytes)" >&2
