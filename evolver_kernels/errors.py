"""The one error type a user can cause: bad options, bad files, a refused output directory.

Every message names the option, file or model at fault and fits on one line; the CLIs print it as
`error: <message>` and exit with code 2. Library functions raise it (or ValueError / TypeError naming their
own arguments); nothing a user can reach should end in a traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """Input that cannot work; the message names the culprit."""


class ArgumentError(UserError):
    """A library function's argument that cannot work: `arg` is the argument's name, `detail` the rest of the
    message. It reads `<arg> <detail>`; a CLI says it with its own flag for the argument (`as_flag`)."""

    def __init__(self, arg: str, detail: str):
        super().__init__(f"{arg} {detail}")
        self.arg, self.detail = arg, detail

    def as_flag(self, flags: dict[str, str]) -> str:
        """The message with the argument named by its flag (flags: argument name -> flag), when there is one."""
        return f"{flags[self.arg]} {self.detail}" if self.arg in flags else str(self)


def describe_error(err: BaseException, resumable: bool = False, flags: dict[str, str] | None = None) -> str:
    """One line for the CLIs' `error:` output. An ArgumentError names the CLI's flag (flags: argument name ->
    flag); an OSError from the system is said with its file; a full disk says what to do (with resumable, that
    the checkpoint survives)."""
    import errno

    if isinstance(err, ArgumentError) and flags:
        return " ".join(err.as_flag(flags).split())

    if isinstance(err, OSError) and err.errno is not None and err.strerror:
        where = f": {err.filename}" if err.filename else ""
        text = f"{err.strerror}{where}"
        if err.errno == errno.ENOSPC:
            text += (
                "; free some space and rerun with --resume (the last checkpoint is intact)"
                if resumable
                else "; free some space and run again"
            )
        return text
    return " ".join(str(err).split()) or type(err).__name__
