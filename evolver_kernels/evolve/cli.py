"""The command `python -m evolver_kernels.evolve` (console script `evolver-evolve`): parse the options, run,
report errors in one line (naming the flag), and leave through Run.close on Ctrl-C or SIGTERM."""

from __future__ import annotations

import sys

from evolver_kernels.distributed import leave, process_group_up
from evolver_kernels.errors import describe_error
from evolver_kernels.evolve.config import parse_config
from evolver_kernels.evolve.recipe import RecipeRun
from evolver_kernels.evolve.run import Run
from evolver_kernels.evolve.startup import dry_run

# the library's argument names (errors.ArgumentError) as this command's flags
FLAGS = {
    "model_dir": "--models",
    "path": "--dev",
    "task": "--task",
    "metric": "--metric",
    "tier": "--population-on",
    "disk_dir": "--population-dir",
    "device_map": "--device-map",
    "select_fraction": "--select-fraction",
}


def main(argv: list[str] | None = None) -> int:
    import signal
    import threading

    # SIGTERM (torchrun stopping the other ranks when one fails, a scheduler's kill) ends the run as Ctrl-C does:
    # through Run.close, so its scratch directories and shared memory are removed
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        return _main(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None) -> int:
    run = None
    try:
        cfg = parse_config(argv)
        if cfg.dry_run:
            dry_run(cfg, log=lambda msg: print(msg, file=sys.stderr))
            print("dry run: inputs checked, nothing evolved")
            return 0
        search = RecipeRun if cfg.search == "recipe" else Run
        run = search(cfg, log=lambda msg: print(msg, file=sys.stderr))
        result = run.run()
    except (ValueError, FileNotFoundError, NotImplementedError, OSError) as err:
        print(f"error: {describe_error(err, resumable=True, flags=FLAGS)}", file=sys.stderr)
        if process_group_up():
            # a rank refusing its inputs: leave with the error's code, not through the teardown that can
            # abort with gloo's threads running (Ranks.exit); no barrier, the other ranks may not get there
            leave(2)
        return 2
    except KeyboardInterrupt:
        # Run.close has run (lock dropped, scratch removed); the checkpoint is written atomically after every
        # evaluation, so the run continues from it
        print(
            f"interrupted: continue with the same command and --resume (the checkpoint in {cfg.out} is intact)"
            if run is not None
            else "interrupted before any work",
            file=sys.stderr,
        )
        if process_group_up():
            leave(130)
        return 130
    if result.get("final_fitness") is not None:  # rank 0 reports for every rank
        print(f"final_fitness {result['final_fitness']:.6f}")
    if run.ranks.enabled:
        run.ranks.exit(0)  # every rank, after rank 0 has written the outputs; does not return
    return 0


def _terminated(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")
