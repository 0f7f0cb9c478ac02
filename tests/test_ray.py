"""``--ray``: extraction and index building on a two-node Ray cluster started here, against the
single-process build of the same real photos (descriptors, rows, positions), through a killed
worker and a killed driver."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from test_cli_index import REPO, _committed, make_photo_db, make_small_model

pytest.importorskip("ray")

FAST = ("--backend", "torch", "--no-progress", "--no-calibrate", "--threads", "1")  # actors run 1 thread each:
# the reference too (torch's reductions differ in the last bits with the thread count)
# The test cluster's own token (Ray's token authentication), never the one in ~/.ray of this machine's user
AUTH = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
ENV = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0", **AUTH}


def ray_cmd(*args: str) -> list[str]:
    return [sys.executable, "-c", "from ray.scripts.scripts import main; main()", *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def session_pids(sid: int, title: str = "") -> list[int]:
    """Processes of session ``sid`` (a node's daemons, and the workers its raylet starts, each in a
    process group of its own) whose command line starts with ``title`` (Ray names actors 'ray::CLASS')."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if os.getsid(int(d.name)) == sid and (d / "cmdline").read_bytes().split(b"\0")[0].decode(
                errors="replace"
            ).startswith(title):
                out.append(int(d.name))
        except (OSError, ProcessLookupError):
            continue
    return out


