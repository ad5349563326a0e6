"""export.run_exports: the vanilla graphs are exported in two processes (fork) for small models."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from lightkv_export.export import PARALLEL_EXPORT_MAX_BYTES, parallel_export_ok, run_exports


def test_every_job_runs_and_the_first_in_another_process(tmp_path: Path) -> None:
    def write(name: str):
        return lambda: (tmp_path / name).write_text(str(os.getpid()))

    run_exports([write("child"), write("a"), write("b")], parallel=True)
    pids = {p.name: int(p.read_text()) for p in tmp_path.iterdir()}
    assert pids["a"] == pids["b"] == os.getpid() != pids["child"]


def test_a_failing_child_is_reported_with_its_traceback() -> None:
    def broken() -> None:
        raise ValueError("the decode graph did not export")

    with pytest.raises(RuntimeError, match=r"(?s)second process failed.*ValueError: the decode graph did not export"):
        run_exports([broken, lambda: None], parallel=True)


def test_a_child_that_dies_without_a_report_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="exit code 3"):
        run_exports([lambda: os._exit(3), lambda: None], parallel=True)


def test_a_failure_here_stops_the_child_at_once() -> None:
    def interrupted() -> None:
        raise KeyboardInterrupt

    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_exports([lambda: time.sleep(60), interrupted], parallel=True)
    assert time.monotonic() - start < 30  # the sleeping child was killed, not waited for


def test_parallel_only_for_small_models(monkeypatch: pytest.MonkeyPatch) -> None:
    small = torch.nn.Linear(4, 4)
    assert parallel_export_ok(small) == ((os.cpu_count() or 1) >= 2)
    big = torch.nn.Linear(1, 1)
    big.weight = torch.nn.Parameter(torch.empty(PARALLEL_EXPORT_MAX_BYTES // 4 + 1, device="meta"))
    assert not parallel_export_ok(big)
    monkeypatch.setenv("LIGHTKV_EXPORT_PARALLEL", "0")
    assert not parallel_export_ok(small)
