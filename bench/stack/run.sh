#!/usr/bin/env bash
# Benchmark asyncio HTTP stacks for the wasmgate reverse proxy against nginx proxy_pass.
#
#   bash bench/stack/run.sh            # install what is missing, check, benchmark
#   REPS=3 DURATION=5s CONNS="8 32" PROXIES="nginx aiohttp raw uvicorn uvicorn-aiohttp" \
#       bash bench/stack/run.sh
#
# Loopback only (127.0.0.1). Every load run is bounded (wrk -d, timeout). The proxy under
# test is pinned to core 0 (taskset -c 0); wrk and the upstream nginx share core 1.
# Idempotent: re-running re-installs nothing that is present and overwrites results/.
# All servers it starts are stopped on exit (trap EXIT).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
PY="${PY:-$ROOT/.venv/bin/python}"
REPS="${REPS:-3}"
DURATION="${DURATION:-5s}"
CONNS="${CONNS:-8 32}"
PROXIES="${PROXIES:-nginx aiohttp raw uvicorn uvicorn-aiohttp}"
CHECK="${CHECK:-1}"
UP_PORT="${UP_PORT:-18081}"
TEST_UP_PORT="${TEST_UP_PORT:-18082}"
PROXY_PORT="${PROXY_PORT:-18090}"
PROXY_CORE="${PROXY_CORE:-0}"
LOAD_CORE="${LOAD_CORE:-1}"
OUT="${OUT:-$HERE/results}"

# ---------------------------------------------------------------- install
need_apt=()
command -v wrk >/dev/null 2>&1 || need_apt+=(wrk)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need_apt+=(nginx-light)
command -v taskset >/dev/null 2>&1 || need_apt+=(util-linux)
if [ "${#need_apt[@]}" -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"
if [ ! -x "$PY" ]; then
    python3 -m venv "$ROOT/.venv"
fi
if ! "$PY" -c "import uvloop, httptools, aiohttp, uvicorn" 2>/dev/null; then
    "$PY" -m pip install -q uvloop httptools aiohttp uvicorn
fi
# Debian's nginx package may have started a system nginx on :80; not ours, left alone.

# ---------------------------------------------------------------- scratch + cleanup
RUN="$(mktemp -d /tmp/wasmgate-stack.XXXXXX)"
PIDS=()
cleanup() {
    set +e
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null
    done
    sleep 0.3
    for pid in "${PIDS[@]}"; do
        kill -9 "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    rm -rf "$RUN"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mkdir -p "$OUT"
: >"$OUT/raw.tsv"
{
    echo "date: $(date -u +%FT%TZ)"
    echo "kernel: $(uname -r); cpus: $(nproc); $(grep -m1 'model name' /proc/cpuinfo | sed 's/\s\+/ /g')"
    echo "python: $("$PY" -V 2>&1)"
    "$PY" -m pip list 2>/dev/null | grep -iE '^(uvloop|httptools|aiohttp|uvicorn|yarl|multidict) '
    echo "nginx: $("$NGINX" -v 2>&1)"
    echo "wrk: $(wrk -v 2>&1 | head -1)"
} >"$OUT/versions.txt"
cat "$OUT/versions.txt"

render() {  # template -> file
    sed -e "s#@RUN@#$RUN#g" -e "s#@UP_PORT@#$UP_PORT#g" -e "s#@PROXY_PORT@#$PROXY_PORT#g" "$1" >"$2"
}

wait_port() {  # port
    for _ in $(seq 1 100); do
        if "$PY" -c "import socket,sys; socket.create_connection(('127.0.0.1',$1),0.2).close()" \
            2>/dev/null; then return 0; fi
        sleep 0.1
    done
    echo "port $1 did not open" >&2
    return 1
}

stop_pid() {  # pid
    kill "$1" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

# busy share of one cpu between two /proc/stat samples
cpu_sample() { grep "^cpu$1 " /proc/stat; }
cpu_busy() {  # "before line" "after line" -> percent busy
    "$PY" - "$1" "$2" <<'EOF'
import sys
a = [int(x) for x in sys.argv[1].split()[1:]]
b = [int(x) for x in sys.argv[2].split()[1:]]
d = [y - x for x, y in zip(a, b)]
tot = sum(d[:8]); idle = d[3] + d[4]
print(f"{100.0 * (tot - idle) / tot:.0f}" if tot else "0")
EOF
}

start_proxy() {  # name upstream-port listen-port -> sets PROXY_PID
    local name="$1" upport="$2" port="$3"
    case "$name" in
        nginx)
            render "$HERE/nginx.conf" "$RUN/proxy.conf"
            sed -i -e "s#127.0.0.1:$UP_PORT;#127.0.0.1:$upport;#" \
                -e "s#listen 127.0.0.1:$PROXY_PORT #listen 127.0.0.1:$port #" "$RUN/proxy.conf"
            taskset -c "$PROXY_CORE" timeout 900 "$NGINX" -p "$RUN" -c "$RUN/proxy.conf" \
                -e "$RUN/proxy.error.log" &
            ;;
        aiohttp)
            taskset -c "$PROXY_CORE" timeout 900 "$PY" "$HERE/proxy_aiohttp.py" \
                --port "$port" --upstream "127.0.0.1:$upport" >"$RUN/$name.log" 2>&1 &
            ;;
        raw)
            taskset -c "$PROXY_CORE" timeout 900 "$PY" "$HERE/proxy_raw.py" \
                --port "$port" --upstream "127.0.0.1:$upport" >"$RUN/$name.log" 2>&1 &
            ;;
        uvicorn)
            taskset -c "$PROXY_CORE" timeout 900 "$PY" "$HERE/proxy_uvicorn.py" --client raw \
                --port "$port" --upstream "127.0.0.1:$upport" >"$RUN/$name.log" 2>&1 &
            ;;
        uvicorn-aiohttp)
            taskset -c "$PROXY_CORE" timeout 900 "$PY" "$HERE/proxy_uvicorn.py" --client aiohttp \
                --port "$port" --upstream "127.0.0.1:$upport" >"$RUN/$name.log" 2>&1 &
            ;;
        *) echo "unknown proxy $name" >&2; return 1 ;;
    esac
    PROXY_PID=$!
    PIDS+=("$PROXY_PID")
    wait_port "$port"
}

