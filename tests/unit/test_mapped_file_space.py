"""The --workers files on a small tmpfs (a container's /dev/shm is 64 MB by default).

Their pages are reserved before they are written, so running out of space is a refused
operation (INTERNAL_FAILURE, a metric kept per worker) or a clear error at startup, never a
SIGBUS that kills the worker (which it was: exit 135 on a 4 MiB tmpfs). The tmpfs is mounted
in a user + mount namespace (`unshare`), so no root is needed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from ..conftest import missing

CHILD = r"""
import json, sys
from wasmgate.gateway.mapped_file import NoSpace
from wasmgate.gateway.shared_metrics import ProcessMetricStore
from wasmgate.gateway.shared_store import ProcessSharedData
from wasmgate.runtime.abi import MetricType

where = sys.argv[1]
out = {}
try:  # a table alone bigger than the tmpfs: refused when the store is made
    ProcessSharedData.create(where, slots=1 << 20)
except NoSpace as exc:
    out["create"] = str(exc)
store = ProcessSharedData.create(where, slots=1024, arena_bytes=64 << 20)
statuses = [int(store.set("vm", b"k%d" % i, b"x" * (256 << 10), 0)) for i in range(40)]
out["statuses"] = statuses
out["first_kept"] = store.get("vm", b"k0") is not None
metrics = ProcessMetricStore.create(sys.argv[2], arena_bytes=32 << 20)  # a tmpfs of its own
kinds = [type(metrics.define(MetricType.COUNTER, "m%d." % i + "n" * 60000)).__name__
         for i in range(100)]
out["metric_kinds"] = sorted(set(kinds))
print(json.dumps(out))
"""


def test_a_full_tmpfs_refuses_instead_of_crashing(tmp_path: Path) -> None:
    unshare = shutil.which("unshare")
    if unshare is None:
        missing("unshare (util-linux) is needed to mount a small tmpfs without root")
    mount, other = tmp_path / "shm", tmp_path / "shm2"
    mount.mkdir()
    other.mkdir()
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    result = subprocess.run(
        [unshare, "--user", "--map-root-user", "--mount", "sh", "-c",
         f"mount -t tmpfs -o size=4m tmpfs {mount} && mount -t tmpfs -o size=4m tmpfs {other}"
         f" && exec {sys.executable} {script} {mount} {other}"],
        capture_output=True, text=True, timeout=60)
    if "mount" in result.stderr and result.returncode != 0 and not result.stdout:
        missing(f"cannot mount a tmpfs in a user namespace here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr  # (was 135: SIGBUS)
    out = json.loads(result.stdout)
    assert "cannot reserve" in out["create"] and str(mount) in out["create"]
    assert "No space left on device" in out["create"]
    statuses = out["statuses"]
    ok = statuses.count(0)
    assert 5 < ok < 16 and statuses == [0] * ok + [10] * (40 - ok)  # then INTERNAL_FAILURE
    assert out["first_kept"]
    assert f"no space left in {mount} for shared data" in result.stderr
    # metrics past the space: kept by this worker (not shared), with a warning
    assert out["metric_kinds"] == ["MetricValues", "SharedMetric"]
    assert "the shared metrics file is full (no space left in" in result.stderr
