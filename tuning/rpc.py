"""TVM RPC for measuring on a GPU box that is not this machine.

The usual set-up: a tracker and an RPC server run on the GPU box; ``tune`` runs anywhere (it
builds locally, cross-compiling for the target) and sends the built kernels through the tracker
to the server, which runs and times them::

    # on the GPU box
    python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port 9190
    python -m tvm.exec.rpc_server --tracker 127.0.0.1:9190 --key sm_90 --no-fork
    # here
    tune ... --arch sm_90 --rpc-tracker GPU_BOX:9190 --rpc-key sm_90

:class:`LocalRPC` starts the same processes on loopback (tests, or a local GPU through RPC).
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

__all__ = [
    "LocalRPC",
    "RPCServerProcess",
    "RPCTrackerError",
    "RPCTrackerProcess",
    "check_tracker",
    "free_port",
    "make_rpc_runner",
    "no_device_help",
    "parse_tracker",
]

logger = logging.getLogger(__name__)

DEFAULT_TRACKER_PORT = 9190


class RPCTrackerError(RuntimeError):
    """The tracker is unreachable or has no free server under the requested key."""


def parse_tracker(spec: str) -> tuple[str, int]:
    """Parse ``"HOST:PORT"`` (``"HOST"`` alone means port 9190).

    Raises
    ------
    ValueError
        On an empty host or a port that is not an integer in 1..65535.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("RPC tracker must be given as HOST:PORT, e.g. 192.168.1.5:9190")
    host, sep, port_s = spec.strip().rpartition(":")
    if not sep:
        host, port_s = spec.strip(), str(DEFAULT_TRACKER_PORT)
    host = host.strip("[]")  # [::1]:9190
    try:
        port = int(port_s)
    except ValueError:
        port = -1
    if not host or not 0 < port < 65536:
        raise ValueError(f"invalid RPC tracker {spec!r}: expected HOST:PORT, e.g. 192.168.1.5:9190")
    return host, port