# ---------------------------------------------------------------- correctness
if [ "$CHECK" = 1 ]; then
    for name in $PROXIES; do
        [ "$name" = nginx ] && continue
        echo "== check $name (test upstream on :$TEST_UP_PORT)"
        start_proxy "$name" "$TEST_UP_PORT" "$PROXY_PORT"
        timeout 90 "$PY" "$HERE/check.py" --proxy-port "$PROXY_PORT" \
            --upstream-port "$TEST_UP_PORT" | tee "$OUT/check-$name.txt"
        stop_pid "$PROXY_PID"
    done
fi

# ---------------------------------------------------------------- upstream
render "$HERE/nginx_upstream.conf" "$RUN/upstream.conf"
taskset -c "$LOAD_CORE" timeout 1800 "$NGINX" -p "$RUN" -c "$RUN/upstream.conf" \
    -e "$RUN/upstream.error.log" &
PIDS+=("$!")
wait_port "$UP_PORT"

# baseline: upstream alone (wrk on the same core 1, so this is only a sanity number)
echo "== upstream direct (sanity)"
taskset -c "$LOAD_CORE" wrk -t1 -c32 -d2s --latency "http://127.0.0.1:$UP_PORT/" \
    | tee "$RUN/direct.txt" | grep -E "Requests/sec"

