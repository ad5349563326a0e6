"""Ctrl-C and SIGTERM during a build: never lost, never cutting a promotion in half.

Python runs a signal's handler in the main thread at the next bytecode boundary, wherever that is. When it falls
inside a finalizer or a weakref callback (a `gc.collect()` between build stages runs many), the KeyboardInterrupt
the handler raises is printed as "Exception ignored in ..." and discarded: the build went on, promoted its engine
and exited 0 (issue 28, fault 5). So the build's handler (`handling`, installed by build.py) also *records* the
signal, and the build checks that record (`check`) between stages and before it replaces anything.

`deferred()` holds signals for a few statements that must not be cut in half, such as the exchange that puts a
new directory in place (artifacts.promote): a signal that arrives inside is recorded, and takes effect as a
KeyboardInterrupt (`Interrupted`) as soon as the block has completed. Blocking the signal with pthread_sigmask would
not do: the kernel hands a process-directed signal to any thread that does not block it (ONNX Runtime's and
torch's workers), and Python then runs the handler in the main thread all the same.

Outside build.py (library use, tests), `deferred()` installs a recording handler for its own duration, in the main
thread, and afterwards hands a held signal to the handler that was there before (SIG_DFL: the signal is sent
again, so it ends the process as it would have).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)

_received: signal.Signals | None = None  # the first signal the handler got and the build has not finished with
_depth = 0  # nesting of deferred() blocks: the handler records but does not raise while > 0


class Interrupted(KeyboardInterrupt):
    """A build stopped by a signal. `replaced`: the directories it had already put in place, complete (a signal
    that arrives during a promotion takes effect once the exchange is done); empty when nothing was replaced."""

    def __init__(self, signal_name: str, replaced: Sequence[Path] = ()) -> None:
        super().__init__(signal_name)
        self.signal_name, self.replaced = signal_name, list(replaced)


def _record(signum: int, _frame: object) -> None:
    global _received
    name = signal.Signals(signum)
    _received = _received or name
    if _depth == 0:
        raise KeyboardInterrupt(name.name)


def received() -> signal.Signals | None:
    """The signal the build's handler got, if any (acted on or not)."""
    return _received


def check() -> None:
    """Raise KeyboardInterrupt if a signal was received: one whose KeyboardInterrupt a finalizer swallowed would
    otherwise go unnoticed. Call it where stopping is safe (between stages, before replacing anything)."""
    if _received is not None and _depth == 0:
        raise Interrupted(_received.name)


def _unraisable(previous: Any) -> Any:
    def hook(args: Any) -> None:
        # A KeyboardInterrupt raised inside a finalizer: already recorded by _record and acted on at the next
        # check(), so not printed as an "Exception ignored" traceback.
        if isinstance(args.exc_value, KeyboardInterrupt) and _received is not None:
            return
        previous(args)

    return hook


@contextlib.contextmanager
def handling() -> Iterator[None]:
    """For the duration (build.py's main): SIGINT and SIGTERM raise KeyboardInterrupt and are recorded."""
    global _received
    _received = None
    previous = {s: signal.signal(s, _record) for s in SIGNALS}
    previous_hook = sys.unraisablehook
    sys.unraisablehook = _unraisable(previous_hook)
    try:
        yield
    finally:
        sys.unraisablehook = previous_hook
        for s, handler in previous.items():
            signal.signal(s, handler)
        _received = None  # a later build in this process (tests call build.main) starts afresh


@contextlib.contextmanager
def deferred(done: Path | None = None) -> Iterator[None]:
    """Hold SIGINT and SIGTERM while the block runs; one that arrived takes effect right after it completes, as
    Interrupted(replaced=[done]) (`done`: what the block put in place). If the block raises, its exception goes on
    and the signal stays recorded (received()) for the caller."""
    global _depth, _received
    main = threading.current_thread() is threading.main_thread()
    current = [signal.getsignal(s) for s in SIGNALS]
    ours = all(h is _record for h in current)
    previous, saved = None, _received
    # Library use: record for this block only, then hand the signal on (a handler installed outside Python reads
    # as None and could not be put back: then the block runs as it is).
    if main and not ours and None not in current:
        previous = {s: signal.signal(s, _record) for s in SIGNALS}
        _received = None
    before = _received
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        got = _received if _received is not before else None
        if previous is not None:
            for s, handler in previous.items():
                signal.signal(s, handler)
            _received = saved
    if got is None or _depth > 0:
        return
    replaced = [done] if done is not None else []
    handler = previous[got] if previous is not None else _record
    if handler in (_record, signal.default_int_handler):
        raise Interrupted(got.name, replaced)
    if handler == signal.SIG_DFL:
        os.kill(os.getpid(), got)  # what the signal would have done (ends the process), now that it is safe
    elif callable(handler):
        handler(got, None)
