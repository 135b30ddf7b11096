"""A Python that has imported splittrain, Lightning, transformers and peft once, and forks the tests' processes.

Every ``python -m splittrain ...`` spends about 6 s of CPU importing its libraries before it does anything; the
multi-process tests start well over a hundred of them. ``python tests/zygote.py SOCKET`` imports them once (it
starts no Python thread, so forking it is safe) and then, for each request on its Unix socket, forks twice: the
grandchild becomes the requested process in a session of its own (``setsid``: its pid is its group, as with
``Popen(start_new_session=True)``), with the request's argv, environment, working folder, stdout and stderr;
the middle process exits at once, so the kernel hands the grandchild to the test process, which made itself a
child subreaper. The test then waits for it, and kills it, by its pid like any child of its own
(:class:`processes.Forked`).

A request is one JSON line ``{"argv": [...], "env": {...}, "cwd": "...", "stdout": "...", "stderr": "..."}``
(files it appends to; the same one for both, or two) where argv is
``["-m", "splittrain", ...]`` or ``["-c", SCRIPT, ...]``; the answer is one line ``{"pid": N}``.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import runpy
import signal
import socket
import sys
import threading

WARM = ("splittrain", "splittrain.cli", "splittrain.data", "splittrain.modules", "lightning.pytorch",
        "lightning.pytorch.cli", "transformers", "peft", "safetensors.torch", "torchmetrics")
"""What ``fit`` and ``serve`` import anyway (splittrain first: it sets GOMP_SPINCOUNT before torch loads)."""
PR_SET_PDEATHSIG = 1


def become(request: dict) -> None:
    """Turn this (forked) process into the requested one; returns only through its code's SystemExit."""
    os.setsid()
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    for fd, name in ((1, "stdout"), (2, "stderr")):
        log = os.open(request[name], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(log, fd)
        os.close(log)
    argv = request["argv"]
    sys.path[0] = os.getcwd() if argv[0] == "-m" else ""  # as python -m / -c set it (here: this file's folder)
    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = ["-c", *argv[2:]]
        exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
    raise SystemExit(0)


def main(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)  # go when the test process goes, however it ends
    for name in WARM:
        __import__(name)
    # No Python thread may run at a fork. The native ones the imports start (numpy's OpenBLAS pool, pyarrow's
    # jemalloc background thread) stop and restart around a fork themselves (pthread_atfork), as they must for
    # datasets' forked workers.
    if threading.active_count() != 1:
        raise SystemExit(f"zygote: Python threads after the imports: {threading.enumerate()}; not forking")
    gc.freeze()  # the collector leaves the imported objects alone, so forked processes share their pages longer
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    print("ready", flush=True)
    while True:
        conn, _ = listener.accept()
        with conn, conn.makefile("rwb") as stream:
            request = json.loads(stream.readline())
            readable, writable = os.pipe()
            middle = os.fork()
            if middle == 0:
                worker = -1
                try:  # the middle process: fork the worker, pass its pid up, and go
                    listener.close()
                    os.close(readable)
                    worker = os.fork()
                    if worker == 0:
                        os.close(writable)
                        stream.close()
                        conn.close()
                        become(request)
                    os.write(writable, str(worker).encode())
                finally:
                    if worker != 0:
                        os._exit(0)
            os.close(writable)
            with os.fdopen(readable, "rb") as pipe:
                worker = int(pipe.read())
            os.waitpid(middle, 0)  # gone: the worker is the test process's child now, so tell its pid
            stream.write(json.dumps({"pid": worker}).encode() + b"\n")
            stream.flush()


if __name__ == "__main__":
    main(sys.argv[1])
