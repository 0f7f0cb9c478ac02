"""Headless-browser harness for tests: Debian's /usr/bin/chromium driven by playwright.

Never downloads a browser. Typical use::

    reason = browser_available()
    if reason: pytest.skip(reason)
    with open_page(path_or_url) as (page, console_errors, failed_requests):
        assert images_loaded(page) == []
        screenshot(page, tmp_path / "shot.png")
    assert not console_errors and not failed_requests
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]

CHROMIUM = os.environ.get("HAFLOC_CHROMIUM", "/usr/bin/chromium")
LAUNCH_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


def browser_available() -> str | None:
    """None when the harness can run, else the reason it cannot (for ``pytest.skip``)."""
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)) and not shutil.which(CHROMIUM):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as e:
        return f"playwright (python) is not installed: {e}"
    return None


def to_url(target: str | Path) -> str:
    """``file://`` URL for a local path; URLs (http://, file://, data:) pass through."""
    s = str(target)
    if "://" in s or s.startswith(("data:", "about:")):
        return s
    return Path(s).resolve().as_uri()


@contextlib.contextmanager
def open_page(
    url: str | Path,
    viewport: tuple[int, int] = (1280, 900),
    timeout_ms: int = 20000,
    wait_until: str = "load",
    requests: list[str] | None = None,
) -> Iterator[tuple[object, list[str], list[str]]]:
    """Open ``url`` (or a local path) in headless Chromium; yield ``(page, console_errors, failed_requests)``.

    ``console_errors`` collects console messages of type "error" and uncaught page exceptions;
    ``failed_requests`` collects requests that failed at the network level and responses with an
    HTTP status >= 400, as "STATUS URL" / "FAILED URL (reason)". Both lists keep filling while
    the caller uses the page. For file:// pages a missing file shows up as a failed request.
    ``requests``, when given, receives the URL of every request the page makes (to check it stays offline).
    """
    from playwright.sync_api import sync_playwright

    console_errors: list[str] = []
    failed_requests: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=LAUNCH_ARGS)
        try:
            context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]})
            page = context.new_page()
            page.set_default_timeout(timeout_ms)
            page.on(
                "console", lambda m: console_errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None
            )
            if requests is not None:
                page.on("request", lambda r: requests.append(r.url))
            page.on("pageerror", lambda exc: console_errors.append(f"pageerror: {exc}"))
            page.on("requestfailed", lambda r: failed_requests.append(f"FAILED {r.url} ({r.failure})"))
            page.on("response", lambda r: failed_requests.append(f"{r.status} {r.url}") if r.status >= 400 else None)
            page.goto(to_url(url), wait_until=wait_until, timeout=timeout_ms)
            yield page, console_errors, failed_requests
        finally:
            browser.close()


def images_loaded(page) -> list[str]:
    """The ``src`` of every ``<img>`` on the page that did not load (empty list = all loaded).

    An image counts as loaded when it is complete and has ``naturalWidth > 0``; waits for pending
    images first so a slow decode is not reported as broken.
    """
    page.wait_for_function("Array.from(document.images).every(i => i.complete)")
    return page.evaluate("Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)")


def image_count(page) -> int:
    return int(page.evaluate("document.images.length"))


def screenshot(page, path: str | Path, full_page: bool = True) -> Path:
    """Save a PNG screenshot of the page (the whole scroll height by default)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=full_page)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(url: str, timeout: float = 5) -> dict:
    """GET URL/health on a new connection (so any of several worker processes may answer it)."""
    import json

    req = urllib.request.Request(url + "/health", headers={"Connection": "close"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def wait_for_pids(
    url: str, n: int, timeout: float = 60, exclude: "set[int] | frozenset[int]" = frozenset()
) -> set[int]:
    """The pids answering URL/health, polled on new connections until ``n`` distinct ones (not in
    ``exclude``) have answered; RuntimeError after ``timeout`` seconds."""
    seen: set[int] = set()
    deadline = time.monotonic() + timeout
    while len(seen - set(exclude)) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only pids {sorted(seen)} answered {url}/health within {timeout:g} s")
        try:
            seen.add(int(health(url, timeout=2)["pid"]))
        except OSError:
            time.sleep(0.1)
    return seen - set(exclude)


@contextlib.contextmanager
def hafloc_server(
    index: str | Path,
    *extra: str,
    port: int | None = None,
    timeout: float = 60,
    workers: int = 1,
    log: str | Path | None = None,
    backend: str | None = "torch",
) -> Iterator[str]:
    """``hafloc serve --index INDEX`` as a real uvicorn process on a loopback port: yields its base URL.

    ``backend``: the ``--backend`` it runs (None: the server's default).
    ``workers`` > 1: ``--workers N``, and waits until N distinct worker pids have answered /health.
    RuntimeError when it exits or does not answer /health within ``timeout`` seconds; the process
    (and so its workers) is stopped on the way out. ``log``: a file that receives what the server and
    its workers print (stdout and stderr), for the caller to read while it runs.
    """
    port = port or free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if workers > 1:
        extra = ("--workers", str(workers), *extra)
    logfile = open(log, "wb") if log is not None else None
    if backend is not None:
        extra = ("--backend", backend, *extra)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hafloc",
            "serve",
            "--index",
            str(index),
            "--port",
            str(port),
            *extra,
        ],
        stdout=logfile if logfile is not None else subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                printed = Path(log).read_bytes() if log is not None else proc.stdout.read()
                raise RuntimeError(f"server exited: {printed.decode()[-2000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server did not start within {timeout:g} s") from None
                time.sleep(0.2)
        if workers > 1:
            wait_for_pids(url, workers, timeout=max(1.0, deadline - time.monotonic()))
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if logfile is not None:
            logfile.close()