def no_device_help(arch: str) -> str:
    """The message for ``tune --arch ARCH`` on a machine without that GPU and without a tracker."""
    key = arch
    return (
        f"no local GPU of arch {arch} to measure on. Tuning measures every candidate on the real "
        f"card, so attach one through TVM RPC. On the machine with the {arch} GPU run:\n"
        f"    python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port {DEFAULT_TRACKER_PORT}\n"
        f"    python -m tvm.exec.rpc_server --tracker 127.0.0.1:{DEFAULT_TRACKER_PORT} "
        f"--key {key} --no-fork\n"
        f"then here:\n"
        f"    tune ... --arch {arch} --rpc-tracker GPU_HOST:{DEFAULT_TRACKER_PORT} "
        f"--rpc-key {key}\n"
        f"(GPU_HOST is that machine's address; check it with "
        f"`python -m tvm.exec.query_rpc_tracker --host GPU_HOST --port {DEFAULT_TRACKER_PORT}`)."
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _tracker_summary(host: str, port: int, timeout: float) -> dict:
    """Tracker summary, or RPCTrackerError within ``timeout`` seconds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as err:
        raise RPCTrackerError(
            f"RPC tracker {host}:{port} is unreachable ({err}). Is the tracker running "
            f"(python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port {port}) and is the port open?"
        ) from err
    from tvm import rpc  # pylint: disable=import-outside-toplevel  # TVM (seconds) only once the tracker answered

    result: dict = {}

    def _query():
        try:
            result["summary"] = rpc.connect_tracker(host, port).summary()
        except Exception as err:  # pragma: no cover - depends on the network
            result["error"] = err

    t = threading.Thread(target=_query, daemon=True)
    t.start()
    t.join(timeout)
    if "summary" not in result:
        err = result.get("error", f"no answer within {timeout:.0f} s")
        raise RPCTrackerError(f"{host}:{port} does not answer as a TVM RPC tracker: {err}")
    return result["summary"]


def check_tracker(host: str, port: int, key: str, *, timeout: float = 10.0) -> dict:
    """Check that a tracker is reachable and has a free server under ``key``.

    Parameters
    ----------
    host, port : str, int
        The tracker address.
    key : str
        The device key the servers registered with (``--key``).
    timeout : float
        Seconds to wait for the tracker (and, if none is free yet, for a server to register).

    Returns
    -------
    dict
        The tracker's queue entry for ``key``: ``{"free": n, "pending": m}``.

    Raises
    ------
    RPCTrackerError
        Unreachable tracker, or no free server under ``key`` (the message lists the keys seen).
    """
    deadline = time.monotonic() + timeout
    while True:
        summary = _tracker_summary(host, port, max(1.0, deadline - time.monotonic()))
        queue = summary.get("queue_info", {})
        entry = queue.get(key)
        if entry and entry.get("free", 0) > 0:
            return dict(entry)
        if time.monotonic() >= deadline:
            break
        time.sleep(0.25)
    keys = sorted(k for k, v in queue.items() if v.get("free", 0) or v.get("pending", 0))
    if entry:
        detail = f"its {entry.get('pending', 0)} server(s) under key {key!r} are all busy"
    else:
        detail = f"no server registered under key {key!r}" + (
            f" (keys seen: {', '.join(keys)})" if keys else " (no servers at all)"
        )
    raise RPCTrackerError(
        f"RPC tracker {host}:{port}: {detail}. Start one on the GPU machine with "
        f"`python -m tvm.exec.rpc_server --tracker {host}:{port} --key {key} --no-fork`."
    )


def make_rpc_runner(
    host: str,
    port: int,
    key: str,
    *,
    number: int = 3,
    repeat: int = 1,
    min_repeat_ms: int = 100,
    enable_cpu_cache_flush: bool = False,
    session_timeout_sec: int = 60,
    max_workers: int = 1,
):
    """A MetaSchedule ``RPCRunner`` that measures through a tracker.

    Build with the (default) local builder: it cross-compiles here and the runner uploads the
    artifact. The server links it (``.tar``), so the GPU machine needs a C compiler.

    Parameters
    ----------
    host, port, key : str, int, str
        Tracker address and device key.
    number, repeat, min_repeat_ms, enable_cpu_cache_flush
        MetaSchedule ``EvaluatorConfig``: each of ``repeat`` timings averages ``number`` runs
        (raised until a timing lasts ``min_repeat_ms``).
    session_timeout_sec : int
        Limit for one RPC session (one candidate's upload and measurement).
    max_workers : int
        Concurrent sessions; keep 1 per server so measurements don't overlap on one GPU.

    Returns
    -------
    tvm.s_tir.meta_schedule.runner.RPCRunner
    """
    from tvm.s_tir.meta_schedule.runner import EvaluatorConfig, RPCConfig, RPCRunner  # pylint: disable=import-outside-toplevel  # rpc.py itself stays TVM-free for the server scripts

    rpc_config = RPCConfig(
        tracker_host=host,
        tracker_port=int(port),
        tracker_key=key,
        session_timeout_sec=int(session_timeout_sec),
    )
    evaluator = EvaluatorConfig(
        number=number,
        repeat=repeat,
        min_repeat_ms=min_repeat_ms,
        enable_cpu_cache_flush=enable_cpu_cache_flush,
    )
    return RPCRunner(rpc_config=rpc_config, evaluator_config=evaluator, max_workers=max_workers)


# --------------------------------------------------------------------------------------------
# Processes on loopback
# --------------------------------------------------------------------------------------------


class _Process:
    """A ``python -m tvm.exec.*`` subprocess, stopped on exit (its process group is killed)."""

    def __init__(self, args: list[str], name: str, env: dict[str, str] | None = None):
        self.args = [sys.executable, "-m", *args]
        self.name = name
        self.env = dict(env or {})
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
        self.proc = subprocess.Popen(
            self.args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,  # the server forks per session: kill the whole group
            env=env,
        )

    def _wait_ready(self, probe, timeout: float, what: str) -> None:
        """Poll ``probe()`` until it stops raising RPCTrackerError; fail if the process dies or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise self._fail("exited at start")
            try:
                probe()
                return
            except RPCTrackerError:
                time.sleep(0.2)
        raise self._fail(f"{what} within {timeout:.0f} s")

    def _fail(self, what: str) -> RPCTrackerError:
        err = ""
        if self.proc is not None and self.proc.poll() is not None and self.proc.stderr:
            err = self.proc.stderr.read().decode(errors="replace")[-2000:]
        self.stop()
        return RPCTrackerError(f"{self.name} ({' '.join(self.args[1:])}) {what}\n{err}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, 15)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, 9)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=5)
        if self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class RPCTrackerProcess(_Process):
    """``python -m tvm.exec.rpc_tracker`` on ``host:port`` (a free port when ``port`` is None)."""

    def __init__(self, *, host: str = "127.0.0.1", port: int | None = None):
        self.host = host
        self.port = port or free_port(host)
        super().__init__(
            ["tvm.exec.rpc_tracker", "--host", host, "--port", str(self.port),
             "--port-end", str(self.port + 1), "--silent"],
            "RPC tracker",
        )

    def start(self, *, timeout: float = 60.0) -> RPCTrackerProcess:
        """Start and wait until the tracker answers."""
        super().start()
        self._wait_ready(lambda: _tracker_summary(self.host, self.port, 5.0), timeout, "did not answer")
        return self

    def __enter__(self):
        return self.start() if self.proc is None else self


class RPCServerProcess(_Process):
    """``python -m tvm.exec.rpc_server`` registered with a tracker under ``key``.

    ``fork=False`` (``--no-fork``) serves each session from a freshly started process: a forked
    session inherits the server's CUDA state and fails with ``cudaErrorInitializationError``.
    ``device`` pins the server to one GPU (``CUDA_VISIBLE_DEVICES``): one server per card.
    """

    def __init__(self, *, tracker_host: str, tracker_port: int, key: str, host: str = "127.0.0.1",
                 fork: bool = False, device: str | None = None):
        self.tracker_host, self.tracker_port, self.key = tracker_host, tracker_port, key
        port = free_port(host)
        super().__init__(
            ["tvm.exec.rpc_server", "--tracker", f"{tracker_host}:{tracker_port}", "--key", key,
             "--host", host, "--port", str(port), "--port-end", str(port + 10), "--silent",
             *([] if fork else ["--no-fork"])],
            f"RPC server {key!r}" + (f" on GPU {device}" if device is not None else ""),
            env=None if device is None else {"CUDA_VISIBLE_DEVICES": str(device)},
        )

    def start(self, *, timeout: float = 60.0, wait: bool = True) -> RPCServerProcess:
        """Start and (with ``wait``) wait until the tracker lists this server as free."""
        super().start()
        if not wait:
            return self
        self._wait_ready(lambda: check_tracker(self.tracker_host, self.tracker_port, self.key, timeout=1.0),
                         timeout, "did not register with the tracker")
        return self

    def __enter__(self):
        return self.start() if self.proc is None else self


@dataclass
class LocalRPC:
    """A tracker plus ``n_servers`` servers; a context manager that stops them.

    ``devices`` (e.g. ``["0", "1"]``) starts one server per GPU, each seeing only its card
    (``CUDA_VISIBLE_DEVICES``), all under one key, so a ``tune --rpc-tracker`` measures on all of
    them in parallel (MetaSchedule's RPC runner with one worker per server). ``host`` is where the
    tracker and servers listen (``0.0.0.0`` to serve other machines).

    >>> with LocalRPC(key="cpu") as rpc:                  # doctest: +SKIP
    ...     runner = make_rpc_runner(rpc.host, rpc.port, rpc.key)
    """

    key: str = "local"
    n_servers: int = 1
    host: str = "127.0.0.1"
    port: int | None = None
    fork: bool = False
    devices: list[str] | None = None
    tracker: RPCTrackerProcess | None = field(default=None, init=False)
    servers: list = field(default_factory=list, init=False)

    def __enter__(self) -> LocalRPC:
        try:
            self.tracker = RPCTrackerProcess(host=self.host, port=self.port).start()
            self.port = self.tracker.port
            client = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
            devices = list(self.devices) if self.devices is not None else [None] * self.n_servers
            for device in devices:
                server = RPCServerProcess(
                    tracker_host=client, tracker_port=self.port, key=self.key, host=self.host,
                    fork=self.fork, device=device,
                )
                self.servers.append(server)
                server.start(wait=False)
            # all started in parallel; ready once the tracker lists every one as free
            deadline = time.monotonic() + 120
            while True:
                for server in self.servers:
                    if server.proc.poll() is not None:
                        raise server._fail("exited at start")  # pylint: disable=protected-access
                try:
                    free = int(check_tracker(client, self.port, self.key, timeout=1.0).get("free", 0))
                except RPCTrackerError:
                    free = 0
                if free >= len(self.servers):
                    break
                if time.monotonic() > deadline:
                    raise RPCTrackerError(f"only {free} of {len(self.servers)} RPC servers registered within 120 s")
                time.sleep(0.25)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Stop the servers, then the tracker."""
        for server in self.servers:
            server.stop()
        self.servers.clear()
        if self.tracker is not None:
            self.tracker.stop()
            self.tracker = None

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def address(self) -> str:
        """``HOST:PORT`` of the tracker (the ``--rpc-tracker`` value)."""
        return f"{self.host}:{self.port}"
