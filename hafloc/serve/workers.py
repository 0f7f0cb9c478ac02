"""Running the server: its listening socket, then one process or ``--workers N`` behind it.

``listen`` binds and listens before the model loads: a busy port is one line (exit 2) before
anything claims to be serving, and the port stays ours while the model loads (a connection in
that time waits in the backlog). uvicorn is handed that socket, for one process as for N.

Why uvicorn's own workers (``uvicorn.supervisors.Multiprocess`` with ``app_from_env`` as the factory):
the parent binds the port once and hands the socket to N spawned children, each of which calls
``app_from_env`` and so loads the model once and opens the index read-only; uvicorn's supervisor
(>= 0.30) restarts a worker that dies (and tries a rolling restart on SIGHUP: abandoned, old workers
kept, when a new one takes over 5 s to load its model). A spawned child cannot receive Python objects
from the CLI, so the settings travel in the environment variable ``HAFLOC_SERVE_SETTINGS`` (JSON;
children inherit the parent's environment, and nothing is written to disk). SO_REUSEPORT with one
``uvicorn.Server`` per process would balance as well, but needs its own supervisor, signal handling
and restart logic.

What N processes cost: each holds its own model and decode buffers (the default model: ~520 MB
resident with ONNX Runtime, docs/SCALING.md); the index's search structure is memory-mapped read-only
(``IndexStore.open(read_only=True)``), so its pages are shared through the page cache.

A worker killed mid-request (SIGKILL, the OOM killer) loses the requests it had accepted: the one it
was answering, those waiting for its inference thread and any sent on its open keep-alive connections
(their clients see the connection close without an answer). Connections not yet accepted wait in the
shared socket's backlog and go to the other workers, which keep answering; the supervisor notices the
death within 0.5 s and starts a replacement, serving once its model has loaded.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import signal
import socket
import sys
from typing import Any

from fastapi import FastAPI

from ..errors import HaflocError
from ..index.locator import LocatorConfig
from .app import create_app

ENV = "HAFLOC_SERVE_SETTINGS"
FACTORY = "hafloc.serve.workers:app_from_env"
BACKLOG = 2048  # uvicorn's default: connections the kernel queues before a process accepts them
STARTUP_FAILURE = 3  # uvicorn's exit status for "failed before serving": its supervisor stops, never restarts


def settings_json(index: str, locator_config: LocatorConfig, threads: int | None, **app_kwargs: Any) -> str:
    """What each worker needs to build its app: ``create_app``'s arguments, JSON."""
    return json.dumps(
        {
            "index": str(index),
            "locator_config": dataclasses.asdict(locator_config),
            "threads": threads,
            "app": app_kwargs,
        }
    )


def app_from_env() -> FastAPI:
    """The uvicorn app factory each worker process calls: ``create_app`` from ``HAFLOC_SERVE_SETTINGS``.

    A startup error (index or model gone since the parent checked) prints one line and exits with
    uvicorn's startup-failure status, so the supervisor stops instead of restarting it forever.
    """
    try:
        settings = json.loads(os.environ[ENV])
    except (KeyError, ValueError):
        print(
            f"hafloc: error: {FACTORY} is started by 'hafloc serve --workers N' ({ENV} missing or not JSON)",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(STARTUP_FAILURE)
    from ..descriptors.runtime import apply_threads
    from ..images.io import quiet_bomb_warning

    _die_with_parent()
    # process-wide settings the CLI makes in its own process: a spawned worker inherits neither
    apply_threads(settings["threads"])  # each worker its own share of the cores
    quiet_bomb_warning()
    try:
        return create_app(
            settings["index"], locator_config=LocatorConfig(**settings["locator_config"]), **settings["app"]
        )
    except HaflocError as err:
        print(f"hafloc: error: worker {os.getpid()}: {err}", file=sys.stderr, flush=True)
        sys.exit(STARTUP_FAILURE)


def _die_with_parent() -> None:
    """Linux: SIGTERM (a graceful stop) to this worker when its supervisor dies, even by SIGKILL;
    otherwise the orphaned workers would keep the port and a restarted service could not bind it."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the supervisor died before the call above
        os.kill(os.getpid(), signal.SIGTERM)


def threads_per_worker(workers: int, threads: int | None) -> int | None:
    """``--threads`` if given, else the cores shared out between the workers (None for one worker: all)."""
    from ..descriptors.runtime import default_threads

    if threads or workers == 1:
        return threads
    return max(1, default_threads() // workers)


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host``:``port`` and listening (as uvicorn binds: SO_REUSEADDR; IPv6 for a
    host with ':'), or a one-line ``HaflocError`` naming the address and the cause."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except (OSError, OverflowError) as err:
        sock.close()
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if getattr(err, "errno", None) == errno.EADDRINUSE:
            raise HaflocError(f"cannot listen on {where}: the port is already in use (choose another --port)") from None
        cause = getattr(err, "strerror", None) or str(err)
        raise HaflocError(f"cannot listen on {where}: {cause}") from None
    sock.set_inheritable(True)  # as uvicorn's own: the worker processes receive it
    return sock


def _config(app: Any, workers: int, **kwargs: Any):
    import uvicorn

    return uvicorn.Config(app, workers=workers, log_level="warning", backlog=BACKLOG, **kwargs)


def run_one(app: FastAPI, sock: socket.socket) -> int:
    """Serve ``app`` in this process on ``sock`` until interrupted (blocks); the exit status."""
    import uvicorn

    server = uvicorn.Server(_config(app, 1))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    return 0 if server.started else STARTUP_FAILURE


def run_workers(settings: str, sock: socket.socket, workers: int) -> int:
    """Serve with ``workers`` processes on ``sock`` until interrupted (blocks); the exit status."""
    from uvicorn.supervisors import Multiprocess

    os.environ[ENV] = settings  # inherited by the spawned workers
    # uvicorn's worker health-check timeout stays at its default (5 s): raising it (so that a SIGHUP
    # restart waits longer for a new worker's model) delayed the replacement of a killed worker by as
    # much, in uvicorn 0.54
    supervisor = Multiprocess(_config(FACTORY, workers, factory=True), sockets=[sock])
    try:
        supervisor.run()
    except KeyboardInterrupt:
        pass
    # a worker that failed to start (its one line is printed) stopped the supervisor: say so in the status
    return STARTUP_FAILURE if any(p.exitcode == STARTUP_FAILURE for p in supervisor.processes) else 0
