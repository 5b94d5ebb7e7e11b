"""`wasmgate run --workers 2`: shared queues are one set across the worker processes.

As across Envoy's worker threads: an item enqueued in one worker can be dequeued in the other
(once), and ``on_queue_ready`` goes to whichever VM registered the queue last, in its own
worker, wherever the enqueue happened. Log lines name their worker (``[wasmgate-worker-N]``).
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable

from .conftest import Gateway
from .test_gateway import conformance, gateway_doc
from .test_shared_workers import REQUESTS, get, worker0_requests

Start = Callable[..., Gateway]
EMPTY = "7"


def test_an_item_enqueued_in_one_worker_is_dequeued_in_the_other(start_gateway: Start,
                                                                  upstream: str) -> None:
    # each request takes the item the previous request left, then leaves one
    steps = ["configure register_shared_queue s:jobs",
             "request_headers resolve_shared_queue s: s:jobs",
             "request_headers dequeue_shared_queue $token",
             "request_headers enqueue_shared_queue $token s:job"]
    gateway = start_gateway(gateway_doc(upstream) + conformance("queues", steps),
                            "--workers", "2")
    for i in range(REQUESTS):
        assert get(gateway, f"/r{i}") == 200
    assert 0 < worker0_requests(gateway) < REQUESTS
    logs = gateway.logs()
    dequeues = re.findall(r"conf request_headers dequeue_shared_queue status=(\d+) out=(\S*)",
                          logs)
    # per-worker queues would leave each worker's first request EMPTY: two of them
    assert dequeues == [(EMPTY, "")] + [("0", "job")] * (REQUESTS - 1)
    resolved = set(re.findall(r"conf request_headers resolve_shared_queue status=0 out=(\d+)",
                              logs))
    registered = set(re.findall(r"conf configure register_shared_queue status=0 out=(\d+)",
                                logs))
    assert len(resolved) == 1 and resolved == registered  # one token for the queue everywhere


def test_on_queue_ready_reaches_the_owner_worker(start_gateway: Start, upstream: str) -> None:
    steps = ["configure register_shared_queue s:jobs",
             "request_headers resolve_shared_queue s: s:jobs",
             "request_headers enqueue_shared_queue $token s:job",
             "queue_ready dequeue_shared_queue $token"]
    gateway = start_gateway(gateway_doc(upstream) + conformance("queues", steps),
                            "--workers", "2")
    for i in range(REQUESTS):
        assert get(gateway, f"/r{i}") == 200
    assert 0 < worker0_requests(gateway) < REQUESTS

    def by_worker(pattern: str) -> Counter[str]:
        found = re.findall(r"\[(wasmgate-worker-\d+)\] .*" + pattern, gateway.logs())
        return Counter(found)

    enqueued = by_worker(r"conf request_headers enqueue_shared_queue status=0")
    assert sum(enqueued.values()) == REQUESTS and len(enqueued) == 2  # both workers enqueued

    def all_delivered() -> bool:
        return sum(by_worker(r"conf queue_ready dequeue_shared_queue status=0 out=job")
                   .values()) == REQUESTS

    deadline = time.monotonic() + 30  # wake-ups are asynchronous: wait for them, bounded
    while not all_delivered() and time.monotonic() < deadline:
        time.sleep(0.05)
    woken = by_worker(r"conf queue_ready dequeue_shared_queue status=0 out=job")
    # every wake-up, from both workers' enqueues, went to the one owner
    assert len(woken) == 1 and sum(woken.values()) == REQUESTS
