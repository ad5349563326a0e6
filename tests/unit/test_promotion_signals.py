"""Ctrl-C and SIGTERM at the moment of promotion (issue 28, fault 5): the build ends with exit 130, either before the
atomic exchange with nothing replaced or after it with the complete new engine in place; never exit 0.

In-process tests drive artifacts.promote with real signals sent to this process; the end-to-end tests send real
signals to real build.py processes, one right after "done parity" and one while promote holds (the documented
testing hook LIGHTKV_TEST_HOLD_PROMOTION). Both builds reuse the session's cached export (conftest.builds).
"""

from __future__ import annotations

import gc
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lightkv_export import artifacts, interrupts
from lightkv_export.artifacts import is_locked, promote
from lightkv_export.integrity import verify_engine
from tests.unit.test_reliability import export_entry, leftovers, snapshot, wait_for

ROOT = Path(__file__).resolve().parents[2]
HOLD_PROMOTION = "LIGHTKV_TEST_HOLD_PROMOTION"  # artifacts.HOLD_PROMOTION, spelled out: the contract is the variable


def directory(path: Path, content: str) -> Path:
    path.mkdir(parents=True)
    (path / "file.txt").write_text(content)
    return path


def test_a_signal_during_the_exchange_takes_effect_after_it(tmp_path, monkeypatch):
    old, new = directory(tmp_path / "engine", "old"), directory(tmp_path / ".engine.partial-1", "new")
    exchange = artifacts._exchange

    def signalled_exchange(a: Path, b: Path) -> bool:
        os.kill(os.getpid(), signal.SIGINT)  # arrives between the checks and the rename
        return exchange(a, b)

    monkeypatch.setattr(artifacts, "_exchange", signalled_exchange)
    with pytest.raises(KeyboardInterrupt) as raised:
        promote(new, old)
    assert isinstance(raised.value, interrupts.Interrupted) and raised.value.replaced == [old]
    assert (old / "file.txt").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["engine"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # library use: the handler is restored


def test_a_sigterm_held_during_promotion_goes_to_the_previous_handler_afterwards(tmp_path):
    old, new = directory(tmp_path / "engine", "old"), directory(tmp_path / ".engine.partial-1", "new")
    got = []
    previous = signal.signal(signal.SIGTERM, lambda signum, _frame: got.append(signum))
    try:
        with interrupts.deferred(done=old):
            os.kill(os.getpid(), signal.SIGTERM)
            assert got == []  # held
            promote(new, old)
        assert got == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert (old / "file.txt").read_text() == "new"


class SignalsWhenCollected:
    """An object whose finalizer receives Ctrl-C: Python raises the KeyboardInterrupt inside it and discards it
    ("Exception ignored in ..."), as happened inside the gc.collect() that starts a build stage."""

    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):  # bytecode boundaries: the handler runs here, inside the finalizer
            pass


def test_a_signal_swallowed_by_a_finalizer_still_stops_the_promotion(tmp_path, capsys):
    old, new = directory(tmp_path / "engine", "old"), directory(tmp_path / ".engine.partial-1", "new")
    with interrupts.handling():  # what build.py installs
        cycle = SignalsWhenCollected()
        cycle.self = cycle
        del cycle
        gc.collect()  # KeyboardInterrupt raised in __del__ and swallowed: the build would go on
        assert interrupts.received() == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            promote(new, old)
    assert (old / "file.txt").read_text() == "old" and (new / "file.txt").read_text() == "new"
    assert "Exception ignored" not in capsys.readouterr().err  # recorded, so not printed as a lost traceback
    assert interrupts.received() is None  # handling() ended: a later build in this process starts afresh


# --- real builds, real signals -----------------------------------------------------------------------------------


@pytest.fixture()
def out_with_engine(builds, tmp_path) -> tuple[Path, Path]:
    """A build output holding the session's cached export and a previous r0.55 engine (copies: the session's own
    engines stay as they are)."""
    engine = builds("tiny-qwen-vl", 0.55).engine_dirs["ort-cpu"]
    entry = export_entry(engine)
    out = tmp_path / "out"
    shutil.copytree(entry, out / ".cache" / "export" / entry.name)
    previous = out / "tiny-qwen-vl" / "r0.55" / "ort-cpu"
    shutil.copytree(engine, previous)
    return out, previous


def start_build(out: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "build.py"), "--model", "tiny-qwen-vl", "--ratio", "0.55", "--out", str(out),
         *args], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )  # fmt: skip


@pytest.mark.slow
def test_ctrl_c_right_after_parity_exits_130_and_replaces_nothing(out_with_engine):
    """On main the signal landed in a finalizer run by the next stage's gc.collect(): the build printed
    "Exception ignored", promoted and exited 0."""
    out, previous = out_with_engine
    before = snapshot(previous)
    proc = start_build(out)
    wait_for(proc, "done parity")
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    message = " ".join(err.split())
    assert proc.returncode == 130, err[-3000:]
    assert "Exception ignored" not in err and "Traceback" not in err
    if "no engine was replaced" in message:  # the signal came before the exchange (the usual case)
        assert snapshot(previous) == before
    else:  # or during it: then the exchange completed, and the message says so
        assert f"after {previous} had been put in place" in message
        verify_engine(previous)
    assert leftovers(out) == [] and not is_locked(previous)


@pytest.mark.slow
def test_sigterm_during_promotion_exits_130_after_the_exchange(out_with_engine):
    out, previous = out_with_engine
    before = snapshot(previous)
    proc = start_build(out, "--no-parity", env={HOLD_PROMOTION: "3"})
    wait_for(proc, f"promoting {previous}")  # inside promote, before the exchange
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err[-3000:]
    assert f"interrupted (SIGTERM) after {previous} had been put in place" in " ".join(err.split())
    assert "Traceback" not in err
    after = snapshot(previous)
    assert after != before and "Parity was skipped" in (previous / "report.md").read_text()  # the new engine
    verify_engine(previous)  # complete: every file with its recorded SHA-256
    assert leftovers(out) == [] and not list(previous.parent.glob(".ort-cpu.old-*")) and not is_locked(previous)
