#!/usr/bin/env bash
# Requests/s through the gateway (no plugin, the AssemblyScript example plugin, the Go
# transformer plugin) next to nginx proxy_pass, in the same run, with wrk.
#
#   bash bench/gateway.sh                 # REPS=3 DURATION=5s CONNS="8 32"
#   BEFORE_SRC=/tmp/old/src bash bench/gateway.sh   # also every wasmgate config run from that
#                                         # source tree (before-*), in the same run
#
# Loopback only. Each proxy is pinned to core 0 (one worker / one event loop); wrk and the
# upstream (a static nginx) share core 1, so "per core" compares like with like. Every load
# run is bounded by wrk -d; every server started here is stopped on exit.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
PY="${PY:-$ROOT/.venv/bin/python}"
WASMGATE="${WASMGATE:-$ROOT/.venv/bin/wasmgate}"
REPS="${REPS:-3}"
DURATION="${DURATION:-5s}"
CONNS="${CONNS:-8 32}"
UP_PORT="${UP_PORT:-18181}"
BASE_PORT="${BASE_PORT:-18190}"
OUT="${OUT:-$ROOT/bench/results}"

need=()
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
if [ "${#need[@]}" -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"

RUN="$(mktemp -d /tmp/wasmgate-gwbench.XXXXXX)"
PIDS=()
cleanup() {
    set +e
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done
    sleep 0.5
    for pid in "${PIDS[@]}"; do kill -9 "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; done
    rm -rf "$RUN"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
mkdir -p "$OUT"

wait_port() {
    for _ in $(seq 1 300); do
        "$PY" -c "import socket; socket.create_connection(('127.0.0.1',$1),0.2).close()" \
            2>/dev/null && return 0
        sleep 0.1
    done
    echo "port $1 did not open" >&2; return 1
}

render() {
    sed -e "s#@RUN@#$RUN#g" -e "s#@UP_PORT@#$UP_PORT#g" -e "s#@PROXY_PORT@#$2#g" "$1" >"$3"
}

# upstream: static nginx on core 1
render "$HERE/stack/nginx_upstream.conf" x "$RUN/upstream.conf"
taskset -c 1 timeout 1800 "$NGINX" -p "$RUN" -c "$RUN/upstream.conf" -e "$RUN/up.err" &
PIDS+=("$!")
wait_port "$UP_PORT"

TRANSFORMER="$("$PY" -c "import sys; sys.path.insert(0, '$ROOT/tests/real'); \
from higress import higress_plugin; print(higress_plugin('transformer'))")"
EXAMPLE="$ROOT/plugins/example-as/example.wasm"

gateway_config() {  # name port -> config path
    local name="${1#before-}" port="$2" file="$RUN/$1.yaml"
    cat >"$file" <<EOF
apiVersion: wasmgate.io/v1alpha1
kind: Gateway
metadata: {name: bench}
spec:
  listen: 127.0.0.1:$port
  admin: 127.0.0.1:$((port + 100))
  clusters: [{name: up, endpoints: ["127.0.0.1:$UP_PORT"]}]
  routes: [{name: all, cluster: up}]
EOF
    case "$name" in
        wasmgate-example) cat >>"$file" <<EOF
---
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {name: example}
spec: {url: "file://$EXAMPLE", pluginName: example, pluginConfig: {greeting: bench}}
EOF
        ;;
        wasmgate-transformer) cat >>"$file" <<EOF
---
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {name: transformer}
spec:
  url: "file://$TRANSFORMER"
  pluginConfig:
    reqRules: [{operate: add, headers: [{key: x-added, value: v1}]}]
    respRules: [{operate: add, headers: [{key: x-resp, value: r1}]}]
EOF
        ;;
    esac
    echo "$file"
}

PROXIES="nginx wasmgate wasmgate-example wasmgate-transformer"
if [ -n "${BEFORE_SRC:-}" ]; then
    PROXIES="$PROXIES before-wasmgate before-wasmgate-example before-wasmgate-transformer"
