"""`python -m evolver_kernels.evolve`: the Evolver driver. cli (the command), run (the generation loop), config
(the options), inputs, memory_plan and placement (what a run needs, where), strategies, adaptation, offspring and
fitness (the algorithm), initial (the initial population), state and checkpoint (progress, resume), heldout
(held-out choice of the output), report (outputs); genome and recipe (--search recipe: CMA-ES over merge recipes)."""


def main(argv: list[str] | None = None) -> int:
    """The command's entry point (console script `evolver-evolve`)."""
    from evolver_kernels.evolve.cli import main as cli_main

    return cli_main(argv)
