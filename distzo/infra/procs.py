"""Starting and stopping service processes (zoctl up, tests): spawned, announced, reaped; and the worker's
command line, which ``distzo-worker-launch`` and ``zoctl up``'s local cluster both start."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence


class ServiceFailed(RuntimeError):
    """A service process exited or did not announce itself in time; ``code``: its exit code, if it exited."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.code = code


@dataclass
class ServiceProcess:
    name: str
    argv: list[str]
    ready_file: Path
    log_path: Path
    proc: subprocess.Popen | None = None
    info: dict = field(default_factory=dict)
    pass_fds: tuple[int, ...] = ()  # open files the process inherits (zoctl up: its run directory's lock)

    def start(self, timeout_s: float = 120.0, env: dict[str, str] | None = None) -> dict:
        """Start the process (its own session, so a kill reaches its children) and wait for its ready file."""
        self.spawn(env)
        return self.wait_ready(timeout_s)

    def spawn(self, env: dict[str, str] | None = None) -> None:
        """Start the process without waiting for it (``wait_ready`` waits)."""
        self.ready_file.unlink(missing_ok=True)
        self.popen(env)

    def popen(self, env: dict[str, str] | None = None) -> None:
        """The process itself: its own session (a kill reaches its children), its log, ``pass_fds`` inherited."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, env={**os.environ, **(env or {})},
                                         pass_fds=self.pass_fds)

    def wait_ready(self, timeout_s: float = 120.0) -> dict:
        """Wait for the spawned process's ready file and return what it announced.

        Raises ServiceFailed when it exits first (with its exit code) or is not ready in ``timeout_s``
        seconds (then it is killed)."""
        assert self.proc is not None, "spawn() first"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.ready_file.is_file():
                self.info = json.loads(self.ready_file.read_text())
                return self.info
            code = self.proc.poll()
            if code is not None:
                raise ServiceFailed(f"{self.name} exited with code {code} while starting:\n{self.tail()}", code)
            time.sleep(0.05)
        self.kill()
        raise ServiceFailed(f"{self.name} did not become ready in {timeout_s:.0f}s:\n{self.tail()}")

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after the timeout; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.kill(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill(signal.SIGKILL)
                self.proc.wait(5)
        return self.proc.returncode


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


READY = "ready:"  # an address given as "ready:PATH": read it from that service's ready file once it is written


def address_flags(flag: str, address: str) -> list[str]:
    """Command-line flags naming a service: ``[flag, address]``, or for ``ready:PATH``
    ``[flag + "-from", PATH]`` (the process waits for that ready file: ``address_from_ready_file``)."""
    if address.startswith(READY):
        return [flag + "-from", address[len(READY):]]
    return [flag, address]


def worker_command(coordinator: str, param_servers: Sequence[str], device: str, worker_id: str,
                   credentials: Mapping[str, str | None], node: tuple[int, int, str, str] | None = None,
                   extra: Sequence[str] = ()) -> list[str]:
    """The command line of one worker process (``python -m gpuworker``): what ``distzo-worker-launch`` and
    ``zoctl up``'s local cluster both start.

    ``coordinator``: its address, or ``ready:PATH``, its ready file (``--coordinator-from``: the worker
    waits for it); ``credentials``: token_file, tls_ca, tls_cert, tls_key (None or empty: not passed);
    ``node``: a node group member's (rank, size, rendezvous HOST:PORT or file:// URL, node id); ``extra``:
    more flags."""
    where = address_flags("--coordinator", coordinator)
    argv = [sys.executable, "-m", "gpuworker", *where, "--device", device, "--worker-id", worker_id]
    for s in param_servers:
        argv += ["--param-server", s]
    for flag in ("token_file", "tls_ca", "tls_cert", "tls_key"):
        if credentials.get(flag):
            argv += [f"--{flag.replace('_', '-')}", str(credentials[flag])]
    if node is not None:
        rank, size, rendezvous, node_id = node
        argv += ["--node-rank", str(rank), "--node-size", str(size), "--node-master", rendezvous, "--node-id", node_id]
    return argv + list(extra)


def address_from_ready_file(path: str | Path, timeout_s: float = 300.0) -> str:
    """The ``address`` a service announces in its ready file, waiting up to ``timeout_s`` seconds for the
    file (written atomically once the service serves).

    Lets ``zoctl up`` start a process before the one it connects to is up: both import torch at the same
    time, and the client reads the address once it is known. Raises TimeoutError."""
    path = Path(path)
    deadline = time.monotonic() + timeout_s
    while not path.is_file():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear in {timeout_s:.0f} s (the service it names did not start)")
        time.sleep(0.05)
    return str(json.loads(path.read_text())["address"])


SUPERVISOR_ENV = "DISTZO_SUPERVISOR_PID"  # set by zoctl up for its services: they end when it is gone


def end_with_supervisor(poll_s: float = 0.5) -> None:
    """In a service started by ``zoctl up`` (``SUPERVISOR_ENV`` names its pid): end this process with
    SIGTERM, its clean shutdown, as soon as the supervisor is gone, however it died (SIGKILL, the OOM
    killer), so that no service trains on unsupervised beside a resumed run.

    A thread watches the parent pid (it changes when the parent dies: the orphan is re-parented).
    Not PR_SET_PDEATHSIG: that fires when the *thread* that forked the child ends, and a supervisor
    may start processes from any thread. Nothing happens without the variable (a service run by hand)."""
    import threading

    text = os.environ.get(SUPERVISOR_ENV, "")
    if not text.isdigit():
        return
    supervisor = int(text)

    def watch() -> None:
        while os.getppid() == supervisor:
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="supervisor-watch", daemon=True).start()
