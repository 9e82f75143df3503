"""CPU accounting of launched servers: a launcher's worker processes are the server's, not "other"."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from dsjax.bench.servers import ServerProcess

# A parent that starts one child, which spins ~0.4 s of CPU, then both sleep.
_PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c",
    "import time\\nt = time.process_time()\\nwhile time.process_time() - t < 0.4: pass\\nprint('done', flush=True)\\ntime.sleep(60)"],
    stdout=subprocess.PIPE)
child.stdout.readline()
print('ready', flush=True)
time.sleep(60)
"""


def test_descendants_cpu_counts_worker_processes_not_the_parent(tmp_path: Path):
    proc = subprocess.Popen([sys.executable, "-c", _PARENT], stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == b"ready"
        server = ServerProcess(name="router", proc=proc, core=None, log_path=tmp_path / "log")
        workers = server.descendants_cpu_seconds()
        own = server.cpu_seconds()
        assert workers is not None and workers >= 0.3, workers  # the child's spin
        assert own is not None and own < workers  # the parent only waited
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the parent and its child
        proc.wait()
    assert server.descendants_cpu_seconds() is None  # gone


def test_a_process_without_children_reports_none(tmp_path: Path):
    proc = subprocess.Popen([sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(60)"],
                            stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(0.05)
        assert ServerProcess(name="replica-0", proc=proc, core=None, log_path=tmp_path / "log").descendants_cpu_seconds() is None
    finally:
        proc.kill()
        proc.wait()