# ---------------------------------------------------------------- load
# All proxies run at once (each on its own port, all pinned to core 0; an idle one just
# sits in epoll_wait) and the runs are interleaved round-robin, so that the slow drifts of
# this shared VM hit every proxy alike instead of whichever one ran during a slow minute.
declare -A PORT_OF
idx=0
for name in $PROXIES; do
    PORT_OF[$name]=$((PROXY_PORT + idx)); idx=$((idx + 1))
    start_proxy "$name" "$UP_PORT" "${PORT_OF[$name]}"
    body="$(timeout 5 "$PY" -c "import urllib.request as u; print(u.urlopen('http://127.0.0.1:${PORT_OF[$name]}/', timeout=3).read().decode().strip())")"
    echo "== $name on :${PORT_OF[$name]} (pid $PROXY_PID) body: $body"
    taskset -c "$LOAD_CORE" wrk -t1 -c32 -d2s "http://127.0.0.1:${PORT_OF[$name]}/" >/dev/null  # warm-up
done
for c in $CONNS; do
    for i in $(seq 1 "$REPS"); do
        for name in $PROXIES; do
            c0="$(cpu_sample "$PROXY_CORE")"; l0="$(cpu_sample "$LOAD_CORE")"
            taskset -c "$LOAD_CORE" wrk -t1 -c"$c" -d"$DURATION" --latency \
                "http://127.0.0.1:${PORT_OF[$name]}/" >"$RUN/wrk.txt"
            c1="$(cpu_sample "$PROXY_CORE")"; l1="$(cpu_sample "$LOAD_CORE")"
            pb="$(cpu_busy "$c0" "$c1")"; lb="$(cpu_busy "$l0" "$l1")"
            "$PY" - "$name" "$c" "$i" "$pb" "$lb" "$RUN/wrk.txt" >>"$OUT/raw.tsv" <<'EOF'
import re, sys
name, c, i, pb, lb, path = sys.argv[1:]
t = open(path).read()
def ms(s):
    v, u = re.match(r"([\d.]+)(us|ms|s)", s).groups()
    return float(v) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[u]
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", t).group(1))
p50 = ms(re.search(r"^\s+50%\s+(\S+)", t, re.M).group(1))
p99 = ms(re.search(r"^\s+99%\s+(\S+)", t, re.M).group(1))
errs = re.search(r"Non-2xx or 3xx responses: (\d+)", t)
sock = re.search(r"Socket errors: (.*)", t)
err = (errs.group(1) if errs else "0") + ("|" + sock.group(1).replace(" ", "") if sock else "")
print(f"{name}\t{c}\t{i}\t{rps:.0f}\t{p50:.3f}\t{p99:.3f}\t{pb}\t{lb}\t{err}")
EOF
            tail -1 "$OUT/raw.tsv"
        done
    done
done

# ---------------------------------------------------------------- table
"$PY" - "$OUT/raw.tsv" >"$OUT/table.md" <<'EOF'
import statistics, sys
from collections import defaultdict
rows = defaultdict(list)
for line in open(sys.argv[1]):
    n, c, i, rps, p50, p99, pb, lb, err = line.rstrip("\n").split("\t")
    rows[(n, int(c))].append((float(rps), float(p50), float(p99), int(pb), int(lb), err))
ng = {c: statistics.median(r[0] for r in v) for (n, c), v in rows.items() if n == "nginx"}
print("| proxy | conns | req/s (median of %d) | p50 ms | p99 ms | proxy core busy %% | "
      "load core busy %% | req/s per busy core | vs nginx | errors |"
      % max(len(v) for v in rows.values()))
print("|---|---|---|---|---|---|---|---|---|---|")
for (n, c), v in rows.items():
    v = sorted(v)
    m = v[len(v) // 2]  # the median run (by req/s), whose latencies are shown
    rps = m[0]
    per_core = rps * 100.0 / m[3] if m[3] else 0
    rel = f"{100 * rps / ng[c]:.0f}%" if c in ng else "-"
    errs = ",".join(sorted({r[5] for r in v}))
    print(f"| {n} | {c} | {rps:.0f} | {m[1]:.2f} | {m[2]:.2f} | {m[3]} | {m[4]} | "
          f"{per_core:.0f} | {rel} | {errs} |")
EOF
echo
cat "$OUT/table.md"