fi
declare -A PORT_OF
i=0
for name in $PROXIES; do
    port=$((BASE_PORT + i)); i=$((i + 1)); PORT_OF[$name]=$port
    if [ "$name" = nginx ]; then
        render "$HERE/stack/nginx.conf" "$port" "$RUN/proxy.conf"
        taskset -c 0 timeout 1800 "$NGINX" -p "$RUN" -c "$RUN/proxy.conf" -e "$RUN/px.err" &
    else
        config="$(gateway_config "$name" "$port")"
        pythonpath="${PYTHONPATH:-}"
        [ "${name#before-}" != "$name" ] && pythonpath="$BEFORE_SRC"
        PYTHONPATH="$pythonpath" taskset -c 0 timeout 1800 "$WASMGATE" run -c "$config" \
            --log-level warning >"$RUN/$name.log" 2>&1 &
    fi
    PIDS+=("$!")
    wait_port "$port"
    for _ in $(seq 1 300); do  # plugins loaded?
        [ "$name" = nginx ] && break
        curl -sf "http://127.0.0.1:$((port + 100))/ready" >/dev/null && break
        sleep 0.1
    done
    echo "== $name on :$port: $(curl -si "http://127.0.0.1:$port/" | tr -d '\r' \
        | grep -iE '^(x-wasm-greeting|x-resp|HTTP)' | tr '\n' ' ')"
    taskset -c 1 wrk -t1 -c32 -d2s "http://127.0.0.1:$port/" >/dev/null  # warm-up
done

RAW="$OUT/gateway.tsv"
: >"$RAW"
for c in $CONNS; do
    for rep in $(seq 1 "$REPS"); do
        for name in $PROXIES; do
            taskset -c 1 wrk -t1 -c"$c" -d"$DURATION" --latency \
                "http://127.0.0.1:${PORT_OF[$name]}/" >"$RUN/wrk.txt"
            "$PY" - "$name" "$c" "$rep" "$RUN/wrk.txt" >>"$RAW" <<'EOF'
import re, sys
name, c, rep, path = sys.argv[1:]
t = open(path).read()
def ms(s):
    v, u = re.match(r"([\d.]+)(us|ms|s)", s).groups()
    return float(v) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[u]
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", t).group(1))
p50 = ms(re.search(r"^\s+50%\s+(\S+)", t, re.M).group(1))
p99 = ms(re.search(r"^\s+99%\s+(\S+)", t, re.M).group(1))
bad = re.search(r"Non-2xx or 3xx responses: (\d+)", t)
print(f"{name}\t{c}\t{rep}\t{rps:.0f}\t{p50:.2f}\t{p99:.2f}\t{bad.group(1) if bad else 0}")
EOF
            tail -1 "$RAW" >&2
        done
    done
done

"$PY" - "$RAW" <<'EOF' | tee "$OUT/gateway.md"
import statistics, sys
from collections import defaultdict
rows = defaultdict(list)
for line in open(sys.argv[1]):
    name, c, rep, rps, p50, p99, bad = line.split("\t")
    rows[(name, int(c))].append((float(rps), float(p50), float(p99), int(bad)))
print("| proxy (1 core) | conns | req/s (median) | p50 ms | p99 ms | non-2xx | vs nginx "
      "| vs no-plugin |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for c in sorted({c for _, c in rows}):
    med = {n: statistics.median(r[0] for r in v) for (n, cc), v in rows.items() if cc == c}
    for (name, cc), v in rows.items():
        if cc != c:
            continue
        p50 = statistics.median(r[1] for r in v)
        p99 = statistics.median(r[2] for r in v)
        vs_nginx = f"{100 * med[name] / med['nginx']:.0f}%"
        plain = "before-wasmgate" if name.startswith("before-") else "wasmgate"
        vs_plain = ("" if name in ("nginx", plain)
                    else f"{100 * med[name] / med[plain]:.0f}%")
        print(f"| {name} | {c} | {med[name]:.0f} | {p50:.2f} | {p99:.2f} "
              f"| {sum(r[3] for r in v)} | {vs_nginx} | {vs_plain} |")
EOF
