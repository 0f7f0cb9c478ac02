"""``atomic_path``: regular files are replaced by rename; symlinks, FIFOs and devices are written through."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import numpy as np
import pytest

from hafloc.fileio import atomic_path, write_target, write_text_atomic


def _read_fifo_in_thread(fifo: Path) -> tuple[threading.Thread, list[bytes]]:
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    return reader, got


def test_fifo_is_written_through_not_replaced(tmp_path):
    fifo = tmp_path / "out.json"
    os.mkfifo(fifo)
    reader, got = _read_fifo_in_thread(fifo)
    write_text_atomic(fifo, '{"x": 1}\n')
    reader.join(timeout=10)
    assert got == [b'{"x": 1}\n']
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]  # no temp file beside it


def test_fifo_gets_a_library_written_file_whole(tmp_path):
    """Libraries that write the temp path themselves (numpy here) work through a FIFO too."""
    fifo = tmp_path / "a.npy"
    os.mkfifo(fifo)
    reader, got = _read_fifo_in_thread(fifo)
    with atomic_path(fifo) as tmp:
        np.save(tmp, np.arange(5))
    reader.join(timeout=10)
    (tmp_path / "copy.npy").write_bytes(got[0])
    assert np.load(tmp_path / "copy.npy").tolist() == [0, 1, 2, 3, 4]


def test_symlink_target_changes_and_link_stays(tmp_path):
    (tmp_path / "results").mkdir()
    target = tmp_path / "results" / "today.json"
    target.write_text("old\n")
    link = tmp_path / "latest.json"
    link.symlink_to(Path("results") / "today.json")  # relative, resolved against the link's folder
    write_text_atomic(link, "new\n")
    assert link.is_symlink() and os.readlink(link) == str(Path("results") / "today.json")
    assert target.read_text() == "new\n"
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["today.json"]


def test_dangling_symlink_creates_its_target(tmp_path):
    link = tmp_path / "latest.json"
    link.symlink_to(tmp_path / "made.json")
    write_text_atomic(link, "made\n")
    assert link.is_symlink() and (tmp_path / "made.json").read_text() == "made\n"


def test_failed_write_through_a_symlink_keeps_the_old_target(tmp_path):
    target = tmp_path / "today.json"
    target.write_text("old\n")
    link = tmp_path / "latest.json"
    link.symlink_to(target)
    with pytest.raises(RuntimeError), atomic_path(link) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert target.read_text() == "old\n" and link.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "today.json"]


def test_dev_null_stays_a_device():
    write_text_atomic("/dev/null", "discarded\n")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_dev_stdout_is_the_open_file_not_its_name(tmp_path):
    """/dev/stdout -> /proc/self/fd/1 stands for an open file: written through, never resolved and replaced."""
    assert write_target(Path("/dev/stdout"))[1] is False
    assert write_target(Path("/dev/fd/1"))[1] is False
    assert write_target(tmp_path / "new.json") == (tmp_path / "new.json", True)


def test_os_lock_excludes_a_second_process_and_dies_with_its_holder(tmp_path):
    """A lock held by another process blocks; once that process is SIGKILLed (no cleanup runs) the
    lock is free at once, so a crashed writer never leaves the next one waiting."""
    import signal
    import subprocess
    import sys

    import filelock

    from hafloc.fileio import os_lock

    lock = tmp_path / "model.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from hafloc.fileio import os_lock; l = os_lock(sys.argv[1]); l.acquire();"
            " print('held', flush=True); time.sleep(60)",
            str(lock),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(filelock.Timeout):
            os_lock(lock).acquire(timeout=0.3)
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    with os_lock(lock).acquire(timeout=2):
        pass
