"""The generation grid benchmark: its smoke run (every cell's tokens equal transformers'), its cells and its relay."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from argparse import Namespace
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from generate_grid import cells, relay  # noqa: E402


def test_smoke_grid_tokens_equal_transformers(tmp_path: Path) -> None:
    out = tmp_path / "grid.json"
    proc = subprocess.Popen([sys.executable, str(BENCHMARKS / "generate_grid.py"), "--smoke", "--out", str(out)],
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        log, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:  # the grid and its trunk servers: one process group
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, log
    data = json.loads(out.read_text())
    assert len(data["cells"]) == 4  # two cells per dtype
    assert {c["dtype"] for c in data["cells"]} == {"float32", "bfloat16"}
    for cell in data["cells"]:
        runs = cell["runs"]
        assert set(runs) == {"transformers", "in process", "tcp"}
        assert all(run["same_tokens"] for run in runs.values()), cell
        tcp = runs["tcp"]
        assert tcp["round_trips_per_step"] == 1.0
        payload = sum(tcp["cut_bytes_per_step"].values())
        assert payload <= tcp["wire_bytes_per_step"] < payload + 4096  # frames add headers only
        assert tcp["server_peak_rss_mib"] > 0 and tcp["memory_mib"]["server_kv_cache"] > 0


def test_cells_cap_new_tokens_at_the_context() -> None:
    args = Namespace(dtypes=["float32"], batches=[1], inputs=[32, 64], outputs=[16, 64])
    assert cells(args, 64) == [("float32", 1, 32, 16, False), ("float32", 1, 32, 32, True)]


def test_relay_delays_each_direction_and_keeps_the_bytes() -> None:
    listener = socket.create_server(("127.0.0.1", 0))

    def echo() -> None:
        conn, _ = listener.accept()
        with conn:
            while data := conn.recv(1 << 16):
                conn.sendall(data)

    threading.Thread(target=echo, daemon=True).start()
    host, port = relay("127.0.0.1", listener.getsockname(), 0.05).rsplit(":", 1)
    payload = os.urandom(300_000)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        start = time.perf_counter()
        sock.sendall(payload)
        got = b""
        while len(got) < len(payload):
            got += sock.recv(1 << 16)
        elapsed = time.perf_counter() - start
    listener.close()
    assert got == payload
    assert 0.1 <= elapsed < 2.0  # 50 ms each way
