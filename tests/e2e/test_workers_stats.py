"""`wasmgate run --workers 2`: the admin endpoint's stats cover every worker.

Plugin-defined metrics are one set across the workers (a memory-mapped file); the gateway and
per-plugin stats are per worker and worker 0 sums them at scrape time. Each request opens a new
connection, so the kernel (SO_REUSEPORT) spreads them over both workers (/plugins shows each
worker's stream count, which proves it). The parent respawns a worker that dies; the tests of
an exited worker stop the parent first (`no_respawn`) so that it stays exited.
"""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from wasmgate.gateway.admin import _alive
from wasmgate.gateway.shared_metrics import ProcessMetricStore

from .conftest import Gateway
from .test_gateway import conformance, gateway_doc

Start = Callable[..., Gateway]
REQUESTS = 24
PLUGIN = "default.counting"
# ids in each VM: the first counter is 4, the first gauge 5, the first histogram 6
STEPS = ["configure define_metric 0 s:e2e_requests_total",
         "configure define_metric 1 s:e2e_last_seen",
         "configure define_metric 2 s:e2e_sample",
         "request_headers increment_metric 4 1",
         "request_headers get_metric 4",
         "request_headers record_metric 5 42",
         "request_headers record_metric 6 12"]


def scrape(gateway: Gateway) -> str:
    status, body = gateway.admin_get("/stats/prometheus")
    assert status == 200, body
    return body.decode()


def value(text: str, series: str) -> float:
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.MULTILINE)
    assert match, f"no {series} in:\n{text}"
    return float(match.group(1))


def workers(gateway: Gateway) -> list[dict]:  # type: ignore[type-arg]
    return gateway.admin_json("/plugins")["workers"]  # type: ignore[no-any-return]


def start(start_gateway: Start, upstream: str) -> Gateway:
    gateway = start_gateway(gateway_doc(upstream) + conformance("counting", STEPS),
                            "--workers", "2")
    # /ready (worker 0's) waits for every worker to have started and loaded its plugins
    assert [(w["state"], [p["status"] for p in w["plugins"]]) for w in workers(gateway)] \
        == [("up", ["ready"]), ("up", ["ready"])]
    return gateway


