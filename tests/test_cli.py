"""The ``hafloc`` entry point as a user runs it: a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from hafloc.descriptors.modelfile import save_model
from hafloc.descriptors.network import GeoLocNet, ModelConfig


@pytest.fixture(scope="module")
def gem_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "gem.model"
    save_model(GeoLocNet(ModelConfig.for_method("gem"), pretrained=False).eval(), path)
    return path


def test_closed_pipe_ends_quietly(gem_model):
    """``hafloc model info M | head -0``: the reader is gone before we write; no BrokenPipeError traceback."""
    r, w = os.pipe()
    os.close(r)  # any write to w now fails with EPIPE, whatever the pipe's buffer size
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "hafloc", "model", "info", str(gem_model), "--json"],
            stdout=w,
            stderr=subprocess.PIPE,
            timeout=120,
        )
    finally:
        os.close(w)
    assert proc.stderr.decode() == "" and proc.returncode == 141  # 128 + SIGPIPE, as a shell reports it


def test_pipe_into_head_keeps_the_first_line(gem_model):
    proc = subprocess.run(
        f"'{sys.executable}' -m hafloc model info '{gem_model}' | head -1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.stdout.split(":")[0].strip() == "file" and proc.stderr == "", proc.stderr


def test_version():
    proc = subprocess.run([sys.executable, "-m", "hafloc", "--version"], capture_output=True, text=True, timeout=120)
    from hafloc import __version__

    assert proc.returncode == 0 and proc.stdout == f"hafloc {__version__}\n", proc.stderr


def test_model_init_defaults_to_haf_and_takes_no_progress(tmp_path, shared_data):
    """As the README shows it: no --method gives HAF; --no-progress leaves stderr without bars."""
    photos = sorted((shared_data / "lund_gps" / "images").glob("*.jpg"))[:4]
    out = tmp_path / "tiny.model"
    argv = ["model", "init", "--images", *map(str, photos), "--output", str(out), "--no-progress"]
    argv += ["--clusters", "4", "--proj-dim", "16", "--max-side", "96", "--dim", "2"]
    proc = subprocess.run([sys.executable, "-m", "hafloc", *argv], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"wrote {out}: haf on ") and "img/s" not in proc.stderr and "%|" not in proc.stderr
    from hafloc.descriptors.modelfile import model_info

    assert model_info(out)["method"] == "haf"
