"""Build artifacts on disk, the bottom layer: digests, engine manifests and their verification, locks, copies,
and staging (write under a temporary name, verify, then promote in one rename).

The rules every writer follows:
* A directory is written complete under a hidden temporary sibling (`.<name>.partial-<pid>`), checked, and only
  then put in place by one atomic exchange (renameat2 RENAME_EXCHANGE; two renames where the kernel lacks it).
  Until that moment an existing directory of the same name stays byte-for-byte as it was.
* Temporary siblings are created only while holding the lock of what they will become, so a temporary directory
  whose lock can be taken belongs to a build that died (SIGKILL, power loss): the next build removes it.
* Files are never hard-linked between engines, caches and repositories: a copy (a reflink where the file system
  can share blocks copy-on-write) so that writing through one path never changes another.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import json
import os
import shutil
import stat
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from lightkv_export import interrupts
from lightkv_export.errors import InputError

MANIFEST = "manifest.json"
PROCESSOR_DIR = "processor"  # the checkpoint's tokenizer and image processor files, inside every engine
WEIGHTS_FILE = "weights.bin"  # an ort-cpu engine's weights, each distinct tensor once (passes/share_weights.py)
# 2: files (SHA-256) and file_sizes (bytes) cover every file the engine runs from; 3: MANIFEST_DIGEST covers the
# manifest itself, and the prefill graph records its schedule (contract.ENGINE_META_KEY)
MANIFEST_FORMAT = 4
MANIFEST_DIGEST = "manifest_digest"  # the manifest's own record: a SHA-256 per top-level field (`manifest_digest`)
MANIFEST_REBUILD = "Rebuild the engine with build.py (or put back the manifest.json the build wrote)."
PARTIAL = ".partial-"
LOCK_SUFFIX = ".lock"


# --- digests ----------------------------------------------------------------------------------------------------


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def graph_digest(path: Path) -> str:
    """SHA-256 of a graph file and, for large models, its external data file."""
    data = path.with_name(path.name + ".data")
    digest = file_digest(path)
    return digest if not data.exists() else hashlib.sha256((digest + file_digest(data)).encode()).hexdigest()


def file_records(directory: Path) -> dict[str, dict[str, Any]]:
    """{"files": {relative path: SHA-256}, "file_sizes": {relative path: bytes}} of every file under `directory`."""
    paths = [p for p in sorted(directory.rglob("*")) if p.is_file()]
    names = [p.relative_to(directory).as_posix() for p in paths]
    return {
        "files": {n: file_digest(p) for n, p in zip(names, paths, strict=True)},
        "file_sizes": {n: p.stat().st_size for n, p in zip(names, paths, strict=True)},
    }


# --- manifests and verification ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReferenceRequest:
    """What the engine promises for the reference request, one image of `Manifest.image_size` and the reference
    prompt (parity checks it)."""

    prompt: str
    seq_len: int
    vision_tokens: int
    image_layouts: list  # per image, its ImageLayout's JSON form (method/spans.py): grids and fixed runs
    kv_lengths: list[int]  # per layer: the KV cache's sequence length after LightKV
    vision_tokens_per_layer: list[int]
    kv_bytes_per_layer: list[int]
    kv_bytes_vanilla_per_layer: list[int]


@dataclass(frozen=True)
class Manifest:
    """manifest.json, typed: what an engine was built from and with, what it promises, and its files.

    The JSON is this dataclass's fields by name; a target's own records (TensorRT's engines and profiles ...) ride
    in `extra` as top-level keys. Readers get attributes, and a manifest that lacks a field or gives it the wrong
    type is refused when read (`from_json`), never half-used.
    """

    format: int
    model: str  # the registry key, hub id or checkpoint path it was built from
    model_dir: str  # OUT/<model_dir>/<tag>/<target>, and the export cache's prefix
    model_source: str  # what `load_model` reloads it from (parity, tools)
    family: str
    random_weights: bool
    vanilla: bool
    ratio: float | None
    schedule: str  # Schedule's string form; "" for vanilla
    retention: float
    positions: str  # "preserve" | "official"
    grid_mode: str
    image_size: list[int]  # (height, width) of the reference request's image as sent (and TensorRT's opt point)
    vision_inputs: dict[str, list[int]]  # the vision graph's inputs: name -> shape, -1 where any size is taken
    num_layers: int
    hidden_size: int
    num_kv_heads: int
    head_dim: int
    num_attention_heads: int
    intermediate_size: int
    vocab_size: int
    image_token_id: int
    position_scheme: str  # models/positions.py SCHEMES
    eos_token_ids: list[int]
    max_new_tokens_limit: int
    export_key: str
    reference_request: ReferenceRequest
    versions: dict[str, str]
    created: str
    dtype: str
    notes: list[str] = field(default_factory=list)
    max_image_pixels: int | None = None  # a cap on each processed image below the processor's (--max-image-pixels)
    target: str = ""  # set by the target that builds the engine
    weight_bytes: int = 0  # the weights the engine holds at run time, all its sessions together (0: not recorded)
    files: dict[str, str] = field(default_factory=dict)  # relative path -> SHA-256
    file_sizes: dict[str, int] = field(default_factory=dict)  # relative path -> bytes
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        record = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("extra", "reference_request")}
        return {**record, "reference_request": asdict(self.reference_request), **self.extra}

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str = MANIFEST) -> Manifest:
        """The typed manifest of a JSON object; an InputError naming what is missing or mistyped."""
        rebuild = f"{source} was written by an older lightkv_export or edited; rebuild the engine with build.py."
        known = {f.name: f for f in fields(cls)}
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        missing = [name for name in required if name not in data]
        if missing:
            raise InputError(f"{source} lacks {', '.join(missing)}. {rebuild}")
        ref = data["reference_request"]
        ref_fields = [f.name for f in fields(ReferenceRequest)]
        if not isinstance(ref, dict) or any(name not in ref for name in ref_fields):
            raise InputError(f"{source}: reference_request must hold {', '.join(ref_fields)}. {rebuild}")
        values = {k: v for k, v in data.items() if k in known and k not in ("extra", "reference_request")}
        for name, value in values.items():
            if not _json_type_ok(value, known[name].type):
                raise InputError(f"{source}: {name} is {value!r}, expected {known[name].type}. {rebuild}")
        extra = {k: v for k, v in data.items() if k not in known and k != MANIFEST_DIGEST}  # the digest: not content
        reference = ReferenceRequest(**{k: ref[k] for k in ref_fields})
        return cls(**values, reference_request=reference, extra=extra)


def _json_type_ok(value: Any, annotation: str) -> bool:
    """Whether a JSON value fits a field's annotation (as a string: `from __future__ import annotations`)."""
    base = annotation.split("[")[0].split("|")[0].strip()
    if value is None:
        return "None" in annotation
    checks = {"int": int, "float": (int, float), "str": str, "bool": bool, "list": list, "dict": dict}
    expected = checks.get(base)
    if expected is None:
        return True
    if base in ("int", "float") and isinstance(value, bool):
        return False
    return isinstance(value, expected)


def read_manifest_json(directory: Path) -> dict[str, Any]:
    """manifest.json as a JSON object, or an InputError that says why the directory is not an engine."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise InputError(
            f"{directory} is not an engine directory (no {MANIFEST}); build one with "
            "`python build.py --model tiny-qwen-vl --ratio 0.55`."
        )
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not valid JSON ({exc}); rebuild the engine with build.py.") from None
    if not isinstance(manifest, dict):
        raise InputError(f"{path} is not a JSON object; rebuild the engine with build.py.")
    return manifest


def read_manifest(directory: Path) -> Manifest:
    """The engine's typed manifest (files not checked: `verify_engine` does that)."""
    return Manifest.from_json(read_manifest_json(directory), str(Path(directory) / MANIFEST))


def canonical_json(value: Any) -> bytes:
    """A JSON value as one byte string whatever the file's layout (key order, indentation, escapes): what the
    manifest's digest hashes, so rewriting the file in another layout is not an edit."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def manifest_digest(record: dict[str, Any]) -> dict[str, Any]:
    """The digest of a manifest's JSON object (every top-level key but MANIFEST_DIGEST): the SHA-256 of each
    field's canonical JSON ("fields"), so that a mismatch names the field, and the SHA-256 of those ("sha256"), so
    that an edit of the digest itself is told apart from an edit of a field.

    It has no key: it tells an edited manifest from the one the build wrote (a hand edit, a field added or removed,
    a bad merge), not a forged one. What a forger cannot change consistently is checked against the graphs
    (integrity.py)."""
    per_field = {k: hashlib.sha256(canonical_json(v)).hexdigest() for k, v in sorted(record.items())}
    per_field.pop(MANIFEST_DIGEST, None)
    return {"fields": per_field, "sha256": hashlib.sha256(canonical_json(per_field)).hexdigest()}


def check_manifest_digest(record: dict[str, Any], source: str = MANIFEST) -> None:
    """An InputError naming every field of `record` (a manifest's JSON object) that was changed, added or removed
    since `write_manifest` wrote it, or naming MANIFEST_DIGEST when the digest is missing or was edited itself."""
    rebuild = MANIFEST_REBUILD
    digest = record.get(MANIFEST_DIGEST)
    if digest is None:
        raise InputError(f"{source} has no {MANIFEST_DIGEST} (written before manifests recorded one). {rebuild}")
    per_field = digest.get("fields") if isinstance(digest, dict) else None
    well_formed = isinstance(per_field, dict) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in per_field.items()
    )
    if not well_formed or digest.get("sha256") != hashlib.sha256(canonical_json(per_field)).hexdigest():
        raise InputError(
            f"{source}: {MANIFEST_DIGEST} was edited (it is not the digest the build wrote: expected "
            '{"fields": {field: SHA-256}, "sha256": SHA-256 of the fields\' digests}), so nothing in the manifest can '
            f"be trusted. {rebuild}"
        )
    now = manifest_digest(record)["fields"]
    changed = [k for k in sorted(set(now) & set(per_field)) if now[k] != per_field[k]]
    added, removed = sorted(set(now) - set(per_field)), sorted(set(per_field) - set(now))
    what = [f"field {k} was changed (to {shown(record[k])})" for k in changed]
    what += [f"field {k} was added ({shown(record[k])})" for k in added] + [f"field {k} was removed" for k in removed]
    if what:
        raise InputError(
            f"{source}: {'; '.join(what)} after the build: the manifest no longer matches the {MANIFEST_DIGEST} "
            f"recorded when the engine was written. {rebuild}"
        )


def shown(value: Any, limit: int = 80) -> str:
    """A value as the manifest writes it (JSON), cut to `limit` characters: how messages quote a field."""
    text = json.dumps(value, default=repr)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def write_manifest(directory: Path, manifest: Manifest) -> Manifest:
    """manifest.json with the SHA-256 and size of every file already in `directory` (what the engine runs from),
    sealed with its own digest (`manifest_digest`)."""
    records = file_records(directory)
    manifest = replace(manifest, files=records["files"], file_sizes=records["file_sizes"])
    record = manifest.to_json()
    record[MANIFEST_DIGEST] = manifest_digest(record)
    write_text_atomic(directory / MANIFEST, json.dumps(record, indent=2) + "\n")
    return manifest


def enclosing_engine(path: Path) -> Path | None:
    """The nearest of `path` and its parents that holds a manifest.json (an engine directory), or None."""
    path = Path(path).resolve()
    return next((p for p in (path, *path.parents) if (p / MANIFEST).is_file()), None)


# --- copies -----------------------------------------------------------------------------------------------------

FICLONE = 0x40049409  # linux/fs.h: share the source's blocks copy-on-write (btrfs, XFS, overlayfs on those)


def clone_file(src: Path, dst: Path) -> None:
    """An independent copy of `src` at `dst`: a reflink where the file system offers one, else a full copy.
    Never a hard link: writing one must not change the other."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        try:
            fcntl.ioctl(fout.fileno(), FICLONE, fin.fileno())
        except OSError:
            shutil.copyfileobj(fin, fout, 1 << 24)
    shutil.copystat(src, dst)


def clone_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, copy_function=lambda a, b: clone_file(Path(a), Path(b)))


def write_text_atomic(path: Path, text: str) -> None:
    """Write a sibling temporary file, fsync it, then rename it over `path`: a full disk or a kill leaves the
    old file (or none), never a truncated one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        # Cleanup must not hide the error that brought us here (on a read-only file system unlink fails too).
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


# --- locks ------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def locked(target: Path, *, what: str, log: Callable[[str], None] = lambda m: None) -> Iterator[None]:
    """Hold an exclusive flock on `<target>.lock` (hidden sibling); wait for another holder, saying so.

    flock belongs to the open file: it goes away with the process however it ends (kill -9 included), and is
    not inherited by spawned children.
    """
    lock = lock_path(target)
    lock.parent.mkdir(parents=True, exist_ok=True)
    waited = None
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            log(f"waiting for another build (pid {holder}) that holds {what} ({lock}) ...")
            waited = waited or time.monotonic()
            fcntl.flock(fd, fcntl.LOCK_EX)
        if _same_file(fd, lock):
            break
        os.close(fd)  # the holder removed that lock file as it let go: lock the one at the path now
    if waited is not None:
        log(f"got {what} after {time.monotonic() - waited:.1f} s")
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        # Removed while still held, so no build is left behind a lock file; a waiter that opened it re-opens.
        with contextlib.suppress(FileNotFoundError):
            if _same_file(fd, lock):
                lock.unlink()
        os.close(fd)  # releases the lock


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def lock_path(target: Path) -> Path:
    return target.with_name(f".{target.name}{LOCK_SUFFIX}")


def is_locked(target: Path) -> bool:
    """Whether a live process holds `target`'s lock right now."""
    lock = lock_path(target)
    if not lock.exists():
        return False
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


# --- staging and promotion --------------------------------------------------------------------------------------


def partial_name(destination: Path) -> Path:
    return destination.with_name(f".{destination.name}{PARTIAL}{os.getpid()}")


def remove_stale_partials(destination: Path) -> list[Path]:
    """Remove the temporary siblings of `destination` left by builds that died. Call with its lock held."""
    stale = sorted(destination.parent.glob(f".{destination.name}{PARTIAL}*"))
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def remove_stale_under(out: Path, cache: str) -> list[Path]:
    """Temporary directories in a build output (OUT/<model>/<tag>/.<target>.partial-*, the export cache's
    .<model>-<key>.partial-*) whose owner's lock is free: the build that made them is gone. `cache` is the export
    cache's path relative to OUT; its `<key>.tmp` directories were left by versions before locking."""
    removed = []
    candidates = [*Path(out).glob(f"*/*/.*{PARTIAL}*"), *Path(out, cache).glob(f".*{PARTIAL}*")]
    for path in sorted(candidates):
        name = path.name[1:].rsplit(PARTIAL, 1)[0]
        if path.is_dir() and not is_locked(path.with_name(name)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    for path in sorted(Path(out, cache).glob("*.tmp")):
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EXDEV, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def follow_link(path: Path) -> Path:
    """`path`, or where it points when it is a symbolic link (chains followed): a directory reached through a link
    is written where it really is, beside its real self, and the link stays a link. Parents may be links: a
    temporary sibling then lands in the link's target directory, on the same file system, as a rename needs."""
    path = Path(path)
    return Path(os.path.realpath(path)) if path.is_symlink() else path


HOLD_PROMOTION = "LIGHTKV_TEST_HOLD_PROMOTION"  # testing hook: seconds to wait inside promote, signals held


def promote(staged: Path, destination: Path) -> None:
    """Put the complete directory `staged` at `destination` in one step; the previous one is then removed.

    With an existing destination the two are exchanged atomically, so every reader sees either the old or the
    new directory, never a mix or nothing. The new directory takes the old one's permission bits (an operator's
    chmod of a repository or engine survives rebuilds).

    SIGINT / SIGTERM: one received before (even if a finalizer swallowed its KeyboardInterrupt) stops here with
    nothing replaced; one that arrives during the exchange takes effect right after it, as
    interrupts.Interrupted naming `destination`. The testing hook LIGHTKV_TEST_HOLD_PROMOTION=SECONDS prints
    "promoting DESTINATION" to stderr and waits that long inside, before the exchange, so that a test can send a
    signal at that moment."""
    if destination.is_symlink():  # an exchange would replace the link itself; callers follow it (follow_link)
        raise InputError(f"{destination} is a symbolic link: write to {follow_link(destination)} instead.")
    interrupts.check()
    with interrupts.deferred(done=destination):
        hold = os.environ.get(HOLD_PROMOTION)
        if hold:
            print(f"promoting {destination} (holding {hold} s: {HOLD_PROMOTION})", file=sys.stderr, flush=True)
            time.sleep(float(hold))
        _promote(staged, destination)


def _promote(staged: Path, destination: Path) -> None:
    if destination.exists():
        os.chmod(staged, stat.S_IMODE(destination.stat().st_mode))
    if destination.exists() and _exchange(staged, destination):
        shutil.rmtree(staged)  # now the old directory
        return
    if destination.exists():  # no atomic exchange here: the old one steps aside for the shortest moment
        old = destination.with_name(f".{destination.name}.old-{os.getpid()}")
        destination.rename(old)
        try:
            staged.rename(destination)
        except BaseException:
            old.rename(destination)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return
    staged.rename(destination)


@contextlib.contextmanager
def staging(destination: Path) -> Iterator[Path]:
    """A fresh temporary sibling of `destination` that is removed unless the caller promoted it. Hold the
    destination's lock around it."""
    tmp = partial_name(destination)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    finally:
        with interrupts.deferred():  # a second Ctrl-C must not leave half of it behind
            shutil.rmtree(tmp, ignore_errors=True)
