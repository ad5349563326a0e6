"""Failures reported in their own words: a failed check request surfaces with its message, not as
`KeyError: 'ort-cpu'`; parity on a read-only engine is one clear message (issue 28)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lightkv_export import pipeline
from lightkv_export.config import BuildConfig
from tests.unit.test_reliability import leftovers, snapshot

pytestmark = pytest.mark.slow


def test_a_failed_check_request_surfaces_with_its_own_message(builds, engines_out, monkeypatch):
    builds("tiny-qwen-vl", 0.55)  # export cached: this build only transforms and writes the engine

    def refused(*args, **kwargs):
        raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : the session cannot run")

    monkeypatch.setattr(pipeline, "smoke_request", refused)
    result = pipeline.run(BuildConfig(model="tiny-qwen-vl", ratio=0.4, out=engines_out, parity=False))
    assert result.exit_code == 1 and "ort-cpu" not in result.engine_dirs
    expected = "the ort-cpu engine failed its check run (RuntimeError: [ONNXRuntimeError] : 6"
    with pytest.raises(KeyError) as lookup:  # what a test or a caller indexing the result meets
        result.engine_dirs["ort-cpu"]
    assert expected in str(lookup.value) and "nothing was replaced" in str(lookup.value)
    with pytest.raises(KeyError, match="the target failed"):
        result.parity["ort-cpu"]
    assert not (engines_out / "tiny-qwen-vl" / "r0.4" / "ort-cpu").exists() and leftovers(engines_out) == []


@contextlib.contextmanager
def read_only(directory: Path) -> Iterator[None]:
    """`directory` read-only for this process: mode 555 for a normal user, a read-only bind mount for root (whom
    modes do not stop); skips where neither holds."""
    mounted = False
    if os.geteuid() == 0:
        bind = subprocess.run(["mount", "--bind", str(directory), str(directory)], capture_output=True)
        if bind.returncode != 0:
            pytest.skip(f"cannot bind-mount here: {bind.stderr.decode().strip()}")
        mounted = True
        subprocess.run(["mount", "-o", "remount,bind,ro", str(directory)], check=False, capture_output=True)
    else:
        os.chmod(directory, 0o555)
    try:
        probe = directory / ".probe"
        try:
            probe.write_bytes(b"")
        except OSError:
            pass
        else:
            probe.unlink()
            pytest.skip("cannot make a directory read-only here")
        yield
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(directory)], check=False)
        else:
            os.chmod(directory, 0o755)


def test_parity_on_a_read_only_engine_is_one_message(builds, tmp_path):
    engine = tmp_path / "engine"
    shutil.copytree(builds("tiny-qwen-vl", 0.55).engine_dirs["ort-cpu"], engine)
    before = snapshot(engine)
    with read_only(engine):
        proc = subprocess.run(
            [sys.executable, "-m", "lightkv_export.parity", str(engine)], capture_output=True, text=True, timeout=300
        )
    message = " ".join(proc.stderr.split())
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"cannot write into the engine directory {engine}" in message and "was not run" in message
    assert "run parity on the copy" in message and "Traceback" not in proc.stderr
    assert snapshot(engine) == before
