"""``hafloc serve --workers N``: real worker processes over one read-only index of real photos.

One two-worker server for the module (the last test kills one of its workers); the reference
answers come from the same app in this process (what ``--workers 1`` runs).
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import filelock
import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from hafloc.cli import main
from hafloc.errors import HaflocError
from hafloc.index.store import LOCK_NAME, IndexStore
from test_cli_index import make_photo_db, make_small_model
from test_extract import _png_header

try:
    import browser
except ImportError:  # run from the repo root as a package
    from tests import browser

REPO = Path(__file__).resolve().parents[1]
N_QUERIES = 4


@pytest.fixture(scope="module")
def data(tmp_path_factory, shared_data) -> dict:
    root = tmp_path_factory.mktemp("serve_workers")
    d = make_photo_db(shared_data / "landmarks_mini" / "images", root)
    d["model"] = make_small_model(sorted(d["db"].glob("*.jpg")), root / "small.model")
    d["index"] = root / "index"
    assert (
        main(
            [
                "index",
                "build",
                str(d["db"]),
                "--model",
                str(d["model"]),
                "--index",
                str(d["index"]),
                "--positions",
                str(d["csv"]),
                "--backend",
                "torch",
                "--no-progress",
                "--no-calibrate",
            ]
        )
        == 0
    )
    # photos a concurrent writer adds: a second folder of real photos (GPS in their EXIF)
    d["more"] = root / "more"
    d["more"].mkdir()
    for p in sorted((shared_data / "lund_gps" / "images").glob("*.jpg"))[:6]:
        shutil.copy(p, d["more"] / p.name)
    return d


@pytest.fixture(scope="module")
def reference(data) -> dict[str, dict]:
    """One process's answers (the app ``--workers 1`` serves), by photo name."""
    from hafloc.serve.app import create_app

    out = {}
    with TestClient(create_app(data["index"], backend="torch")) as c:
        for name in data["names"][:N_QUERIES]:
            r = c.post("/locate", files={"file": (name, (data["db"] / name).read_bytes(), "image/jpeg")})
            assert r.status_code == 200, r.text
            out[name] = r.json()["results"][0]
    return out


@pytest.fixture(scope="module")
def workers_log(tmp_path_factory) -> Path:
    """What the server and its workers print (stdout and stderr)."""
    return tmp_path_factory.mktemp("serve_workers_log") / "server.log"


@pytest.fixture(scope="module")
def workers(data, workers_log):
    with browser.hafloc_server(data["index"], workers=2, timeout=180, log=workers_log) as url:
        yield url


def _locate(url: str, path: Path) -> httpx.Response:
    # a new connection per request: the kernel hands it to whichever worker accepts first
    with httpx.Client(base_url=url, timeout=120, headers={"Connection": "close"}) as c:
        return c.post("/locate", files={"file": (path.name, path.read_bytes(), "image/jpeg")})


def _same_answer(got: dict, want: dict) -> None:
    """Equal up to float rounding (worker processes run torch with fewer threads)."""
    assert got["image"] == want["image"]
    assert [m["id"] for m in got["matches"]] == [m["id"] for m in want["matches"]]
    np.testing.assert_allclose(
        [m["similarity"] for m in got["matches"]], [m["similarity"] for m in want["matches"]], atol=1e-4
    )
    assert (got["estimate"] is None) == (want["estimate"] is None)
    if want["estimate"] is not None:
        assert got["estimate"]["lat"] == pytest.approx(want["estimate"]["lat"], abs=1e-7)
        assert got["estimate"]["lon"] == pytest.approx(want["estimate"]["lon"], abs=1e-7)
    assert "attention" not in got and "attention" not in want  # overlays only with ?attention=1