def stop_session(sid: int) -> None:
    """Stop every process of session ``sid`` (what one 'ray start' started), never another's ('ray stop' would
    stop every Ray on the machine)."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
        for pid in session_pids(sid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and session_pids(sid):
            time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster():
    """A head node and a second node, 1 CPU each, in a private temp folder; stopped at the end."""
    temp = Path(tempfile.mkdtemp(prefix="hr-", dir="/tmp"))  # short: Ray's socket paths must fit in 107 bytes
    port = free_port()
    from ray._private.services import get_node_ip_address

    address = f"{get_node_ip_address()}:{port}"
    common = ("--num-cpus", "1", "--disable-usage-stats", "--include-log-monitor", "false")
    nodes: list[subprocess.Popen] = []
    try:
        for args in (
            ("--head", "--port", str(port), "--include-dashboard", "false", "--temp-dir", str(temp / "h")),
            ("--address", address, "--temp-dir", str(temp / "w")),
        ):
            p = subprocess.Popen(
                ray_cmd("start", *args, *common),
                start_new_session=True,
                env=ENV,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            nodes.append(p)
            out = p.communicate(timeout=120)[0].decode(errors="replace")
            assert p.returncode == 0, out[-3000:]
        yield {"address": address, "sessions": [p.pid for p in nodes]}
    finally:
        for p in reversed(nodes):
            stop_session(p.pid)  # start_new_session: the session id is the pid of 'ray start'
        import shutil

        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory, shared_data) -> dict:
    root = tmp_path_factory.mktemp("ray")
    d = make_photo_db(shared_data / "landmarks_mini" / "images", root, n=23)
    d["model"] = make_small_model(sorted(d["db"].glob("*.jpg")), root / "small.model")
    (d["db"] / "broken.jpg").write_bytes(b"\xff\xd8 not really a JPEG")  # skipped and reported by every build
    d["root"] = root
    return d


def build_cmd(d: dict, idx: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "hafloc",
        "index",
        "build",
        str(d["db"]),
        "--model",
        str(d["model"]),
        "--index",
        str(idx),
        "--positions",
        str(d["csv"]),
        "--chunk-size",
        "2",
        "--batch-size",
        "2",
        *FAST,
        *extra,
    ]


@pytest.fixture(scope="module")
def reference(data) -> Path:
    """The single-process build (no Ray)."""
    idx = data["root"] / "reference"
    r = subprocess.run(build_cmd(data, idx), capture_output=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    return idx


def rows(idx: Path) -> list[tuple]:
    with sqlite3.connect(idx / "meta.sqlite") as db:
        return db.execute(
            "SELECT id, path, lat, lon, easting, northing, position_source, chunk, row, sha1 FROM images ORDER BY id"
        ).fetchall()


def assert_same_index(idx: Path, ref: Path, layout: bool = True) -> None:
    """Same images, positions, hashes and descriptors (1e-5) as ``ref``; with ``layout`` also the same
    ids, chunks and rows (committed in the same order; a resumed build chunks the rest anew)."""
    from hafloc.index.store import IndexStore

    if layout:
        assert rows(idx) == rows(ref)
    else:
        assert [r[1:7] + r[9:] for r in rows(idx)] == [r[1:7] + r[9:] for r in rows(ref)]
    with IndexStore.open(idx) as a, IndexStore.open(ref) as b:
        _, names_a, desc_a = a.descriptors()
        _, names_b, desc_b = b.descriptors()
        assert names_a == names_b and len(set(names_a)) == len(names_a)
        np.testing.assert_allclose(desc_a, desc_b, atol=1e-5)
        assert len(a.search(desc_a[0], k=len(names_a))) == len(names_a)


def test_two_node_build_equals_single_process(cluster, data, reference, tmp_path):
    idx = tmp_path / "ray"
    r = subprocess.run(build_cmd(data, idx, "--ray", cluster["address"]), capture_output=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    assert_same_index(idx, reference)
    assert "skipped 1 of 24 file(s)" in r.stderr.decode() and "broken.jpg" in r.stderr.decode()


def test_worker_killed_midway_is_survived(cluster, data, reference, tmp_path):
    idx = tmp_path / "ray"
    proc = subprocess.Popen(
        build_cmd(data, idx, "--ray", cluster["address"]), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV
    )
    killed = []
    deadline = time.monotonic() + 240
    while not killed and proc.poll() is None and time.monotonic() < deadline:
        if _committed(idx) >= 2:  # checkpoint: the first chunk is committed, the actors are working
            for g in cluster["sessions"]:
                killed += session_pids(g, "ray::Describer")[:1]
            if killed:
                os.kill(killed[0], signal.SIGKILL)
        time.sleep(0.01)
    assert killed, (
        f"no actor process found to kill: {proc.stderr.read().decode()[-2000:] if proc.poll() is not None else ''}"
    )
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-3000:]
    assert_same_index(idx, reference)


def test_driver_killed_then_rerun_completes_without_duplicates(cluster, data, reference, tmp_path):
    idx = tmp_path / "ray"
    cmd = build_cmd(data, idx, "--ray", cluster["address"])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    deadline = time.monotonic() + 240
    while _committed(idx) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, f"build ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)  # right after its first committed chunk
    proc.wait(timeout=30)
    partial = _committed(idx)
    assert 2 <= partial < len(data["names"]), partial
    r = subprocess.run(cmd, capture_output=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    assert f"already indexed {partial}" in r.stdout.decode()
    assert_same_index(idx, reference, layout=False)


def test_extract_on_cluster_equals_single_process(cluster, data, tmp_path):
    base = [
        sys.executable,
        "-m",
        "hafloc",
        "extract",
        "--model",
        str(data["model"]),
        str(data["db"]),
        "--backend",
        "torch",
        "--no-progress",
        "--threads",
        "1",
    ]
    outs = []
    for name, extra in (("one.npz", ()), ("ray.npz", ("--ray", cluster["address"]))):
        r = subprocess.run([*base, "--output", str(tmp_path / name), *extra], capture_output=True, env=ENV, timeout=300)
        assert r.returncode == 0, r.stderr.decode()[-3000:]
        outs.append(np.load(tmp_path / name))
    assert outs[0]["names"].tolist() == outs[1]["names"].tolist() and len(outs[0]["names"]) == len(data["names"])
    np.testing.assert_allclose(outs[0]["descriptors"], outs[1]["descriptors"], atol=1e-5)


def test_unreachable_cluster_is_one_line_error(data, tmp_path):
    r = subprocess.run(
        build_cmd(data, tmp_path / "idx", "--ray", f"127.0.0.1:{free_port()}"),
        capture_output=True,
        env=ENV,
        timeout=120,
    )
    err = r.stderr.decode().strip()
    assert r.returncode == 2 and "Traceback" not in err, err
    assert "no Ray cluster reachable" in err and len(err.splitlines()) == 1, err


def test_ray_not_installed_is_one_line_error(data, tmp_path):
    argv = build_cmd(data, tmp_path / "idx", "--ray")[3:]
    code = f"import sys; sys.modules['ray'] = None; from hafloc.cli import main; sys.exit(main({argv!r}))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, env=ENV, timeout=120)
    err = r.stderr.decode().strip()
    assert r.returncode == 2 and len(err.splitlines()) == 1 and "pip install 'hafloc[ray]'" in err, err


CHECK = """
import sys
from hafloc.descriptors.modelfile import load_model
from hafloc.errors import HaflocError
from hafloc.index.distributed import DescribeSpec, RayPool

