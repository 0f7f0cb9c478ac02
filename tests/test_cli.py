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
