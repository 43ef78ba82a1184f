"""Runs `python -m evolver_kernels.evolve` and kills itself with SIGKILL at a chosen point, as a crash would:

    python tests/kill_run.py evaluate N [RANK] -- <evolve arguments>   killed at Run.evaluate call N + 1
    python tests/kill_run.py save N [RANK] -- <evolve arguments>       killed right after checkpoint save N

With RANK, only that torchrun rank (the RANK variable) is killed; the others run on."""

import os
import signal
import sys


def main(argv: list[str]) -> int:
    point, limit, *rest = argv[: argv.index("--")]
    rank = rest[0] if rest else None
    from evolver_kernels.evolve import checkpoint, main, run

    owner, name = (run.Search, "evaluate") if point == "evaluate" else (checkpoint.Checkpoint, "save")
    original, calls = getattr(owner, name), [0]

    def wrapped(self, *args, **kw):
        mine = rank is None or os.environ.get("RANK") == rank
        if point == "evaluate":
            calls[0] += 1
            if mine and calls[0] > int(limit):
                os.kill(os.getpid(), signal.SIGKILL)
            return original(self, *args, **kw)
        result = original(self, *args, **kw)
        calls[0] += 1
        if mine and calls[0] == int(limit):
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(owner, name, wrapped)
    return main(argv[argv.index("--") + 1 :])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