def test_workers_answer_concurrent_requests_like_one_process(workers, data, reference):
    names = list(reference) * 3
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda n: _locate(workers, data["db"] / n), names))
    for name, r in zip(names, responses):
        assert r.status_code == 200, r.text
        _same_answer(r.json()["results"][0], reference[name])
    # several processes answer on the one port, each reporting the same index
    pids = browser.wait_for_pids(workers, 2, timeout=30)
    assert len(pids) == 2 and os.getpid() not in pids
    assert {browser.health(workers)["images"] for _ in range(4)} == {len(data["names"])}


def test_security_caps_hold_in_every_worker(workers, data):
    with httpx.Client(base_url=workers, timeout=60, headers={"Connection": "close"}) as c:
        for _ in range(4):  # new connections: both workers get some
            big = b"\xff\xd8" + b"0" * (21 * 2**20)  # over the default 20 MB upload cap
            assert c.post("/locate", files={"file": ("big.jpg", big, "image/jpeg")}).status_code == 413
            assert c.get("/thumbnails/%2e%2e%2f%2e%2e%2fetc%2fpasswd").status_code == 404


def _lock_owner_pid(index: Path) -> int | None:
    try:
        return int(json.loads((index / (LOCK_NAME + ".owner")).read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return None


def test_concurrent_index_add_neither_blocks_nor_breaks_the_workers(workers, data, reference):
    index, more = data["index"], data["more"]
    n_before = len(data["names"])
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hafloc",
            "index",
            "add",
            str(more),
            "--index",
            str(index),
            "--backend",
            "torch",
            "--chunk-size",
            "1",
            "--no-progress",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        deadline = time.monotonic() + 120
        while _lock_owner_pid(index) != proc.pid:  # the writer has taken the lock
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "the writer never took the lock"
            time.sleep(0.05)
        answered_while_locked = 0
        name = next(iter(reference))
        while proc.poll() is None:
            r = _locate(workers, data["db"] / name)
            assert r.status_code == 200, r.text
            assert r.json()["results"][0]["matches"][0]["image"] == name
            answered_while_locked += proc.poll() is None
        out = proc.stdout.read().decode()
        assert proc.returncode == 0, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert answered_while_locked >= 1  # the servers answered while `index add` held the write lock
    # once the writer has finished, every worker serves the new state: the added photos are found
    n_after = n_before + len(list(more.glob("*.jpg")))
    seen = set()
    deadline = time.monotonic() + 30
    while len(seen) < 2 and time.monotonic() < deadline:
        h = browser.health(workers)
        assert h["images"] == n_after
        seen.add(h["pid"])
    assert len(seen) == 2
    added = sorted(more.glob("*.jpg"))[3]
    for _ in range(4):
        r = _locate(workers, added)
        assert r.status_code == 200 and r.json()["results"][0]["matches"][0]["image"] == added.name


def test_workers_option_is_checked_and_explained(data, capsys):
    assert main(["serve", "--index", str(data["index"]), "--workers", "0"]) == 2
    assert "--workers must be 1 or more" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split()).replace("- ", "-")  # argparse wraps at hyphens
    assert "each worker loads its own copy of the model" in out and "memory-mapped" in out


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # the reference, in this process
def test_decompression_bombs_get_the_single_process_answer_in_every_worker(workers, workers_log, data):
    """Pillow's DecompressionBombWarning (89-179 MP) and DecompressionBombError (above): the 413 of one
    process, and no warning printed by a worker (a spawned worker inherits no warning filter)."""
    from hafloc.serve.app import create_app

    bombs = {"warns.png": _png_header(10_000, 10_000), "errors.png": _png_header(20_000, 20_000)}
    with TestClient(create_app(data["index"], backend="torch")) as c:  # what --workers 1 answers
        want = {n: c.post("/locate", files={"file": (n, b, "image/png")}).json() for n, b in bombs.items()}
    assert want["warns.png"]["detail"] == "warns.png: image too large (10000x10000 = 100.0 MP; the limit is 40 MP)"
    assert want["errors.png"]["detail"].startswith("errors.png: image too large (Image size (400000000 pixels)")
    printed = workers_log.stat().st_size
    with httpx.Client(base_url=workers, timeout=60, headers={"Connection": "close"}) as c:
        for _ in range(4):  # new connections: both workers get some
            for name, bomb in bombs.items():
                r = c.post("/locate", files={"file": (name, bomb, "image/png")})
                assert r.status_code == 413 and r.json() == want[name]
        assert c.get("/health").status_code == 200
    with open(workers_log, "rb") as f:
        f.seek(printed)
        assert f.read().decode(errors="replace") == ""  # no warning, no traceback


def _multipart(name: str, data: bytes) -> tuple[bytes, str]:
    boundary = "hafloc-test-boundary"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n\r\n'.encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_a_worker_killed_mid_request_loses_that_request_only(workers, data, reference):
    """SIGKILL to the worker holding a half-sent upload: that request is lost (its connection closes
    without an answer, as docs/SCALING.md says), every other request is answered by the other worker,
    and uvicorn's supervisor (>= 0.30) starts a replacement."""
    before = browser.wait_for_pids(workers, 2, timeout=30)
    conn = http.client.HTTPConnection(workers.removeprefix("http://"), timeout=60)
    conn.request("GET", "/health")  # a keep-alive connection: the worker that accepted it answers
    victim = json.loads(conn.getresponse().read())["pid"]
    name = next(iter(reference))
    body, ctype = _multipart(name, (data["db"] / name).read_bytes())
    conn.putrequest("POST", "/locate")
    conn.putheader("Content-Type", ctype)
    conn.putheader("Content-Length", str(len(body)))
    conn.endheaders()
    conn.send(body[: len(body) // 2])  # the victim is now reading this upload
    os.kill(victim, signal.SIGKILL)
    with pytest.raises(ConnectionError):  # reset or closed without a response: this request is lost
        conn.send(body[len(body) // 2 :])
        conn.getresponse()
    conn.close()
    for _ in range(4):  # the survivor answers at once, every request
        r = _locate(workers, data["db"] / name)
        assert r.status_code == 200 and r.json()["results"][0]["matches"][0]["image"] == name
    replacement = browser.wait_for_pids(workers, 1, timeout=120, exclude=before)
    assert replacement and victim not in replacement
    for _ in range(4):  # and the two serve on
        assert _locate(workers, data["db"] / name).status_code == 200


def test_read_only_store_never_takes_the_lock_nor_writes(data, tmp_path):
    index = tmp_path / "index"
    shutil.copytree(data["index"], index)
    for p in index.glob("search*"):  # no saved search structure: a server must build one in memory
        p.unlink()
    with IndexStore.open(index) as writer:
        q = writer.descriptors()[2][:2]
    owner = (index / (LOCK_NAME + ".owner")).read_bytes()
    held = filelock.FileLock(str(index / LOCK_NAME))
    held.acquire(timeout=0)  # a writer holds the lock throughout
    try:
        with IndexStore.open(index, read_only=True) as store:
            matches = store.search(q, 3)  # answers at once, never waiting for the lock
            assert [m[0].id for m in matches] == [1, 2]
            with pytest.raises(HaflocError, match="read-only"):
                store.set_position([1], 10.0, 10.0)
    finally:
        held.release()
    with IndexStore.open(index, read_only=True) as store:  # lock free: still nothing written
        store.search(q, 3)
    assert not list(index.glob("search*"))  # a writer's job, even with the lock free
    assert (index / (LOCK_NAME + ".owner")).read_bytes() == owner


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_workers_stop_when_their_supervisor_is_killed(workers):
    """No orphan keeps serving (and holding the port) after ``kill -9`` of the parent. Runs last."""
    pids = browser.wait_for_pids(workers, 2, timeout=60)
    parents = {_parent(p) for p in pids}
    assert len(parents) == 1 and os.getpid() not in parents
    os.kill(parents.pop(), signal.SIGKILL)
    deadline = time.monotonic() + 30
    while any(_running(p) for p in pids):
        assert time.monotonic() < deadline, f"workers {[p for p in pids if _running(p)]} outlived their parent"
        time.sleep(0.1)