address, model, missing, *present = sys.argv[1:]
spec = DescribeSpec(model, load_model(model).fingerprint(), backend="torch")
with RayPool(spec, address) as pool:
    assert len(pool.actors) == 2, pool.actors  # one per node (1 CPU each)
    infos = pool.check(present)
    assert sorted(i["host"] for i in infos) and all(i["missing"] is None for i in infos), infos
    try:
        pool.check([missing])
    except HaflocError as err:
        print(err)
"""


def test_images_missing_on_workers_is_one_line_error(cluster, data, tmp_path):
    # the nodes here share this machine's filesystem: a path that exists nowhere stands in for an
    # image the workers cannot see
    missing = str(tmp_path / "elsewhere" / "photo.jpg")
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            CHECK,
            cluster["address"],
            str(data["model"]),
            missing,
            *map(str, sorted(data["db"].glob("*.jpg"))),
        ],
        capture_output=True,
        env=ENV,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    msg = r.stdout.decode().strip()
    assert msg.startswith(missing) and "shared filesystem" in msg and len(msg.splitlines()) == 1, msg


def test_local_features_go_through_the_cluster(cluster, data, tmp_path):
    local = ("--local", "xfeat", "--max-keypoints", "64", "--local-max-side", "160")
    idx = {}
    for name, extra in (("one", ()), ("ray", ("--ray", cluster["address"]))):
        idx[name] = tmp_path / name
        r = subprocess.run(build_cmd(data, idx[name], *local, *extra), capture_output=True, env=ENV, timeout=300)
        assert r.returncode == 0, r.stderr.decode()[-3000:]
    assert rows(idx["ray"]) == rows(idx["one"])
    from hafloc.index.store import IndexStore

    with IndexStore.open(idx["ray"]) as a, IndexStore.open(idx["one"]) as b:
        ids = [r[0] for r in rows(idx["one"])]
        fa, fb = a.local_features(ids), b.local_features(ids)
        assert set(fa) == set(fb) == set(ids)
        for i in ids:
            assert len(fa[i].keypoints) > 0
            np.testing.assert_allclose(fa[i].keypoints, fb[i].keypoints, atol=1e-3)
            np.testing.assert_allclose(fa[i].descriptors, fb[i].descriptors, atol=1e-3)


def test_no_ray_import_without_flag(data, tmp_path):
    code = (
        "import sys; from hafloc.cli import main; "
        f"rc = main({[a for a in build_cmd(data, tmp_path / 'idx')[3:]]!r}); "
        "assert rc == 0, rc; assert 'ray' not in sys.modules, 'ray imported'; print('ok')"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, env=ENV, timeout=300)
    assert r.returncode == 0 and r.stdout.decode().strip().endswith("ok"), r.stderr.decode()[-2000:]
