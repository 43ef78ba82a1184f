"""The one error type a user can cause: bad options, bad files, a refused output directory.

Every message names the option, file or model at fault and fits on one line; the CLIs print it as
`error: <message>` and exit with code 2. Library functions raise it (or ValueError / TypeError naming their
own arguments); nothing a user can reach should end in a traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """Input that cannot work; the message names the culprit."""


def describe_error(err: BaseException, resumable: bool = False) -> str:
    """One line for the CLIs' `error:` output. An OSError from the system is said with its file; a full disk
    says what to do (with resumable, that the checkpoint survives)."""
    import errno

    if isinstance(err, OSError) and err.errno is not None and err.strerror:
        where = f": {err.filename}" if err.filename else ""
        text = f"{err.strerror}{where}"
        if err.errno == errno.ENOSPC:
            text += ("; free some space and rerun with --resume (the last checkpoint is intact)" if resumable
                     else "; free some space and run again")
        return text
    return " ".join(str(err).split()) or type(err).__name__
