"""``--workers N``: run a recipe (``rcomp run``, ``rcomp demo``) in N local processes, without torchrun.

:func:`launch` starts N copies of the same command (this interpreter, ``-m rcomp``) with the environment
torchrun would give them (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT: a free local port found
now), so the engine's torchrun path (:func:`rcomp.recipes.engine._run_sharded`) is what runs. Each worker
gets ``OMP_NUM_THREADS`` = max(1, cores // N) unless the environment sets it. The workers' output comes
back through pipes, line by line (rank 0's stdout is the command's), so lines never mix. When a worker
fails, the others are given a moment to stop on their own (they take no new stage and stop once theirs ends) and are
then terminated; their output after the failure is dropped, so the failure is said once. Ctrl-C or SIGTERM
terminates every worker (they remove their temporary files) and then kills any left, so none outlives the
command. Pure Python: torch is loaded by the workers only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from rcomp.errors import RcompError

#: how long the other workers get to stop on their own after one failed, then after SIGTERM
GRACE_S = 10.0
#: the environment variables a launcher of a process group sets
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def cores() -> int:
    """CPU cores this process may run on (its affinity; the machine's count where there is none)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def threads_per_worker(n: int, environ: dict | None = None) -> str:
    """OMP_NUM_THREADS of each of ``n`` workers: the environment's when set, else max(1, cores // n)."""
    environ = os.environ if environ is None else environ
    return environ.get("OMP_NUM_THREADS") or str(max(1, cores() // n))


def check_workers(n: int) -> None:
    """Refuse --workers > 1 inside a process group another launcher (torchrun) started."""
    from rcomp.train.distributed import launched

    if n > 1 and launched():
        raise RcompError(f"--workers {n}: this command already runs under torchrun (WORLD_SIZE is set); use "
                         "torchrun's --nproc-per-node or --workers, not both")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent():
    """A function for the child to run before exec (Linux): SIGTERM it when the launcher dies, even by
    SIGKILL (PR_SET_PDEATHSIG); None elsewhere. libc is loaded here, in the parent: nothing is imported
    between fork and exec."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def child() -> None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    return child


class _Relay(threading.Thread):
    """Copies a worker's stream to ``sink`` line by line (under ``lock``) until EOF; stops copying, still
    reading, once ``muted``."""

    def __init__(self, stream, sink, lock: threading.Lock):
        super().__init__(daemon=True)
        self.stream, self.sink, self.lock, self.muted = stream, sink, lock, False
        self.error: BaseException | None = None  # why the sink could not be written

    def run(self) -> None:
        for raw in iter(self.stream.readline, b""):
            if self.muted:
                continue
            line = raw.decode("utf-8", errors="replace")
            with self.lock:
                try:
                    self.sink.write(line)
                    self.sink.flush()
                except Exception as exc:  # noqa: BLE001 - the reader went away: keep draining the worker
                    self.muted, self.error = True, exc
        self.stream.close()


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM every running worker (each cleans up like Ctrl-C), then SIGKILL those still there."""
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def _code(rc: int) -> int:
    return 128 - rc if rc < 0 else rc  # killed by signal S: 128 + S, as a shell says


def launch(args: list[str], n: int, log) -> int:
    """Run ``rcomp ARGS`` in ``n`` worker processes forming one process group; returns the exit code (0,
    or the first failing worker's). ``log`` says the launch (stderr)."""
    port = free_port()
    threads = threads_per_worker(n)
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.update(WORLD_SIZE=str(n), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS=threads,
               LOCAL_WORLD_SIZE=str(n))
    log(f"running {n} worker processes on this machine ({threads} torch thread(s) each; "
        f"{'OMP_NUM_THREADS' if os.environ.get('OMP_NUM_THREADS') else f'{cores()} cores'} // workers)")
    lock = threading.Lock()
    before_exec = _die_with_parent()
    procs: list[subprocess.Popen] = []
    relays: list[_Relay] = []
    code = 0
    try:
        for rank in range(n):
            p = subprocess.Popen([sys.executable, "-m", "rcomp", *args], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE if rank == 0 else subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}, start_new_session=True,
                                 preexec_fn=before_exec)
            procs.append(p)
            streams = [(p.stderr, sys.stderr)] + ([(p.stdout, sys.stdout)] if rank == 0 else [])
            for stream, sink in streams:
                relays.append(_Relay(stream, sink, lock))
                relays[-1].start()
        by_proc = [[r for r in relays if r.stream in (p.stdout, p.stderr)] for p in procs]
        while True:
            failed = next((i for i, p in enumerate(procs) if p.poll() not in (None, 0)), None)
            if failed is not None:
                code = _code(procs[failed].returncode)
                deadline = time.monotonic() + GRACE_S  # the others stop once their running stage ends
                while time.monotonic() < deadline and any(p.poll() is None for p in procs):
                    time.sleep(0.05)
                for i, rs in enumerate(by_proc):  # the failure was said once, by the worker that failed
                    if i != failed:
                        for r in rs:
                            r.muted = True
                _stop(procs)
                break
            if all(p.poll() == 0 for p in procs):
                break
            time.sleep(0.05)
    except KeyboardInterrupt:
        for r in relays:
            r.muted = True
        _stop(procs)
        raise
    finally:
        for p in procs:  # never leave one behind
            if p.poll() is None:
                p.kill()
                p.wait()
        for r in relays:
            r.join(timeout=GRACE_S)
    lost = next((r.error for r in relays if r.error is not None), None)
    if lost is not None:  # the command's stdout or stderr went away: the caller says so as for one process
        raise lost
    return code
