#!/usr/bin/env bash
# Assemble every edge-case .wat module into the .wasm next to it (Debian wabt).
set -euo pipefail
cd "$(dirname "$0")"
for f in *.wat; do
  wat2wasm "$f" -o "${f%.wat}.wasm"
done
echo "wat: built $(ls *.wasm | wc -l) modules" >&2