@contextmanager
def no_respawn(gateway: Gateway) -> Iterator[None]:
    """The parent stopped (SIGSTOP): a worker killed meanwhile is not respawned (it stays a
    zombie, which the admin takes for exited)."""
    os.kill(gateway.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(gateway.process.pid, signal.SIGCONT)


def wait_exited(gateway: Gateway, index: int) -> None:
    """Until the admin reports worker `index` exited (within 30 s)."""
    deadline = time.monotonic() + 30
    while workers(gateway)[index]["state"] != "exited":
        assert time.monotonic() < deadline, workers(gateway)
        time.sleep(0.05)


def send(gateway: Gateway, count: int) -> None:
    for i in range(count):
        assert gateway.get(f"/r{i}")[0] == 200


def test_prometheus_covers_both_workers(start_gateway: Start, upstream: str) -> None:
    gateway = start(start_gateway, upstream)
    send(gateway, REQUESTS)
    streams = [w["plugins"][0]["streams"] for w in workers(gateway)]
    assert sum(streams) == REQUESTS and all(streams), f"streams per worker: {streams}"
    text = scrape(gateway)
    # plugin-defined metrics: one set across the workers
    assert value(text, "e2e_requests_total") == REQUESTS
    assert "# TYPE e2e_requests_total counter" in text
    assert value(text, "e2e_last_seen") == 42
    assert value(text, "e2e_sample_count") == REQUESTS
    assert value(text, "e2e_sample_sum") == 12 * REQUESTS
    assert value(text, 'e2e_sample_bucket{le="10"}') == 0
    assert value(text, 'e2e_sample_bucket{le="25"}') == REQUESTS
    # proxy_get_metric read the combined counter: each request saw the count so far
    seen = re.findall(r"conf request_headers get_metric status=0 out=(\d+)", gateway.logs())
    assert sorted(int(n) for n in seen) == list(range(1, REQUESTS + 1))
    # gateway and per-plugin stats: summed over the workers
    assert value(text, "wasmgate_requests_total") == REQUESTS
    assert value(text, 'wasmgate_responses_total{code="200"}') == REQUESTS
    assert value(text, "wasmgate_request_duration_seconds_count") == REQUESTS
    assert value(text, 'wasmgate_request_duration_seconds_bucket{le="+Inf"}') == REQUESTS
    assert value(text, f'wasmgate_plugin_streams_total{{plugin="{PLUGIN}"}}') == REQUESTS
    assert value(text, f'wasmgate_plugin_callbacks_total{{plugin="{PLUGIN}"}}') >= REQUESTS
    assert value(text, f'wasmgate_plugin_ready{{plugin="{PLUGIN}"}}') == 1
    memory = [w["plugins"][0]["memory_bytes"] for w in workers(gateway)]
    assert value(text, f'wasmgate_plugin_vm_memory_bytes{{plugin="{PLUGIN}"}}') == sum(memory)
    assert value(text, 'wasmgate_worker_up{worker="0"}') == 1
    assert value(text, 'wasmgate_worker_up{worker="1"}') == 1
    assert value(text, "wasmgate_plugin_metrics_refused_total") == 0
    assert "# TYPE wasmgate_plugin_metrics_refused_total counter" in text
    # each worker still answers for itself
    own = gateway.admin_json("/stats/worker")
    assert own["worker"] == 0 and 0 < own["gateway"]["requests"] < REQUESTS


def test_a_stopped_or_dead_worker_does_not_break_the_scrape(start_gateway: Start,
                                                             upstream: str) -> None:
    gateway = start(start_gateway, upstream)
    send(gateway, REQUESTS)
    assert value(scrape(gateway), "wasmgate_requests_total") == REQUESTS
    pid = workers(gateway)[1]["pid"]
    os.kill(pid, signal.SIGSTOP)  # slow: worker 0 waits WORKER_TIMEOUT, then goes on
    try:
        text = scrape(gateway)
        assert value(text, 'wasmgate_worker_up{worker="1"}') == 0
        # its last numbers stay in the sums: counters never go backwards
        assert value(text, "wasmgate_requests_total") == REQUESTS
        assert value(text, "e2e_requests_total") == REQUESTS
        assert workers(gateway)[1]["state"] == "not answering"
    finally:
        os.kill(pid, signal.SIGCONT)
    with no_respawn(gateway):
        os.kill(pid, signal.SIGKILL)
        wait_exited(gateway, 1)
        assert gateway.admin_get("/ready") == (200, b"LIVE\n")  # an exited worker is left out
        send(gateway, 5)  # all served by worker 0 now
        text = scrape(gateway)
        assert value(text, 'wasmgate_worker_up{worker="1"}') == 0
        assert value(text, "wasmgate_requests_total") == REQUESTS + 5
        assert value(text, "e2e_requests_total") == REQUESTS + 5


def worker_lines(gateway: Gateway, index: int, needle: str) -> int:
    """How many log lines of worker `index` contain `needle`."""
    tag = f"[wasmgate-worker-{index}]"
    return sum(1 for line in gateway.logs().splitlines() if tag in line and needle in line)


TRACED = "[host->vm] proxy_on_request_headers("
LOGGED = "conf request_headers get_metric"  # the plugin's own log line (info)


def test_logging_applies_to_every_worker(start_gateway: Start, upstream: str) -> None:
    gateway = start(start_gateway, upstream)
    send(gateway, REQUESTS)
    assert worker_lines(gateway, 0, TRACED) == worker_lines(gateway, 1, TRACED) == 0
    assert worker_lines(gateway, 0, LOGGED) and worker_lines(gateway, 1, LOGGED)
    # a plugin by name, through worker 0's admin: both workers trace it
    reply = gateway.admin_post_json(f"/logging?{PLUGIN}=trace")
    assert reply["changed"] == {PLUGIN: "trace"}
    assert [(w["worker"], w["state"], w["changed"]) for w in reply["workers"]] \
        == [(0, "up", {PLUGIN: "trace"}), (1, "up", {PLUGIN: "trace"})]
    assert all(w["levels"] == {PLUGIN: "trace"} for w in reply["workers"])
    send(gateway, REQUESTS)
    assert worker_lines(gateway, 0, TRACED) and worker_lines(gateway, 1, TRACED)
    # all=: both workers stop logging below error
    reply = gateway.admin_post_json("/logging?all=error")
    assert [w["changed"] for w in reply["workers"]] == [{PLUGIN: "error"}] * 2
    before = [worker_lines(gateway, i, n) for i in (0, 1) for n in (TRACED, LOGGED)]
    send(gateway, REQUESTS)
    assert [worker_lines(gateway, i, n) for i in (0, 1) for n in (TRACED, LOGGED)] == before
    # GET without a change lists every worker's levels
    listed = gateway.admin_json("/logging")
    assert [w["levels"] for w in listed["workers"]] == [{PLUGIN: "error"}] * 2
    # a bad level or name changes nothing anywhere
    assert gateway.admin_post("/logging?all=loud")[0] == 400
    assert gateway.admin_post(f"/logging?{PLUGIN}=info&nobody=info")[0] == 404
    assert [w["levels"] for w in gateway.admin_json("/logging")["workers"]] \
        == [{PLUGIN: "error"}] * 2
    # a worker that does not answer is reported, the others still changed
    pid = workers(gateway)[1]["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        status, body = gateway.admin_post(f"/logging?{PLUGIN}=info")
    finally:
        os.kill(pid, signal.SIGCONT)
    assert status == 200, body
    reply = json.loads(body)
    assert reply["changed"] == {PLUGIN: "info"}
    assert [(w["worker"], w["state"]) for w in reply["workers"]] \
        == [(0, "up"), (1, "not answering")]
    assert "error" in reply["workers"][1] and "changed" not in reply["workers"][1]


def test_an_exited_workers_gauges_leave_the_sums(start_gateway: Start, upstream: str) -> None:
    gateway = start(start_gateway, upstream)
    send(gateway, REQUESTS)
    memory = f'wasmgate_plugin_vm_memory_bytes{{plugin="{PLUGIN}"}}'
    pid = workers(gateway)[1]["pid"]
    with no_respawn(gateway):
        os.kill(pid, signal.SIGKILL)
        wait_exited(gateway, 1)
        text = scrape(gateway)
        own = gateway.admin_json("/stats/worker")["plugins"][0]["memory_bytes"]
    assert own > 0 and value(text, memory) == own  # worker 0's VM only
    assert value(text, f'wasmgate_plugin_ready{{plugin="{PLUGIN}"}}') == 1
    # counters keep the exited worker's last numbers
    assert value(text, "wasmgate_requests_total") == REQUESTS
    assert value(text, f'wasmgate_plugin_streams_total{{plugin="{PLUGIN}"}}') == REQUESTS


def test_ready_answers_quickly_with_a_stuck_worker(start_gateway: Start, upstream: str) -> None:
    gateway = start(start_gateway, upstream)
    pid = workers(gateway)[1]["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        began = time.monotonic()
        status, body = gateway.admin_get("/ready")
        took = time.monotonic() - began
    finally:
        os.kill(pid, signal.SIGCONT)
    assert status == 503 and b"worker 1" in body and b"not answering" in body, body
    assert took < 0.8, f"/ready took {took:.2f} s"  # within a 1 s kubelet probe timeout
    deadline = time.monotonic() + 10
    while gateway.admin_get("/ready") != (200, b"LIVE\n"):
        assert time.monotonic() < deadline, gateway.admin_get("/ready")
        time.sleep(0.05)


def test_a_reused_pid_is_an_exited_worker(start_gateway: Start, upstream: str) -> None:
    gateway = start(start_gateway, upstream)
    [path] = glob.glob(f"/dev/shm/wasmgate-metrics-{gateway.process.pid}-*")
    store = ProcessMetricStore.attach(path)
    try:
        pid, _, started = store.worker_entries()[1]
        assert started > 0
        with no_respawn(gateway):
            os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
            # the pid now names another live process (this one), started at another time
            store.set_worker(1, pid=os.getpid(), start=started)
            assert workers(gateway)[1]["state"] == "exited"
            assert gateway.admin_get("/ready") == (200, b"LIVE\n")
    finally:
        store.close()


def test_a_killed_worker_is_respawned(start_gateway: Start, upstream: str) -> None:
    gateway = start(start_gateway, upstream)
    send(gateway, REQUESTS)
    before = scrape(gateway)
    assert value(before, "wasmgate_requests_total") == REQUESTS
    streams = value(before, f'wasmgate_plugin_streams_total{{plugin="{PLUGIN}"}}')
    old = workers(gateway)[1]["pid"]
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while not ((w := workers(gateway)[1])["pid"] != old and w["state"] == "up"
               and w["plugins"] and w["plugins"][0]["status"] == "ready"):
        assert time.monotonic() < deadline, w
        time.sleep(0.05)
    assert gateway.admin_get("/ready") == (200, b"LIVE\n")
    assert f"worker 1 (pid {old}) was killed by signal SIGKILL" in gateway.logs()
    # counters never go backwards: the old process's last numbers stay in the sums
    text = scrape(gateway)
    assert value(text, "wasmgate_requests_total") == REQUESTS
    assert value(text, f'wasmgate_plugin_streams_total{{plugin="{PLUGIN}"}}') == streams
    assert value(text, 'wasmgate_worker_up{worker="1"}') == 1
    send(gateway, REQUESTS)  # both workers serve again
    new = workers(gateway)
    assert new[1]["plugins"][0]["streams"] > 0, new
    text = scrape(gateway)
    assert value(text, "wasmgate_requests_total") == 2 * REQUESTS
    assert value(text, 'wasmgate_request_duration_seconds_count') == 2 * REQUESTS
    assert value(text, f'wasmgate_plugin_streams_total{{plugin="{PLUGIN}"}}') \
        == streams + REQUESTS
    assert value(text, "e2e_requests_total") == 2 * REQUESTS
    # gauges: the live processes' only
    memory = [w["plugins"][0]["memory_bytes"] for w in new]
    assert value(text, f'wasmgate_plugin_vm_memory_bytes{{plugin="{PLUGIN}"}}') == sum(memory)
    assert value(text, f'wasmgate_plugin_ready{{plugin="{PLUGIN}"}}') == 1
    # SIGTERM to the parent: every worker drains and stops, none is respawned, exit 0
    pids = [w["pid"] for w in new]
    gateway.process.send_signal(signal.SIGTERM)
    assert gateway.process.wait(20) == 0
    assert gateway.logs().count("starting a new one") == 1
    assert not [pid for pid in pids if _alive(pid)]


def test_a_worker_killed_again_and_again_is_respawned(start_gateway: Start,
                                                      upstream: str) -> None:
    gateway = start(start_gateway, upstream)
    for round_ in range(1, 3):  # the second within seconds of the first: a longer backoff
        send(gateway, REQUESTS)
        old = workers(gateway)[1]["pid"]
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while (w := workers(gateway)[1])["pid"] == old or w["state"] != "up" \
                or gateway.admin_get("/ready")[0] != 200:  # its plugins loaded too
            assert time.monotonic() < deadline, w
            time.sleep(0.05)
        assert value(scrape(gateway), "wasmgate_requests_total") == round_ * REQUESTS
    assert "starting a new one in 0.5 s" in gateway.logs()
    assert "starting a new one in 1 s" in gateway.logs()
    send(gateway, 5)
    assert value(scrape(gateway), "wasmgate_requests_total") == 2 * REQUESTS + 5


def test_a_respawned_worker_0_serves_the_admin_again(start_gateway: Start,
                                                     upstream: str) -> None:
    gateway = start(start_gateway, upstream)
    send(gateway, REQUESTS)
    old = gateway.admin_json("/stats/worker")["pid"]
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while True:  # the admin address is bound again, by the new worker 0
        assert time.monotonic() < deadline, gateway.logs()
        try:
            if gateway.admin_json("/stats/worker")["pid"] != old \
                    and gateway.admin_get("/ready")[0] == 200:
                break
        except OSError:
            pass
        time.sleep(0.05)
    assert [w["state"] for w in workers(gateway)] == ["up", "up"]
    send(gateway, 5)
    assert value(scrape(gateway), "e2e_requests_total") == REQUESTS + 5
    gateway.process.send_signal(signal.SIGTERM)
    assert gateway.process.wait(20) == 0


def test_a_worker_that_cannot_start_stops_the_gateway(start_gateway: Start,
                                                      upstream: str) -> None:
    with socket.socket() as busy:  # worker 0's admin port is taken: it exits 1
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        gateway = start_gateway(gateway_doc(upstream) + conformance("counting", STEPS),
                                "--workers", "2", "--admin", f"127.0.0.1:{port}", wait=False)
        assert gateway.process.wait(60) == 1, gateway.logs()
    assert "before it started: stopping the gateway" in gateway.logs()
    assert "starting a new one" not in gateway.logs()


def test_workers_stop_and_clean_up_when_the_parent_is_killed(start_gateway: Start,
                                                            upstream: str) -> None:
    """A SIGKILLed (or OOM-killed) parent cannot stop its workers: they get SIGTERM from the
    kernel (PR_SET_PDEATHSIG), drain, stop, and remove the shared files the parent would
    have; the port is free again."""
    gateway = start(start_gateway, upstream)
    send(gateway, REQUESTS)
    parent = gateway.process.pid
    files = glob.glob(f"/dev/shm/wasmgate-*-{parent}-*")
    assert len(files) == 2, files  # shared data (and queues), plugin metrics
    kill_parent_and_wait_for(gateway, [w["pid"] for w in workers(gateway)])
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", gateway.port)) != 0


def _children(pid: int) -> list[int]:
    found = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = Path(stat).read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.split("/")[2]))
    return found


def test_workers_of_a_parent_killed_while_they_start_clean_up(start_gateway: Start,
                                                              upstream: str) -> None:
    """The parent dies while its workers are still importing and loading (before their event
    loop handles SIGTERM): they stop all the same and remove the shared files."""
    gateway = start_gateway(gateway_doc(upstream) + conformance("counting", STEPS),
                            "--workers", "2", wait=False)
    parent = gateway.process.pid
    deadline = time.monotonic() + 20
    while len(glob.glob(f"/dev/shm/wasmgate-*-{parent}-*")) < 2 or len(_children(parent)) < 2:
        assert time.monotonic() < deadline, gateway.logs()
        time.sleep(0.005)
    kill_parent_and_wait_for(gateway, _children(parent))


def kill_parent_and_wait_for(gateway: Gateway, pids: list[int]) -> None:
    """SIGKILL the gateway's parent process: `pids` (its workers) stop within 30 s and the
    shared files are gone."""
    parent = gateway.process.pid
    os.kill(parent, signal.SIGKILL)
    gateway.process.wait(10)
    deadline = time.monotonic() + 30
    while [pid for pid in pids if _alive(pid)]:
        assert time.monotonic() < deadline, [pid for pid in pids if _alive(pid)]
        time.sleep(0.05)
    assert glob.glob(f"/dev/shm/wasmgate-*-{parent}-*") == []


def test_log_rotation_during_a_respawn_does_not_kill_the_new_worker(start_gateway: Start,
                                                                   upstream: str) -> None:
    """SIGUSR1 (logrotate) or SIGHUP reaches only listening workers: one still starting has
    no handler yet, and would die of it (a review found it did)."""
    gateway = start(start_gateway, upstream)
    os.kill(workers(gateway)[1]["pid"], signal.SIGKILL)  # respawned after 0.5 s
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:  # logrotate's postrotate, meanwhile
        gateway.process.send_signal(signal.SIGUSR1)
        time.sleep(0.02)
    deadline = time.monotonic() + 30
    while not ((w := workers(gateway)[1])["state"] == "up" and w["plugins"]
               and w["plugins"][0]["status"] == "ready"):
        assert time.monotonic() < deadline, w
        time.sleep(0.05)
    assert "killed by signal SIGUSR1" not in gateway.logs()
    assert gateway.process.poll() is None
