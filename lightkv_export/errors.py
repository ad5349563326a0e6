"""User-facing errors: each says what was wrong, what was expected and what to do next.

The CLI prints these as one message with no traceback; anything else is a bug and keeps its traceback.
"""


class LightKVError(Exception):
    """Base class for errors caused by user input or the environment, not by a bug."""

    exit_code = 2


class InputError(LightKVError, ValueError):
    """Bad argument: unknown key, unreachable ratio, malformed schedule, inconsistent spans."""


class ModelNotFoundError(LightKVError, FileNotFoundError):
    """A checkpoint that is not on disk (no network here: it must be downloaded beforehand)."""


class VerificationError(LightKVError):
    """A built engine failed its check (parity with the gate on, or a real request through it): it was not
    promoted, and the engine that was there before is untouched."""

    exit_code = 1
