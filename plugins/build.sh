#!/usr/bin/env bash
# Rebuild every wasmgate test/demo plugin. Installs the toolchains if missing
# (Debian 12: clang/lld 14 + wasi-libc + wabt from apt, AssemblyScript via npm ci).
# Idempotent: re-running only rebuilds. The built .wasm files are committed, so
# tests never need this script.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

apt_pkgs=(clang lld wasi-libc libclang-rt-14-dev-wasm32 wabt)
missing=()
for p in "${apt_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ! command -v npm >/dev/null 2>&1; then missing+=(nodejs npm); fi
if [ "${#missing[@]}" -gt 0 ]; then
  echo "build.sh: installing ${missing[*]}" >&2
  $SUDO apt-get update
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
fi

# Every plugin directory with its own build.sh (example-as, conformance, wat, ...).
for b in "$here"/*/build.sh; do
  echo "build.sh: running ${b#$here/}" >&2
  "$b"
done

echo "build.sh: done" >&2
ls -l "$here"/*/*.wasm >&2
