#!/bin/sh
# Rebuild crash.wasm with DWARF (not stripped). Needs Debian's clang-14, lld,
# wasi-libc and libclang-rt-14-dev-wasm32 (the wasi-libc sysroot is found
# automatically; do not pass --sysroot).
set -eu
cd "$(dirname "$0")"
clang --target=wasm32-wasi -mexec-model=reactor -g -O0 \
  -Wall -Wextra -Werror -fdebug-prefix-map="$(pwd)"=. \
  -o crash.wasm crash.c
ls -l crash.wasm
