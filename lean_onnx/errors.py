"""Errors that the CLI turns into one `[E]` line and an exit code (DESIGN.md section 6)."""


class LeanOnnxError(Exception):
    """Bad usage or unreadable/invalid input: exit code 2."""

    exit_code = 2


class NothingToPrune(LeanOnnxError):
    """Every kernel is frozen or the model has no Conv at all: exit code 4."""

    exit_code = 4


class PeerFailed(LeanOnnxError):
    """Under torchrun, another process of the run failed or vanished (train/distributed.py): exit code 1."""

    exit_code = 1


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (at most 300 characters), for one-line errors."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
