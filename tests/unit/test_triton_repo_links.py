"""--triton-repo as operators set it up (issue 28, fault 8): a symbolic link to the real repository is followed, not
replaced; the repository root keeps its mode; a directory that is not a repository is refused before any work."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from lightkv_export import triton_repo
from tests.unit.test_triton_repo import MANIFESTS, fake_engine

ROOT = Path(__file__).resolve().parents[2]
NAME_A, NAME_B = (triton_repo.model_name(MANIFESTS[k]) for k in ("ort_cpu_lightkv", "ort_cpu_vanilla"))


def temporaries(*dirs: Path) -> list[Path]:
    """Stages, old copies, locks and probes the writer might leave beside a repository."""
    return sorted(p for d in dirs for p in d.iterdir() if p.name.startswith("."))


def test_a_symlinked_repository_is_updated_where_it_points(tmp_path):
    a = fake_engine(tmp_path / "e", MANIFESTS["ort_cpu_lightkv"])
    b = fake_engine(tmp_path / "e", MANIFESTS["ort_cpu_vanilla"])
    real = tmp_path / "volume" / "repo"  # e.g. on a mounted volume
    triton_repo.write_repository([a], real)
    links = tmp_path / "links"
    links.mkdir()
    (links / "hop").symlink_to(real)
    link = links / "repo"
    link.symlink_to(links / "hop")  # a chain of two links
    assert triton_repo.write_repository([b], link) == link
    assert link.is_symlink() and os.readlink(link) == str(links / "hop") and (links / "hop").is_symlink()
    assert triton_repo.repository_models(real) == [NAME_A, NAME_B]  # the real repository was updated, merged
    assert (real / NAME_B / "1" / "engine" / "onnx" / "prefill.onnx").read_bytes() == b"\x00" * 64
    assert temporaries(links, real.parent) == []  # no .partial-PID, lock or old copy beside the link or the target


def test_the_repository_root_keeps_its_mode(tmp_path):
    a = fake_engine(tmp_path / "e", MANIFESTS["ort_cpu_lightkv"])
    repo = triton_repo.write_repository([a], tmp_path / "repo")
    for mode in (0o2750, 0o700):  # setgid for a shared group, then private
        os.chmod(repo, mode)
        triton_repo.write_repository([a], repo)
        assert stat.S_IMODE(repo.stat().st_mode) == mode


@pytest.fixture()
def build_main(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    import build

    return build.main


def test_a_foreign_triton_repo_is_refused_before_any_work(build_main, tmp_path, capsys):
    foreign = tmp_path / "models"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    (tmp_path / "via-link").symlink_to(foreign)
    for given in (foreign, tmp_path / "via-link"):
        out = tmp_path / f"out-{given.name}"
        assert build_main(["--model", "tiny-qwen-vl", "--out", str(out), "--triton-repo", str(given)]) == 2
        message = " ".join(capsys.readouterr().err.split())
        assert f"--triton-repo {given}" in message and "not a model repository written by lightkv_export" in message
        assert "Choose a new or empty directory" in message and "Traceback" not in message
        assert list(out.iterdir()) == []  # refused before loading, exporting or building anything
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"] and (tmp_path / "via-link").is_symlink()


def test_empty_directories_and_our_repositories_pass_the_early_check(tmp_path):
    from lightkv_export.pipeline import check_triton_repo

    (tmp_path / "empty").mkdir()
    ours = triton_repo.write_repository([fake_engine(tmp_path / "e", MANIFESTS["ort_cpu_lightkv"])], tmp_path / "r")
    (tmp_path / "link").symlink_to(ours)
    for repo in (tmp_path / "empty", tmp_path / "new", ours, tmp_path / "link"):
        check_triton_repo(repo)
